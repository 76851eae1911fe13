"""VLA decoding latency at two code revisions, paired call by call in one process.

On a machine whose speed drifts (a shared VM: medians of one command 50 and 90 ms a few minutes
apart, docs/LOG.md 2026-12-06), timing two revisions one after the other measures the drift, not
the change.  This loads ``roadloop/policies/vla/model.py`` and ``roadloop/sim/dynamics.py`` as
they were at ``--base`` (any git revision) beside the working tree's, puts the same weights in
both models and alternates their calls (the order flipped every round) on the scene of
``roadloop bench vla``: ``VLAModel.sample`` (reasoning + trajectory, top-p sampling with seeded
generators) and the plan's ``unicycle_rollout``.  It reports medians, the median of the per-round
ratios (working tree / base) and whether both revisions gave the same bits.

Usage: python benchmarks/paired_decoding.py --base HEAD~1 --policy RUN/final [--batch 1,16]
       [--rounds 60] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"model": "roadloop/policies/vla/model.py", "dynamics": "roadloop/sim/dynamics.py"}


def base_modules(rev: str, tmp: Path) -> dict:
    """The ``MODULES`` as of git revision ``rev``, imported under private names."""
    out = {}
    for key, rel in MODULES.items():
        got = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True)
        if got.returncode != 0:
            raise SystemExit(f"paired_decoding: no {rel} at revision {rev!r}: {got.stderr.strip()}")
        src = got.stdout
        path = tmp / f"_base_{key}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"_base_{key}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
        out[key] = mod
    return out


def bench_inputs(model, batch: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs of ``roadloop bench vla``'s scene at ``batch`` rows, and the ego (xy, yaw, speed)."""
    from roadloop.bench import bench_observation
    from roadloop.policies.vla.policy import VLAPolicy

    obs = bench_observation(batch)
    inputs, _ = VLAPolicy(model).model_inputs(obs)
    s = obs.state
    return inputs, s.xy[:, 0], s.yaw[:, 0], s.speed[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--policy", required=True, help="VLA checkpoint directory")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--rounds", type=int, default=60, help="paired calls per batch size (the first 10 untimed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from roadloop.policies.vla import tokenizer as tok
    from roadloop.policies.vla.model import load_checkpoint
    from roadloop.sim import dynamics

    new, _ = load_checkpoint(a.policy)
    new.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        base = base_modules(a.base, Path(tmp))
        old = base["model"].VLAModel(base["model"].VLAConfig(**dataclasses.asdict(new.cfg)))
        old.load_state_dict(new.state_dict())
        old.eval()
        sides = {"base": (old, base["dynamics"]), "tree": (new, dynamics)}
        for batch in [int(x) for x in a.batch.split(",") if x.strip()]:
            inputs, xy, yaw, speed = bench_inputs(new, batch)
            times = {f"{k}_{part}": [] for k in sides for part in ("sample", "rollout")}
            outs = {}
            for r in range(a.rounds):
                for name in (("base", "tree") if r % 2 == 0 else ("tree", "base")):
                    model, dyn = sides[name]
                    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
                    t0 = time.perf_counter()
                    res = model.sample(inputs, 1.0, 0.95, gens)
                    t1 = time.perf_counter()
                    plan = dyn.unicycle_rollout(xy, yaw, speed, tok.dequantize(res[1], model.cfg.action_chunk))
                    t2 = time.perf_counter()
                    times[f"{name}_sample"].append(t1 - t0)
                    times[f"{name}_rollout"].append(t2 - t1)
                    outs.setdefault(name, (*res, *plan))
            same = all(torch.equal(x, y) for x, y in zip(outs["base"], outs["tree"], strict=True))
            row = {"batch": batch, "same_bits": same}
            for part in ("sample", "rollout"):
                b, t = (np.array(times[f"{k}_{part}"][10:]) * 1e3 for k in ("base", "tree"))
                row[part] = {"base_ms": float(np.median(b)), "tree_ms": float(np.median(t)),
                             "ratio": float(np.median(t / b))}
                print(f"batch {batch:4d} {part:8s} base {row[part]['base_ms']:8.2f} ms  tree "
                      f"{row[part]['tree_ms']:8.2f} ms  paired ratio {row[part]['ratio']:.3f}", flush=True)
            print(f"batch {batch:4d} same bits: {same}")
            rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps({"base": a.base, "threads": a.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
