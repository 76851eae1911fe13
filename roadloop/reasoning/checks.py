"""Checks of free CoC text against simulator ground truth: parsing, grounding, consistency.

* ``parse_coc(text)``: decision (longitudinal, lateral) and mentioned components from the
  phrase inventory of docs/reasoning.md; ``None`` when no decision phrase is found.
* ``grounding(text, state, b)``: every mentioned component exists in scene ``b`` where the text
  says (kind, side, distance within +-max(5 m, 30 %), light colour, coarse motion); "the lane
  ahead is clear" requires no corridor obstacle within 30 m.  Unparseable text is ungrounded.
* ``consistency(text, lon, lat)``: the parsed decision equals the trajectory's meta-actions.

Judged against the state tensors (``scene_facts``), never against a label, so any model text
can be scored.  Garbage never raises: it scores False / False.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from roadloop.reasoning.labels import CLEAR_RANGE, SceneFacts, scene_facts
from roadloop.reasoning.meta_action import Lateral, Longitudinal
from roadloop.sim.datatypes import AgentType, LightState, SimState

DIST_TOL_M = 5.0
DIST_TOL_FRAC = 0.3
UNSPECIFIED_RANGE = 60.0  # m, a component without a distance must exist this close
SIDE_EPS = 0.3  # m, lateral offset that counts as left / right
AHEAD_BAND = 3.0  # m, |lateral offset| of something "ahead"

_NEG = r"(?<!not )(?<!n't )(?<!never )(?<!no need to )"
_LON_PATTERNS = [  # precedence: the first axis value found in this order wins
    (Longitudinal.STOP, r"\b(?:stop|halt)\b(?!\s+(?:lines?|signs?))|\bcome to a (?:full )?(?:stop|halt)\b"),
    (Longitudinal.SLOW_DOWN, r"\b(?:slow(?:s)? down|slow|decelerate|brake|reduce (?:the )?speed)\b"),
    (Longitudinal.ACCELERATE, r"\b(?:accelerate|speed up)\b"),
    (Longitudinal.KEEP_SPEED, r"\b(?:keep|maintain|hold)(?: the| its| a| our)?(?: current| same| steady)? speed\b"
                              r"|\bcontinue at (?:the )?(?:same|current|steady) speed\b"),
]
_LAT_PATTERNS = [
    (Lateral.TURN_LEFT, r"\bturn(?:s)? left\b|\bmake a left turn\b"),
    (Lateral.TURN_RIGHT, r"\bturn(?:s)? right\b|\bmake a right turn\b"),
    (Lateral.CHANGE_LANE_LEFT, r"\bchange lanes? (?:to |into )?(?:the )?left(?: lane)?\b|\bmove into the left lane\b"),
    (Lateral.CHANGE_LANE_RIGHT, r"\bchange lanes? (?:to |into )?(?:the )?right(?: lane)?\b"
                                r"|\bmove into the right lane\b"),
    (Lateral.NUDGE_LEFT, r"\bnudge (?:to the |slightly )?left\b|\bshift (?:slightly )?(?:to the )?left\b"),
    (Lateral.NUDGE_RIGHT, r"\bnudge (?:to the |slightly )?right\b|\bshift (?:slightly )?(?:to the )?right\b"),
    (Lateral.KEEP_LANE, r"\b(?:keep|stay in|hold)(?: the| its| our)? lane\b"),
]
_KIND_PATTERNS = [
    ("stop sign", r"\bstop signs?\b"),
    ("light", r"\b(?:traffic )?(?:lights?|signals?)\b"),
    ("pedestrian", r"\b(?:pedestrians?|person|people|walkers?)\b"),
    ("cyclist", r"\b(?:cyclists?|bicyclists?|bicycles?|bikes?)\b"),
    ("cone", r"\b(?:cones?|barriers?|barrels?)\b"),
    ("vehicle", r"\b(?:vehicles?|cars?|trucks?|vans?|bus|buses)\b"),
    ("obstacle", r"\b(?:obstacles?|objects?)\b"),
    ("intersection", r"\b(?:intersections?|junctions?|roundabouts?|crossroads)\b"),
]
_CLEAR_RE = re.compile(r"\b(?:lane|road|path|way)(?: ahead)? is clear\b|\bclear (?:lane|road|path)\b")
_DIST_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:m|meters?|metres?)\b")
_STATE_WORDS = {"red": "red", "yellow": "yellow", "amber": "yellow", "green": "green",
                "stopped": "stopped", "stationary": "stopped", "parked": "stopped", "waiting": "stopped",
                "standing": "stopped", "halted": "stopped", "slowing": "slowing", "braking": "slowing",
                "decelerating": "slowing", "crossing": "crossing", "moving": "moving", "driving": "moving",
                "walking": "moving", "approaching": "moving"}
_STATE_RE = re.compile(r"\b(" + "|".join(_STATE_WORDS) + r")\b")
_CLAUSE_SPLIT = re.compile(r"[.;,!?](?!\d)|\band\b|\bso\b|\bbecause\b|\bsince\b|\bwhile\b")


@dataclass(frozen=True)
class MentionedComponent:
    kind: str  # vehicle / pedestrian / cyclist / cone / obstacle / light / stop sign / intersection
    side: str | None  # ahead / left / right / None
    distance_m: float | None
    state: str | None  # red / yellow / green / stopped / slowing / crossing / moving / None


@dataclass(frozen=True)
class ParsedCoC:
    lon: Longitudinal  # KEEP_SPEED when only a lateral phrase is given
    lat: Lateral  # KEEP_LANE when only a longitudinal phrase is given
    components: tuple[MentionedComponent, ...] = ()
    claims_clear: bool = False


def _affirmed(pat: str) -> str:
    """``pat`` not preceded by a negation ("not", "n't", "never", "no need to")."""
    return _NEG + r"(?:" + pat + r")"


def _find(patterns, text: str):
    for value, pat in patterns:
        if re.search(_affirmed(pat), text):
            return value
    return None


def decision_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the decision phrases (either axis, any synonym, not negated) in
    ``text``: where a CoC text states what to do (``il.decision_weight`` weighs their tokens)."""
    t = text.lower().replace("’", "'")  # same length as text
    spans = []
    for _, pat in _LON_PATTERNS + _LAT_PATTERNS:
        spans += [m.span() for m in re.finditer(_affirmed(pat), t)]
    return sorted(spans)


