"""Resumable trainer checkpoints, written atomically, and guards against non-finite training steps.

Layout of a run directory::

    run_dir/
      latest                 text file: the name of the newest complete checkpoint ("ckpt-00001200")
      ckpt-00001000/         model weights + trainer state at step 1000
      ckpt-00001200/
        model.safetensors    weights (VLAModel: ``vla.model.save_checkpoint`` format, with config.json)
        config.json          VLAModel only: config, vocabulary fingerprint, weights hash, extra
        trainer.pt           torch.save: step, optimizer / scheduler state, extra, RNG states
      .tmp-ckpt-...          a save in progress, or left by a crash: never read, removed after an hour

A save builds the checkpoint in a temp directory inside ``run_dir`` (each file fsynced), renames it into
place, fsyncs the directory, then atomically rewrites ``latest``; only then are checkpoints beyond the newest
``keep`` deleted.  A crash at any point leaves ``latest`` naming a complete checkpoint (or the previous one).
One writer per run directory.

``trainer.pt`` is read with ``torch.load(weights_only=True)``: ``extra`` must hold plain Python values
(dict / list / tuple / str / int / float / bool / None) and tensors.  RNG states saved: torch CPU, torch
CUDA (all devices, when CUDA is available), numpy's global RNG, Python's ``random``.

Non-finite guards: ``save_train_state`` refuses to write a checkpoint whose weights or optimizer state hold
NaN / inf; ``check_finite`` (after ``backward``) raises ``NonFiniteError`` naming the loss or the first
parameter with a non-finite gradient; ``GoodState`` keeps an in-memory copy of the last good model +
optimizer state to roll back to.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from roadloop.errors import RoadloopError
from roadloop.io import atomic_write_bytes, atomic_write_text, json_clean

FORMAT = "roadloop-train/1"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
WEIGHTS_FILE = "model.safetensors"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")
_TMP_PREFIX = ".tmp-ckpt-"
_TRASH_PREFIX = ".trash-ckpt-"
_STALE_TMP_S = 3600.0


class NonFiniteError(RoadloopError):
    """A loss, gradient, weight or optimizer state is NaN / inf; ``what`` names it."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what


# ---------------------------------------------------------------------------------------------
# finiteness

def _first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first tensor holding a NaN / inf (one device sync for the common all-finite case)."""
    named = [(n, t) for n, t in named if t.is_floating_point() or t.is_complex()]
    if not named:
        return None
    ok = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in named])
    if bool(ok.all()):
        return None
    return named[int((~ok).nonzero()[0])][0]


def check_finite(loss: torch.Tensor, model: nn.Module) -> None:
    """Raise ``NonFiniteError`` if ``loss`` or any parameter's gradient is non-finite (call after backward)."""
    loss = torch.as_tensor(loss)
    if not bool(torch.isfinite(loss.detach()).all()):
        v = loss.detach().float()
        shown = f"{v.item()}" if v.numel() == 1 else f"shape {tuple(v.shape)}"
        raise NonFiniteError(f"non-finite loss ({shown})", what="loss")
    bad = _first_nonfinite([(n, p.grad) for n, p in model.named_parameters() if p.grad is not None])
    if bad is not None:
        raise NonFiniteError(f"non-finite gradient of parameter '{bad}'", what=f"grad:{bad}")


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[tuple[str, torch.Tensor]]:
    if optimizer is None:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out.append((f"optimizer state '{k}' of parameter '{names.get(id(p), '?')}'", v))
    return out


# ---------------------------------------------------------------------------------------------
# RNG

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], [int(x) for x in np_state[1]], int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} device(s), this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored", stacklevel=3)


# ---------------------------------------------------------------------------------------------
# file helpers

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _ckpt_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of ``ckpt-*`` directories, newest step first."""
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def _pointer(run_dir: Path) -> str | None:
    try:
        name = (run_dir / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _CKPT_RE.match(name) else None


def _looks_complete(p: Path) -> bool:
    return (p / TRAINER_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names if its files are there, else the newest complete ``ckpt-*``
    directory, else None.  (Cheap: files are not read; ``load_train_state`` verifies them.)"""
    run_dir = Path(run_dir)
    name = _pointer(run_dir)
    if name and _looks_complete(run_dir / name):
        return run_dir / name
    for _, p in _ckpt_dirs(run_dir):
        if _looks_complete(p):
            return p
    return None


def _is_vla(model: nn.Module) -> bool:
    from roadloop.policies.vla.model import VLAModel

    return isinstance(model, VLAModel)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# save

