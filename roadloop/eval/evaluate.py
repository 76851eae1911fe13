"""Evaluate a policy on a scenario suite: batched rollouts -> metrics -> ``EvalReport``.

Every aggregate carries a 95% bootstrap confidence interval, overall and per scenario family
(the validation matrix).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from roadloop.eval.metrics import METRICS, compute_metrics
from roadloop.eval.replay import rollout_id
from roadloop.policies.base import Policy
from roadloop.rollout import Rollout, RolloutConfig, rollout
from roadloop.sim.backend import TrafficBackend
from roadloop.sim.batching import collate
from roadloop.sim.datatypes import Scenario

HEADLINE = ["score", "nuplan_score", "collision_at_fault", "collision_any", "offroad", "red_light",
            "route_completion", "comfort_violation", "progress"]


def bootstrap_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                 groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x`` (finite values only); NaN if empty.

    ``groups`` (same length as ``x``): resample whole groups instead of values (a cluster
    bootstrap, e.g. the decisions of one scenario, which are not independent draws); the mean is
    then over all values of the drawn groups."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.isfinite(x)
    x = x[keep]
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    if groups is None:
        means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    else:
        _, g = np.unique(np.asarray(groups)[keep], return_inverse=True)
        sums, counts = np.bincount(g, weights=x), np.bincount(g).astype(np.float64)
        pick = rng.integers(0, sums.size, size=(n_boot, sums.size))
        means = sums[pick].sum(1) / counts[pick].sum(1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


@dataclass
class Stat:
    mean: float
    ci: tuple[float, float]
    n: int


def summarize(values: dict[str, np.ndarray], groups: np.ndarray | None = None) -> dict[str, Stat]:
    """{metric: Stat} of per-rollout values (R,) each: sums, or means with their 95% bootstrap CI.  ``groups``
    (R,): the scenario of each rollout where one scenario is rolled out several times (seeds): the CI then
    resamples scenarios (``bootstrap_ci``), since seeds of one scenario are not independent draws."""
    out = {}
    for k, v in values.items():
        keep = np.isfinite(v)
        fin = v[keep]
        if METRICS[k].aggregate == "sum":
            out[k] = Stat(float(fin.sum()), (float(fin.sum()), float(fin.sum())), int(fin.size))
        else:
            ci = bootstrap_ci(fin, groups=None if groups is None else np.asarray(groups)[keep])
            out[k] = Stat(float(fin.mean()) if fin.size else math.nan, ci, int(fin.size))
    return out


@dataclass
class RolloutSummary:
    rollout_id: str  # "<scenario id>#<seed>@<policy>"
    scenario_id: str
    family: str
    seed: int
    failed: bool
    fail_reason: str
    metrics: dict[str, float]


@dataclass
class EvalReport:
    policy: str
    suite: str
    suite_hash: str
    seed: int
    overall: dict[str, Stat]
    per_family: dict[str, dict[str, Stat]]
    rollouts: list[RolloutSummary]
    n_failed: int
    km_between_incidents: float
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def headline(self) -> dict:
        """The JSON contract of ``roadloop eval --json``."""
        o = self.overall
        return {
            "policy": self.policy, "suite": self.suite, "suite_hash": self.suite_hash, "seed": self.seed,
            "n": len(self.rollouts), "n_failed": self.n_failed,
            "score": o["score"].mean, "score_ci": list(o["score"].ci),
            "nuplan_score": o["nuplan_score"].mean, "nuplan_score_ci": list(o["nuplan_score"].ci),
            "collision_at_fault_rate": o["collision_at_fault"].mean,
            "collision_at_fault_rate_ci": list(o["collision_at_fault"].ci),
            "collision_any_rate": o["collision_any"].mean, "offroad_rate": o["offroad"].mean,
            "offroad_rate_ci": list(o["offroad"].ci), "red_light_rate": o["red_light"].mean,
            "route_completion": o["route_completion"].mean, "comfort_violation_rate": o["comfort_violation"].mean,
            "progress": o["progress"].mean, "progress_ci": list(o["progress"].ci),
            "km_between_incidents": self.km_between_incidents, "seconds": self.seconds,
            "per_family": {f: {k: {"mean": s.mean, "ci": list(s.ci), "n": s.n} for k, s in m.items()}
                           for f, m in self.per_family.items()},
        }

    def to_json(self) -> dict:
        d = self.headline()
        d["overall"] = {k: asdict(s) for k, s in self.overall.items()}
        d["rollouts"] = [asdict(r) for r in self.rollouts]
        d["extra"] = self.extra
        return d


def evaluate(policy: Policy, scenarios: list[Scenario], *, suite_name: str = "", suite_hash: str = "",
             seed: int = 0, batch_size: int = 64, cfg: RolloutConfig | None = None,
             on_batch: Callable[[int], None] | None = None,
             keep_rollouts: bool = False, record: bool = False,
             traffic: TrafficBackend | None = None) -> tuple[EvalReport, list[tuple[Rollout, Scenario]]]:
    """Roll ``policy`` out on every scenario (batched), compute metrics, aggregate with CIs.

    ``record`` stores each batch in the rollout store so ``roadloop replay ID`` can re-run it.
    ``traffic``: an external backend moving the non-ego agents (e.g. the SUMO co-simulation),
    reset for every batch; None: roadloop's own traffic models.
    """
    import time

    from roadloop.eval.replay import record_batch

    cfg = cfg or RolloutConfig()
    t0 = time.perf_counter()
    per = {k: [] for k in METRICS}
    summaries: list[RolloutSummary] = []
    kept = []
    # batch scenarios with equal step counts together so padding stays small
    order = sorted(range(len(scenarios)), key=lambda i: (scenarios[i].num_steps, i))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([scenarios[i] for i in idx])
        seeds = torch.tensor([seed] * len(idx), dtype=torch.int64)
        with torch.inference_mode():
            ro = rollout(policy, batch, seeds, cfg, traffic=traffic)
            vals = compute_metrics(ro, batch)
        for j, i in enumerate(idx):
            m = scenarios[i].meta
            mv = {k: float(v[j]) for k, v in vals.items()}
            summaries.append(RolloutSummary(rollout_id(m.scenario_id, seed, ro.policy), m.scenario_id, m.family,
                                            seed, bool(ro.failed[j]), ro.fail_reason[j], mv))
            for k in per:
                per[k].append(mv[k])
        if record:
            record_batch(ro, suite_name, suite_hash, policy, cfg)
        if keep_rollouts:
            kept.append((ro, batch))
        if on_batch:
            on_batch(len(idx))
    # restore suite order
    pos = {i: k for k, i in enumerate(order)}
    summaries = [summaries[pos[i]] for i in range(len(scenarios))]
    arr = {k: np.array([s.metrics[k] for s in summaries]) for k in per}
    overall = summarize(arr)
    fams = sorted({s.family for s in summaries})
    per_family = {}
    for f in fams:
        mask = np.array([s.family == f for s in summaries])
        per_family[f] = summarize({k: v[mask] for k, v in arr.items()})
    incidents = np.nansum(arr["collision_at_fault"]) + np.nansum(arr["offroad"])
    km = float(np.nansum(arr["km"]))
    kbi = km / incidents if incidents > 0 else math.inf
    rep = EvalReport(policy=f"{policy.name}@{policy.version}", suite=suite_name, suite_hash=suite_hash, seed=seed,
                     overall=overall, per_family=per_family, rollouts=summaries,
                     n_failed=sum(s.failed for s in summaries), km_between_incidents=kbi,
                     seconds=time.perf_counter() - t0,
                     extra={"seed_independent": bool(policy.seed_independent), "policy_settings": policy.settings()})
    return rep, kept


def reseeded(report: EvalReport, seed: int) -> EvalReport:
    """``report`` as the evaluation with ``seed`` would be for a policy whose rollouts do not depend on the seed
    (``Policy.seed_independent``): the same rollouts and statistics, each rollout's seed and id set to ``seed``."""
    from dataclasses import replace

    from roadloop.eval.replay import rollout_id

    rolls = [replace(r, seed=seed, rollout_id=rollout_id(r.scenario_id, seed, r.rollout_id.split("@", 1)[1]))
             for r in report.rollouts]
    return replace(report, seed=seed, rollouts=rolls, seconds=0.0)


