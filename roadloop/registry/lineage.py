"""Lineage of a registered checkpoint and the SHA-256 manifest of its artifacts.

* ``code_version()``: git commit, whether the work tree was dirty (tracked changes or untracked files,
  ``git status --porcelain``), and a SHA-256 of roadloop's own sources and configs (pins the code even when
  the tree is dirty or the package is installed without git).
* ``build_lineage(meta, given, ...)``: the normalised lineage dict stored with every registered version.
  Keys a trainer passes in ``given`` win over what its ``save_checkpoint(extra=...)`` recorded in
  ``config.json`` (``roadloop.train.il`` / ``grpo`` / ``road`` already write run id, config, dataset or
  suite hashes and the init checkpoint there, so registering a trainer's ``final/`` directory by hand
  recovers most of it).  Absent fields are listed under ``missing``.
* ``write_manifest(dir)`` / ``verify_manifest(dir, sha)``: ``manifest.json`` lists every file of a
  version's folder with its size and SHA-256; the manifest's own SHA-256 is kept in the registry database,
  so replacing a file *and* the manifest is detected as well.  Verification names the first problem:
  missing, truncated (fewer bytes than recorded), modified (same size, other hash), or an unexpected file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from roadloop.io import atomic_write_text, json_clean, sha256_file
from roadloop.registry.errors import IntegrityError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "roadloop-manifest/1"
LINEAGE = "lineage.json"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # roadloop/


# ---------------------------------------------------------------------------------------------
# code version

def source_hash(root: Path = PACKAGE_DIR) -> str:
    """SHA-256 of roadloop's ``*.py`` sources and ``configs/*.yaml`` (relative path + bytes, sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and (p.suffix == ".py" or (p.suffix == ".yaml" and p.parent.name == "configs")))
    for p in files:
        if "__pycache__" in p.parts:
            continue
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def code_version(root: Path = PACKAGE_DIR) -> dict:
    """``{"git_commit", "git_dirty", "git_dirty_files", "source_sha256"}``; commit / dirty are None
    outside a git checkout (e.g. an installed wheel)."""
    commit = _git(["rev-parse", "HEAD"], root)
    out: dict = {"git_commit": commit.strip() if commit else None, "git_dirty": None, "git_dirty_files": [],
                 "source_sha256": source_hash(root)}
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=normal"], root)
        if status is not None:
            lines = [ln for ln in status.splitlines() if ln.strip()]
            out["git_dirty"] = bool(lines)
            out["git_dirty_files"] = [ln[3:] for ln in lines[:50]]
    return out


# ---------------------------------------------------------------------------------------------
# lineage

LINEAGE_FIELDS = ("weights_sha256", "trainer", "config", "dataset_hash", "suites", "parent", "training_run", "code",
                  "evaluations")


def _first(d: dict, *keys):
    for k in keys:
        v = d.get(k)
        if v not in (None, "", {}, []):
            return v
    return None


def build_lineage(meta: dict, given: dict | None, checkpoint_dir: str | Path, tracking_uri: str | None) -> dict:
    """Normalised lineage of a checkpoint (``meta``: ``load_checkpoint``'s dict) from the trainer's ``given``
    dict and what ``config.json`` recorded.  Recognised keys of ``given`` (aliases in brackets):

    ``trainer``; ``config`` (resolved training config, a dict); ``dataset_hash`` [``dataset``];
    ``val_dataset_hash`` [``val_dataset``]; ``suites`` (``{suite name: content hash}``); ``eval_suite``;
    ``parent`` [``init``] (parent checkpoint path) and ``parent_weights_sha256`` [``init_weights_sha256``];
    ``run_id`` [``training_run``] and ``tracking_uri``; ``code`` (a ``code_version()`` dict captured when
    training started; default: the code at registration time, marked as such).  Anything else (given,
    or recorded in ``config.json``: ``steps``, the trainer's final ``eval`` metrics...) is kept under ``extra``.
    """
    given = dict(given or {})
    rec = meta.get("extra") or {}
    if isinstance(rec.get("trainer"), dict):  # train-state checkpoints nest the trainer's extra
        rec = {**rec["trainer"], **{k: v for k, v in rec.items() if k != "trainer"}}
    src = {**rec, **given}
    consumed = {"trainer", "config", "dataset_hash", "dataset", "val_dataset_hash", "val_dataset", "suites",
                "eval_suite", "parent", "init", "parent_weights_sha256", "init_weights_sha256", "run_id",
                "training_run", "tracking_uri", "code"}
    code = given.get("code")
    if not isinstance(code, dict):
        code = {**code_version(), "captured": "registration"}
    parent_path = _first(src, "parent", "init")
    training_run = _first(src, "run_id", "training_run")
    lin = {
        "weights_sha256": meta.get("weights_sha256"),
        "model": {"format": meta.get("format"), "config": meta.get("config"), "params": meta.get("params"),
                  "vocab_sha": meta.get("vocab_sha")},
        "trainer": src.get("trainer") if isinstance(src.get("trainer"), str) else None,
        "config": src.get("config") if isinstance(src.get("config"), dict) else None,
        "dataset_hash": _first(src, "dataset_hash", "dataset"),
        "val_dataset_hash": _first(src, "val_dataset_hash", "val_dataset"),
        "suites": dict(src.get("suites") or {}) if isinstance(src.get("suites") or {}, dict) else src.get("suites"),
        "eval_suite": src.get("eval_suite") or {},
        "parent": {"checkpoint": str(parent_path) if parent_path else None,
                   "weights_sha256": _first(src, "parent_weights_sha256", "init_weights_sha256"),
                   "registry": None},
        "training_run": {"run_id": training_run, "tracking_uri": src.get("tracking_uri") or tracking_uri}
        if training_run else None,
        "code": code,
        "evaluations": [],
        "checkpoint_path": str(Path(checkpoint_dir).expanduser().resolve()),
        "extra": {k: v for k, v in src.items() if k not in consumed},  # e.g. steps, final eval metrics
    }
    lin["missing"] = [k for k in ("trainer", "config", "dataset_hash", "suites", "parent", "training_run")
                      if (lin[k] in (None, {}, []) if k != "parent" else lin["parent"]["weights_sha256"] is None)]
    return json.loads(json.dumps(json_clean(lin), default=str))


