"""The validation matrix the gates judge: every family of the declared suites (``val`` and ``sumo-real-val`` by
default), each scenario rolled out once per seed, merged into one ``EvalReport``.  A policy whose rollouts do not
depend on the seed (``Policy.seed_independent``: the expert, ``route-idm``) drives each scenario once; the other
seeds' rollouts are the same ones (``evaluate.reseeded``).

The merged report's ``per_family`` is the matrix (procedural families and one ``sumo_<network>`` family per
real network); ``extra["maps"]`` counts rollouts per map (``procedural`` or the SUMO network name, from the
scenario's ``meta.source``) and ``extra["matrix"]`` says what was run, including ``key``: a hash of the
suites' content hashes, seeds, scenario limit, batch size, replanning rate, temperature and the sources that
decide a rollout's outcome (simulator, scenarios, metrics, rollout loop, policies, reasoning checks).  Two
reports with the same key are comparable and a recorded report is reused for a key instead of re-running it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from roadloop.errors import ConfigError
from roadloop.eval.evaluate import EvalReport, summarize
from roadloop.registry.lineage import PACKAGE_DIR, canonical_sha256

# sources whose changes can change a rollout's metrics
_EVAL_SOURCES = ("sim", "scenarios", "sumo", "eval/metrics.py", "eval/evaluate.py", "rollout.py", "policies",
                 "reasoning")


@dataclass
class MatrixConfig:
    suites: list[str] = field(default_factory=lambda: ["val", "sumo-real-val"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # rollouts per scenario = len(seeds)
    max_per_family: int = 0  # 0: every scenario; N: the first N of each family per suite (quick runs)
    batch_size: int = 64
    replan_hz: float | None = None  # None: the policy's own rate (2 Hz for the VLA policy)
    temperature: float | None = None  # None: the policy's own (VLA: 1.0, top-p 0.95)

    def validate(self) -> MatrixConfig:
        if not self.suites:
            raise ConfigError("gates matrix.suites must name at least one suite")
        if not self.seeds:
            raise ConfigError("gates matrix.seeds must hold at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"gates matrix.seeds has duplicates: {list(self.seeds)}")
        if self.max_per_family < 0 or self.batch_size < 1:
            raise ConfigError("gates matrix.max_per_family must be >= 0 and matrix.batch_size >= 1")
        return self


@dataclass(frozen=True)
class MatrixSuite:
    name: str
    content_hash: str  # of the (possibly limited) scenario list
    scenarios: list


def eval_code_hash() -> str:
    """SHA-256 (16 hex) of the sources that decide a rollout's outcome (``_EVAL_SOURCES``)."""
    h = hashlib.sha256()
    for rel in _EVAL_SOURCES:
        p = PACKAGE_DIR / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(f.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def map_of(meta) -> str:
    """``procedural`` or the SUMO network name of a scenario (``meta.source`` ``sumo:<network>``)."""
    src = str(getattr(meta, "source", "") or "")
    return src.split(":", 1)[1] if src.startswith("sumo:") else (src or "unknown")


def load_matrix(cfg: MatrixConfig) -> list[MatrixSuite]:
    """The matrix's suites (named suites are built / read from the cache), limited to ``max_per_family``."""
    from roadloop.scenarios.suites import content_hash, load_suite

    out = []
    for name in cfg.suites:
        s = load_suite(name)
        scs = list(s.scenarios)
        if cfg.max_per_family:
            seen: Counter = Counter()
            keep = []
            for sc in scs:
                if seen[sc.meta.family] < cfg.max_per_family:
                    seen[sc.meta.family] += 1
                    keep.append(sc)
            scs = keep
        h = s.content_hash if len(scs) == len(s.scenarios) else content_hash(scs)
        out.append(MatrixSuite(s.name, h, scs))
    return out


def matrix_key(cfg: MatrixConfig, suites: list[MatrixSuite]) -> str:
    return canonical_sha256({"suites": [[s.name, s.content_hash] for s in suites], "seeds": list(cfg.seeds),
                             "max_per_family": cfg.max_per_family, "batch_size": cfg.batch_size,
                             "replan_hz": cfg.replan_hz, "temperature": cfg.temperature,
                             "eval_code": eval_code_hash()})[:32]


def merge_reports(reports: list[EvalReport], suite: str, suite_hash: str, extra: dict | None = None) -> EvalReport:
    """One report over the rollouts of several (suite, seed) reports: aggregates recomputed, and CIs that
    resample scenarios (a cluster bootstrap: the seeds of one scenario, or a seed-independent policy's copies
    of one rollout, are not independent draws)."""
    rollouts = [r for rep in reports for r in rep.rollouts]
    keys = list(reports[0].overall) if reports else []
    arr = {k: np.array([r.metrics.get(k, math.nan) for r in rollouts], dtype=np.float64) for k in keys}
    scen = np.array([r.scenario_id for r in rollouts], dtype=object)
    overall = summarize(arr, scen) if rollouts else {}
    per_family = {}
    for f in sorted({r.family for r in rollouts}):
        mask = np.array([r.family == f for r in rollouts])
        per_family[f] = summarize({k: v[mask] for k, v in arr.items()}, scen[mask])
    incidents = np.nansum(arr["collision_at_fault"]) + np.nansum(arr["offroad"]) if rollouts else 0.0
    km = float(np.nansum(arr["km"])) if rollouts else 0.0
    return EvalReport(policy=reports[0].policy if reports else "", suite=suite, suite_hash=suite_hash,
                      seed=reports[0].seed if reports else 0, overall=overall, per_family=per_family,
                      rollouts=rollouts, n_failed=sum(r.failed for r in rollouts),
                      km_between_incidents=km / incidents if incidents > 0 else math.inf,
                      seconds=sum(r.seconds for r in reports), extra=dict(extra or {}))


def evaluate_matrix(policy, cfg: MatrixConfig, suites: list[MatrixSuite] | None = None,
                    on_batch: Callable[[int], None] | None = None) -> EvalReport:
    """Roll ``policy`` out on every suite x seed of the matrix; one merged report (module docstring)."""
    from roadloop.eval.evaluate import evaluate, reseeded
    from roadloop.rollout import RolloutConfig

    suites = load_matrix(cfg) if suites is None else suites
    policy.set_decoding("gates matrix.temperature", temperature=cfg.temperature)
    every = policy.replan_every
    if cfg.replan_hz is not None:
        every = round(10.0 / cfg.replan_hz) if cfg.replan_hz > 0 else 0
        if every < 1 or abs(10.0 / every - cfg.replan_hz) > 1e-6:
            raise ConfigError(f"gates matrix.replan_hz must divide 10 Hz (10, 5, 2, 1...), got {cfg.replan_hz}")
    reports = []
    maps: Counter = Counter()
    for s in suites:
        first = None
        for seed in cfg.seeds:
            if first is not None and getattr(policy, "seed_independent", False):
                rep = reseeded(first, int(seed))  # the same rollouts: drive them once
                if on_batch:
                    on_batch(len(s.scenarios))
            else:
                rep, _ = evaluate(policy, s.scenarios, suite_name=s.name, suite_hash=s.content_hash, seed=int(seed),
                                  batch_size=cfg.batch_size, cfg=RolloutConfig(replan_every=every), on_batch=on_batch)
                first = rep
            reports.append(rep)
            maps.update(map_of(sc.meta) for sc in s.scenarios)
    key = matrix_key(cfg, suites)
    name = "matrix:" + "+".join(s.name for s in suites)
    suite_hash = canonical_sha256([[s.name, s.content_hash] for s in suites])
    extra = {"matrix": {"key": key, "suites": {s.name: s.content_hash for s in suites}, "seeds": list(cfg.seeds),
                        "max_per_family": cfg.max_per_family, "batch_size": cfg.batch_size, "replan_every": every,
                        "policy_settings": policy.settings(), "eval_code": eval_code_hash()},
             "maps": dict(sorted(maps.items())), "seed_independent": bool(policy.seed_independent)}
    return merge_reports(reports, name, suite_hash, extra)


def matrix_size(suites: list[MatrixSuite], cfg: MatrixConfig) -> int:
    """Rollouts one policy needs on the matrix."""
    return sum(len(s.scenarios) for s in suites) * len(cfg.seeds)


__all__ = ["MatrixConfig", "MatrixSuite", "eval_code_hash", "evaluate_matrix", "load_matrix", "map_of",
           "matrix_key", "matrix_size", "merge_reports"]
