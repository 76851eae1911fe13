"""Procedural scenario families: ``FAMILIES[name].build_raw(seed) -> Scenario``.

A raw scenario holds the map, the ego's route and initial state (a 1-step track), reactive
agents' initial states and paths, and scripted agents' full tracks.  The same seed always gives
a bit-identical scenario.  ``roadloop.scenarios.generate`` turns raw scenarios into logged ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from roadloop.errors import UnknownNameError
from roadloop.scenarios.families import (
    construction_zone,
    cut_in,
    intersection_protected,
    lead_braking,
    merge,
    multilane_traffic,
    pedestrian_crossing,
    roundabout,
    stopped_vehicle,
    unprotected_left,
)
from roadloop.sim.datatypes import Scenario


@dataclass(frozen=True)
class FamilySpec:
    name: str
    build_raw: Callable[[int], Scenario]
    description: str  # one line


FAMILIES: dict[str, FamilySpec] = {
    m.NAME: FamilySpec(m.NAME, m.build_raw, m.DESCRIPTION)
    for m in (multilane_traffic, lead_braking, cut_in, merge, intersection_protected, unprotected_left,
              pedestrian_crossing, construction_zone, stopped_vehicle, roundabout)
}

BUILTIN = frozenset(FAMILIES)


def get_family(name: str) -> FamilySpec:
    """The family called ``name``; ``UnknownNameError`` listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownNameError("scenario family", name, list(FAMILIES)) from None


def register_family(name: str, build_raw: Callable[[int], Scenario], description: str = "") -> FamilySpec:
    """Add a procedural family: ``build_raw(seed)`` returns a raw scenario (module docstring) for any
    seed >= 0, bit-identical for the same seed.  ``generate_many([(name, seed), ...])`` then logs it with
    the expert like the built-in ones.  A built-in name is refused; an added one may be registered again
    (e.g. when its module is re-run)."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"family name must be letters, digits and '_', got {name!r}")
    if name in BUILTIN:
        raise ValueError(f"scenario family '{name}' already exists (built in)")
    FAMILIES[name] = FamilySpec(name, build_raw, description)
    return FAMILIES[name]


__all__ = ["FAMILIES", "FamilySpec", "get_family", "register_family"]
