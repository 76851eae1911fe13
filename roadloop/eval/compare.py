"""Paired comparison of two closed-loop evaluations (``roadloop compare``).

Two policies evaluated on the same scenarios with the same rollout seeds (``roadloop eval --json``) give
one pair of rollouts per (scenario, seed).  The change of a per-rollout metric is the mean of the
per-pair differences, with a 95% interval of that mean (Student's t); pairing removes the
scenario-to-scenario spread, which dominates an unpaired interval.  The independent units are the scenarios,
not the pairs: two seeds of one scenario share its layout and its traffic, so their differences are
correlated, and the interval is clustered by scenario (``mean_and_halfwidth``'s cluster-robust variance;
with one seed it is the plain one).  A change whose interval holds 0 is "within noise".

The rows (``COMPARE_METRICS``) are the evaluation's per-rollout metrics plus ``incident``: an at-fault
collision or an off-road excursion, counted once (the GRPO issue's safety target).  Failed rollouts and
non-finite values (e.g. reasoning metrics of a policy without text) leave their pair out.

A policy whose rollouts do not depend on the seed (rule-based, or a learned one decoded greedily: the
evaluation's ``extra.seed_independent``) drives the same rollout under every seed; where both sides are such
policies, each scenario is paired once, so evaluating them under several seeds does not narrow the interval.

``compare_by_family`` (``roadloop compare --by-family``) gives the score and incident rows within each
scenario family, where post-training's gains and losses usually differ most.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from roadloop.errors import RoadloopError
from roadloop.eval.evaluate import EvalReport, report_from_json

# (name, how it reads: "rate" (share, lower is better), "up" (higher is better) or "down" (lower is better))
COMPARE_METRICS: tuple[tuple[str, str], ...] = (
    ("score", "up"), ("incident", "rate"), ("collision_at_fault", "rate"), ("offroad", "rate"),
    ("comfort_violation", "rate"), ("red_light", "rate"), ("progress", "up"), ("dist_to_log", "down"),
    ("nuplan_score", "up"), ("reasoning_grounding", "up"), ("reasoning_consistency", "up"),
)
MIN_PAIRS = 10


def metric_value(name: str) -> Callable[[dict[str, float]], float]:
    """Reader of one per-rollout value from a rollout's metrics: the metric ``name``, or ``incident`` (1.0
    with an at-fault collision or an off-road excursion, else 0.0); NaN where the metrics lack it (or hold None)."""
    def get(m: dict[str, float], key: str) -> float:
        v = m.get(key)
        return math.nan if v is None else float(v)

    if name == "incident":
        def incident(m: dict[str, float]) -> float:
            a, o = get(m, "collision_at_fault"), get(m, "offroad")
            return float(a > 0 or o > 0) if math.isfinite(a) and math.isfinite(o) else math.nan
        return incident
    return lambda m: get(m, name)


def seed_independent(reports: Iterable[EvalReport]) -> bool:
    """Whether every report is of a policy whose rollouts do not depend on the seed (``extra``'s
    ``seed_independent``, written by ``evaluate``: a rule-based policy, a learned one decoded greedily)."""
    reports = list(reports)
    return bool(reports) and all(rep.extra.get("seed_independent") is True for rep in reports)


Pair = tuple[str, dict[str, float], dict[str, float]]  # (scenario id, metrics before, metrics after)


def paired_metrics(before: Iterable[EvalReport], after: Iterable[EvalReport]) -> list[Pair]:
    """(scenario id, metrics before, metrics after) of every (scenario, seed) rollout both sides evaluated
    without failure, in ``after``'s order.  Where both sides are ``seed_independent``, another seed repeats the
    same two rollouts, so each scenario is paired once (its lowest seed): copies are not more evidence."""
    before, after = list(before), list(after)
    ref = {(r.scenario_id, r.seed): r.metrics for rep in before for r in rep.rollouts if not r.failed}
    pairs = [(k, ref[k], r.metrics) for rep in after for r in rep.rollouts
             if not r.failed and (k := (r.scenario_id, r.seed)) in ref]
    if seed_independent(before) and seed_independent(after):
        first: dict[str, int] = {}
        for (sid, seed), _, _ in pairs:
            first[sid] = min(seed, first.get(sid, seed))
        pairs = [p for p in pairs if p[0][1] == first[p[0][0]]]
    return [(sid, b, a) for (sid, _), b, a in pairs]


def paired_diffs(before: Iterable[EvalReport], after: Iterable[EvalReport],
                 value: Callable[[dict[str, float]], float], pairs: list[Pair] | None = None
                 ) -> tuple[list[float], list[float], list[str]]:
    """(values before, values after, scenario ids) of the ``paired_metrics`` pairs (given, or built from the
    reports) whose ``value`` is finite on both sides."""
    vb, va, ids = [], [], []
    for sid, mb, ma in paired_metrics(before, after) if pairs is None else pairs:
        b, a = value(mb), value(ma)
        if math.isfinite(a) and math.isfinite(b):
            vb.append(b)
            va.append(a)
            ids.append(sid)
    return vb, va, ids


def t95(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom (1.96 as df grows):
    the intervals below are over a handful of scenarios in a small family, where 1.96 would be too narrow."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_and_halfwidth(diffs: Sequence[float], clusters: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """(mean, 95% half-width of the mean) of ``diffs`` (at least 2 values): t_{n-1} x sd / sqrt(n).

    ``clusters`` (one key per value, e.g. the scenario of each pair): values of one cluster are not independent,
    so the variance of the mean is the cluster-robust one, C / (C - 1) * sum_c (sum_{i in c} (x_i - mean))^2 / n^2
    over C clusters (at least 2), with t_{C-1}; with every value its own cluster it is the plain one."""
    n = len(diffs)
    if clusters is not None and len(clusters) != n:
        raise RoadloopError(f"mean_and_halfwidth: {n} values but {len(clusters)} cluster keys")
    mean = sum(diffs) / n
    if clusters is None or len(set(clusters)) == n:
        sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
        return mean, t95(n - 1) * sd / math.sqrt(n)
    sums: dict[Hashable, float] = {}
    for x, c in zip(diffs, clusters, strict=True):
        sums[c] = sums.get(c, 0.0) + (x - mean)
    c = len(sums)
    if c < 2:
        return mean, math.nan
    var = c / (c - 1) * sum(v * v for v in sums.values()) / (n * n)
    return mean, t95(c - 1) * math.sqrt(var)


def verdict(change: float, halfwidth: float, kind: str) -> str:
    """``unchanged`` (every pair equal), ``within noise`` (the interval holds 0), else ``better`` / ``worse``
    for a metric read as ``kind`` (``up``: higher is better; ``rate`` / ``down``: lower is better)."""
    if change == 0 and halfwidth == 0:
        return "unchanged"
    if abs(change) <= halfwidth:
        return "within noise"
    return "better" if (change > 0) == (kind == "up") else "worse"


def grouped_change(before: Sequence[float], after: Sequence[float], group: int) -> tuple[float, float, int]:
    """Paired change of rollouts that come in groups of ``group`` consecutive ones sharing a scenario (GRPO's
    collections): (mean of the groups' mean differences, its 95% half-width, groups used).  The groups are
    the independent units; pairs with a non-finite side are left out, and groups left empty with them."""
    if len(before) != len(after) or group < 1 or len(before) % group:
        raise RoadloopError(f"grouped_change: {len(before)} and {len(after)} rollouts do not form groups of {group}")
    means = []
    for g in range(0, len(before), group):
        d = [a - b for b, a in zip(before[g:g + group], after[g:g + group], strict=True)
             if math.isfinite(a) and math.isfinite(b)]
        if d:
            means.append(sum(d) / len(d))
    if len(means) < 2:
        return math.nan, math.nan, len(means)
    change, hw = mean_and_halfwidth(means)
    return change, hw, len(means)


@dataclass
class PairedRow:
    metric: str
    kind: str  # rate / up / down
    n: int  # pairs
    before: float
    after: float
    change: float  # mean of after - before over the pairs
    halfwidth: float  # 95% half-width of ``change``
    verdict: str  # better / worse / within noise (the interval holds 0) / unchanged (every pair equal)
    scenarios: int = 0  # distinct scenarios among the pairs (the interval's independent units)

    @property
    def relative(self) -> float:
        """change / before (NaN when before is 0)."""
        return self.change / self.before if self.before else math.nan


def compare_reports(before: Sequence[EvalReport], after: Sequence[EvalReport],
                    metrics: Sequence[tuple[str, str]] = COMPARE_METRICS, min_pairs: int = MIN_PAIRS
                    ) -> list[PairedRow]:
    """One ``PairedRow`` per metric with at least ``min_pairs`` pairs.  Raises ``RoadloopError`` when the two
    sides share fewer than ``min_pairs`` (scenario, seed) rollouts."""
    rows = []
    pairs = paired_metrics(before, after)
    for name, kind in metrics:
        vb, va, ids = paired_diffs(before, after, metric_value(name), pairs)
        if len(vb) < max(2, min_pairs) or len(set(ids)) < 2:
            continue
        change, hw = mean_and_halfwidth([a - b for a, b in zip(va, vb, strict=True)], ids)
        rows.append(PairedRow(name, kind, len(vb), sum(vb) / len(vb), sum(va) / len(va), change, hw,
                              verdict(change, hw, kind), len(set(ids))))
    if not rows:
        raise RoadloopError(f"the two evaluations share fewer than {min_pairs} (scenario, seed) rollouts "
                            f"without failure: evaluate both policies on the same suites with the same --seed")
    return rows


FAMILY_METRICS: tuple[tuple[str, str], ...] = (("score", "up"), ("incident", "rate"))
MIN_FAMILY_PAIRS = 5


def compare_by_family(before: Sequence[EvalReport], after: Sequence[EvalReport],
                      metrics: Sequence[tuple[str, str]] = FAMILY_METRICS, min_pairs: int = MIN_FAMILY_PAIRS
                      ) -> tuple[dict[str, list[PairedRow]], dict[str, int]]:
    """``compare_reports`` within each scenario family (of the ``after`` rollouts): ({family: rows} for the
    families with at least ``min_pairs`` pairs, {family: pairs} for the others).  The intervals are the same
    t interval over fewer scenarios: wide for a family of a few scenarios."""
    fams = sorted({r.family for rep in after for r in rep.rollouts})
    rows, few = {}, {}
    for f in fams:
        b = [dataclasses.replace(rep, rollouts=[r for r in rep.rollouts if r.family == f]) for rep in before]
        a = [dataclasses.replace(rep, rollouts=[r for r in rep.rollouts if r.family == f]) for rep in after]
        n = len(paired_metrics(b, a))
        if n < max(2, min_pairs):
            few[f] = n
            continue
        rows[f] = compare_reports(b, a, metrics, min_pairs=min_pairs)
    return rows, few


def load_reports(paths: str | Sequence[str | Path]) -> list[EvalReport]:
    """``EvalReport``s of ``roadloop eval --json`` files (a comma-separated string or a list of paths)."""
    items = [p for p in (paths.split(",") if isinstance(paths, str) else paths) if str(p).strip()]
    if not items:
        raise RoadloopError("no evaluation JSON given")
    out = []
    for p in items:
        path = Path(str(p).strip()).expanduser()
        if not path.is_file():
            raise RoadloopError(f"{path}: no such evaluation JSON (write one with roadloop eval --json)")
        try:
            d = json.loads(path.read_text())
            rep = report_from_json(d)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RoadloopError(f"{path}: not a roadloop eval --json file ({type(e).__name__}: {e})") from e
        if not rep.rollouts:
            raise RoadloopError(f"{path}: holds no per-rollout records, so nothing can be paired")
        out.append(rep)
    return out


def rows_to_json(rows: Sequence[PairedRow], before: Sequence[EvalReport], after: Sequence[EvalReport],
                 families: dict[str, list[PairedRow]] | None = None) -> dict:
    """The JSON ``roadloop compare --json`` writes; ``families`` (``compare_by_family``) adds per-family rows."""
    def js(rs: Sequence[PairedRow]) -> list[dict]:
        return [asdict(r) | {"relative": r.relative} for r in rs]

    out = {"before": [{"policy": r.policy, "suite": r.suite, "seed": r.seed} for r in before],
           "after": [{"policy": r.policy, "suite": r.suite, "seed": r.seed} for r in after],
           "rows": js(rows)}
    if families is not None:
        out["families"] = {f: js(rs) for f, rs in families.items()}
    return out