def parse_coc(text: object) -> ParsedCoC | None:
    """Parse free text (any object; non-strings give None) into a ``ParsedCoC`` (immutable).  Memoised on
    the text: the grounding and consistency checks of a decision parse the same text, and sampled texts
    repeat (RoaD's K candidates of a scene, the steps of a rollout)."""
    if not isinstance(text, str):
        return None
    return _parse_coc(text)


@functools.lru_cache(maxsize=16384)
def _parse_coc(text: str) -> ParsedCoC | None:
    if not text.strip():
        return None
    t = " " + re.sub(r"\s+", " ", text.lower().replace("’", "'")) + " "
    t = t.replace("right of way", "priority")
    lon, lat = _find(_LON_PATTERNS, t), _find(_LAT_PATTERNS, t)
    if lon is None and lat is None:
        return None
    # blank out decision phrases so their left/right words are not read as component sides
    rest = t
    for _, pat in _LON_PATTERNS + _LAT_PATTERNS:
        rest = re.sub(pat, " ; ", rest)
    comps: list[MentionedComponent] = []
    for clause in _CLAUSE_SPLIT.split(rest):
        hits = []
        for kind, pat in _KIND_PATTERNS:
            for m in re.finditer(pat, clause):
                if not any(m.start() < e and s < m.end() for s, e, _ in hits):
                    hits.append((m.start(), m.end(), kind))
        dist_m = _DIST_RE.search(clause)
        side = "left" if re.search(r"\bleft\b", clause) else "right" if re.search(r"\bright\b", clause) else \
            "ahead" if re.search(r"\bahead\b|\bin front\b", clause) else None
        st = _STATE_RE.search(clause)
        if not hits:
            if comps and (dist_m or st):  # details in a following clause ("..., about 12 m away")
                c = comps[-1]
                comps[-1] = MentionedComponent(c.kind, c.side or side,
                                               c.distance_m if c.distance_m is not None else
                                               (float(dist_m.group(1)) if dist_m else None),
                                               c.state or (_STATE_WORDS[st.group(1)] if st else None))
            continue
        hits.sort()
        for _s0, _, kind in hits:
            comps.append(MentionedComponent(kind, side, float(dist_m.group(1)) if dist_m else None,
                                            _STATE_WORDS[st.group(1)] if st else None))
            if len(hits) > 1:  # several kinds in one clause: details go to the first only
                side, dist_m, st = None, None, None
    return ParsedCoC(lon if lon is not None else Longitudinal.KEEP_SPEED,
                     lat if lat is not None else Lateral.KEEP_LANE, tuple(comps), bool(_CLEAR_RE.search(t)))


