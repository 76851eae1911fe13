"""Safety gates: pure functions of (candidate report, champion report or None, config) -> ``GateResult``.

Configured in YAML (``roadloop/configs/gates.yaml``, the ``GateConfig`` schema below; ``load_gate_config``
merges files and ``key=value`` overrides like every other roadloop config).  ``run_gates`` applies every
gate in ``GATES`` and returns a ``GateSummary``; a candidate passes when every gate passes.  Gates never
raise on odd reports: missing metrics, NaN values or missing families fail the gate with a reason.

Gates (``thresholds.*`` names the config keys):

* ``comparable``: candidate and champion reports come from the same validation matrix (same matrix key:
  suites and their content hashes, seeds, scenario limit, code); otherwise every comparison is meaningless.
* ``failed_rollouts``: at most ``max_failed_rollouts`` rollouts failed (the policy raised / returned NaN).
* ``envelope``: every family and map of the declared operating envelope was validated, each with at least
  ``envelope.min_rollouts`` rollouts.
* ``collision_at_fault`` / ``offroad``: the candidate's rate is at most the upper end of the champion's 95%
  bootstrap CI (resampling scenarios) plus ``safety_slack``: worse than the champion only within the
  champion's own sampling noise.
* ``family_score``: no family's mean score is more than ``family_score_drop`` below the champion's.
* ``mean_score``: overall mean score >= champion's - ``score_tolerance`` (a tolerance, not a CI: a candidate
  must not be worse on average, and equal is fine; the tolerance absorbs float-level differences and, if
  raised, lets a safety-only improvement through).
* ``comfort``: comfort-violation rate <= ``comfort_violation_max`` and <= champion's +
  ``comfort_violation_increase``.
* ``reasoning``: reasoning consistency (``reasoning_consistency`` metric) >= ``reasoning_consistency_min`` and
  >= champion's - ``reasoning_consistency_drop``; a policy that writes no text fails when
  ``require_reasoning`` is true.

With no champion (the first release), the relative gates pass with a note; the absolute ones still apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from roadloop.errors import ConfigError
from roadloop.eval.evaluate import EvalReport
from roadloop.registry.lineage import canonical_sha256
from roadloop.registry.matrix import MatrixConfig

PROCEDURAL_FAMILIES = ["multilane_traffic", "lead_braking", "cut_in", "merge", "intersection_protected",
                       "unprotected_left", "pedestrian_crossing", "construction_zone", "stopped_vehicle", "roundabout"]
SUMO_NETWORKS = ["bs3d", "fkk_in", "highway", "fokr_bs_demo"]


@dataclass
class EnvelopeConfig:
    """The operating envelope a model is released for: it must be validated on all of it."""

    families: list[str] = field(default_factory=lambda: PROCEDURAL_FAMILIES + [f"sumo_{n}" for n in SUMO_NETWORKS])
    maps: list[str] = field(default_factory=lambda: ["procedural"] + list(SUMO_NETWORKS))
    min_rollouts: int = 10  # per family and per map


@dataclass
class ThresholdConfig:
    safety_slack: float = 0.0
    family_score_drop: float = 0.05
    score_tolerance: float = 0.005
    comfort_violation_max: float = 0.9
    comfort_violation_increase: float = 0.05
    reasoning_consistency_min: float = 0.5
    reasoning_consistency_drop: float = 0.05
    require_reasoning: bool = True
    max_failed_rollouts: int = 0


@dataclass
class GateConfig:
    name: str = "default"
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    envelope: EnvelopeConfig = field(default_factory=EnvelopeConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)

    def validate(self) -> GateConfig:
        self.matrix.validate()
        t = self.thresholds
        for k in ("safety_slack", "family_score_drop", "score_tolerance", "comfort_violation_increase",
                  "reasoning_consistency_drop"):
            if not (getattr(t, k) >= 0):
                raise ConfigError(f"gates thresholds.{k} must be >= 0, got {getattr(t, k)}")
        for k in ("comfort_violation_max", "reasoning_consistency_min"):
            if not (0 <= getattr(t, k) <= 1):
                raise ConfigError(f"gates thresholds.{k} must be in [0, 1], got {getattr(t, k)}")
        if t.max_failed_rollouts < 0 or self.envelope.min_rollouts < 1:
            raise ConfigError("gates thresholds.max_failed_rollouts must be >= 0 and envelope.min_rollouts >= 1")
        if not self.envelope.families:
            raise ConfigError("gates envelope.families must name at least one scenario family")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def sha256(self) -> str:
        """Hash of the resolved config: a recorded gate result is reused only under the same config."""
        return canonical_sha256(self.to_dict())


def load_gate_config(files: list[str | Path] | tuple = (), overrides: list[str] | tuple = ()) -> GateConfig:
    """``GateConfig`` from YAML ``files`` (default: the shipped ``gates.yaml``) and ``key=value`` overrides."""
    from roadloop.config import CONFIG_DIR, load_config

    return load_config(GateConfig, list(overrides), list(files) or [CONFIG_DIR / "gates.yaml"])


@dataclass
class GateResult:
    gate: str
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed (or notes when it passed)
    measured: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GateSummary:
    passed: bool
    results: list[GateResult]

    @property
    def failed(self) -> list[str]:
        return [r.gate for r in self.results if not r.passed]

    def reasons(self) -> list[str]:
        """``gate: reason`` of every failed gate."""
        return [f"{r.gate}: {why}" for r in self.results if not r.passed for why in (r.reasons or ["failed"])]

    def to_json(self) -> dict:
        return {"passed": self.passed, "failed": self.failed, "results": [r.to_json() for r in self.results]}

    @staticmethod
    def from_json(d: dict) -> GateSummary:
        return GateSummary(bool(d["passed"]), [GateResult(r["gate"], bool(r["passed"]), list(r.get("reasons") or []),
                                                          dict(r.get("measured") or {})) for r in d["results"]])


# ---------------------------------------------------------------------------------------------
# helpers

def _mean(rep: EvalReport, metric: str, family: str | None = None) -> float:
    try:
        m = rep.overall if family is None else rep.per_family[family]
        return float(m[metric].mean)
    except (KeyError, TypeError, AttributeError):
        return math.nan


def _ci_high(rep: EvalReport, metric: str) -> float:
    try:
        return float(rep.overall[metric].ci[1])
    except (KeyError, TypeError, IndexError, AttributeError):
        return math.nan


def _n(rep: EvalReport, family: str) -> int:
    try:
        return int(rep.per_family[family]["score"].n)
    except (KeyError, TypeError, AttributeError):
        return 0


def _fin(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _matrix_key(rep: EvalReport) -> str | None:
    m = (rep.extra or {}).get("matrix") or {}
    return m.get("key") if isinstance(m, dict) else None


NO_CHAMPION = "no champion to compare with (first release): passes"


# ---------------------------------------------------------------------------------------------
# gates

def gate_comparable(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    if champ is None:
        return GateResult("comparable", True, [NO_CHAMPION])
    a, b = _matrix_key(cand), _matrix_key(champ)
    same = cand.suite_hash == champ.suite_hash and a == b
    why = [] if same else [f"candidate and champion were evaluated on different matrices (suites {cand.suite} "
                           f"{cand.suite_hash[:12]} key {a} vs {champ.suite} {champ.suite_hash[:12]} key {b})"]
    return GateResult("comparable", same, why, {"candidate_key": a, "champion_key": b})


def gate_failed_rollouts(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    n, lim = int(cand.n_failed), cfg.thresholds.max_failed_rollouts
    ok = n <= lim
    bad = [r.rollout_id for r in cand.rollouts if r.failed][:3]
    return GateResult("failed_rollouts", ok, [] if ok else [f"{n} rollout(s) failed (max {lim}), e.g. {bad}"],
                      {"n_failed": n})


def gate_envelope(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    env = cfg.envelope
    why = []
    fams = {f: _n(cand, f) for f in env.families}
    for f, n in fams.items():
        if n == 0:
            why.append(f"family '{f}' of the operating envelope was not validated")
        elif n < env.min_rollouts:
            why.append(f"family '{f}' has {n} rollouts (< {env.min_rollouts})")
    maps = (cand.extra or {}).get("maps") or {}
    for m in env.maps:
        n = int(maps.get(m, 0))
        if n == 0:
            why.append(f"map '{m}' of the operating envelope was not validated")
        elif n < env.min_rollouts:
            why.append(f"map '{m}' has {n} rollouts (< {env.min_rollouts})")
    return GateResult("envelope", not why, why, {"families": fams, "maps": {m: int(maps.get(m, 0)) for m in env.maps}})


def _safety_rate(metric: str, gate: str) -> Callable[[EvalReport, EvalReport | None, GateConfig], GateResult]:
    def fn(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
        c = _mean(cand, metric)
        if not _fin(c):
            return GateResult(gate, False, [f"candidate has no {metric} rate"])
        if champ is None:
            return GateResult(gate, True, [NO_CHAMPION], {"candidate": c})
        hi = _ci_high(champ, metric)
        if not _fin(hi):
            return GateResult(gate, False, [f"champion report has no {metric} confidence interval"], {"candidate": c})
        bound = hi + cfg.thresholds.safety_slack
        ok = c <= bound + 1e-12
        why = [] if ok else [f"{metric} rate {c:.3f} > champion's {_mean(champ, metric):.3f} (95% CI upper "
                             f"{hi:.3f} + slack {cfg.thresholds.safety_slack:g})"]
        return GateResult(gate, ok, why, {"candidate": c, "champion": _mean(champ, metric), "bound": bound})

    fn.__name__ = f"gate_{gate}"
    fn.__doc__ = f"{metric}: candidate rate <= champion's CI upper bound + thresholds.safety_slack."
    return fn


gate_collision_at_fault = _safety_rate("collision_at_fault", "collision_at_fault")
gate_offroad = _safety_rate("offroad", "offroad")


def gate_family_score(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    if champ is None:
        return GateResult("family_score", True, [NO_CHAMPION])
    drop = cfg.thresholds.family_score_drop
    why, measured = [], {}
    for f in sorted(champ.per_family):
        b, a = _mean(champ, "score", f), _mean(cand, "score", f)
        measured[f] = {"candidate": a, "champion": b}
        if not _fin(b):
            continue
        if not _fin(a):
            why.append(f"family '{f}': candidate has no score (champion {b:.3f})")
        elif a < b - drop - 1e-12:
            why.append(f"family '{f}' score {a:.3f} < champion's {b:.3f} - {drop:g}")
    return GateResult("family_score", not why, why, measured)


def gate_mean_score(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    a = _mean(cand, "score")
    if not _fin(a):
        return GateResult("mean_score", False, ["candidate has no mean score"])
    if champ is None:
        return GateResult("mean_score", True, [NO_CHAMPION], {"candidate": a})
    b, tol = _mean(champ, "score"), cfg.thresholds.score_tolerance
    ok = _fin(b) and a >= b - tol - 1e-12
    why = [] if ok else [f"mean score {a:.3f} < champion's {b:.3f} - tolerance {tol:g}"]
    return GateResult("mean_score", ok, why, {"candidate": a, "champion": b})


def gate_comfort(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    t = cfg.thresholds
    a = _mean(cand, "comfort_violation")
    if not _fin(a):
        return GateResult("comfort", False, ["candidate has no comfort_violation rate"])
    why = []
    if a > t.comfort_violation_max + 1e-12:
        why.append(f"comfort-violation rate {a:.3f} > bound {t.comfort_violation_max:g}")
    b = _mean(champ, "comfort_violation") if champ is not None else math.nan
    if _fin(b) and a > b + t.comfort_violation_increase + 1e-12:
        why.append(f"comfort-violation rate {a:.3f} > champion's {b:.3f} + {t.comfort_violation_increase:g}")
    return GateResult("comfort", not why, why, {"candidate": a, "champion": b})


def gate_reasoning(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateResult:
    t = cfg.thresholds
    a = _mean(cand, "reasoning_consistency")
    b = _mean(champ, "reasoning_consistency") if champ is not None else math.nan
    if not _fin(a):
        if t.require_reasoning:
            return GateResult("reasoning", False, ["candidate wrote no reasoning text (reasoning_consistency "
                                                   "undefined) and thresholds.require_reasoning is true"])
        return GateResult("reasoning", True, ["no reasoning text; not required (thresholds.require_reasoning)"])
    why = []
    if a < t.reasoning_consistency_min - 1e-12:
        why.append(f"reasoning consistency {a:.3f} < bound {t.reasoning_consistency_min:g}")
    if _fin(b) and a < b - t.reasoning_consistency_drop - 1e-12:
        why.append(f"reasoning consistency {a:.3f} < champion's {b:.3f} - {t.reasoning_consistency_drop:g}")
    return GateResult("reasoning", not why, why, {"candidate": a, "champion": b})


GATES: list[Callable[[EvalReport, EvalReport | None, GateConfig], GateResult]] = [
    gate_comparable, gate_failed_rollouts, gate_envelope, gate_collision_at_fault, gate_offroad, gate_family_score,
    gate_mean_score, gate_comfort, gate_reasoning,
]


def run_gates(cand: EvalReport, champ: EvalReport | None, cfg: GateConfig) -> GateSummary:
    """Every gate of ``GATES``; passed when all pass."""
    results = [g(cand, champ, cfg) for g in GATES]
    return GateSummary(all(r.passed for r in results), results)


__all__ = ["GATES", "EnvelopeConfig", "GateConfig", "GateResult", "GateSummary", "ThresholdConfig",
           "gate_collision_at_fault", "gate_comfort", "gate_comparable", "gate_envelope", "gate_failed_rollouts",
           "gate_family_score", "gate_mean_score", "gate_offroad", "gate_reasoning", "load_gate_config",
           "run_gates"]
