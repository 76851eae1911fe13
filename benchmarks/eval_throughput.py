"""Evaluation throughput: scenarios evaluated per second per policy, and how time grows with
suite size.  Usage: python benchmarks/eval_throughput.py [--suite val] [--sizes 30,60,120,240]."""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from roadloop.eval.evaluate import evaluate
from roadloop.policies import get_policy
from roadloop.scenarios.suites import load_suite


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="val")
    ap.add_argument("--sizes", default="30,60,120,240")
    ap.add_argument("--policies", default="route-idm,expert")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    suite = load_suite(a.suite)
    rows = []
    for name in a.policies.split(","):
        for n in [int(x) for x in a.sizes.split(",")]:
            scs = suite.scenarios[:n]
            t0 = time.perf_counter()
            rep, _ = evaluate(get_policy(name), scs, batch_size=a.batch_size)
            dt = time.perf_counter() - t0
            rows.append({"policy": name, "n": len(scs), "seconds": dt, "scenarios_per_s": len(scs) / dt,
                         "score": rep.overall["score"].mean})
            print(f"{name:10s} n={len(scs):4d} {dt:7.1f} s  {len(scs) / dt:6.2f} scenarios/s  "
                  f"score {rep.overall['score'].mean:.3f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": platform.processor(), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
