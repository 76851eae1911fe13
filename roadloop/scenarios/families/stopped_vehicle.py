"""``stopped_vehicle``: a stopped car blocks the ego lane of a one-way 2-lane road.

The route changes into the adjacent lane (smooth lane change) 12-25 m before the blocker;
IDM traffic in the adjacent lane leaves a gap around the ego.
"""

from __future__ import annotations

import numpy as np

from roadloop.scenarios.builder import smooth_lane_change
from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import AgentType, Scenario

NAME = "stopped_vehicle"
DESCRIPTION = "a stopped vehicle blocks the ego lane; the route changes to the adjacent lane past IDM traffic"


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    v_lim = float(rng.uniform(11.0, 17.0))
    w = float(rng.uniform(3.3, 3.7))
    ego_right = bool(rng.random() < 0.5)
    s_ego = float(rng.uniform(30.0, 60.0))
    s_block = s_ego + float(rng.uniform(55.0, 100.0))  # blocker centre
    s1 = s_block - s_ego - 0.5 * c.CAR_L - float(rng.uniform(12.0, 25.0))  # lane change done (route arc length)
    s0 = max(5.0, s1 - float(rng.uniform(25.0, 40.0)))
    length = s_ego + c.route_need(v_lim) + 150.0
    ref = c.centerline(rng, length, bool(rng.random() < 0.4), kappa_max=min(1 / 150, 2.0 / v_lim**2))

    b = c.new_builder()
    lanes, _ = c.add_road(b, ref, 2, 0, w, v_lim)
    ego_lane, adj = (lanes[0], lanes[1]) if ego_right else (lanes[1], lanes[0])
    ego_ch, adj_ch = c.chain(b, [ego_lane]), c.chain(b, [adj])
    span = c.route_need(v_lim) + 20.0
    route = smooth_lane_change(ego_ch.cut(s_ego, s_ego + span), adj_ch.cut(s_ego, s_ego + span), s0, s1)
    v0 = v_lim * float(rng.uniform(0.7, 0.9))
    c.add_ego(b, [ego_lane, adj], route, v0, v_lim)

    p, h = ego_ch.pose(s_block)
    kerb = -1.0 if ego_right else 1.0  # left offset towards the road's outer edge
    p = p + kerb * float(rng.uniform(0.0, 0.3)) * np.array([-np.sin(h), np.cos(h)])
    b.add_static(p, h + float(rng.uniform(-0.05, 0.05)), length=c.CAR_L, width=c.CAR_W, kind=AgentType.VEHICLE)

    # adjacent-lane traffic: ahead of the ego at >= its speed, and well behind it
    v = v0 * float(rng.uniform(1.0, 1.1))
    blocked = [(s_ego - 35.0, s_ego + 0.5 * c.CAR_L + 2.0 + 1.5 * v0)]
    slots = c.spawn_slots(rng, 5.0, s_ego + 160.0, c.headway_gap(rng, v, 1.2, 3.0), blocked)
    for k in sorted(rng.permutation(len(slots))[: int(rng.integers(2, 8))]):
        c.add_idm(b, adj_ch, slots[k], v if slots[k] > s_ego else min(v, v0), min(v_lim, v * 1.05))
    # ego-lane traffic that has already passed the blocker
    if rng.random() < 0.5:
        c.add_idm(b, ego_ch, s_block + float(rng.uniform(15.0, 40.0)), v_lim * 0.8, v_lim * 0.9)
    return c.finish(b, NAME, seed, side="right" if ego_right else "left")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
