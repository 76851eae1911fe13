"""``multilane_traffic``: 3-lane one-way road (straight or gently curved) with 10-30 IDM vehicles."""

from __future__ import annotations

from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import Scenario

NAME = "multilane_traffic"
DESCRIPTION = "3-lane one-way road, straight or gently curved, ego in the middle of 10-30 IDM vehicles"


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    highway = bool(rng.random() < 0.5)
    v_lim = float(rng.uniform(25.0, 30.0) if highway else rng.uniform(11.0, 14.0))
    width = float(rng.uniform(3.3, 3.75))
    s_ego = float(rng.uniform(80.0, 140.0))
    ahead = float(rng.uniform(150.0, 220.0))  # traffic is placed up to this far ahead of the ego
    length = s_ego + max(c.route_need(v_lim), ahead + 1.1 * v_lim * c.HORIZON) + 50.0
    curved = bool(rng.random() < 0.5)
    ref = c.centerline(rng, length, curved, kappa_max=min(1 / 150, 2.0 / v_lim**2))

    b = c.new_builder()
    lanes, _ = c.add_road(b, ref, 3, 0, width, v_lim)
    chains = [c.chain(b, [ln]) for ln in lanes]
    ego_lane = 1
    v_ego = v_lim * float(rng.uniform(0.75, 0.95))
    c.add_ego(b, [lanes[ego_lane]], chains[ego_lane].cut(s_ego, s_ego + c.route_need(v_lim) + 20.0), v_ego, v_lim)

    n_target = int(rng.integers(10, 31))
    slots: list[tuple[int, float, float]] = []  # (lane, s, speed)
    for i in range(3):
        v_lane = v_lim * float(rng.uniform(0.7, 0.95))
        blocked = [(s_ego - c.CAR_L / 2 - 2.0 - 1.2 * v_ego, s_ego + c.CAR_L / 2 + 2.0 + 1.2 * v_ego)] \
            if i == ego_lane else []
        for s in c.spawn_slots(rng, 5.0, s_ego + ahead, c.headway_gap(rng, v_lane, 0.9, 2.4), blocked):
            slots.append((i, s, v_lane))
    order = rng.permutation(len(slots))[: min(n_target, c.MAX_AGENTS - 1)]
    for k in sorted(order):
        i, s, v = slots[k]
        desired = v_lim * float(rng.uniform(0.8, 1.05))
        c.add_idm(b, chains[i], s, v, desired)
    return c.finish(b, NAME, seed, road="highway" if highway else "urban", curved=curved)


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
