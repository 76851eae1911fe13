"""``pedestrian_crossing``: pedestrians cross the ego's two-way street.

Variants (by seed):

* ``crosswalk``: 1-4 pedestrians walk (IDM) across a zebra crossing ahead of the ego;
* ``occluded``: a pedestrian stands hidden in front of a car parked at the kerb (parking lane
  on the ego's right) and steps out into the ego lane (scripted) when a careful driver at the
  speed limit is still at least its stopping distance (1 s reaction, 4 m/s^2) + a margin away;
  one or two more pedestrians use a crosswalk further on.

Frame: the street runs along +x; ego lane centre y = -w/2, oncoming lane y = +w/2, parking
lanes (2.4 m) outside them.
"""

from __future__ import annotations

import numpy as np

from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import AgentType, Scenario

NAME = "pedestrian_crossing"
DESCRIPTION = "pedestrians on a crosswalk, or one stepping out from behind a parked car, across the ego's street"
PED = 0.6  # m, pedestrian box size
PARK_W = 2.4  # m, parking lane width


def _crosswalk_peds(b, rng: np.random.Generator, x_cw: float, cw_w: float, half: float, n: int) -> None:
    """``n`` IDM pedestrians on distinct lines of the crosswalk centred at x_cw (road half-width ``half``)."""
    n_slots = max(1, int((cw_w - 0.8) / 0.9) + 1)
    lines = x_cw - 0.45 * (n_slots - 1) + 0.9 * rng.permutation(n_slots)[: min(n, n_slots)]
    for x in lines:
        north = bool(rng.random() < 0.5)
        y0, y1 = (-half - 1.5, half + 4.0) if north else (half + 1.5, -half - 4.0)
        path = c.straight_xy((x, y0), (x, y1))
        speed = float(rng.uniform(1.0, 1.6))
        s0 = float(rng.uniform(0.0, 0.6)) * half  # some already on the road
        c.add_idm(b, c.free_path(path), s0, speed * float(rng.uniform(0.6, 1.0)),
                  speed, length=PED, width=PED, kind=AgentType.PEDESTRIAN, extra=5.0)


