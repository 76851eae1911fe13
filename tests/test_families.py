"""Procedural families: determinism, validity and geometry of the raw scenarios."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from roadloop.errors import UnknownNameError
from roadloop.scenarios.families import FAMILIES, get_family
from roadloop.sim.batching import validate
from roadloop.sim.datatypes import DT, AgentType, LightState, Scenario, TrafficModel
from roadloop.sim.geometry import box_corners

SEEDS = list(range(int(os.environ.get("ROADLOOP_FAMILY_SEEDS", "5"))))  # more: a stress run
NAMES = sorted(FAMILIES)
_cache: dict[tuple[str, int], Scenario] = {}


def raw(name: str, seed: int) -> Scenario:
    if (name, seed) not in _cache:
        _cache[(name, seed)] = FAMILIES[name].build_raw(seed)
    return _cache[(name, seed)]


# --- geometry helpers ---------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64) if t.is_floating_point() else t.numpy()


def seg_dist(p: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Distance (P,) from points p (P, 2) to polyline xy (N, 2)."""
    a, b = xy[:-1], xy[1:]
    ab = b - a
    ap = p[:, None, :] - a[None]
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(1)


def signed_offset(p: np.ndarray, xy: np.ndarray) -> float:
    """Left (+) / right (-) offset (m) of point p (2,) from polyline xy."""
    d = np.linalg.norm(xy - p, axis=1)
    i = min(int(np.argmin(d)), len(xy) - 2)
    t = (xy[i + 1] - xy[i]) / np.linalg.norm(xy[i + 1] - xy[i])
    d = p - xy[i]
    return float(t[0] * d[1] - t[1] * d[0])


def lane_xy(s: Scenario, i: int) -> np.ndarray:
    return _np(s.map.lane_xy[i])[_np(s.map.lane_point_valid[i])]


def arc_s(p: np.ndarray, xy: np.ndarray) -> float:
    """Arc length along polyline xy of the point nearest to p."""
    cs = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))))
    d = np.linalg.norm(xy - p, axis=1)
    return float(cs[int(np.argmin(d))])


def sat_overlap(ca: np.ndarray, cb: np.ndarray) -> bool:
    """Separating-axis test of two convex quads (4, 2): True if interiors overlap."""
    for poly in (ca, cb):
        for k in range(4):
            e = poly[(k + 1) % 4] - poly[k]
            n = np.array([-e[1], e[0]])
            pa, pb = ca @ n, cb @ n
            if pa.max() <= pb.min() + 1e-9 or pb.max() <= pa.min() + 1e-9:
                return False
    return True


def corners_at(s: Scenario, t: int) -> tuple[np.ndarray, np.ndarray]:
    a = s.agents
    c = _np(box_corners(a.xy[:, t], a.yaw[:, t], a.length, a.width))
    return c, _np(a.valid[:, t])


def segments_cross(p: np.ndarray, q: np.ndarray) -> bool:
    """Whether polylines p and q properly intersect (shared end points do not count)."""
    def orient(a, b, c):
        ab, ac = b - a, c - a
        return np.sign(ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0])
    a, b = p[:-1][:, None], p[1:][:, None]
    c, d = q[:-1][None], q[1:][None]
    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    return bool(((o1 * o2 < 0) & (o3 * o4 < 0)).any())


# --- generic checks ---------------------------------------------------------------------------------

def test_registry_and_unknown_family():
    assert set(FAMILIES) == {"multilane_traffic", "lead_braking", "cut_in", "merge", "intersection_protected",
                             "unprotected_left", "pedestrian_crossing", "construction_zone", "stopped_vehicle",
                             "roundabout"}
    for name, spec in FAMILIES.items():
        assert spec.name == name and spec.description and "\n" not in spec.description
    with pytest.raises(UnknownNameError, match="unknown scenario family 'nope'.*cut_in"):
        get_family("nope")


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_seed_dependent(name):
    a, b = FAMILIES[name].build_raw(7), FAMILIES[name].build_raw(7)
    ta, tb = dict(a.tensor_items()), dict(b.tensor_items())
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), f"{name}: field {k} differs between two builds of seed 7"
    assert a.meta == b.meta
    c = dict(FAMILIES[name].build_raw(8).tensor_items())
    assert any(ta[k].shape != c[k].shape or not torch.equal(ta[k], c[k]) for k in ta), "seeds 7 and 8 identical"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NAMES)
