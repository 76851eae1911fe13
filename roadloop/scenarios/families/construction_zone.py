"""``construction_zone``: a line of cones narrows the right side of the ego lane over 30-60 m.

Variants (by seed):

* ``nudge``: two-way road; cones take 0.3-0.8 m of the ego lane and the route is nudged left
  within the lane; oncoming IDM traffic.
* ``shift``: one-way 2-lane road, ego in the right lane; cones take 1.0-1.8 m and the route
  shifts partly into the left lane (neighbours set); IDM traffic in the left lane.

The route keeps a 1.9 m wide box >= 0.45 m clear of the cones (0.4 x 0.4 m, kind STATIC).
"""

from __future__ import annotations

import numpy as np

from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import AgentType, Scenario

NAME = "construction_zone"
DESCRIPTION = "cones narrow the right of the ego lane; the route is nudged left (or partly into the left lane)"
CONE = 0.4  # m
CLEAR = 0.3  # m, clearance the route keeps between a car-wide box and the cones (plus a margin)


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    shift = bool(rng.random() < 0.5)
    v_lim = float(rng.uniform(11.0, 14.0)) if not shift else float(rng.uniform(13.0, 20.0))
    w = float(rng.uniform(3.4, 3.75))
    margin = float(rng.uniform(0.15, 0.3))
    need = 0.5 * CONE + 0.5 * c.CAR_W + CLEAR + margin  # route-to-cone-centre lateral distance
    if shift:
        intrusion = float(rng.uniform(1.0, min(1.8, w / 2 - 0.2)))  # cone centres stay right of the centreline
    else:
        # the box must stay in its lane: -w/2 + intrusion + need + CAR_W/2 <= w/2 - 0.05
        intrusion = float(rng.uniform(0.3, min(0.8, w - need - 0.5 * c.CAR_W - 0.05)))
    s_ego = float(rng.uniform(20.0, 50.0))
    z0 = s_ego + float(rng.uniform(40.0, 80.0))  # first cone (arc length along the ego lane)
    zlen = float(rng.uniform(30.0, 60.0))
    length = s_ego + c.route_need(v_lim) + 100.0
    ref = c.centerline(rng, length, bool(rng.random() < 0.4), kappa_max=min(1 / 150, 2.0 / v_lim**2))

    b = c.new_builder()
    if shift:
        (ego_lane, left_lane), _ = c.add_road(b, ref, 2, 0, w, v_lim)
        other = left_lane
        route_lanes = [ego_lane, left_lane]
    else:
        (ego_lane,), (other,) = c.add_road(b, ref, 1, 1, w, v_lim)
        route_lanes = [ego_lane]
    ego_ch = c.chain(b, [ego_lane])

    # cones: tapered line along the right side of the ego lane
    n_cones = int(np.clip(round(zlen / 4.0) + 1, 8, 16))
    s_c = np.linspace(z0, z0 + zlen, n_cones)
    taper = min(10.0, zlen / 3)
    prof = c.smoothstep((s_c - z0) / taper) * c.smoothstep((z0 + zlen - s_c) / taper)
    lat = -w / 2 + 0.25 + (intrusion - 0.25) * prof  # cone centre offset (left +) from the lane centre
    p, h = c.interp(ego_ch.xy, s_c)
    cones = p + np.stack((-np.sin(h), np.cos(h)), 1) * lat[:, None]

    # route: offset left so the car-wide box clears the cones; in before the first cone, back after the last
    d_r = -w / 2 + intrusion + need
    r = ego_ch.cut(s_ego, s_ego + c.route_need(v_lim) + 20.0)
    s_r = s_ego + c.arclength(r)
    off = d_r * (c.smoothstep((s_r - (z0 - 25.0)) / 20.0) - c.smoothstep((s_r - (z0 + zlen + 5.0)) / 20.0))
    v0 = v_lim * float(rng.uniform(0.7, 0.9))
    c.add_ego(b, route_lanes, c.offset_polyline(r, off), v0, v_lim)
    for xy, hh in zip(cones, h, strict=True):
        b.add_static(xy, float(hh), length=CONE, width=CONE, kind=AgentType.STATIC)

    # a few IDM vehicles in the other lane (none in the ego lane: they would queue behind the cones)
    ch = c.chain(b, [other])
    v = v_lim * float(rng.uniform(0.7, 0.9))
    if shift:  # same direction: keep clear of the ego's position
        blocked = [(s_ego - 40.0, s_ego + c.CAR_L + 2.0 + 1.5 * v0)]
        slots = c.spawn_slots(rng, 5.0, s_ego + 150.0, c.headway_gap(rng, v, 1.5, 3.5), blocked)
    else:  # oncoming: anywhere along the road
        slots = c.spawn_slots(rng, 5.0, ch.length - 40.0, c.headway_gap(rng, v, 1.5, 4.0))
    for k in sorted(rng.permutation(len(slots))[: int(rng.integers(2, 6))]):
        c.add_idm(b, ch, slots[k], v, v_lim * float(rng.uniform(0.85, 1.0)))
    return c.finish(b, NAME, seed, variant="shift" if shift else "nudge", intrusion=f"{intrusion:.2f}")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