def _park(b, xs: list[float], y: float, yaw: float) -> None:
    for x in xs:
        b.add_static((x, y), yaw, length=c.CAR_L, width=c.CAR_W, kind=AgentType.VEHICLE)


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    occluded = bool(rng.random() < 0.5)
    parking = occluded or bool(rng.random() < 0.5)
    v_lim = float(rng.uniform(11.0, 14.0))
    w = float(rng.uniform(3.2, 3.6))
    x_ego = float(rng.uniform(100.0, 120.0))
    length = x_ego + c.route_need(v_lim) + 60.0
    ref = c.straight_xy((0.0, 0.0), (length, 0.0))

    b = c.new_builder()
    (ego_lane,), (onc_lane,) = c.add_road(b, ref, 1, 1, w, v_lim, edges=False)
    half = w + (PARK_W if parking else 0.0)  # m, kerb-to-centreline distance
    if parking:
        b.add_lane(c.straight_xy((0.0, -w - PARK_W / 2), (length, -w - PARK_W / 2)), PARK_W, 3.0)
        b.add_lane(c.straight_xy((length, w + PARK_W / 2), (0.0, w + PARK_W / 2)), PARK_W, 3.0)
    b.add_road_edge(c.straight_xy((0.0, -half), (length, -half)))
    b.add_road_edge(c.straight_xy((0.0, half), (length, half)))

    v0 = v_lim * float(rng.uniform(0.85, 1.0))
    ego_ch = c.chain(b, [ego_lane])
    c.add_ego(b, [ego_lane], ego_ch.cut(x_ego, x_ego + c.route_need(v_lim) + 20.0), v0, v_lim)

    y_park = -w - PARK_W / 2 + 0.1  # parked car centre, slightly towards the kerb
    blocked: list[tuple[float, float]] = []  # x extents kept free of parked cars on the right
    blocked_left: list[tuple[float, float]] = []  # ... and on the left
    if occluded:
        stop_need = v_lim * 1.0 + v_lim**2 / (2 * 4.0) + 5.0
        t_conf = float(rng.uniform(3.0, 6.0))  # s, when the pedestrian reaches the ego's corridor
        x_p = x_ego + 0.5 * c.CAR_L + v_lim * t_conf + stop_need + 0.5 * PED + float(rng.uniform(0.0, 5.0))
        x_car = x_p - 0.5 * PED - float(rng.uniform(0.6, 1.0)) - 0.5 * c.CAR_L
        y0 = -w - PARK_W / 2 + float(rng.uniform(0.0, 0.4))
        y_conf = -w / 2 - 0.5 * c.CAR_W - 0.3 - 0.5 * PED  # ped centre where its box meets the ego corridor
        v_p = float(rng.uniform(1.2, 2.0))
        a_p = 2.0
        walk = y_conf - y0
        t_walk = v_p / a_p + max(0.0, walk - v_p**2 / (2 * a_p)) / v_p
        t_go = max(1.5, t_conf - t_walk)
        s_rel, _ = c.speed_profile(0.0, c.accel_schedule([(t_go, 0.0), (v_p / a_p, a_p)]), v_max=v_p)
        path = c.straight_xy((x_p, y0), (x_p, half + 2.5))
        xy, yaw, speed = c.track_along(path, s_rel)
        yaw[:] = np.pi / 2
        _park(b, [x_car], y_park, 0.0)
        b.add_agent(xy, yaw, speed, length=PED, width=PED, kind=AgentType.PEDESTRIAN)
        blocked.append((x_car - 0.5 * c.CAR_L, x_p + PED))
        blocked_left.append((x_p - PED, x_p + PED))  # the pedestrian walks on across the street
        x_cw = x_p + float(rng.uniform(25.0, 45.0))
        n_peds = int(rng.integers(1, 3))
        extra = {"t_go": f"{t_go:.1f}"}
    else:
        x_cw = x_ego + float(rng.uniform(40.0, 70.0))
        n_peds = int(rng.integers(1, 5))
        extra = {}
    cw_w = float(rng.uniform(3.0, 4.5))
    b.add_crosswalk([(x_cw - cw_w / 2, -half), (x_cw + cw_w / 2, -half), (x_cw + cw_w / 2, half),
                     (x_cw - cw_w / 2, half)])
    blocked.append((x_cw - cw_w / 2 - 6.0, x_cw + cw_w / 2 + 6.0))
    blocked_left.append(blocked[-1])
    _crosswalk_peds(b, rng, x_cw, cw_w, half, n_peds)

    if parking:  # more parked cars on both sides, clear of the crosswalk and the occluder
        gap = lambda: float(rng.uniform(2.0, 12.0))
        right = c.spawn_slots(rng, x_ego - 30.0, x_cw + 40.0, gap, blocked)
        left = c.spawn_slots(rng, x_ego - 30.0, x_cw + 40.0, gap, blocked_left)
        _park(b, [x for x in right if rng.random() < 0.35][:4], y_park, 0.0)
        _park(b, [x for x in left if rng.random() < 0.35][:4], w + PARK_W / 2 - 0.1, np.pi)
    # oncoming vehicles that have already passed the ego (they never reach a pedestrian)
    onc = c.chain(b, [onc_lane])
    for s in c.spawn_slots(rng, length - x_ego - 5.0, length - x_ego + 40.0, c.headway_gap(rng, v_lim, 1.2, 3.0))[:2]:
        c.add_idm(b, onc, s, v_lim * 0.8, v_lim * float(rng.uniform(0.85, 1.0)))
    return c.finish(b, NAME, seed, variant="occluded" if occluded else "crosswalk", **extra)


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