def test_raw_scenario_is_sound(name, seed):
    s = raw(name, seed)
    validate(s)
    a = s.agents
    m = s.meta
    assert m.scenario_id == f"{name}/{seed:06d}" and m.family == name and m.seed == seed
    assert m.source == "procedural" and m.warmup_steps == 10
    assert s.num_steps == 150 and 2 <= a.num_agents <= 32
    # ego: 1-step track on the route start, inside its lane
    assert bool(a.valid[0, 0]) and not bool(a.valid[0, 1:].any())
    r = _np(s.route.xy)[_np(s.route.valid)]
    ego = _np(a.xy[0, 0])
    assert np.linalg.norm(ego - r[0]) < 0.5
    h = math.atan2(r[1, 1] - r[0, 1], r[1, 0] - r[0, 0])
    assert abs(math.remainder(float(a.yaw[0, 0]) - h, 2 * math.pi)) < 0.1
    ln = int(s.route.lane_of_point[0])
    assert seg_dist(ego[None], lane_xy(s, ln))[0] < 0.5 * float(s.map.lane_width[ln])
    # route: on lanes, long enough for a careful driver
    dmin = np.full(len(r), np.inf)
    for i in range(s.map.num_lanes):
        dmin = np.minimum(dmin, seg_dist(r, lane_xy(s, i)) - 0.5 * float(s.map.lane_width[i]))
    assert dmin.max() <= 0.1, f"route point {int(dmin.argmax())} is {dmin.max():.2f} m outside every lane"
    need = float(s.route.speed_limit.max()) * 15.0 + 30.0
    assert float(s.route.length) >= need - 1.0
    lim = _np(s.map.lane_speed_limit)
    assert lim.min() > 0 and lim.max() <= 30.0 + 1e-4
    w = _np(s.map.lane_width)
    assert ((w >= 2.4) & (w <= 5.5)).all()
    assert bool(s.map.road_edge_valid.any())
    # no overlapping boxes at t = 0
    c, v = corners_at(s, 0)
    for i in range(a.num_agents):
        for j in range(i + 1, a.num_agents):
            if v[i] and v[j]:
                assert not sat_overlap(c[i], c[j]), f"agents {i} and {j} overlap at t=0"
    # scripted agents never run into static objects
    statics = [j for j in range(a.num_agents) if int(a.model[j]) == TrafficModel.STATIC]
    diag = np.hypot(_np(a.length), _np(a.width)) / 2
    for i in range(1, a.num_agents):
        if int(a.model[i]) != TrafficModel.LOG or int(a.valid[i].sum()) <= 1:
            continue
        for t in range(0, s.num_steps, 2):
            xy = _np(a.xy[i, t])
            near = [j for j in statics if np.linalg.norm(_np(a.xy[j, t]) - xy) < diag[i] + diag[j]]
            if near and bool(a.valid[i, t]):
                c, _ = corners_at(s, t)
                for j in near:
                    assert not sat_overlap(c[i], c[j]), f"scripted agent {i} hits static agent {j} at step {t}"
    # reactive agents start on their path, heading along it; scripted tracks are plausible
    for i in range(1, a.num_agents):
        model = int(a.model[i])
        if model == TrafficModel.IDM:
            p = _np(a.path_xy[i])[_np(a.path_valid[i])]
            assert len(p) >= 2 and float(a.desired_speed[i]) > 0
            assert np.linalg.norm(_np(a.xy[i, 0]) - p[0]) < 0.5
            hp = math.atan2(p[1, 1] - p[0, 1], p[1, 0] - p[0, 0])
            assert abs(math.remainder(float(a.yaw[i, 0]) - hp, 2 * math.pi)) < 0.1
            assert int(a.valid[i].sum()) == 1
        elif model == TrafficModel.LOG and int(a.valid[i].sum()) > 1:
            xy, sp = _np(a.xy[i]), _np(a.speed[i])
            ok = _np(a.valid[i])
            assert np.isfinite(xy).all() and np.isfinite(sp).all()
            assert sp[ok].max() < 40.0 and sp[ok].min() >= 0
            acc = np.diff(sp[ok]) / DT
            assert np.abs(acc).max() < 10.0, f"agent {i}: |accel| {np.abs(acc).max():.1f} m/s^2"
            step = np.linalg.norm(np.diff(xy[ok], axis=0), axis=1) / DT
            assert np.abs(step - 0.5 * (sp[ok][1:] + sp[ok][:-1])).max() < 1.0, f"agent {i}: speed vs positions"
        elif model == TrafficModel.STATIC:
            assert int(a.kind[i]) in (AgentType.STATIC, AgentType.VEHICLE)
            assert bool(a.valid[i].all())


