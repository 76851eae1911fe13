"""The run-directory plumbing every trainer shares (imitation, GRPO, RoaD): one place for it.

A run directory holds ``config.yaml`` (resolved config), ``run.json`` (tracker run id and
lineage), trainer checkpoints (``roadloop.train.checkpointing``) and ``final/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from roadloop.config import resolve_device, to_yaml
from roadloop.errors import ConfigError, RoadloopError
from roadloop.io import atomic_write_text
from roadloop.policies.vla.model import VLAConfig, VLAModel, load_checkpoint
from roadloop.sim.datatypes import Scenario


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


def cosine_lr(lr: float, progress: float, min_frac: float) -> float:
    """Cosine decay from ``lr`` at ``progress`` 0 to ``min_frac`` x ``lr`` at 1 (progress clamped to [0, 1])."""
    p = min(1.0, max(0.0, progress))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def check_init_model(model: VLAModel, cfg) -> None:
    """``ConfigError`` if the init checkpoint's architecture is not ``cfg.model_preset``'s (any config with
    ``init`` and ``model_preset``: GRPO, RoaD)."""
    if cfg.model_preset is None:
        return
    want = dataclasses.asdict(VLAConfig.preset(cfg.model_preset))
    have = dataclasses.asdict(model.cfg)
    diff = [f"{k}: checkpoint {have[k]!r}, preset {want[k]!r}" for k in want if k != "dropout" and want[k] != have[k]]
    if diff:
        raise ConfigError(f"init checkpoint {cfg.init} is not a '{cfg.model_preset}' model: " + "; ".join(diff))


def load_pool(suites: str, families: str = "", max_scenarios: int = 0) -> tuple[list[Scenario], dict[str, str]]:
    """Scenarios of the comma-separated suites (filtered), and {suite: content hash}.  Empty: ConfigError."""
    from roadloop.scenarios.suites import load_suite

    names = [s.strip() for s in suites.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"no scenario suite given (suites='{suites}')")
    fams = {f.strip() for f in families.split(",") if f.strip()}
    pool, hashes = [], {}
    for n in names:
        s = load_suite(n)
        hashes[n] = s.content_hash
        pool += [sc for sc in s.scenarios if not fams or sc.meta.family in fams]
    if max_scenarios:
        pool = pool[:max_scenarios]
    if not pool:
        raise ConfigError(f"suites '{suites}' hold no scenarios" + (f" of the families {sorted(fams)}" if fams else ""))
    return pool, hashes


def spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (suites are ordered by family, so every family is
    represented); all of them if ``n`` is 0 or >= len(items)."""
    if not n or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def eval_pool(cfg) -> tuple[list, str]:
    """(scenarios, suite hash) of ``cfg.eval_suite`` spread over ``cfg.eval_scenarios``; empty when
    ``cfg.eval_every`` is 0."""
    if not cfg.eval_every:
        return [], ""
    from roadloop.scenarios.suites import load_suite

    ev = load_suite(cfg.eval_suite)
    return spread(ev.scenarios, cfg.eval_scenarios), ev.content_hash


def restore(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, resume: bool, unit: str, total: int,
            log: Callable[[str], None]) -> tuple[int, float, dict | None]:
    """(step, elapsed seconds, checkpoint state or None): the newest trainer checkpoint of ``run_dir``
    loaded into ``model`` / ``opt`` when resuming, else a fresh start."""
    from roadloop.train.checkpointing import load_train_state

    state = load_train_state(run_dir, model, opt) if resume else None
    if state is None:
        if resume:
            log(f"no checkpoint in {run_dir}: starting from {unit} 0")
        return 0, 0.0, None
    step = int(state["step"])
    log(f"resumed {state['path']} at {unit} {step}/{total}")
    return step, float(state["extra"].get("elapsed", 0.0)), state


def begin_run(cfg, run_dir: Path, prev: dict, lineage: dict):
    """Create the run directory, write ``config.yaml``, open the tracker (reattached to the previous
    run when resuming) and write ``run.json`` = ``{"run_id", **lineage}``.  Returns (tracker, lineage
    with the run id)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    tracker = make_tracker(cfg, run_dir, prev.get("run_id"))
    lineage = {"run_id": tracker.run_id, **lineage}
    atomic_write_text(run_dir / "run.json", json.dumps(lineage, indent=1))
    return tracker, lineage


@dataclass
class PostTrainingStart:
    """What GRPO and RoaD share before their first iteration (``start_post_training``)."""

    model: VLAModel  # loaded from the init checkpoint (also the lineage parent)
    init_dir: Path
    init_sha: str  # weights sha256 of the init checkpoint
    pool: list[Scenario]  # training scenarios
    hashes: dict[str, str]  # training suite -> content hash
    run_dir: Path
    prev: dict  # the previous run.json when resuming, else {}
    ev_pool: list[Scenario]
    ev_hash: str

    def lineage(self, cfg) -> dict:
        return {"init": str(self.init_dir), "init_weights_sha256": self.init_sha, "suites": self.hashes,
                "eval_suite": {cfg.eval_suite: self.ev_hash} if self.ev_hash else {}}


def start_post_training(cfg, resume: bool) -> PostTrainingStart:
    """Validate ``cfg``, load and check the init checkpoint, the training and evaluation scenarios and
    the run directory; a resumed run must keep its init checkpoint and suites.  Every bad input is an
    error here, before any compute."""
    cfg.validate()
    init_dir = Path(cfg.init).expanduser()
    model, meta = load_checkpoint(init_dir, resolve_device(cfg.device))
    check_init_model(model, cfg)
    init_sha = meta["weights_sha256"]
    pool, hashes = load_pool(cfg.suites, cfg.families, cfg.max_scenarios)
    run_dir, prev = open_run_dir(cfg.out, resume)
    if prev and prev.get("init_weights_sha256") != init_sha:
        raise RoadloopError(f"--init {init_dir} (weights {init_sha[:12]}) is not the checkpoint this run started "
                            f"from ({prev.get('init')}, {str(prev.get('init_weights_sha256'))[:12]})")
    if prev and prev.get("suites") != hashes:
        raise RoadloopError(f"suites {hashes} differ from the ones this run started on ({prev.get('suites')}); "
                            "not resuming on other scenarios")
    ev_pool, ev_hash = eval_pool(cfg)
    return PostTrainingStart(model, init_dir, init_sha, pool, hashes, run_dir, prev, ev_pool, ev_hash)


__all__ = ["PostTrainingStart", "adamw", "begin_run", "check_init_model", "cosine_lr", "eval_pool", "load_pool",
           "make_tracker", "open_run_dir", "restore", "spread", "start_post_training"]