# ---------------------------------------------------------------------------------------------
# manifest

def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(d: str | Path) -> str:
    """Write ``manifest.json`` (size + SHA-256 of every other file under ``d``); returns its SHA-256."""
    d = Path(d)
    files = {p.relative_to(d).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(d)}
    atomic_write_text(d / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1,
                                                sort_keys=True))
    return sha256_file(d / MANIFEST)


def verify_manifest(d: str | Path, manifest_sha256: str | None, what: str) -> dict:
    """Check every file of ``d`` against ``manifest.json`` (and the manifest against ``manifest_sha256``);
    returns the manifest.  ``IntegrityError`` names ``what`` and the first problem found."""
    d = Path(d)
    hint = "refusing to use it; restore the file from the registry's artifact store or re-register the checkpoint"
    mp = d / MANIFEST
    if not d.is_dir():
        raise IntegrityError(f"{what}: artifact folder {d} does not exist; {hint}")
    if not mp.is_file():
        raise IntegrityError(f"{what}: {mp} is missing; {hint}")
    if manifest_sha256 is not None and sha256_file(mp) != manifest_sha256:
        raise IntegrityError(f"{what}: {mp} was modified (its SHA-256 differs from the one recorded at "
                             f"registration); {hint}")
    try:
        man = json.loads(mp.read_text())
        files = man["files"]
        if man.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{what}: {mp} is not a valid manifest ({e}); {hint}") from e
    for rel, rec in sorted(files.items()):
        p = d / rel
        if not p.is_file():
            raise IntegrityError(f"{what}: artifact {rel} is missing from {d}; {hint}")
        size = p.stat().st_size
        if size != rec["bytes"]:
            kind = "truncated" if size < rec["bytes"] else "larger than recorded"
            raise IntegrityError(f"{what}: artifact {rel} is {kind} ({size} bytes, manifest says {rec['bytes']}); "
                                 f"{hint}")
        if sha256_file(p) != rec["sha256"]:
            raise IntegrityError(f"{what}: artifact {rel} was modified (SHA-256 {sha256_file(p)[:16]}..., manifest "
                                 f"says {rec['sha256'][:16]}...); {hint}")
    extra = [p.relative_to(d).as_posix() for p in _files(d) if p.relative_to(d).as_posix() not in files]
    if extra:
        raise IntegrityError(f"{what}: unexpected file(s) {extra[:5]} in {d} (not in the manifest); {hint}")
    return man


def canonical_sha256(obj) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces; non-finite floats -> null)."""
    return hashlib.sha256(json.dumps(json_clean(obj), sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def actor() -> str:
    """``$ROADLOOP_ACTOR``, else ``user@host``."""
    import getpass
    import socket

    if os.environ.get("ROADLOOP_ACTOR"):
        return os.environ["ROADLOOP_ACTOR"]
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


__all__ = ["LINEAGE", "LINEAGE_FIELDS", "MANIFEST", "actor", "build_lineage", "canonical_sha256", "code_version",
           "source_hash", "verify_manifest", "write_manifest"]
