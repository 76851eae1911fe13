"""``VLAPolicy``: drives the simulator with a ``VLAModel`` (BEV + ego history + route command ->
CoC text + 64 (accel, curvature) controls).

The BEV shows the last ``frames`` states at 10 Hz (``Observation.recent``, whatever the
replanning rate); a caller that builds observations without ``recent`` gets the current state
repeated.  Sampling uses one ``torch.Generator`` per batch row seeded from the rollout seed, so a
rollout's samples do not depend on the batch it runs in (up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from roadloop.errors import ConfigError
from roadloop.policies.base import Observation, Policy, PolicyOutput
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import VLAModel, check_greedy_actions, load_checkpoint, state_hash
from roadloop.policies.vla.observe import (
    RasterConfig,
    command_index,
    ego_history_features,
    encode_raster,
    render_bev,
    route_command,
)
from roadloop.sim import dynamics
from roadloop.sim.datatypes import SimState

_SEED_SALT = 0x5EED_F00D
DEFAULT_TEMPERATURE = 1.0  # the policy's own decoding (roadloop eval, the registry's gates) ...
DEFAULT_TOP_P = 0.95  # ... and its nucleus
# from this batch size up the live raster is drawn channels-last for the vision stem (oneDNN's convolutions:
# 1.5-2x faster on it at batch 64, about even at 4, 0.1-0.5 ms slower at 1-2; docs/LOG.md 2026-12-06)
CHANNELS_LAST_MIN_BATCH = 4


def observation_tensors(history: list[SimState], obs: Observation, raster: RasterConfig,
                        channels_last: bool | None = None) -> dict[str, torch.Tensor]:
    """Model inputs from a state history (oldest first, last = now) and the observation.  ``bev`` is on the
    uint8 grid of the demonstrations (``render_bev(quantized=True)``: the model sees exactly the values it
    was trained on), laid out channels-last when ``channels_last`` (None: from ``CHANNELS_LAST_MIN_BATCH``
    scenes up); ``encode_raster(bev)`` gives its uint8 levels."""
    if channels_last is None:
        channels_last = obs.state.batch_size >= CHANNELS_LAST_MIN_BATCH
    return {"bev": render_bev(history, raster, quantized=True, channels_last=channels_last),
            "history": ego_history_features(obs), "command": command_index(route_command(obs.state))}


@dataclass
class DecisionRecord:
    """What the policy saw and sampled at one decision step (``VLAPolicy(record=True)``), for the
    post-training learners: re-scoring the same tokens under new weights gives exact ratios."""

    step: int  # simulator step
    bev: torch.Tensor  # (B, F, C, H, W) uint8 (``encode_raster``; any memory layout; decode_raster)
    history: torch.Tensor  # (B, 16, 5) float32
    command: torch.Tensor  # (B,) int64
    text: torch.Tensor  # (B, L) int64 sampled text ids (tokens, <eos>, pads)
    actions: torch.Tensor  # (B, N, 2) int64 sampled action bins
    logp_text: torch.Tensor  # (B,) float32 log-likelihood under the sampling weights
    logp_action: torch.Tensor  # (B,) float32
    speed: torch.Tensor  # (B,) float32 m/s, ego speed (plans start at the ego pose: x = y = yaw = 0)


def decoding_tag(temperature: float, top_p: float, greedy_actions: str = "mean") -> str:
    """A decoding as a short tag: ``greedy`` (``greedy-mode`` with mode-decoded actions) or ``t1p0.95``
    (temperature, top-p)."""
    if temperature <= 0:
        return "greedy" if greedy_actions == "mean" else f"greedy-{greedy_actions}"
    return f"t{temperature:g}p{top_p:g}"


class VLAPolicy(Policy):
    """``record=True`` appends a ``DecisionRecord`` to ``self.trace`` at every decision (cleared by
    ``reset``); ``temperature`` <= 0 decodes greedily (action tokens by ``greedy_actions``, see
    ``VLAModel.sample``)."""

    name = "vla"
    replan_every = 5  # 2 Hz: the rate of its demonstrations (roadloop data collect)
    writes_coc = True

    def __init__(self, model: VLAModel, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 version: str | None = None, record: bool = False, greedy_actions: str = "mean"):
        self.model = model.eval()
        self.record = record
        self.trace: list[DecisionRecord] = []
        self.apply_settings({"temperature": temperature, "top_p": top_p, "greedy_actions": greedy_actions})
        self.weights_version = version or state_hash(model)[:12]
        cfg = model.cfg
        self.raster = cfg.raster_config()
        self._gens: list[torch.Generator] | None = None

    @property
    def version(self) -> str:
        """The weights' id and the decoding (``decoding_tag``): one checkpoint driven greedily and sampled are
        two policies, whose rollouts have different ids."""
        return f"{self.weights_version}+{decoding_tag(self.temperature, self.top_p, self.greedy_actions)}"

    @property
    def seed_independent(self) -> bool:
        """Greedy decoding draws nothing at random: every seed drives the same rollout."""
        return self.temperature <= 0

    def settings(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "greedy_actions": self.greedy_actions}

    def apply_settings(self, settings: dict) -> None:
        unknown = set(settings) - {"temperature", "top_p", "greedy_actions"}
        if unknown:
            raise ConfigError(f"VLAPolicy settings are temperature, top_p and greedy_actions, got {sorted(unknown)}")
        t = float(settings.get("temperature", getattr(self, "temperature", DEFAULT_TEMPERATURE)))
        p = float(settings.get("top_p", getattr(self, "top_p", DEFAULT_TOP_P)))
        if not (math.isfinite(t) and t >= 0):
            raise ConfigError(f"VLAPolicy temperature must be >= 0 (0: greedy), got {t}")
        if not 0 < p <= 1:
            raise ConfigError(f"VLAPolicy top_p must be in (0, 1], got {p}")
        ga = check_greedy_actions(settings.get("greedy_actions", getattr(self, "greedy_actions", "mean")))
        self.temperature, self.top_p, self.greedy_actions = t, p, ga

    @classmethod
    def from_checkpoint(cls, path_dir: str | Path, device: str | torch.device = "cpu", **kw) -> VLAPolicy:
        model, meta = load_checkpoint(path_dir, device)
        pol = cls(model, version=meta["weights_sha256"][:12], **kw)
        pol.source = str(Path(path_dir).expanduser().resolve())
        return pol

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        self.trace = []
        self._gens = [torch.Generator().manual_seed((int(s) * 1_000_003 + _SEED_SALT) % (2 ** 63))
                      for s in seeds.tolist()]

    def model_inputs(self, obs: Observation) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The model's inputs for ``obs`` (``bev`` on the uint8 grid the model was trained on: the
        demonstrations'), and the uint8 raster itself when recording (else None)."""
        frames = list(obs.recent[-self.raster.frames:]) or [obs.state]
        inputs = observation_tensors(frames, obs, self.raster)
        return inputs, (encode_raster(inputs["bev"]) if self.record else None)

    def act(self, obs: Observation) -> PolicyOutput:
        state = obs.state
        B = state.batch_size
        if self._gens is None or len(self._gens) != B:
            self.reset(state, torch.zeros(B, dtype=torch.int64))
        inputs, bev_q = self.model_inputs(obs)
        text, acts, lp_text, lp_act = self.decode(inputs)
        if self.record:
            self.trace.append(DecisionRecord(obs.step, bev_q, inputs["history"].float(),
                                             inputs["command"], text.cpu(), acts.cpu(), lp_text.float().cpu(),
                                             lp_act.float().cpu(), state.speed[:, 0].float().clone()))
        controls = tok.dequantize(acts.cpu(), self.model.cfg.action_chunk)
        xy, yaw, speed = dynamics.unicycle_rollout(state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0], controls)
        return PolicyOutput(plan_xy=xy, plan_yaw=yaw, plan_speed=speed, controls=controls,
                            reasoning=tok.decode_batch(text.cpu()), logp=(lp_text + lp_act).float().cpu())

    def decode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's output for the inputs of one decision (``VLAModel.sample`` with this policy's decoding and
        per-row generators): text ids (B, L), action bins (B, N, 2), log-likelihoods of text and actions (B,)."""
        return self.model.sample(inputs, self.temperature, self.top_p, self._gens, self.greedy_actions)


__all__ = ["CHANNELS_LAST_MIN_BATCH", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "DecisionRecord", "VLAPolicy",
           "decoding_tag", "observation_tensors"]
