"""Generate logged scenarios from procedural families.

``generate(family, seed)`` builds the raw scenario (``FAMILIES[family].build_raw``), simulates
it with a careful driver (``roadloop.scenarios.record.record_logs``) to fill in every agent's
log, and checks the report.  If the careful driver collided, left the road, got stuck, or
background agents collided, the family is rebuilt from the derived seed ``seed * 1000 + attempt``
(attempt 1..4); the scenario keeps its id and seed and records ``attempt`` and ``build_seed`` in
``meta.extra``.  After 5 failed attempts a ``ScenarioError`` names the family, seed and reason.
"""

from __future__ import annotations

import dataclasses

from roadloop.errors import ScenarioError
from roadloop.scenarios.families import get_family
from roadloop.sim.datatypes import Scenario

MAX_ATTEMPTS = 5
CHUNK = 64  # scenarios simulated together


def build_seed(seed: int, attempt: int) -> int:
    """Seed passed to ``build_raw`` on attempt ``attempt`` (0 = the seed itself)."""
    return seed if attempt == 0 else seed * 1000 + attempt


def build_attempt(family: str, seed: int, attempt: int) -> Scenario:
    """Raw scenario of ``family``/``seed`` on attempt ``attempt``, with the original id and seed."""
    spec = get_family(family)
    bs = build_seed(seed, attempt)
    raw = spec.build_raw(bs)
    if attempt == 0:
        return raw
    extra = dict(raw.meta.extra) | {"attempt": str(attempt), "build_seed": str(bs)}
    meta = dataclasses.replace(raw.meta, scenario_id=f"{family}/{seed:06d}", seed=seed,
                               extra=tuple(sorted(extra.items())))
    return raw.replace(meta=meta)


def _record_logs(raws: list[Scenario]) -> list:
    """Indirection so tests can substitute the recorder."""
    from roadloop.scenarios.record import record_logs

    return record_logs(raws)


def _is_valid(report) -> bool:
    valid = getattr(report, "valid", None)
    if valid is not None:
        return bool(valid)
    return not report.collision and not report.offroad and bool(report.completed)


def generate_many(pairs: list[tuple[str, int]]) -> list[Scenario]:
    """Logged scenarios for (family, seed) pairs, in order (simulated in batches of ``CHUNK``)."""
    pairs = [(str(f), int(s)) for f, s in pairs]
    for f, s in pairs:
        get_family(f)  # unknown names fail before any work
        if s < 0:
            raise ScenarioError(f"{f}: seed must be >= 0, got {s}")
    out: list[Scenario | None] = [None] * len(pairs)
    reasons = [""] * len(pairs)
    pending = list(range(len(pairs)))
    for attempt in range(MAX_ATTEMPTS):
        if not pending:
            break
        raws: dict[int, Scenario] = {}
        for i in pending:
            f, s = pairs[i]
            try:
                raws[i] = build_attempt(f, s, attempt)
            except ScenarioError as e:  # a derived seed may give an impossible layout: try the next
                reasons[i] = f"build failed: {e}"
        order = sorted(raws, key=lambda i: (pairs[i][0], i))  # batch similar scenarios together
        for k in range(0, len(order), CHUNK):
            idx = order[k:k + CHUNK]
            for i, (sc, rep) in zip(idx, _record_logs([raws[i] for i in idx]), strict=True):
                if _is_valid(rep):
                    out[i] = sc
                else:
                    reasons[i] = getattr(rep, "reason", "") or "invalid"
        pending = [i for i in pending if out[i] is None]
    if pending:
        f, s = pairs[pending[0]]
        more = f" (and {len(pending) - 1} more)" if len(pending) > 1 else ""
        raise ScenarioError(f"family '{f}' seed {s}: no valid scenario after {MAX_ATTEMPTS} attempts "
                            f"(build seeds {[build_seed(s, a) for a in range(MAX_ATTEMPTS)]}); "
                            f"last reason: {reasons[pending[0]]}{more}")
    return out  # type: ignore[return-value]


def generate(family: str, seed: int) -> Scenario:
    """One logged scenario of ``family`` (``UnknownNameError`` if unknown)."""
    return generate_many([(family, seed)])[0]


__all__ = ["generate", "generate_many", "build_seed", "build_attempt", "MAX_ATTEMPTS"]
