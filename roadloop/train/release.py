"""Hand a trainer's final checkpoint to the model registry as a candidate (``register=true``).

Registration never promotes: ``roadloop registry promote`` runs the safety gates.  A registry
that cannot be reached does not lose the training run: the checkpoint stays on disk and the
error is reported, so ``roadloop registry register CKPT`` can be run later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from roadloop.errors import RoadloopError


def register_final(checkpoint: Path, lineage: dict, log: Callable[[str], None]) -> str | None:
    """Register ``checkpoint`` with ``lineage``; returns "NAME vVERSION" or None (error logged)."""
    from roadloop.registry import register_candidate

    try:
        mv = register_candidate(checkpoint, lineage)
    except RoadloopError as e:
        log(f"not registered ({e}); run `roadloop registry register {checkpoint}` later")
        return None
    ref = f"{mv.name} v{mv.version}"
    log(f"registered {checkpoint} as candidate {ref} (promote with `roadloop registry promote {mv.name}@{mv.version}`)")
    return ref


__all__ = ["register_final"]
