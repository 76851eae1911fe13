"""The run-directory plumbing every trainer shares (imitation, GRPO, RoaD): one place for it.

A run directory holds ``config.yaml`` (resolved config), ``run.json`` (tracker run id and
lineage), trainer checkpoints (``roadloop.train.checkpointing``) and ``final/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from roadloop.errors import RoadloopError


def open_run_dir(out: str, resume: bool) -> tuple[Path, dict]:
    """(run directory, its previous ``run.json`` when resuming, else {}).  Refuses to start a new
    run over an existing one (``latest`` present) unless ``resume``."""
    run_dir = Path(out).expanduser()
    run_json = run_dir / "run.json"
    prev = json.loads(run_json.read_text()) if resume and run_json.is_file() else {}
    if not resume and (run_dir / "latest").exists():
        raise RoadloopError(f"{run_dir} already holds a training run; pass --resume to continue it or choose "
                            "another --out")
    return run_dir, prev


def make_tracker(cfg, run_dir: Path, resume_id: str | None):
    """The MLflow ``Tracker`` of a run (``cfg.experiment``; reattached when ``resume_id``), or a
    ``NullTracker`` when ``cfg.track`` is false."""
    from roadloop.train.tracking import Tracker

    if not cfg.track:
        return Tracker.disabled()
    return Tracker(cfg.experiment, run_name=run_dir.name, run_id=resume_id)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98)
          ) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on biases, norms and embeddings)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def eval_pool(cfg) -> tuple[list, str]:
    """(scenarios, suite hash) of ``cfg.eval_suite`` spread over ``cfg.eval_scenarios``; empty when
    ``cfg.eval_every`` is 0."""
    if not cfg.eval_every:
        return [], ""
    from roadloop.scenarios.suites import load_suite
    from roadloop.train.grpo import spread

    ev = load_suite(cfg.eval_suite)
    return spread(ev.scenarios, cfg.eval_scenarios), ev.content_hash


__all__ = ["adamw", "eval_pool", "make_tracker", "open_run_dir"]