def save_train_state(run_dir: str | os.PathLike, step: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer | None, extra: dict | None = None, keep: int = 3,
                     scheduler: Any = None) -> Path:
    """Write ``run_dir/ckpt-{step:08d}/`` atomically, point ``latest`` at it, keep the newest ``keep``.

    Raises ``NonFiniteError`` (a ``RoadloopError``) without writing anything if a weight or an optimizer
    state tensor is NaN / inf; ``RoadloopError`` if ``extra`` is not plain data (see module docstring).
    """
    if keep < 1:
        raise RoadloopError(f"keep must be >= 1, got {keep}")
    step = int(step)
    if step < 0:
        raise RoadloopError(f"checkpoint step must be >= 0, got {step}")
    bad = _first_nonfinite(list(model.state_dict().items()))
    if bad is not None:
        raise NonFiniteError(f"refusing to save checkpoint at step {step}: model tensor '{bad}' is non-finite",
                             what=f"param:{bad}")
    bad = _first_nonfinite(_optimizer_tensors(model, optimizer))
    if bad is not None:
        raise NonFiniteError(f"refusing to save checkpoint at step {step}: {bad} is non-finite", what=bad)
    extra = dict(extra or {})
    buf = io.BytesIO()
    torch.save(extra, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as e:
        raise RoadloopError(f"checkpoint extra must hold plain Python values and tensors "
                            f"(loadable with torch.load(weights_only=True)): {str(e).splitlines()[0]}") from e

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}-", dir=run_dir))
    try:
        state = {"format": FORMAT, "step": step, "time": time.time(), "model_class": type(model).__qualname__,
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "extra": extra, "rng": _rng_state()}
        if _is_vla(model):
            from roadloop.policies.vla.model import save_checkpoint

            try:
                meta_extra = json.loads(json.dumps(json_clean({"step": step, "trainer": extra})))
            except (TypeError, ValueError):
                meta_extra = {"step": step}
            save_checkpoint(model, tmp, extra=meta_extra)
            state["weights_sha256"] = json.loads((tmp / "config.json").read_text())["weights_sha256"]
        else:
            from safetensors.torch import save

            data = save(_cpu_state(model))
            atomic_write_bytes(tmp / WEIGHTS_FILE, data)
            state["weights_sha256"] = hashlib.sha256(data).hexdigest()
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / TRAINER_FILE, buf.getvalue())
        _fsync_dir(tmp)
        trash = None
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=run_dir))
            os.replace(final, trash / final.name)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    _fsync_dir(run_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    _prune(run_dir, keep, final)
    return final


def _prune(run_dir: Path, keep: int, current: Path) -> None:
    for i, (_, p) in enumerate(_ckpt_dirs(run_dir)):
        if i >= keep and p != current:
            shutil.rmtree(p, ignore_errors=True)
    now = time.time()
    for p in run_dir.iterdir():
        if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and p.is_dir():
            try:
                stale = now - p.stat().st_mtime > _STALE_TMP_S
            except OSError:
                continue
            if stale:
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# load

class _Corrupt(Exception):
    """A checkpoint directory that cannot be read (missing / corrupt files): try an older one."""


def _read(path: Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify one checkpoint.  Raises _Corrupt (try another) or RoadloopError (incompatible)."""
    tpath = path / TRAINER_FILE
    if not tpath.is_file():
        raise _Corrupt(f"missing {TRAINER_FILE}")
    try:
        state = torch.load(tpath, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _Corrupt(f"cannot read {TRAINER_FILE}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _Corrupt(f"{TRAINER_FILE} is not a {FORMAT} file")
    if _is_vla(model):
        from roadloop.policies.vla.model import load_checkpoint

        cpath = path / "config.json"
        try:
            meta = json.loads(cpath.read_text())
            saved_cfg = meta["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _Corrupt(f"cannot read config.json: {e}") from e
        own = dataclasses.asdict(model.cfg)
        if isinstance(saved_cfg, dict) and saved_cfg != own:
            diff = [f"{k}: checkpoint {saved_cfg.get(k, '<missing>')!r}, model {own.get(k, '<missing>')!r}"
                    for k in sorted(set(own) | set(saved_cfg)) if saved_cfg.get(k) != own.get(k)]
            raise RoadloopError(f"checkpoint {path} was written for a different VLAConfig: " + "; ".join(diff))
        try:
            loaded, _ = load_checkpoint(path)  # verifies the weights hash, names, shapes
        except RoadloopError as e:
            raise _Corrupt(str(e)) from e
        sd = loaded.state_dict()
    else:
        from safetensors.torch import load

        wpath = path / WEIGHTS_FILE
        try:
            data = wpath.read_bytes()
        except OSError as e:
            raise _Corrupt(f"cannot read {WEIGHTS_FILE}: {e}") from e
        if state.get("weights_sha256") and hashlib.sha256(data).hexdigest() != state["weights_sha256"]:
            raise _Corrupt(f"{WEIGHTS_FILE} does not match the hash in {TRAINER_FILE}")
        try:
            sd = load(data)
        except Exception as e:
            raise _Corrupt(f"cannot read {WEIGHTS_FILE}: {e}") from e
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise RoadloopError(f"checkpoint {path} does not fit this {type(model).__name__}: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}")
    return sd, state


def load_train_state(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: Any = None, restore_rng: bool = True) -> dict | None:
    """Restore the newest valid checkpoint of ``run_dir`` into ``model`` (and optimizer / scheduler / RNG).

    Returns None when there is no checkpoint, else ``{"step", "extra", "path", "fallback"}``: ``fallback``
    is None, or a message when ``latest`` named a missing / unreadable checkpoint and an older complete one
    was used (also issued as a ``warnings.warn``).  Raises ``RoadloopError`` if the checkpoint does not fit
    the model (different VLAConfig, tensor names / shapes) or optimizer, or if no checkpoint is readable.
    """
    run_dir = Path(run_dir)
    dirs = _ckpt_dirs(run_dir)
    name = _pointer(run_dir)
    order: list[Path] = []
    if name:
        order.append(run_dir / name)
    order += [p for _, p in dirs if p.name != name]
    if not dirs and not (name and (run_dir / name).is_dir()):
        if name:
            warnings.warn(f"{run_dir / LATEST} names {name}, which does not exist, and there is no other "
                          f"checkpoint: starting from scratch", stacklevel=2)
        return None
    problems: list[str] = []
    for path in order:
        if not path.is_dir():
            problems.append(f"{path.name}: missing")
            continue
        try:
            sd, state = _read(path, model)
        except _Corrupt as e:
            problems.append(f"{path.name}: {e}")
            continue
        break
    else:
        raise RoadloopError(f"no readable checkpoint in {run_dir}: " + "; ".join(problems))

    fallback = None
    if problems:
        fallback = f"checkpoint(s) skipped ({'; '.join(problems)}); resumed from {path.name}"
        warnings.warn(f"{run_dir}: {fallback}", stacklevel=2)

    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise RoadloopError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}") from e
    if optimizer is not None:
        if state.get("optimizer") is None:
            warnings.warn(f"checkpoint {path} has no optimizer state: optimizer left as is", stacklevel=2)
        else:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise RoadloopError(f"checkpoint {path}: optimizer state does not fit this optimizer "
                                    f"({type(optimizer).__name__}): {e}") from e
    if scheduler is not None:
        if state.get("scheduler") is None:
            warnings.warn(f"checkpoint {path} has no scheduler state: scheduler left as is", stacklevel=2)
        else:
            scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        _set_rng_state(state["rng"])
    return {"step": int(state["step"]), "extra": state.get("extra") or {}, "path": path, "fallback": fallback}


# ---------------------------------------------------------------------------------------------
# in-memory rollback

class GoodState:
    """In-memory copy of model + optimizer (+ scheduler) state to roll back to after a non-finite step::

        good = GoodState(model, opt); good.snapshot()
        for step ...:
            loss.backward()
            try:
                check_finite(loss, model)
            except NonFiniteError:
                good.restore(); continue      # weights / moments as at the last snapshot, grads cleared
            opt.step(); good.snapshot()      # (or every N steps)

    The copy lives on the tensors' own device (one extra model + optimizer state in memory).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._model_state: dict[str, torch.Tensor] | None = None
        self._opt_state: dict | None = None
        self._sched_state: dict | None = None
        self.step: int | None = None
        self.restores = 0

    @property
    def has_snapshot(self) -> bool:
        return self._model_state is not None

    def snapshot(self, step: int | None = None) -> None:
        self._model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._opt_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        self._sched_state = copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None
        self.step = step

    def restore(self) -> int | None:
        """Load the snapshot back (grads set to None); returns the step given to ``snapshot``."""
        if self._model_state is None:
            raise RoadloopError("GoodState.restore() called before any snapshot()")
        self.model.load_state_dict(self._model_state)
        # deep copies: load_state_dict may alias the given tensors, and the snapshot must survive later steps
        if self.optimizer is not None and self._opt_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._opt_state))
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self._sched_state is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self._sched_state))
        self.model.zero_grad(set_to_none=True)
        self.restores += 1
        return self.step


__all__ = ["GoodState", "NonFiniteError", "check_finite", "latest_checkpoint", "load_train_state",
           "save_train_state"]
