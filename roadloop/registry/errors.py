"""Registry errors: every one is a ``RoadloopError`` (one line, the CLI prints it and exits 2)."""

from __future__ import annotations

from roadloop.errors import RoadloopError


class RegistryError(RoadloopError):
    """Base class of the model-registry errors."""


class UnknownModelError(RegistryError):
    """No registered model / version / champion under that name."""


class IntegrityError(RegistryError):
    """A registered artifact is missing, truncated or modified (its SHA-256 differs from the manifest)."""


class RegistryDatabaseError(RegistryError):
    """The registry database cannot be opened or is not a valid SQLite database."""


class RegistryLockedError(RegistryDatabaseError):
    """Another process holds the registry database's write lock longer than the lock timeout."""


class ConcurrentChangeError(RegistryError):
    """The champion changed while a promotion was being gated: the gates compared against a stale champion."""


class GateFailedError(RegistryError):
    """A promotion was refused because at least one safety gate failed (``.gates`` holds the results)."""

    def __init__(self, message: str, gates=None):
        super().__init__(message)
        self.gates = gates


class StaleGateReportError(RegistryError):
    """A gate report given to ``promote`` does not match the candidate, the champion or the gate config."""


__all__ = ["ConcurrentChangeError", "GateFailedError", "IntegrityError", "RegistryDatabaseError", "RegistryError",
           "RegistryLockedError", "StaleGateReportError", "UnknownModelError"]
