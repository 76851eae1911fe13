"""Deterministic replay of evaluated rollouts.

A rollout is identified by ``<scenario id>#<seed>@<policy name>@<policy version>``.  When
``roadloop eval`` runs, each evaluated batch is recorded in the rollout store
(``$ROADLOOP_HOME/rollouts/``, default ``~/.roadloop/rollouts``): the suite (name or folder and
content hash), the exact batch composition and order, the seed, the rollout config and a
SHA-256 digest of every rollout's recorded tensors.  ``replay(rollout_id)`` reloads the suite,
checks its hash, re-runs that batch with the same policy, seed and config, and compares the
digest: replay is bit-identical on the same machine.

The policy is rebuilt from its ``source`` (``Policy.source``: a registered name, a checkpoint folder, or
a registry reference ``registry:NAME@VERSION``) with its recorded ``settings`` (a learned policy's
decoding: temperature, top-p), and must have the recorded version (for a learned policy the weights'
hash and the decoding).  Records written before the source was kept replay registered policies only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from roadloop.errors import RoadloopError, UnknownNameError
from roadloop.io import atomic_write_text, roadloop_home
from roadloop.policies.base import Policy
from roadloop.rollout import Rollout, RolloutConfig, rollout
from roadloop.sim.config import IDMParams, SimConfig


def store_dir() -> Path:
    return roadloop_home() / "rollouts"


def row_digest(ro: Rollout, b: int) -> str:
    """SHA-256 over rollout ``b``'s tensors (states, controls, checks, plans), bit-exact."""
    h = hashlib.sha256()
    for name, t in ro.tensor_items():
        if t.dim() == 0:
            continue
        if name in ("scored", "decision_steps"):  # no batch dimension
            row = t
        elif name in ("failed", "seeds"):  # (B,)
            row = t[b:b + 1]
        else:  # time-major: (T or D, B, ...)
            row = t[:, b]
        h.update(name.encode())
        h.update(row.contiguous().numpy().tobytes())
    for texts in ro.reasoning:
        h.update(texts[b].encode())
    return h.hexdigest()


def rollout_id(scenario_id: str, seed: int, policy: str) -> str:
    return f"{scenario_id}#{seed}@{policy}"


@dataclass
class BatchRecord:
    suite: str  # name or folder
    suite_hash: str
    policy: str  # name (or checkpoint path)
    policy_version: str
    seed: int
    scenario_ids: list[str]  # batch order
    digests: list[str]
    rollout_cfg: dict
    policy_source: str | None = None  # what get_policy rebuilds it from (None: its name)
    policy_settings: dict = dataclasses.field(default_factory=dict)  # Policy.settings(), set again on replay

    @property
    def rollout_ids(self) -> list[str]:
        return [rollout_id(s, self.seed, f"{self.policy}@{self.policy_version}") for s in self.scenario_ids]


def _cfg_to_dict(cfg: RolloutConfig) -> dict:
    return dataclasses.asdict(cfg)


def _cfg_from_dict(d: dict) -> RolloutConfig:
    sim = dict(d["sim"])
    sim["vehicle_idm"] = IDMParams(**sim["vehicle_idm"])
    sim["pedestrian_idm"] = IDMParams(**sim["pedestrian_idm"])
    return RolloutConfig(replan_every=d["replan_every"], max_steps=d["max_steps"], warmup=d["warmup"],
                         sim=SimConfig(**sim))


def record_batch(ro: Rollout, suite: str, suite_hash: str, policy: Policy, cfg: RolloutConfig) -> BatchRecord:
    """Write the replay record of one batch ``policy`` drove (atomically) and return it."""
    rec = BatchRecord(suite=suite, suite_hash=suite_hash, policy=policy.name, policy_version=policy.version,
                      seed=int(ro.seeds[0]), scenario_ids=list(ro.scenario_ids),
                      digests=[row_digest(ro, b) for b in range(ro.batch_size)], rollout_cfg=_cfg_to_dict(cfg),
                      policy_source=policy.source, policy_settings=dict(policy.settings()))
    key = hashlib.sha256(json.dumps(dataclasses.asdict(rec), sort_keys=True).encode()).hexdigest()[:24]
    atomic_write_text(store_dir() / f"{key}.json", json.dumps(dataclasses.asdict(rec)))
    return rec


def find(rollout_id_: str) -> tuple[BatchRecord, int]:
    """The stored batch record containing ``rollout_id_`` and its row."""
    d = store_dir()
    if d.exists():
        for p in sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                rec = BatchRecord(**json.loads(p.read_text()))
            except (json.JSONDecodeError, TypeError) as e:
                raise RoadloopError(f"rollout store file {p} is corrupt: {e}") from e
            ids = rec.rollout_ids
            if rollout_id_ in ids:
                return rec, ids.index(rollout_id_)
    raise RoadloopError(f"no recorded rollout '{rollout_id_}' in {d} (run `roadloop eval` first; ids look like "
                        "'cut_in/000003#0@expert@1')")


@dataclass
class ReplayResult:
    rollout_id: str
    identical: bool
    recorded: str
    replayed: str
    rollout: Rollout
    row: int


def replay(rollout_id_: str) -> ReplayResult:
    """Re-run a recorded rollout and compare it bit for bit with the record."""
    from roadloop.policies import get_policy
    from roadloop.scenarios.suites import load_suite
    from roadloop.sim.batching import collate

    rec, row = find(rollout_id_)
    suite = load_suite(rec.suite)
    if suite.content_hash != rec.suite_hash:
        raise RoadloopError(f"suite '{rec.suite}' changed since the rollout was recorded "
                            f"(hash {suite.content_hash[:12]} != {rec.suite_hash[:12]})")
    by_id = {s.meta.scenario_id: s for s in suite.scenarios}
    missing = [i for i in rec.scenario_ids if i not in by_id]
    if missing:
        raise RoadloopError(f"suite '{rec.suite}' lacks scenarios {missing[:3]}")
    source = rec.policy_source or rec.policy
    try:
        policy = get_policy(source)
    except UnknownNameError as e:
        raise RoadloopError(f"cannot rebuild the policy of {rollout_id_}: {e}") from e
    policy.apply_settings(rec.policy_settings)
    if policy.version != rec.policy_version:
        raise RoadloopError(f"policy '{source}' is now version {policy.version}, the rollout was recorded "
                            f"with version {rec.policy_version}")
    batch = collate([by_id[i] for i in rec.scenario_ids])
    seeds = torch.full((len(rec.scenario_ids),), rec.seed, dtype=torch.int64)
    with torch.inference_mode():
        ro = rollout(policy, batch, seeds, _cfg_from_dict(rec.rollout_cfg))
    got = row_digest(ro, row)
    return ReplayResult(rollout_id_, got == rec.digests[row], rec.digests[row], got, ro, row)
