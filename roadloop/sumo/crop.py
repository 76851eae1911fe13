"""Crop a ``RoadNetwork`` to a region and add it to a ``ScenarioBuilder``.

``crop_network`` selects the lanes within a radius of query points (an ego route, agent
positions) through the network's spatial grid and trims long lanes to the region;
``add_crop_to_builder`` adds them with connections, neighbours, lights (grouped by SUMO
(tls, link index)), crosswalks, road edges, stop lines and stop signs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from roadloop.errors import ScenarioError
from roadloop.scenarios.builder import ScenarioBuilder, offset_polyline
from roadloop.sumo.network import CHAR_TO_LIGHT, CROP_MARGIN, RoadNetwork


@dataclass
class Crop:
    """Lanes of a network kept for one region, with the kept arc-length range of each."""

    lanes: np.ndarray  # (n,) int64 network lane indices, ascending
    s0: np.ndarray  # (n,) m, kept range start along the lane
    s1: np.ndarray  # (n,) m
    full_start: np.ndarray  # (n,) bool, the lane start is kept (predecessor links stay)
    full_end: np.ndarray  # (n,) bool, the lane end is kept (successors, stop line stay)
    query: np.ndarray  # (M, 2) the query points
    radius: float


def crop_network(net: RoadNetwork, points: np.ndarray, radius: float = 80.0,
                 must_keep: np.ndarray | None = None) -> Crop:
    """Lanes with a point within ``radius`` m of ``points`` (M, 2); long lanes are trimmed.

    ``must_keep`` lanes (e.g. the ego route) are kept whole within the region even if trimmed.
    """
    points = np.asarray(points, float).reshape(-1, 2)
    lanes, smin, smax = net.grid.query(points, radius)
    if must_keep is not None and len(must_keep):
        extra = np.setdiff1d(np.asarray(must_keep, np.int64), lanes)
        lanes = np.concatenate((lanes, extra))
        smin = np.concatenate((smin, np.zeros(len(extra))))
        smax = np.concatenate((smax, net.lane_length[extra]))
        o = np.argsort(lanes)
        lanes, smin, smax = lanes[o], smin[o], smax[o]
    ln = net.lane_length[lanes]
    s0 = np.clip(smin - CROP_MARGIN, 0.0, ln)
    s1 = np.clip(smax + CROP_MARGIN, 0.0, ln)
    full_start = s0 <= 1.0
    full_end = s1 >= ln - 1.0
    s0 = np.where(full_start, 0.0, s0)
    s1 = np.where(full_end, ln, s1)
    return Crop(lanes.astype(np.int64), s0, s1, full_start, full_end, points, float(radius))


def lane_piece(net: RoadNetwork, i: int, s0: float, s1: float) -> np.ndarray:
    """The part of lane ``i`` between arc lengths s0..s1 (K, 2)."""
    p = net.lane_xy(i)
    s = net.lane_s[net.lane_ptr[i]:net.lane_ptr[i + 1]]
    if s0 <= 0.0 and s1 >= s[-1]:
        return p
    inner = (s > s0) & (s < s1)
    a = np.array([np.interp(s0, s, p[:, 0]), np.interp(s0, s, p[:, 1])])
    b = np.array([np.interp(s1, s, p[:, 0]), np.interp(s1, s, p[:, 1])])
    return np.concatenate((a[None], p[inner], b[None]))


def choose_links(net: RoadNetwork, lanes: np.ndarray,
                 next_lane: dict[int, int] | None = None) -> dict[int, tuple]:
    """For each light-controlled lane: the (tls index, link index) that governs its stop line.

    A lane can feed several links (left / straight / right).  Preference: the link towards
    ``next_lane[lane]`` (the lane the ego or agent takes next, junction-internal or beyond),
    then the straight link, then the lowest link index.
    """
    out: dict[int, tuple] = {}
    next_lane = next_lane or {}
    sel = np.isin(net.conn_from, lanes) & (net.conn_tls >= 0)
    for k in np.nonzero(sel)[0]:
        a = int(net.conn_from[k])
        key = (int(net.conn_tls[k]), int(net.conn_link[k]))
        nl = next_lane.get(a, -2)
        rank = (0 if nl in (int(net.conn_via[k]), int(net.conn_to[k])) else
                1 if net.conn_dir[k] == ord("s") else 2, key[1])
        if a not in out or rank < out[a][0]:
            out[a] = (rank, key)
    return {a: v[1] for a, v in out.items()}


def add_crop_to_builder(b: ScenarioBuilder, net: RoadNetwork, crop: Crop,
                        link_states: dict[str, np.ndarray] | None = None, t0: float = 0.0,
                        next_lane: dict[int, int] | None = None) -> np.ndarray:
    """Add the cropped lanes, graph, lights, crosswalks, road edges and stop signs to ``b``.

    ``link_states``: tls id -> (T, num_links) uint8 SUMO state chars for the scenario's steps
    (from a recording); lights without it replay their static program from time ``t0`` s.
    Returns ``lane_map`` (L_net,) int64: network lane -> builder lane index, -1 if not kept.
    """
    T = b.T
    lane_map = -np.ones(net.num_lanes, np.int64)
    for k, i in enumerate(crop.lanes):
        xy = lane_piece(net, int(i), float(crop.s0[k]), float(crop.s1[k]))
        lane_map[i] = b.add_lane(xy, width=float(net.lane_width[i]), speed_limit=float(net.lane_speed[i]),
                                 junction=bool(net.lane_internal[i]))
    kept_end = np.zeros(net.num_lanes, bool)
    kept_start = np.zeros(net.num_lanes, bool)
    kept_end[crop.lanes[crop.full_end]] = True
    kept_start[crop.lanes[crop.full_start]] = True
    for i in crop.lanes:
        if not kept_end[i]:
            continue
        for j in net.successors[i]:
            if j >= 0 and lane_map[j] >= 0 and kept_start[j]:
                b.connect(int(lane_map[i]), int(lane_map[j]))
    for i in crop.lanes:
        for nb, side in ((net.lane_left[i], "left"), (net.lane_right[i], "right")):
            if nb >= 0 and lane_map[nb] >= 0:
                lane = b.lanes[lane_map[i]]
                if side == "left":
                    lane.left = int(lane_map[nb])
                else:
                    lane.right = int(lane_map[nb])
        if net.lane_outer_right[i]:
            b.edge_of_lane(int(lane_map[i]), "right")
        if net.lane_outer_left[i]:
            b.edge_of_lane(int(lane_map[i]), "left")
    # lights: group the kept, light-controlled lane ends by (tls, link)
    ends = crop.lanes[crop.full_end]
    groups: dict[tuple, list[int]] = {}
    for a, key in choose_links(net, ends, next_lane).items():
        groups.setdefault(key, []).append(int(lane_map[a]))
    cache: dict[int, np.ndarray] = {}
    for (ti, link), blanes in sorted(groups.items()):
        tl = net.traffic_lights[ti]
        if ti not in cache:
            rec = None if link_states is None else link_states.get(tl.id)
            cache[ti] = rec if rec is not None else tl.link_states(t0, T)
        chars = cache[ti]
        st = CHAR_TO_LIGHT[chars[:, link]] if link < chars.shape[1] else np.zeros(T, np.int64)
        b.add_light(st, sorted(blanes))
    stops = [int(lane_map[i]) for i in ends if net.lane_stop_sign[i]]
    if stops:
        b.add_stop_sign(stops)
    if len(net.crosswalk_xy):
        c = net.crosswalk_xy.mean(1)
        d2 = ((c[:, None, :] - crop.query[None, :, :]) ** 2).sum(-1).min(1)
        for k in np.nonzero(d2 <= crop.radius ** 2)[0]:
            b.add_crosswalk(net.crosswalk_xy[k])
    return lane_map


def network_to_scenario_map(net: RoadNetwork, region_center, radius: float = 80.0, num_steps: int = 170,
                            t0: float = 0.0) -> tuple[ScenarioBuilder, np.ndarray]:
    """A ``ScenarioBuilder`` holding the network within ``radius`` m of ``region_center`` (2,).

    Lights replay their static programs from ``t0`` s.  Add agents and a route, then ``build``.
    Returns (builder, lane_map network lane -> builder lane, -1 if not kept).
    """
    crop = crop_network(net, np.asarray(region_center, float).reshape(1, 2), radius)
    if len(crop.lanes) == 0:
        raise ScenarioError(f"network '{net.name}': no drivable lane within {radius} m of {region_center}")
    b = ScenarioBuilder(num_steps)
    return b, add_crop_to_builder(b, net, crop, t0=t0)


def outer_edges(net: RoadNetwork) -> list[np.ndarray]:
    """Road-edge polylines of the whole network (outer lane sides), for display."""
    out = []
    for i in np.nonzero(net.lane_outer_left | net.lane_outer_right)[0]:
        xy = net.lane_xy(int(i))
        w = 0.5 * net.lane_width[i]
        if net.lane_outer_right[i]:
            out.append(offset_polyline(xy, -w))
        if net.lane_outer_left[i]:
            out.append(offset_polyline(xy, w))
    return out