# --- family-specific checks ------------------------------------------------------------------------

def _log_agents(s: Scenario, kind: AgentType = AgentType.VEHICLE) -> list[int]:
    a = s.agents
    return [i for i in range(1, a.num_agents)
            if int(a.model[i]) == TrafficModel.LOG and int(a.kind[i]) == kind and bool(a.valid[i].all())]


def _route(s: Scenario) -> np.ndarray:
    return _np(s.route.xy)[_np(s.route.valid)]


@pytest.mark.parametrize("seed", SEEDS)
def test_multilane_traffic(seed):
    s = raw("multilane_traffic", seed)
    a = s.agents
    n_idm = int(((a.model == TrafficModel.IDM) & (a.kind == AgentType.VEHICLE)).sum())
    assert 10 <= n_idm <= 30
    assert s.map.num_lanes == 3
    ego_lane = int(s.route.lanes[0])
    assert int(s.map.lane_left[ego_lane]) >= 0 and int(s.map.lane_right[ego_lane]) >= 0  # middle lane
    xs = [arc_s(_np(a.xy[i, 0]), lane_xy(s, ego_lane)) for i in range(a.num_agents)]
    assert min(xs[1:]) < xs[0] < max(xs[1:])  # traffic behind and ahead


@pytest.mark.parametrize("seed", SEEDS)
def test_lead_braking(seed):
    s = raw("lead_braking", seed)
    (lead,) = _log_agents(s)
    a = s.agents
    r = _route(s)
    p0 = _np(a.xy[lead, 0])
    assert seg_dist(p0[None], r)[0] < 0.5 and arc_s(p0, r) > 4.6 + 2.0  # ahead, in the ego lane
    acc = np.diff(_np(a.speed[lead])) / DT
    assert acc.min() <= -4.0
    assert float(a.speed[lead].min()) < 0.1  # brakes to a stop
    assert int((a.model == TrafficModel.IDM).sum()) >= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_cut_in(seed):
    s = raw("cut_in", seed)
    (cut,) = _log_agents(s)
    a = s.agents
    r = _route(s)
    xy = _np(a.xy[cut])
    d = seg_dist(xy, r)
    w = float(s.map.lane_width[int(s.route.lanes[0])])
    assert d[0] > 0.8 * w  # starts in the adjacent lane
    assert d[-1] < 0.3  # ends in the ego lane
    k = int(np.argmax(d < 0.5 * w))  # first step with its centre in the ego lane
    v0 = float(a.speed[0, 0])
    gap = arc_s(xy[k], r) - v0 * k * DT - float(a.length[cut])  # vs. the ego at constant speed
    assert 2.0 < gap < 40.0, f"cut-in gap {gap:.1f} m"
    dur = (np.argmax(d < 0.15) - np.argmax(d < w - 0.15)) * DT  # ~75 % of the lane change
    assert 1.0 <= dur <= 4.0


@pytest.mark.parametrize("seed", SEEDS)
def test_merge(seed):
    s = raw("merge", seed)
    lanes = [int(x) for x in s.route.lanes]
    ramp, acc, main = lanes[0], lanes[1], lanes[2]
    assert int(s.map.lane_successors[acc].max()) == -1  # the acceleration lane ends
    assert int(s.map.lane_left[acc]) == main and int(s.map.lane_right[main]) == acc
    assert acc in [int(x) for x in s.map.lane_successors[ramp]]
    assert int(s.route.lane_of_point[0]) == ramp and int(s.route.lane_of_point[-1]) == lanes[-1]
    assert float(s.map.lane_speed_limit[ramp]) == pytest.approx(20.0)
    assert int((s.agents.model == TrafficModel.IDM).sum()) >= 3


def _light_lanes(s: Scenario) -> dict[int, list[int]]:
    """Light -> junction lanes entered from the lanes it controls."""
    out: dict[int, list[int]] = {}
    for ln in range(s.map.num_lanes):
        li = int(s.map.lane_light[ln])
        if li >= 0:
            out.setdefault(li, []).extend(int(x) for x in s.map.lane_successors[ln] if int(x) >= 0)
    return out