def _dist_ok(stated: float | None, actual: torch.Tensor) -> torch.Tensor:
    if stated is None:
        return actual <= UNSPECIFIED_RANGE
    return (actual - stated).abs() <= max(DIST_TOL_M, DIST_TOL_FRAC * stated)


_KIND_OF = {"vehicle": (int(AgentType.VEHICLE),), "pedestrian": (int(AgentType.PEDESTRIAN),),
            "cyclist": (int(AgentType.CYCLIST),), "cone": (int(AgentType.STATIC),),
            "obstacle": tuple(int(k) for k in AgentType)}
_LIGHT_OF = {"red": int(LightState.RED), "yellow": int(LightState.YELLOW), "green": int(LightState.GREEN)}


def _component_ok(c: MentionedComponent, f: SceneFacts, b: int) -> bool:
    if c.kind in _KIND_OF:
        m = f.valid[b] & torch.isin(f.kind[b], torch.tensor(_KIND_OF[c.kind]))
        m &= _dist_ok(c.distance_m, f.dist[b])
        x, ye, yr = f.x_ego[b], f.y_ego[b], f.y_route[b]
        if c.side == "ahead":
            m &= (x > 0) & ((ye.abs() < AHEAD_BAND) | ((yr.abs() < AHEAD_BAND) & f.near_route[b]))
        elif c.side == "left":
            m &= (x > -5.0) & ((ye > SIDE_EPS) | ((yr > SIDE_EPS) & f.near_route[b]))
        elif c.side == "right":
            m &= (x > -5.0) & ((ye < -SIDE_EPS) | ((yr < -SIDE_EPS) & f.near_route[b]))
        sp = f.speed[b]
        if c.state == "stopped":
            m &= sp < 1.5
        elif c.state == "slowing":
            m &= (f.accel[b] < -0.3) | (sp < 1.0)
        elif c.state in ("moving", "crossing"):
            m &= sp > 0.2
        return bool(m.any())
    if c.kind in ("light", "stop sign"):
        if c.side in ("left", "right"):
            return False
        m = f.light_gap[b] < 1e8
        m &= (f.light_state[b] < 0) if c.kind == "stop sign" else (f.light_state[b] >= 0)
        m &= _dist_ok(c.distance_m, f.light_gap[b])
        if c.kind == "light" and c.state in _LIGHT_OF:
            m &= f.light_state[b] == _LIGHT_OF[c.state]
        elif c.kind == "light" and c.state is not None:
            return False
        return bool(m.any())
    if c.kind == "intersection":
        return bool(_dist_ok(c.distance_m, f.junction_gap[b:b + 1]).any())
    return False


def _grounded(p: ParsedCoC | None, f: SceneFacts, b: int) -> bool:
    if p is None:
        return False
    if p.claims_clear:
        blocked = f.in_corridor[b] & (f.dist[b] <= CLEAR_RANGE)
        if bool(blocked.any()):
            return False
    return all(_component_ok(c, f, b) for c in p.components)


def grounding(text: object, state: SimState, b: int = 0, facts: SceneFacts | None = None) -> bool:
    """True if every component the text mentions exists in scene ``b`` as stated (see module doc)."""
    try:
        return _grounded(parse_coc(text), facts if facts is not None else scene_facts(state), b)
    except Exception:  # noqa: BLE001 - garbage never crashes a reward
        return False


def grounding_batch(texts: list[str], state: SimState) -> torch.Tensor:
    """(B,) bool: ``grounding`` of texts[b] in scene b."""
    f = scene_facts(state)
    return torch.tensor([grounding(t, state, b, f) for b, t in enumerate(texts)], dtype=torch.bool)


def consistency(text: object, lon: int | torch.Tensor, lat: int | torch.Tensor) -> bool:
    """True if the decision parsed from ``text`` equals the meta-actions (lon, lat) of the trajectory."""
    try:
        p = parse_coc(text)
        return p is not None and int(p.lon) == int(lon) and int(p.lat) == int(lat)
    except Exception:  # noqa: BLE001
        return False


def consistency_batch(texts: list[str], lon: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """(B,) bool: ``consistency`` of texts[b] with (lon[b], lat[b])."""
    return torch.tensor([consistency(t, lon[b], lat[b]) for b, t in enumerate(texts)], dtype=torch.bool)


__all__ = ["MentionedComponent", "ParsedCoC", "consistency", "consistency_batch", "decision_spans", "grounding",
           "grounding_batch", "parse_coc"]
