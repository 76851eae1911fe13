"""Checkpoint assertions shared by the trainers' tests."""

from __future__ import annotations

from pathlib import Path

import torch

from roadloop.policies.vla.model import load_checkpoint


def assert_same_weights(ckpt_a: str | Path, ckpt_b: str | Path) -> None:
    """Two VLA checkpoint folders hold the same tensors, bit for bit (a resumed run against a straight one)."""
    a = load_checkpoint(ckpt_a)[0].state_dict()
    b = load_checkpoint(ckpt_b)[0].state_dict()
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{k} differs between {ckpt_a} and {ckpt_b}"