@pytest.mark.parametrize("name", ["intersection_protected", "unprotected_left"])
@pytest.mark.parametrize("seed", SEEDS)
def test_intersections(name, seed):
    s = raw(name, seed)
    junction = _np(s.map.lane_is_junction)
    assert junction.sum() >= 8
    assert bool(s.map.crosswalk_valid.any())
    ls = _np(s.light_states)
    assert ls.shape[0] >= 4 and (ls == LightState.GREEN).any() and (ls == LightState.RED).any()
    route_junction = [int(x) for x in s.route.lanes if junction[int(x)]]
    assert len(route_junction) == 1
    assert int(s.route.stop_light[0]) >= 0 and math.isfinite(float(s.route.stop_s[0]))
    # reactive vehicles obey lights: their paths carry the stop points of the lines they cross
    a = s.agents
    n_stops = int(((a.model == TrafficModel.IDM) & (a.path_stop_light >= 0).any(-1)).sum())
    assert n_stops >= 1
    # conflicts: junction lanes of lights green at the same time
    jl = _light_lanes(s)
    ego_light = int(s.route.stop_light[0])
    ego_jl = lane_xy(s, route_junction[0])
    conflict_with_ego = False
    for l1 in jl:
        for l2 in jl:
            if l1 >= l2 or not ((ls[l1] == LightState.GREEN) & (ls[l2] == LightState.GREEN)).any():
                continue
            for j1 in jl[l1]:
                for j2 in jl[l2]:
                    if segments_cross(lane_xy(s, j1), lane_xy(s, j2)):
                        assert name == "unprotected_left", f"lights {l1} and {l2} green together, lanes cross"
    for l2 in jl:
        if l2 != ego_light and ((ls[ego_light] == LightState.GREEN) & (ls[l2] == LightState.GREEN)).any():
            conflict_with_ego |= any(segments_cross(ego_jl, lane_xy(s, j2)) for j2 in jl[l2])
    if name == "unprotected_left":
        h = np.unwrap(np.arctan2(*np.diff(ego_jl, axis=0).T[::-1]))
        assert h[-1] - h[0] == pytest.approx(math.pi / 2, abs=0.25)  # a left turn
        assert conflict_with_ego and (ls[ego_light, :20] == LightState.GREEN).any()
    else:
        assert not conflict_with_ego


@pytest.mark.parametrize("seed", sorted(set(SEEDS) | {5, 6, 7}))
def test_pedestrian_crossing(seed):
    s = raw("pedestrian_crossing", seed)
    a = s.agents
    peds = [i for i in range(a.num_agents) if int(a.kind[i]) == AgentType.PEDESTRIAN]
    assert peds and all(float(a.length[i]) == pytest.approx(0.6) for i in peds)
    cws = _np(s.map.crosswalk_xy)[_np(s.map.crosswalk_valid)]
    crossing = 0
    for i in peds:
        if int(a.model[i]) != TrafficModel.IDM:
            continue
        assert 1.0 <= float(a.desired_speed[i]) <= 1.6
        p = _np(a.path_xy[i])[_np(a.path_valid[i])]
        lo, hi = cws.min(1), cws.max(1)  # axis-aligned crosswalks
        inside = ((p[:, None] >= lo[None]) & (p[:, None] <= hi[None])).all(-1).any(-1)
        crossing += bool(inside.any())
    assert crossing >= 1, "no pedestrian path crosses a crosswalk"
    if dict(s.meta.extra).get("variant") == "occluded":
        (ped,) = _log_agents(s, AgentType.PEDESTRIAN)
        xy = _np(a.xy[ped])
        parked = [i for i in range(a.num_agents) if int(a.model[i]) == TrafficModel.STATIC
                  and int(a.kind[i]) == AgentType.VEHICLE]
        assert min(np.linalg.norm(_np(a.xy[i, 0]) - xy[0]) for i in parked) < 4.0  # hidden by a parked car
        r = _route(s)
        d = seg_dist(xy, r)
        assert d[0] > 0.95 + 0.3 + 0.3  # starts outside the ego's corridor
        assert np.allclose(xy[:10], xy[0])  # stands still during the warm-up
        k = int(np.argmax(d < 0.95 + 0.3))  # reaches the ego's corridor
        assert k > 0
        v = float(s.route.speed_limit[0])
        room = arc_s(xy[k], r) - 0.3 - (v * k * DT + 2.3)
        assert room >= v * v / (2 * 6.0), f"pedestrian appears {room:.1f} m ahead of an ego at the limit"


