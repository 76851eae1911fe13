"""The benchmark scripts under ``benchmarks/`` that run without a GPU or prepared data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from roadloop.policies.vla.model import PRESETS, VLAModel, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_paired_decoding_against_the_committed_code(tmp_path):
    """``paired_decoding.py`` loads the decoder and the plan rollout as of a git revision beside the
    working tree's and alternates them: every timing is a positive number, and against HEAD both
    give the same bits (checked when the two files are as committed: an edit in progress may
    change them on purpose)."""
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("not a git checkout")
    unchanged = _git("diff", "--quiet", "HEAD", "--", "roadloop/policies/vla/model.py",
                     "roadloop/sim/dynamics.py").returncode == 0
    torch.manual_seed(0)
    save_checkpoint(VLAModel(PRESETS["tiny"]), tmp_path / "ck")
    out = tmp_path / "paired.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_decoding.py"), "--base", "HEAD",
                        "--policy", str(tmp_path / "ck"), "--batch", "1,3", "--rounds", "12", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert row["same_bits"] is True or not unchanged
        for part in ("sample", "rollout"):
            assert row[part]["base_ms"] > 0 and row[part]["tree_ms"] > 0 and row[part]["ratio"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_decoding.py"), "--base", "no-such-rev",
                          "--policy", str(tmp_path / "ck")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "no roadloop/policies/vla/model.py at revision 'no-such-rev'" in bad.stderr
