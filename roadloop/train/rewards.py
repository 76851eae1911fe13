"""Rewards of the closed-loop post-training (GRPO): a weighted sum of per-rollout driving metrics, plus
per-decision reasoning rewards.

Driving reward, one value per rollout (weights ``w_*`` from ``RewardConfig``)::

    R_drive = w_score * score + w_progress * clamp(progress, 0, 1)
            + w_collision * collision_at_fault + w_offroad * offroad
            + w_dist_to_log * xy_rmse_to_log
            + w_comfort * comfort_violation + w_red_light * red_light + w_wrong_way * wrong_way

Terms (all from ``roadloop.eval.metrics`` over the scored steps, i.e. after the log-replay warm-up):

==================  =====  ===========  ============================================================
term                unit   range        meaning
==================  =====  ===========  ============================================================
score               -      [0, 1]       the AlpaSim scene score itself (``roadloop.eval.metrics``):
                                        0 on an at-fault collision or off-road, else progress over
                                        the kept window / 0.8, capped at 1; the window ends where the
                                        ego is >= 4 m from its logged path (AlpaSim's truncation)
progress            -      [0, 1]       ego route progress over the AlpaSim-kept window / the logged
                                        ego's over the scored horizon (1 when the log moves < 5 m);
                                        clamped to [0, 1] as in the AlpaSim score
collision           -      {0, 1}       an at-fault collision (front or lateral; being rear-ended
                                        is not at fault)
offroad             -      {0, 1}       a corner of the ego box left the drivable area
dist_to_log         m      [0, inf)     XY-RMSE between the ego and its logged position over the
                                        AlpaSim-kept window (truncated at the first incident or
                                        4 m from the logged path); 0 without a log
comfort             -      {0, 1}       any nuPlan comfort bound exceeded
red_light           -      {0, 1}       crossed a stop line on red
wrong_way           -      {0, 1}       drove against the lane direction
==================  =====  ===========  ============================================================

Reasoning rewards, one value per decision (2 Hz), each in {0, 1}::

    r_reason = w_grounding * grounding + w_consistency * consistency

* grounding: every scene component the sampled CoC text mentions exists as stated in the scene at
  that decision (``reasoning.checks.grounding``, checked by the rollout engine: ``Rollout.grounded``);
  unparseable text scores 0.
* consistency: the decision parsed from the text equals the meta-actions of the sampled plan
  (``meta_actions`` of ``plans_from_tokens(actions, speed, chunk)``, ego frame, origin at the ego).

Presets:

* ``progress_safety`` is AlpaGym's (REFERENCE 1.3): progress x 1, collision x -10, off-road x -5,
  XY-RMSE to the log x -0.01 (AlpaGym penalises ``collision_any``; here only at-fault collisions,
  as in the AlpaSim score, so being rear-ended is not punished).
* ``terms`` adds comfort x -0.5, red light x -5, wrong way x -1 and the reasoning rewards
  grounding x 0.5, consistency x 0.5 (combined with the driving reward, as Alpamayo-R1 found
  reasoning-only rewards hurt driving).  Measured (docs/LOG.md): the policy learned that stopping
  is safe and nearly free, since -0.01 x RMSE barely punishes falling behind the log.
* ``default`` is score-aligned: the AlpaSim score x 4 (so slow progress and leaving the logged path,
  which ends the score's window, cost what the evaluation charges for them), collision x -4 and off-road x -3
  on top of the score's own 0, red light x -3, wrong way x -1, grounding x 0.5, consistency x 0.5,
  and no comfort term: nuPlan's comfort bounds include a -4.05 m/s^2 deceleration, so the term charges
  the emergency braking that avoids a crash.  Measured (docs/LOG.md, 2026-11-22), two training seeds
  each: with comfort x -1 (this preset until then) GRPO learned to brake gently and crashed into
  braking leads (at-fault collisions +10 / +11 points); without it, no such rise, and the KL penalty
  held comfort violations level.  ``reward.comfort=-1`` gives the old preset.

Credit (``credit``): with ``rollout`` (AlpaGym) every decision of a rollout shares its one driving
advantage.  With ``local`` the collision and off-road terms leave the per-rollout sum and become
per-decision rewards of the decisions taken within ``credit_window_s`` before the rollout's first
at-fault collision / off-road (``local_incident_reward``), group-normalised with the reasoning
rewards: the decisions that led into the incident carry it, not the ones 15 s earlier.

Log gap (``log_gap``, off by default): a per-decision term, ``log_gap`` x the growth of the ego's
distance to its logged position at that time (capped at 4 m) from the decision to ``log_gap_window_s``
later (``log_gap_reward``): how much each decision's plan (and the next few) opened or closed the gap to
the log's pace.  It is potential-based shaping (Ng et al. 1999, potential -``log_gap`` x gap): summed over
a rollout's decisions it is close to ``log_gap`` x the gap's growth over the rollout.  Group-normalised
per decision, with the local incident rewards.  It was written when roadloop's score window closed on
this time-matched gap (LOG, 2026-11-22); since 2026-12-07 the window closes, as AlpaSim's does, on the
distance to the logged *path* (``roadloop.eval.metrics``), so the term asks for more than the score does.

A rollout the policy failed (it raised or returned NaN; its metrics are NaN) gets the worst driving
reward the weights allow (every negative indicator term on, progress 0, and the XY-RMSE to the log of
the batch's farthest rollout, at least 4 m: the RMSE has no upper bound since the score's window no
longer closes 4 m from where the log was).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from roadloop.errors import ConfigError
from roadloop.eval.metrics import EpisodeView, compute_metrics
from roadloop.rollout import Rollout
from roadloop.sim.datatypes import DT, Scenario

DRIVING_TERMS = ("score", "progress", "collision", "offroad", "dist_to_log", "comfort", "red_light", "wrong_way")
REASONING_TERMS = ("grounding", "consistency")
TERMS = DRIVING_TERMS + REASONING_TERMS
LOCAL_TERMS = ("collision", "offroad")  # moved onto the decisions before the incident with credit = local
# metric behind each indicator / ratio term (``dist_to_log`` is computed here: RMSE, not the metric's mean)
_METRIC_OF = {"score": "score", "progress": "progress", "collision": "collision_at_fault", "offroad": "offroad",
              "comfort": "comfort_violation", "red_light": "red_light", "wrong_way": "wrong_way"}

PRESETS: dict[str, dict[str, float]] = {
    "progress_safety": {"score": 0.0, "progress": 1.0, "collision": -10.0, "offroad": -5.0, "dist_to_log": -0.01,
                        "comfort": 0.0, "red_light": 0.0, "wrong_way": 0.0, "grounding": 0.0, "consistency": 0.0},
    "terms": {"score": 0.0, "progress": 1.0, "collision": -10.0, "offroad": -5.0, "dist_to_log": -0.01, "comfort": -0.5,
              "red_light": -5.0, "wrong_way": -1.0, "grounding": 0.5, "consistency": 0.5},
    "default": {"score": 4.0, "progress": 0.0, "collision": -4.0, "offroad": -3.0, "dist_to_log": 0.0, "comfort": 0.0,
                "red_light": -3.0, "wrong_way": -1.0, "grounding": 0.5, "consistency": 0.5},
}


@dataclass
class RewardConfig:
    """Reward weights.  ``preset`` gives every weight; a weight set here (not None) overrides the preset's."""

    preset: str = "default"  # progress_safety / terms / default (module docstring)
    score: float | None = None  # x AlpaSim score [0, 1]
    progress: float | None = None  # x clamp(progress, 0, 1)
    collision: float | None = None  # x at-fault collision {0, 1}
    offroad: float | None = None  # x off-road {0, 1}
    dist_to_log: float | None = None  # x XY-RMSE to the log (m)
    comfort: float | None = None  # x comfort violation {0, 1}
    red_light: float | None = None  # x red-light violation {0, 1}
    wrong_way: float | None = None  # x wrong-way driving {0, 1}
    grounding: float | None = None  # x grounded text {0, 1}, per decision
    consistency: float | None = None  # x text decision == plan meta-actions {0, 1}, per decision
    credit: str = "rollout"  # rollout: incidents weigh on the whole rollout; local: on the decisions before them
    credit_window_s: float = 3.0  # local credit: decisions up to this long before an incident carry its penalty
    log_gap: float = 0.0  # x growth (m) of the ego's distance to its logged position at the time over each
    # decision's next ``log_gap_window_s``, capped at 4 m: a per-decision shaping of the log's pace (0: off)
    log_gap_window_s: float = 2.0

    @staticmethod
    def of(preset: str, **weights: float) -> RewardConfig:
        return RewardConfig(preset=preset, **weights).validate()

    def weights(self) -> dict[str, float]:
        """Every term's weight (preset <- overrides)."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown reward preset '{self.preset}'; known: {', '.join(sorted(PRESETS))}")
        base = PRESETS[self.preset]
        return {k: float(base[k] if getattr(self, k) is None else getattr(self, k)) for k in TERMS}

    def validate(self) -> RewardConfig:
        if self.credit not in ("rollout", "local"):
            raise ConfigError(f"reward.credit must be 'rollout' or 'local', got '{self.credit}'")
        if not self.credit_window_s > 0:
            raise ConfigError(f"reward.credit_window_s must be > 0, got {self.credit_window_s}")
        if not (math.isfinite(self.log_gap) and self.log_gap <= 0):
            raise ConfigError(f"reward.log_gap must be <= 0 (a penalty per metre the ego falls away from its "
                              f"log), got {self.log_gap}")
        if not (math.isfinite(self.log_gap_window_s) and self.log_gap_window_s > 0):
            raise ConfigError(f"reward.log_gap_window_s must be > 0, got {self.log_gap_window_s}")
        w = self.weights()
        bad = [k for k, v in w.items() if v != v or abs(v) == float("inf")]
        if bad:
            raise ConfigError(f"reward weight(s) {bad} must be finite")
        if all(v == 0.0 for v in w.values()) and self.log_gap == 0.0:
            over = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "preset" and getattr(self, f.name) is not None}
            raise ConfigError(f"every reward weight is zero (preset '{self.preset}', overrides {over}): "
                              "nothing to learn from")
        return self

    @property
    def per_decision_driving(self) -> bool:
        """Whether some driving reward is per decision (``local_reward``): local credit or the log gap."""
        return self.credit == "local" or self.log_gap != 0.0

    @property
    def uses_reasoning(self) -> bool:
        w = self.weights()
        return any(w[k] != 0.0 for k in REASONING_TERMS)


def xy_rmse_to_log(ro: Rollout, scenarios: Scenario) -> torch.Tensor:
    """(B,) m: RMSE of the ego's distance to its logged position over the AlpaSim-kept window (0 without a log)."""
    v = EpisodeView(ro, scenarios)
    d = ro.checks.dist_to_log
    ok = v.keep & torch.isfinite(d)
    sq = torch.where(ok, torch.nan_to_num(d, nan=0.0) ** 2, torch.zeros_like(d)).sum(0)
    return torch.sqrt(sq / ok.sum(0).clamp_min(1))