def write_json(report: EvalReport, path: str) -> None:
    from roadloop.io import atomic_write_text, json_clean

    atomic_write_text(path, json.dumps(json_clean(report.to_json()), indent=2))


def _num(x, default: float = math.nan) -> float:
    return default if x is None else float(x)


def _stat(d: dict) -> Stat:
    ci = d.get("ci") or (None, None)
    return Stat(_num(d.get("mean")), (_num(ci[0]), _num(ci[1])), int(d.get("n", 0)))


def report_from_json(d: dict) -> EvalReport:
    """The ``EvalReport`` of ``EvalReport.to_json()`` / ``write_json`` output (``None`` -> NaN, as
    ``json_clean`` wrote non-finite values; ``km_between_incidents`` None -> inf).  Raises ``KeyError`` /
    ``TypeError`` / ``ValueError`` on a malformed dict."""
    rollouts = [RolloutSummary(r["rollout_id"], r["scenario_id"], r["family"], int(r["seed"]), bool(r["failed"]),
                               r.get("fail_reason", ""), {k: _num(v) for k, v in r["metrics"].items()})
                for r in d.get("rollouts", [])]
    return EvalReport(policy=d["policy"], suite=d["suite"], suite_hash=d["suite_hash"], seed=int(d["seed"]),
                      overall={k: _stat(s) for k, s in d["overall"].items()},
                      per_family={f: {k: _stat(s) for k, s in m.items()} for f, m in d["per_family"].items()},
                      rollouts=rollouts, n_failed=int(d["n_failed"]),
                      km_between_incidents=_num(d.get("km_between_incidents"), math.inf),
                      seconds=_num(d.get("seconds"), 0.0), extra=dict(d.get("extra") or {}))
