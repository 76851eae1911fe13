"""Atomic file writes (temp file in the same folder + fsync + rename) and hashing."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path


def roadloop_home() -> Path:
    """``$ROADLOOP_HOME`` or ``~/.roadloop`` (absolute; not created): trackers, registry, rollout store."""
    return Path(os.environ.get("ROADLOOP_HOME") or Path.home() / ".roadloop").expanduser().resolve()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def json_clean(o):
    """Replace non-finite floats by None (strict JSON) recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: json_clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_clean(v) for v in o]
    return o
