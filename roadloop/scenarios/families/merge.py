"""``merge``: the ego comes up an on-ramp whose acceleration lane ends; it merges into a 2-lane road.

Layout (x east): main road right lane centred on y = 0, left lane on y = +w, split into
upstream / merge-zone / downstream segments.  The acceleration lane (y = -w) runs alongside the
merge-zone segment and ends; it is the merge-zone right lane's right neighbour.  The ramp curves
in from the south-west and joins the acceleration lane's start tangentially.
"""

from __future__ import annotations

import math

import numpy as np

from roadloop.scenarios.builder import smooth_lane_change
from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import Scenario

NAME = "merge"
DESCRIPTION = "on-ramp whose acceleration lane ends: the ego merges into a 2-lane road with IDM traffic"
RAMP_LIMIT = 20.0  # m/s


def _ramp(rng: np.random.Generator, end: np.ndarray) -> np.ndarray:
    """Ramp centreline (1 m spacing): straight at heading theta, then a right curve to heading 0 at ``end``."""
    theta = float(rng.uniform(0.12, 0.25))
    radius = float(rng.uniform(150.0, 250.0))
    l1 = float(rng.uniform(90.0, 140.0))
    n = int(math.ceil(l1 + radius * theta)) + 1
    s = np.linspace(0.0, l1 + radius * theta, n)
    kappa = np.where(s > l1, -1.0 / radius, 0.0)
    ds = s[1] - s[0]
    th = theta + np.concatenate(([0.0], np.cumsum(0.5 * (kappa[1:] + kappa[:-1]) * ds)))
    steps = np.stack((np.cos(th), np.sin(th)), axis=1) * ds
    xy = np.concatenate(([[0.0, 0.0]], np.cumsum(0.5 * (steps[1:] + steps[:-1]), axis=0)))
    return xy - xy[-1] + end


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    v_lim = float(rng.uniform(25.0, 30.0))
    w = float(rng.uniform(3.5, 3.75))
    l_acc = float(rng.uniform(150.0, 230.0))  # m, acceleration lane / merge zone length
    x0, x1 = 0.0, l_acc
    x_start = -250.0
    x_end = x1 + c.route_need(v_lim) + 150.0

    b = c.new_builder()
    segs = [(x_start, x0), (x0, x1), (x1, x_end)]
    right = [b.add_lane(c.straight_xy((a, 0.0), (e, 0.0)), w, v_lim) for a, e in segs]
    left = [b.add_lane(c.straight_xy((a, w), (e, w)), w, v_lim) for a, e in segs]
    for lane_set in (right, left):
        b.connect(lane_set[0], lane_set[1])
        b.connect(lane_set[1], lane_set[2])
    for r, l_ in zip(right, left, strict=True):
        b.neighbours(r, left=l_)
    acc_lane = b.add_lane(c.straight_xy((x0, -w), (x1, -w)), w, v_lim)
    ramp_xy = _ramp(rng, np.array([x0, -w]))
    ramp = b.add_lane(ramp_xy, w, RAMP_LIMIT)
    b.connect(ramp, acc_lane)
    b.neighbours(acc_lane, left=right[1])

    # road edges: main left side; main right side up- and downstream with a taper after the
    # acceleration lane; the acceleration lane's right side; both sides of the ramp
    b.add_road_edge(c.straight_xy((x_start, 1.5 * w), (x_end, 1.5 * w)))
    b.add_road_edge(c.straight_xy((x_start, -0.5 * w), (x0, -0.5 * w)))
    b.add_road_edge(np.array([[x0, -1.5 * w], [x1, -1.5 * w], [x1 + 40.0, -0.5 * w], [x_end, -0.5 * w]]))
    b.edge_of_lane(ramp, "left")
    b.edge_of_lane(ramp, "right")

    # ego on the ramp; its route merges over [m0, m1] of the acceleration lane
    s_ego = float(rng.uniform(5.0, 20.0))
    m0 = float(rng.uniform(0.15, 0.4)) * l_acc
    m1 = min(m0 + float(rng.uniform(40.0, 70.0)), l_acc - 15.0)
    blend = smooth_lane_change(b.lanes[acc_lane].xy, b.lanes[right[1]].xy, m0, m1)
    route_xy = np.concatenate((c.cut(ramp_xy, s_ego), blend[1:], b.lanes[right[2]].xy[1:]))
    route_xy = c.cut(route_xy, 0.0, c.route_need(v_lim) + 40.0)
    v_ego = float(rng.uniform(14.0, 19.0))
    c.add_ego(b, [ramp, acc_lane, right[1], right[2]], route_xy, v_ego, v_lim)

    # main-road IDM traffic, with gaps of 1.5-4 s in the right lane
    n_max = int(rng.integers(5, 14))
    slots: list[tuple[c.Chain, float, float]] = []
    for lane_set, (lo, hi) in ((right, (1.5, 4.0)), (left, (1.0, 3.0))):
        ch = c.chain(b, lane_set)
        v_lane = v_lim * float(rng.uniform(0.75, 0.95))
        for s in c.spawn_slots(rng, 5.0, -x_start + x0 + 0.6 * l_acc, c.headway_gap(rng, v_lane, lo, hi)):
            slots.append((ch, s, v_lane))
    for k in sorted(rng.permutation(len(slots))[:n_max]):
        ch, s, v = slots[k]
        c.add_idm(b, ch, s, v, v_lim * float(rng.uniform(0.85, 1.0)))
    return c.finish(b, NAME, seed, accel_lane=f"{l_acc:.0f}")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
