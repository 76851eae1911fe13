"""The one closed-loop driver.

``rollout(policy, scenarios, seeds, cfg)`` drives any ``Policy`` through a batch of scenarios
and returns a time-major ``Rollout``.  Evaluation, every trainer and the services call it; it
is a pure function of (policy weights, scenarios, seeds), so it can be distributed.

Loop, for each step t (0.1 s):
  * during the warm-up (the scenario's ``warmup_steps``, 1.0 s by default) the ego replays its
    log and nothing is scored;
  * at every ``replan_every``-th step after it, the policy gets an ``Observation`` and returns a
    64-step plan (and optionally controls and reasoning text);
  * the ego executes the plan's controls in order, or the tracking controller follows the plan;
  * ``step`` advances every agent and ``compute_checks`` records the per-step checks.

An external traffic simulator can move the non-ego agents instead of roadloop's own traffic
models (``traffic=``, a ``roadloop.sim.backend.TrafficBackend``, e.g. the SUMO co-simulation
``roadloop.sumo.cosim.SumoCosim``): it is reset with the initial state, and after each step
(ego moved by roadloop) it replaces the other agents' poses before the checks run.  Nothing
else changes: same policy interface, same checks, same metrics.  The rollout closes it when it ends
(a later ``reset`` starts it again).

A policy that raises, or returns non-finite values for some scenarios, fails those rollouts:
they are marked ``failed`` with the reason, the ego brakes to a stop, and the other rollouts
go on.  A plan of the wrong shape is a bug that fails the whole batch the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from roadloop.errors import ConfigError, ControlError
from roadloop.policies.base import HISTORY_STEPS, PLAN_STEPS, Observation, Policy, PolicyOutput
from roadloop.sim import dynamics
from roadloop.sim.backend import TrafficBackend
from roadloop.sim.checks import compute_checks
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import Scenario, SimState, StepChecks, _TensorTree
from roadloop.sim.state import init_state
from roadloop.sim.step import step


@dataclass(frozen=True)
class RolloutConfig:
    replan_every: int = 1  # steps between policy calls: 1 = 10 Hz, 5 = 2 Hz
    max_steps: int | None = None  # closed-loop steps after t=0 (None: until the log ends)
    warmup: int | None = None  # log-replay steps before the policy engages (None: scenario's own)
    sim: SimConfig = field(default_factory=SimConfig)

    def validate(self) -> RolloutConfig:
        if self.replan_every < 1 or self.replan_every > PLAN_STEPS:
            raise ConfigError(f"rollout.replan_every must be in [1, {PLAN_STEPS}], got {self.replan_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"rollout.max_steps must be >= 1, got {self.max_steps}")
        self.sim.validate()
        return self


@dataclass(frozen=True, eq=False)
class Rollout(_TensorTree):
    """Time-major record of a batch of rollouts: T+1 states (t = 0..T), T steps."""

    xy: torch.Tensor  # (T+1, B, A, 2) m
    yaw: torch.Tensor  # (T+1, B, A) rad
    speed: torch.Tensor  # (T+1, B, A) m/s
    accel: torch.Tensor  # (T+1, B, A) m/s^2
    yaw_rate: torch.Tensor  # (T+1, B, A) rad/s
    present: torch.Tensor  # (T+1, B, A) bool
    route_s: torch.Tensor  # (T+1, B) m, ego progress along the route
    controls: torch.Tensor  # (T, B, 2) ego acceleration m/s^2, curvature 1/m (NaN in warm-up)
    checks: StepChecks  # fields (T, B): result of the step into state t+1
    decision_steps: torch.Tensor  # (D,) int64 step index of each policy call
    plan_xy: torch.Tensor  # (D, B, 64, 2) m
    logp: torch.Tensor  # (D, B) log-probability of each decision (NaN if the policy gives none)
    scored: torch.Tensor  # (T,) bool, step is after the warm-up
    failed: torch.Tensor  # (B,) bool
    seeds: torch.Tensor  # (B,) int64
    reasoning: tuple  # (D,) tuples of B strings ("" if none)
    grounded: torch.Tensor  # (D, B) float: CoC text grounded in the scene at its decision 1 / 0, NaN: no graded text
    fail_reason: tuple  # (B,) strings ("" if ok)
    scenario_ids: tuple  # (B,) strings
    policy: str  # policy name and version, "name@version"

    @property
    def num_steps(self) -> int:
        return self.controls.shape[0]

    @property
    def batch_size(self) -> int:
        return self.controls.shape[1]


def _history(buf: list[SimState]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hist = buf[-HISTORY_STEPS:]
    hist = [hist[0]] * (HISTORY_STEPS - len(hist)) + hist
    return (torch.stack([s.xy[:, 0] for s in hist], 1), torch.stack([s.yaw[:, 0] for s in hist], 1),
            torch.stack([s.speed[:, 0] for s in hist], 1))


def decision_schedule(warmup: int, num_steps: int, replan_every: int) -> range:
    """The steps at which a rollout of ``num_steps`` steps calls its policy: every ``replan_every``-th
    step from the end of the ``warmup`` (log-replay steps)."""
    return range(warmup, num_steps, replan_every)


def rollout(policy: Policy, scenarios: Scenario, seeds: torch.Tensor | None = None,
            cfg: RolloutConfig | None = None, traffic: TrafficBackend | None = None) -> Rollout:
    """Drive ``policy`` through the batched ``scenarios`` in closed loop (see module docstring).

    ``traffic``: an external backend that moves the non-ego agents (None: roadloop's models).
    """
    cfg = (cfg or RolloutConfig()).validate()
    sim = cfg.sim
    B = scenarios.batch_size
    seeds = torch.zeros(B, dtype=torch.int64) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64)
    if tuple(seeds.shape) != (B,):
        raise ConfigError(f"seeds must have shape ({B},), got {tuple(seeds.shape)}")
    metas = scenarios.meta
    warmup = max(m.warmup_steps for m in metas) if cfg.warmup is None else cfg.warmup
    T = scenarios.num_steps - 1 if cfg.max_steps is None else cfg.max_steps
    if T <= warmup:
        raise ConfigError(f"rollout of {T} steps leaves nothing after the {warmup}-step warm-up")

    state = init_state(scenarios, sim)
    if traffic is not None:
        try:
            traffic.reset(state)
        except BaseException:
            traffic.close()
            raise
    try:
        return _run(policy, scenarios, seeds, cfg, state, warmup, T, traffic)
    finally:
        if traffic is not None:
            traffic.close()


def _run(policy: Policy, scenarios: Scenario, seeds: torch.Tensor, cfg: RolloutConfig, state: SimState,
         warmup: int, T: int, traffic: TrafficBackend | None) -> Rollout:
    sim = cfg.sim
    B = scenarios.batch_size
    policy.reset(state, seeds)
    states = [state]
    controls, checks, dsteps, plans, logps, texts, grounded = [], [], [], [], [], [], []
    failed = torch.zeros(B, dtype=torch.bool)
    reasons = [""] * B
    plan: PolicyOutput | None = None
    ungraded = torch.full((B,), float("nan"))  # texts of a policy whose reasoning is not CoC (e.g. a rule trace)
    k_in_plan = 0
    schedule = decision_schedule(warmup, T, cfg.replan_every)  # a range: O(1) membership
    for t in range(T):
        if t < warmup:
            ctrl = None
        else:
            if t in schedule:
                plan, bad, err = _decide(policy, state, states, t, B)
                if err is not None:
                    for b in range(B):
                        if not failed[b]:
                            reasons[b] = err
                    failed[:] = True
                for b in bad.nonzero().flatten().tolist():
                    if not failed[b]:
                        failed[b] = True
                        reasons[b] = f"policy returned a non-finite plan at step {t}"
                dsteps.append(t)
                plans.append(torch.where(failed.view(B, 1, 1), torch.nan, plan.plan_xy))
                logps.append(plan.logp if plan.logp is not None else torch.full((B,), float("nan")))
                texts.append(tuple(plan.reasoning) if plan.reasoning is not None else ("",) * B)
                grounded.append(_grounded(texts[-1], state) if policy.writes_coc else ungraded)
                k_in_plan = 0
            ctrl = _controls(plan, state, k_in_plan, sim)
            k_in_plan += 1
            if bool(failed.any()):  # failed rollouts brake to a stop, straight ahead
                brake = torch.stack((torch.full((B,), sim.accel_min * 0.5), torch.zeros(B)), -1)
                ctrl = torch.where(failed.unsqueeze(-1), brake, ctrl)
        nxt = step(state, ctrl, sim)
        if traffic is not None:
            nxt = traffic.step(state, nxt)
        checks.append(compute_checks(state, nxt, sim))
        controls.append(torch.full((B, 2), float("nan")) if ctrl is None else ctrl)
        states.append(nxt)
        state = nxt
    return Rollout(
        xy=torch.stack([s.xy for s in states]), yaw=torch.stack([s.yaw for s in states]),
        speed=torch.stack([s.speed for s in states]), accel=torch.stack([s.accel for s in states]),
        yaw_rate=torch.stack([s.yaw_rate for s in states]), present=torch.stack([s.present for s in states]),
        route_s=torch.stack([s.route_s for s in states]), controls=torch.stack(controls), checks=_stack_checks(checks),
        decision_steps=torch.tensor(dsteps, dtype=torch.int64),
        plan_xy=torch.stack(plans) if plans else torch.zeros(0, B, PLAN_STEPS, 2),
        logp=torch.stack(logps) if logps else torch.zeros(0, B),
        scored=torch.arange(T) >= warmup, failed=failed, seeds=seeds, reasoning=tuple(texts),
        grounded=torch.stack(grounded) if grounded else torch.zeros(0, B),
        fail_reason=tuple(reasons), scenario_ids=tuple(scenarios.ids), policy=f"{policy.name}@{policy.version}",
    )


def _grounded(texts: tuple, state: SimState) -> torch.Tensor:
    """(B,) float: ``reasoning.checks.grounding`` of each non-empty text against the scene it was written in
    (1 / 0), NaN where the policy wrote none.  Only for ``Policy.writes_coc`` policies, at their decisions."""
    out = torch.full((len(texts),), float("nan"))
    if any(texts):
        from roadloop.reasoning.checks import grounding
        from roadloop.reasoning.labels import scene_facts

        facts = scene_facts(state)
        for b, t in enumerate(texts):
            if t:
                out[b] = float(grounding(t, state, b, facts))
    return out


def _decide(policy: Policy, state: SimState, states: list[SimState], t: int, B: int):
    hx, hy, hv = _history(states)
    obs = Observation(state=state, ego_history_xy=hx, ego_history_yaw=hy, ego_history_speed=hv, step=t,
                      recent=tuple(states[-HISTORY_STEPS:]))
    hold = PolicyOutput(plan_xy=state.xy[:, :1].expand(B, PLAN_STEPS, 2).clone())
    try:
        out = policy.act(obs)
        bad = out.check(B)
    except ControlError as e:
        return hold, torch.zeros(B, dtype=torch.bool), f"policy output invalid at step {t}: {e}"
    except Exception as e:  # a failing policy fails its rollouts, not the evaluation
        return hold, torch.zeros(B, dtype=torch.bool), f"policy raised at step {t}: {type(e).__name__}: {e}"
    if bool(bad.any()):
        safe_xy = torch.where(bad.view(B, 1, 1), hold.plan_xy, out.plan_xy)
        safe_c = None if out.controls is None else torch.where(bad.view(B, 1, 1), 0.0, out.controls)
        out = PolicyOutput(plan_xy=safe_xy, plan_yaw=None, plan_speed=None, controls=safe_c,
                           reasoning=out.reasoning, logp=out.logp)
    return out, bad, None


def _controls(plan: PolicyOutput, state: SimState, k: int, sim: SimConfig) -> torch.Tensor:
    if plan.controls is not None:
        return plan.controls[:, min(k, PLAN_STEPS - 1)]
    # follow the plan from the current point on (plans are dropped as they are consumed)
    j = min(k, PLAN_STEPS - 1)
    pxy = plan.plan_xy[:, j:]
    psp = plan.plan_speed[:, j:] if plan.plan_speed is not None else None
    if pxy.shape[1] < 2:
        pxy = torch.cat((pxy, pxy), 1)
        psp = None if psp is None else torch.cat((psp, psp), 1)
    bounds = dynamics.ActionBounds(accel_min=sim.accel_min, accel_max=sim.accel_max, curvature_max=sim.curvature_max)
    # a plan with an explicit speed profile is followed step by step; one given by positions only
    # is followed through its speed 0.4 s ahead (finite differences of positions are noisy)
    speed_time = sim.dt if psp is not None else 0.4
    return dynamics.track_plan(state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0], pxy, psp, dt=sim.dt,
                               bounds=bounds, speed_time=speed_time)


def _stack_checks(items: list[StepChecks]) -> StepChecks:
    import dataclasses

    return StepChecks(**{f.name: torch.stack([getattr(c, f.name) for c in items])
                         for f in dataclasses.fields(StepChecks)})