@pytest.mark.parametrize("seed", sorted(set(SEEDS) | {5, 6, 7}))
def test_construction_zone(seed):
    s = raw("construction_zone", seed)
    a = s.agents
    cones = [i for i in range(a.num_agents) if int(a.kind[i]) == AgentType.STATIC]
    assert len(cones) >= 8 and all(float(a.length[i]) == pytest.approx(0.4) for i in cones)
    ego_lane = int(s.route.lanes[0])
    lx = lane_xy(s, ego_lane)
    half = 0.5 * float(s.map.lane_width[ego_lane])
    r = _route(s)
    for i in cones:
        p = _np(a.xy[i, 0])
        off = signed_offset(p, lx)
        assert -half < off < 0, f"cone {i} offset {off:.2f} m is not in the right half of the ego lane"
        assert seg_dist(p[None], r)[0] >= 0.95 + 0.2 + 0.3, f"route passes cone {i} too closely"
    assert min(-signed_offset(_np(a.xy[i, 0]), lx) for i in cones) < half - 0.25  # cones narrow the lane


@pytest.mark.parametrize("seed", SEEDS)
def test_stopped_vehicle(seed):
    s = raw("stopped_vehicle", seed)
    a = s.agents
    (blk,) = [i for i in range(a.num_agents) if int(a.model[i]) == TrafficModel.STATIC]
    assert int(a.kind[blk]) == AgentType.VEHICLE
    lanes = [int(x) for x in s.route.lanes]
    assert len(lanes) == 2 and int(s.map.lane_left[lanes[0]]) in (lanes[1], -1)
    assert lanes[1] in (int(s.map.lane_left[lanes[0]]), int(s.map.lane_right[lanes[0]]))
    p = _np(a.xy[blk, 0])
    assert seg_dist(p[None], lane_xy(s, lanes[0]))[0] < 0.5  # blocks the original lane
    r = _route(s)
    k = int(np.argmin(np.linalg.norm(r - p, axis=1)))
    assert np.linalg.norm(r[k] - p) > 2.5 and int(s.route.lane_of_point[k]) == lanes[1]
    assert int(s.route.lane_of_point[0]) == lanes[0]
    # the lane change is complete before the blocker's rear
    kk = int(np.argmax(_np(s.route.lane_of_point) == lanes[1]))
    assert kk < k - 5


@pytest.mark.parametrize("seed", SEEDS)
def test_roundabout(seed):
    s = raw("roundabout", seed)
    junction = _np(s.map.lane_is_junction)
    succ = _np(s.map.lane_successors)
    # the circle: following successors among junction lanes from a circle piece returns to it
    circle = [i for i in range(s.map.num_lanes) if junction[i] and (succ[i] >= 0).sum() == 2]
    assert circle
    start = circle[0]
    seen, cur = set(), start
    for _ in range(2 * s.map.num_lanes):
        nxt = [int(j) for j in succ[cur] if j >= 0 and junction[j] and (succ[j] >= 0).any()
               and any(junction[int(k)] for k in succ[j] if k >= 0)]
        assert nxt, f"circle lane {cur} has no circle successor"
        cur = nxt[0]
        if cur == start:
            break
        assert cur not in seen
        seen.add(cur)
    assert cur == start, "circle lanes do not form a cycle"
    assert sum(junction[int(x)] for x in s.route.lanes) >= 2  # ego drives through the roundabout
    rad = np.linalg.norm(lane_xy(s, start), axis=1)
    assert 15.0 - 1e-3 <= rad.mean() <= 25.0 + 1e-3


def test_expert_yield_gap_is_cached_per_scenario_batch():
    """The expert's gap to the next junction entry / crosswalk: the static part is computed once a
    rollout, recomputed for another batch even without a reset, and equal to a fresh expert's."""
    from roadloop.policies.expert import Expert
    from roadloop.sim.batching import collate
    from roadloop.sim.config import SimConfig
    from roadloop.sim.state import init_state

    def state(name: str):
        return init_state(collate([raw(name, s) for s in range(2)]), SimConfig())

    a, b = state("pedestrian_crossing"), state("intersection_protected")
    ex = Expert()
    ex.reset(a, torch.zeros(2, dtype=torch.int64))
    ga = ex._junction_gap(a)
    assert ex._junction_gap(a) is not ga and torch.equal(ex._junction_gap(a), ga)  # cached static part
    assert bool(torch.isfinite(ga).all())  # a crosswalk ahead on every route
    gb = ex._junction_gap(b)  # another batch, no reset
    assert torch.equal(gb, Expert()._junction_gap(b)) and bool(torch.isfinite(gb).all())
    assert not torch.equal(ga, gb)