def driving_reward(ro: Rollout, scenarios: Scenario, cfg: RewardConfig,
                   metrics: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-rollout driving reward (B,) and its weighted terms {term: (B,)} (module docstring)."""
    w = cfg.weights()
    m = metrics if metrics is not None else compute_metrics(ro, scenarios, list(_METRIC_OF.values()))
    raw = {k: m[name].float() for k, name in _METRIC_OF.items()}
    raw["progress"] = raw["progress"].clamp(0.0, 1.0)
    raw["dist_to_log"] = xy_rmse_to_log(ro, scenarios)
    terms = {k: w[k] * raw[k] for k in DRIVING_TERMS}
    rollout_terms = [v for k, v in terms.items() if not (cfg.credit == "local" and k in LOCAL_TERMS)]
    total = torch.stack(rollout_terms).sum(0)
    worst = sum(min(w[k], 0.0) for k in DRIVING_TERMS if k not in ("score", "progress", "dist_to_log"))
    far = torch.where(ro.failed, 0.0, torch.nan_to_num(raw["dist_to_log"], nan=0.0)).amax() if len(ro.failed) else 0.0
    worst += max(4.0, float(far)) * min(w["dist_to_log"], 0.0)
    total = torch.where(ro.failed | ~torch.isfinite(total), torch.full_like(total, worst), total)
    return total, terms


def first_scored_state(flag: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """(B,) int64 index of the state a step flagged in ``flag`` (T, B) leads to (step t -> state t + 1),
    the first among the ``scored`` (T,) steps; -1 where no scored step is flagged."""
    hit = flag & scored.view(-1, 1)
    first = hit.to(torch.int8).argmax(0) + 1
    return torch.where(hit.any(0), first, torch.full_like(first, -1))


def local_incident_reward(ro: Rollout, cfg: RewardConfig) -> torch.Tensor:
    """(D, B) per-decision incident reward of ``credit = local``: a decision taken at most
    ``credit_window_s`` before the rollout's first at-fault collision (first off-road) in the scored steps
    gets ``w_collision`` (``w_offroad``); every other decision 0.  All zeros with ``credit = rollout``."""
    D, B = ro.decision_steps.numel(), ro.batch_size
    out = torch.zeros(D, B)
    if cfg.credit != "local" or D == 0:
        return out
    w = cfg.weights()
    win = cfg.credit_window_s / DT
    t_dec = ro.decision_steps.view(D, 1).float()
    for key, flag in (("collision", ro.checks.collision_at_fault), ("offroad", ro.checks.offroad)):
        first = first_scored_state(flag, ro.scored)
        any_, first = first >= 0, first.float()
        near = (t_dec < first.view(1, B)) & (t_dec >= first.view(1, B) - win) & any_.view(1, B)
        out += w[key] * near.float()
    return torch.where(ro.failed.view(1, B), torch.zeros_like(out), out)


def log_gap_reward(ro: Rollout, cfg: RewardConfig) -> torch.Tensor:
    """(D, B) per-decision log-gap reward: ``log_gap`` x (g(t_d + W) - g(t_d)), g the ego's distance to its
    logged position at that time capped at 4 m (``DIST_TO_LOG_TRUNCATE``), at the decision's state and
    ``log_gap_window_s`` (W) later (at most the last state).
    Potential-based shaping (Ng et al. 1999) of the gap to the log's pace: summed over a rollout's decisions
    it is about ``log_gap`` x the gap's growth over the rollout, and each decision gets the part that its
    own plan and the next few make.  0 where the log is not valid (no logged ego), and for failed rollouts.
    All zeros when ``log_gap`` is 0."""
    from roadloop.eval.metrics import DIST_TO_LOG_TRUNCATE

    D, B = ro.decision_steps.numel(), ro.batch_size
    out = torch.zeros(D, B)
    if cfg.log_gap == 0.0 or D == 0:
        return out
    T = ro.num_steps
    d = ro.checks.dist_to_log  # (T, B) m at state t + 1
    g = torch.cat((d[:1], d)).clamp(max=DIST_TO_LOG_TRUNCATE)  # (T + 1, B) at state t (state 0: as state 1)
    t0 = ro.decision_steps.clamp(0, T)
    t1 = (t0 + round(cfg.log_gap_window_s / DT)).clamp(max=T)
    delta = g[t1] - g[t0]
    out = cfg.log_gap * torch.nan_to_num(delta, nan=0.0)
    return torch.where(ro.failed.view(1, B), torch.zeros_like(out), out)


def consistency_flags(texts: list[str], actions: torch.Tensor, speed: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B,) bool consistency of one decision's sampled texts with the sampled plans (action bins (B, N, 2)).
    (Grounding needs the scene: the rollout engine checks it, ``Rollout.grounded``.)"""
    from roadloop.eval.openloop import plans_from_tokens
    from roadloop.reasoning.checks import consistency
    from roadloop.reasoning.meta_action import meta_actions

    B = len(texts)
    plan = plans_from_tokens(actions, speed, chunk)
    lon, lat = meta_actions(torch.zeros(B, 2), torch.zeros(B), speed.float(), plan)
    return torch.tensor([consistency(t, lon[b], lat[b]) for b, t in enumerate(texts)], dtype=torch.bool)


def reasoning_reward(grounded: torch.Tensor, consistent: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Per-decision reasoning reward (same shape as the flags)."""
    w = cfg.weights()
    return w["grounding"] * grounded.float() + w["consistency"] * consistent.float()


__all__ = ["DRIVING_TERMS", "LOCAL_TERMS", "PRESETS", "REASONING_TERMS", "RewardConfig", "driving_reward",
           "first_scored_state", "local_incident_reward", "log_gap_reward", "consistency_flags", "reasoning_reward",
           "xy_rmse_to_log"]
