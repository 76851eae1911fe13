"""Chain-of-Causation labels from simulator ground truth.

``scene_facts(state)`` measures, vectorised over the batch and the agents, everything a CoC
component can refer to (kinds, distances, sides, motion, corridor membership, the next route
stop line and its light, the next junction).  ``coc_labels`` picks the critical components of
each scene and writes a varied sentence around the decision given by the expert plan's
meta-actions.  ``roadloop.reasoning.checks`` judges any text against the same facts.
The grammar (component kinds, sides, states, templates) is documented in docs/reasoning.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from roadloop.policies.route_idm import route_window
from roadloop.reasoning.meta_action import LAT_PHRASES, LON_PHRASES, Lateral, Longitudinal, meta_actions
from roadloop.sim.datatypes import AgentType, LightState, SimState
from roadloop.sim.geometry import wrap_angle

_INF = 1e9
LEADER_RANGE = 40.0  # m, leader / static intrusion / light / junction considered within this distance
PED_RANGE = 30.0  # m, pedestrians considered within this distance
CLEAR_RANGE = 30.0  # m, "the lane ahead is clear": no corridor obstacle this close
CORRIDOR_MARGIN = 0.4  # m, as route_obstacles
STOPPED_SPEED = 0.5  # m/s
SLOWING_ACCEL = -1.0  # m/s^2

KIND_NAMES = {int(AgentType.VEHICLE): "vehicle", int(AgentType.PEDESTRIAN): "pedestrian",
              int(AgentType.CYCLIST): "cyclist", int(AgentType.STATIC): "cone"}
LIGHT_NAMES = {int(LightState.RED): "red", int(LightState.YELLOW): "yellow", int(LightState.GREEN): "green",
               int(LightState.UNKNOWN): "unknown"}


@dataclass(frozen=True)
class Component:
    """A critical scene component.  kind: vehicle / pedestrian / cyclist / cone / light / stop sign /
    intersection; side: ahead / left / right; state: stopped / slowing / moving / crossing /
    waiting (agents), red / yellow / green (lights), "" (none)."""

    kind: str
    agent_index: int | None
    side: str
    distance_m: float
    state: str


@dataclass(frozen=True)
class CoCLabel:
    decision: tuple[Longitudinal, Lateral]
    components: list[Component] = field(default_factory=list)
    text: str = ""


@dataclass(frozen=True)
class SceneFacts:
    """Ground truth a CoC text can refer to, for B scenes and A agents (agent 0, the ego, excluded)."""

    kind: torch.Tensor  # (B, A) int64 AgentType
    valid: torch.Tensor  # (B, A) bool, present non-ego agent
    dist: torch.Tensor  # (B, A) m, centre distance to the ego
    x_ego: torch.Tensor  # (B, A) m, forward offset in the ego frame
    y_ego: torch.Tensor  # (B, A) m, left offset in the ego frame
    y_route: torch.Tensor  # (B, A) m, signed (left +) offset from the route centreline
    gap: torch.Tensor  # (B, A) m, along-route gap from the ego centre (only meaningful near the route)
    near_route: torch.Tensor  # (B, A) bool, within 8 m of the route window
    in_corridor: torch.Tensor  # (B, A) bool, in the ego's route corridor ahead now or within 2 s (CV)
    intrudes: torch.Tensor  # (B, A) bool, box edge inside the ego lane (lane half width) ahead
    speed: torch.Tensor  # (B, A) m/s
    accel: torch.Tensor  # (B, A) m/s^2
    crossing: torch.Tensor  # (B, A) bool, moving across the route (45-135 deg to it)
    light_gap: torch.Tensor  # (B, K) m, route stop lines: gap from the ego front (INF: none / behind)
    light_state: torch.Tensor  # (B, K) int64 LightState (-1: stop sign)
    junction_gap: torch.Tensor  # (B,) m to the next junction entry (0 inside one, INF none within range)


def scene_facts(state: SimState, ahead: float = 80.0) -> SceneFacts:
    """Measure ``SceneFacts`` from the state tensors (vectorised over B and A)."""
    st = state.static
    sc = st.scenario
    ag = sc.agents
    route = sc.route
    B, A = state.present.shape
    exy, eyaw = state.xy[:, :1], state.yaw[:, :1]
    rel = state.xy - exy
    c, s = torch.cos(eyaw), torch.sin(eyaw)
    x_e = rel[..., 0] * c + rel[..., 1] * s
    y_e = -rel[..., 0] * s + rel[..., 1] * c
    dist = torch.linalg.vector_norm(rel, dim=-1)

    rxy, rs, rvalid = route_window(state, 5.0, ahead)
    W = rxy.shape[1]
    rhead = torch.atan2(rxy[:, 1:, 1] - rxy[:, :-1, 1], rxy[:, 1:, 0] - rxy[:, :-1, 0])
    rhead = torch.cat((rhead, rhead[:, -1:]), 1) if W > 1 else torch.zeros(B, W)
    ridx = (rs / st.route_ds.unsqueeze(-1)).round().long().clamp(0, route.xy.shape[1] - 1)
    lane = route.lane_of_point.gather(1, ridx).clamp_min(0)
    half_lane = 0.5 * sc.map.lane_width.gather(1, lane)  # (B, W)
    ego_half_w = 0.5 * ag.width[:, :1]
    dirs = torch.stack((torch.cos(state.yaw), torch.sin(state.yaw)), -1)

    def nearest(p: torch.Tensor):
        d = torch.linalg.vector_norm(p.unsqueeze(2) - rxy.unsqueeze(1), dim=-1)
        d = torch.where(rvalid.unsqueeze(1), d, torch.full_like(d, _INF))
        return d.min(-1)

    dmin, k = nearest(state.xy)
    hd = rhead.gather(1, k)
    base = rxy.gather(1, k.unsqueeze(-1).expand(B, A, 2))
    off = state.xy - base
    y_r = -off[..., 0] * torch.sin(hd) + off[..., 1] * torch.cos(hd)
    gap = rs.gather(1, k) - state.route_s.unsqueeze(-1)
    relh = wrap_angle(state.yaw - hd)
    ext_across = 0.5 * (ag.length * relh.sin().abs() + ag.width * relh.cos().abs())
    valid = state.present.clone()
    valid[:, 0] = False
    ahead_m = (gap > 0.0) & (x_e > 0.0)
    corr = torch.zeros(B, A, dtype=torch.bool)
    for h in (0.0, 1.0, 2.0):
        p = state.xy + (state.speed * h).unsqueeze(-1) * dirs
        dm, kk = nearest(p)
        g = rs.gather(1, kk) - state.route_s.unsqueeze(-1)
        corr |= (dm < ego_half_w + ext_across + CORRIDOR_MARGIN) & (g > 0.0)
    corr &= valid & ahead_m
    intr = valid & ahead_m & (y_r.abs() - ext_across < half_lane.gather(1, k)) & (dmin < 8.0)
    crossing = (state.speed > STOPPED_SPEED) & (relh.cos().abs() < 0.7071) & (dmin < 8.0)

    # route stop lines (lights and stop signs) ahead of the ego front
    t = min(int(state.t), st.log_len_steps - 1)
    front = state.route_s + 0.5 * ag.length[:, 0]
    lgap = route.stop_s - front.unsqueeze(-1)
    ls = sc.light_states[:, :, t].gather(1, route.stop_light.clamp_min(0)) if sc.light_states.shape[1] else \
        torch.zeros_like(route.stop_light)
    lstate = torch.where(route.stop_light >= 0, ls, torch.full_like(ls, -1))
    lgap = torch.where(torch.isfinite(route.stop_s) & (lgap > -1.0), lgap.clamp_min(0.0), torch.full_like(lgap, _INF))

    # junction: first route point inside a junction lane at or ahead of the ego front
    M = route.xy.shape[1]
    junc = sc.map.lane_is_junction.gather(1, route.lane_of_point.clamp_min(0)) & route.valid
    s_pts = torch.arange(M).unsqueeze(0) * st.route_ds.unsqueeze(-1)
    cur = (state.route_s / st.route_ds).round().long().clamp(0, M - 1)
    in_j = junc.gather(1, cur.unsqueeze(-1)).squeeze(-1)
    jg = torch.where(junc & (s_pts > front.unsqueeze(-1)), s_pts - front.unsqueeze(-1), torch.full_like(s_pts, _INF))
    jgap = torch.where(in_j, torch.zeros_like(state.route_s), jg.amin(-1))
    return SceneFacts(kind=ag.kind, valid=valid, dist=dist, x_ego=x_e, y_ego=y_e, y_route=y_r, gap=gap,
                      near_route=dmin < 8.0, in_corridor=corr, intrudes=intr, speed=state.speed, accel=state.accel,
                      crossing=crossing, light_gap=lgap, light_state=lstate, junction_gap=jgap)


def _side(y: float) -> str:
    return "ahead" if abs(y) < 1.0 else ("left" if y > 0 else "right")


def _lateral(f: SceneFacts, b: int, a: int) -> float:
    """Lateral offset (m, left > 0) a label's side is read from: from the route centreline for an agent
    near the route (within 8 m, ``near_route``), else from the ego's axis: the frames in which
    ``checks.grounding`` accepts a side.  (Until demonstrations format 5 the route frame always: an
    oncoming car beyond the corner of an unprotected left turn, right of the route but left of the
    ego, was written "on the right", and 1.1% of the labels failed their own grounding check.)"""
    return float(f.y_route[b, a]) if bool(f.near_route[b, a]) else float(f.y_ego[b, a])


def _motion(kind: int, speed: float, accel: float, crossing: bool) -> str:
    if kind == int(AgentType.STATIC):
        return ""
    if speed < STOPPED_SPEED:
        return "waiting" if kind == int(AgentType.PEDESTRIAN) else "stopped"
    if crossing:
        return "crossing"
    if accel < SLOWING_ACCEL:
        return "slowing"
    return "moving"


def scene_components(f: SceneFacts, b: int) -> dict[str, Component]:
    """Candidate critical components of scene ``b``: keys leader, light, intrusion, pedestrian, junction."""
    out: dict[str, Component] = {}
    kind, valid = f.kind[b], f.valid[b]
    dist = f.dist[b]

    def comp(a: int, side: str | None = None) -> Component:
        k = int(kind[a])
        return Component(KIND_NAMES.get(k, "vehicle"), a, side or _side(_lateral(f, b, a)),
                         float(round(float(dist[a]))),
                         _motion(k, float(f.speed[b, a]), float(f.accel[b, a]), bool(f.crossing[b, a])))

    lead = torch.where(f.in_corridor[b] & (dist <= LEADER_RANGE), f.gap[b], torch.full_like(dist, _INF))
    if float(lead.min()) < _INF:
        out["leader"] = comp(int(lead.argmin()))
    still = (kind == int(AgentType.STATIC)) | (f.speed[b] < STOPPED_SPEED)
    intr = f.intrudes[b] & still & (dist <= LEADER_RANGE) & (f.y_route[b].abs() >= 1.0)
    di = torch.where(intr, dist, torch.full_like(dist, _INF))
    if float(di.min()) < _INF:
        a = int(di.argmin())
        if out.get("leader") is None or out["leader"].agent_index != a:
            out["intrusion"] = comp(a)
    ped = valid & ((kind == int(AgentType.PEDESTRIAN)) | (kind == int(AgentType.CYCLIST))) & (f.x_ego[b] > 0) \
        & (dist <= PED_RANGE) & (f.y_route[b].abs() < 6.0) & f.near_route[b]
    dp = torch.where(ped, dist, torch.full_like(dist, _INF))
    if float(dp.min()) < _INF:
        a = int(dp.argmin())
        if all(c.agent_index != a for c in out.values()):
            out["pedestrian"] = comp(a)
    lg = f.light_gap[b]
    if float(lg.min()) <= LEADER_RANGE:
        j = int(lg.argmin())
        s = int(f.light_state[b, j])
        if s < 0:
            out["light"] = Component("stop sign", None, "ahead", float(round(float(lg[j]))), "")
        elif s > 0:
            out["light"] = Component("light", None, "ahead", float(round(float(lg[j]))), LIGHT_NAMES[s])
    jg = float(f.junction_gap[b])
    if jg <= LEADER_RANGE:
        out["junction"] = Component("intersection", None, "ahead", float(round(jg)), "")
    return out


# ---- text generation --------------------------------------------------------------------------
_SIDE_PHRASE = {"ahead": ["ahead", "ahead", "in front"], "left": ["on the left"], "right": ["on the right"]}
_AGENT_CLAUSES = ["{np} is {state} about {d} m away", "{np} about {d} m away is {state}",
                  "there is {np} about {d} m away that is {state}"]
_AGENT_CLAUSES_NOSTATE = ["there is {np} about {d} m away", "{np} is about {d} m away"]
_CONE_CLAUSES = {"side": ["cones narrow the {side} side of the lane about {d} m ahead",
                          "cones on the {side} intrude into the lane about {d} m ahead",
                          "there are cones on the {side} about {d} m ahead"],
                 "ahead": ["cones block the lane about {d} m ahead", "there are cones ahead about {d} m away"]}
_LIGHT_CLAUSES = ["the light ahead is {state} about {d} m away", "the traffic light about {d} m ahead is {state}",
                  "a {state} light is about {d} m ahead"]
_SIGN_CLAUSES = ["a stop sign is about {d} m ahead", "there is a stop sign about {d} m ahead"]
_JUNCTION_CLAUSES = ["an intersection is about {d} m ahead", "the road reaches an intersection about {d} m ahead"]
_CLEAR = ["the lane ahead is clear", "the road ahead is clear", "the path ahead is clear"]
_SENTENCES = ["{Cause}, so {dec}.", "Because {cause}, {dec}.", "{Dec} since {cause}.", "{Cause}; {dec}."]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _clause(c: Component, rng: random.Random) -> str:
    d = int(round(c.distance_m))
    if c.kind == "cone":
        if c.side in ("left", "right"):
            return rng.choice(_CONE_CLAUSES["side"]).format(side=c.side, d=d)
        return rng.choice(_CONE_CLAUSES["ahead"]).format(d=d)
    if c.kind == "light":
        return rng.choice(_LIGHT_CLAUSES).format(state=c.state, d=d)
    if c.kind == "stop sign":
        return rng.choice(_SIGN_CLAUSES).format(d=d)
    if c.kind == "intersection":
        return rng.choice(_JUNCTION_CLAUSES).format(d=d)
    np_ = f"a {c.kind} {rng.choice(_SIDE_PHRASE[c.side])}"
    if c.state:
        return rng.choice(_AGENT_CLAUSES).format(np=np_, state=c.state, d=d)
    return rng.choice(_AGENT_CLAUSES_NOSTATE).format(np=np_, d=d)


def decision_phrase(lon: Longitudinal, lat: Lateral, rng: random.Random) -> str:
    """The decision in words: one of several orderings / optional "keep the lane"."""
    lo = LON_PHRASES[lon] if lon != Longitudinal.KEEP_SPEED else rng.choice(["keep speed", "maintain speed"])
    la = LAT_PHRASES[lat]
    if lat == Lateral.KEEP_LANE and rng.random() < 0.4:
        return lo
    if lat == Lateral.KEEP_LANE or rng.random() < 0.5:
        return f"{la} and {lo}"
    return f"{lo} and {la}"


def _select(comps: dict[str, Component], lon: Longitudinal, lat: Lateral) -> list[Component]:
    order = ["leader", "pedestrian", "light", "intrusion", "junction"]
    if lat in (Lateral.NUDGE_LEFT, Lateral.NUDGE_RIGHT, Lateral.CHANGE_LANE_LEFT, Lateral.CHANGE_LANE_RIGHT):
        order = ["intrusion", "leader", "pedestrian", "light", "junction"]
    elif lon in (Longitudinal.STOP, Longitudinal.SLOW_DOWN):
        light = comps.get("light")
        if light is not None and light.state in ("red", "yellow", "") and light.kind != "intersection":
            order = ["light", "leader", "pedestrian", "intrusion", "junction"]
    return [comps[k] for k in order if k in comps][:2]


def render_text(chosen: list[Component], lon: Longitudinal, lat: Lateral, rng: random.Random) -> str:
    """One sentence: the causes (or "the lane ahead is clear"), then the decision."""
    if chosen:
        cause = " and ".join(_clause(c, rng) for c in chosen)
        if not any(c.kind in ("vehicle", "pedestrian", "cyclist", "cone") for c in chosen) and rng.random() < 0.3:
            cause = f"{rng.choice(_CLEAR)} and {cause}"
    else:
        cause = rng.choice(_CLEAR)
    dec = decision_phrase(lon, lat, rng)
    tpl = rng.choice(_SENTENCES)
    return tpl.format(Cause=_cap(cause), cause=cause, Dec=_cap(dec), dec=dec)


def coc_labels(state: SimState, plan_xy: torch.Tensor, plan_speed: torch.Tensor | None,
               rng_seed: int = 0, facts: SceneFacts | None = None) -> list[CoCLabel]:
    """CoC labels of B scenes: decision = meta-actions of the plan (B, 64, 2) / (B, 64) m/s,
    components = the critical ground-truth components (at most two named), text = varied sentence.

    A corridor obstacle within 40 m always becomes a component, so "the lane ahead is clear" is
    only written when the corridor is clear within 40 m.  ``facts``: ``scene_facts(state)`` if
    already measured.
    """
    lon, lat = meta_actions(state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0], plan_xy, plan_speed)
    f = scene_facts(state) if facts is None else facts
    out = []
    for b in range(state.batch_size):
        rng = random.Random(rng_seed * 1_000_003 + b)
        lo, la = Longitudinal(int(lon[b])), Lateral(int(lat[b]))
        chosen = _select(scene_components(f, b), lo, la)
        out.append(CoCLabel((lo, la), chosen, render_text(chosen, lo, la, rng)))
    return out


__all__ = ["CoCLabel", "Component", "SceneFacts", "coc_labels", "decision_phrase", "render_text",
           "scene_components", "scene_facts"]
