"""The policy interface every driver implements (expert, baselines, learned models, external).

A policy receives an ``Observation`` for a batch of B scenarios and returns a ``PolicyOutput``:
a 64-step plan at 10 Hz (6.4 s) in the scenario frame and, optionally, the (acceleration,
curvature) controls that produce it and a reasoning text per scenario.

    class MyPolicy(Policy):
        name = "mine"
        def act(self, obs: Observation) -> PolicyOutput:
            ...  # obs.state is the ground-truth SimState; obs.ego_history_* the last 16 poses
            return PolicyOutput(plan_xy=..., plan_yaw=..., reasoning=["..."] * B)

If ``controls`` is given the simulator executes them directly (open loop between replans);
otherwise the tracking controller follows ``plan_xy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roadloop.errors import ConfigError, ControlError
from roadloop.sim.datatypes import SimState

PLAN_STEPS = 64  # 6.4 s at 10 Hz
HISTORY_STEPS = 16  # past ego poses given to the policy (1.6 s at 10 Hz)


@dataclass(frozen=True, eq=False)
class Observation:
    """What a policy sees at a decision step."""

    state: SimState  # full ground truth (privileged policies read it; learned ones render from it)
    ego_history_xy: torch.Tensor  # (B, 16, 2) m, past ego positions, oldest first, last = now
    ego_history_yaw: torch.Tensor  # (B, 16) rad
    ego_history_speed: torch.Tensor  # (B, 16) m/s
    step: int  # simulator step index
    recent: tuple[SimState, ...] = ()  # the last states at 10 Hz, oldest first, last = ``state`` (up to 16)

    @property
    def batch_size(self) -> int:
        return self.state.batch_size


@dataclass(frozen=True, eq=False)
class PolicyOutput:
    plan_xy: torch.Tensor  # (B, 64, 2) m, scenario frame, poses at t + 0.1 s ... t + 6.4 s
    plan_yaw: torch.Tensor | None = None  # (B, 64) rad
    plan_speed: torch.Tensor | None = None  # (B, 64) m/s
    controls: torch.Tensor | None = None  # (B, 64, 2) acceleration m/s^2, curvature 1/m
    reasoning: list[str] | None = None  # one Chain-of-Causation text per scenario
    logp: torch.Tensor | None = None  # (B,) log-probability of the sampled output (learned policies)

    def check(self, batch_size: int) -> torch.Tensor:
        """Validate shapes; return a (B,) bool mask of rows that contain NaN/inf.

        Raises ``ControlError`` for a plan of the wrong shape (a policy bug for the whole batch).
        """
        want = (batch_size, PLAN_STEPS, 2)
        if not isinstance(self.plan_xy, torch.Tensor) or tuple(self.plan_xy.shape) != want:
            got = tuple(self.plan_xy.shape) if isinstance(self.plan_xy, torch.Tensor) else type(self.plan_xy)
            raise ControlError(f"policy plan_xy must have shape {want} (64 waypoints at 10 Hz), got {got}")
        bad = ~torch.isfinite(self.plan_xy).all(-1).all(-1)
        if self.controls is not None:
            if tuple(self.controls.shape) != want:
                raise ControlError(f"policy controls must have shape {want}, got {tuple(self.controls.shape)}")
            bad |= ~torch.isfinite(self.controls).all(-1).all(-1)
        if self.reasoning is not None and len(self.reasoning) != batch_size:
            raise ControlError(f"policy returned {len(self.reasoning)} reasoning texts for {batch_size} scenarios")
        return bad


class Policy:
    """Base class.  Subclasses set ``name`` and implement ``act``; ``reset`` is optional."""

    name: str = "policy"
    version: str = "0"
    replan_every: int = 1  # preferred decision period in 0.1 s steps (evaluation default)
    writes_coc: bool = False  # its reasoning is Chain-of-Causation text, graded for grounding and consistency
    # it draws nothing at random (``reset`` ignores the seeds): a scenario's rollout is the same for every seed, so
    # an evaluation over several seeds drives it once (``roadloop.registry.matrix.evaluate_matrix``)
    seed_independent: bool = False
    # what ``get_policy`` builds this policy from again (a registered name, a checkpoint folder, a registry
    # reference), recorded with every evaluated rollout so ``roadloop replay`` can drive it again; None: unknown
    source: str | None = None

    def settings(self) -> dict:
        """Settings beyond ``name`` and ``version`` that change its rollouts (a learned policy's decoding),
        recorded with every evaluated rollout and set again by ``roadloop replay``.  Default: none."""
        return {}

    def apply_settings(self, settings: dict) -> None:
        """Set what ``settings()`` returned (``roadloop replay``); a policy without settings accepts only {}."""
        if settings:
            raise ConfigError(f"policy '{self.name}' has no settings, got {sorted(settings)}")

    def set_decoding(self, what: str = "decoding", **decoding: float | None) -> None:
        """Set a sampling policy's ``temperature`` / ``top_p`` (None: leave it); ``ConfigError`` naming ``what``
        was asked (a CLI flag, a config key) when the policy samples nothing."""
        given = {k: float(v) for k, v in decoding.items() if v is not None}
        if not given:
            return
        if "temperature" not in self.settings():
            raise ConfigError(f"{what} applies to sampling policies; '{self.name}' is deterministic")
        self.apply_settings(given)

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        """Called once per rollout batch with the initial state and one seed (B,) per rollout."""

    def act(self, obs: Observation) -> PolicyOutput:  # pragma: no cover - interface
        raise NotImplementedError
