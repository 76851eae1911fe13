"""``cut_in``: a scripted vehicle in the adjacent lane changes into the ego lane with a small gap."""

from __future__ import annotations

import numpy as np

from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import Scenario

NAME = "cut_in"
DESCRIPTION = "a vehicle from the adjacent lane cuts in close in front of the ego (2-4 s lane change), then slows"


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    v_lim = float(rng.uniform(12.0, 28.0))
    width = float(rng.uniform(3.3, 3.75))
    n_lanes = int(rng.integers(2, 4))
    ego_idx = int(rng.integers(0, n_lanes))
    if ego_idx == 0:
        side = 1
    elif ego_idx == n_lanes - 1:
        side = -1
    else:
        side = int(rng.choice([-1, 1]))
    cut_idx = ego_idx + side  # the cutter's lane; it moves by -side lanes (towards the ego)
    s_ego = float(rng.uniform(60.0, 120.0))
    v_ego = v_lim * float(rng.uniform(0.75, 0.9))
    v_cut = min(v_lim, v_ego * float(rng.uniform(1.0, 1.15)))
    t_lc = float(rng.uniform(1.5, 3.5))  # s, lane change starts
    dur = float(rng.uniform(2.0, 4.0))  # s, lane change duration
    g0 = float(rng.uniform(4.0, 12.0))  # m, bumper gap to the ego when the lane change starts
    s_cut = s_ego + c.CAR_L + g0 - (v_cut - v_ego) * t_lc
    length = s_ego + c.route_need(v_lim) + 150.0
    ref = c.centerline(rng, length, bool(rng.random() < 0.4), kappa_max=min(1 / 150, 2.0 / v_lim**2))

    b = c.new_builder()
    lanes, _ = c.add_road(b, ref, n_lanes, 0, width, v_lim)
    chains = [c.chain(b, [ln]) for ln in lanes]
    c.add_ego(b, [lanes[ego_idx]], chains[ego_idx].cut(s_ego, s_ego + c.route_need(v_lim) + 20.0), v_ego, v_lim)

    # the cutter: cruise, lane change towards the ego lane, then slow down somewhat
    t_slow = float(rng.uniform(1.0, 3.0))
    dec = float(rng.uniform(1.0, 3.0))
    acc = c.accel_schedule([(t_lc + dur, 0.0), (t_slow, -dec)])
    s_rel, _ = c.speed_profile(v_cut, acc, v_max=v_lim)
    t = np.arange(c.T) * c.DT
    lateral = -side * width * c.smoothstep((t - t_lc) / dur)  # left offset: towards the ego lane
    xy, yaw, speed = c.track_along(chains[cut_idx].xy, s_cut + s_rel, lateral)
    b.add_agent(xy, yaw, speed, length=c.CAR_L, width=c.CAR_W)

    # IDM traffic: behind the cutter in its lane, in any other lane, maybe a follower behind the ego
    n_bg = int(rng.integers(2, 8))
    slots: list[tuple[int, float, float]] = []
    for i in range(n_lanes):
        v_lane = v_lim * float(rng.uniform(0.7, 0.9))
        if i == ego_idx:
            hi = s_ego - c.CAR_L - 2.0 - 1.5 * v_ego
            cands = c.spawn_slots(rng, 5.0, hi, c.headway_gap(rng, v_lane, 1.5, 3.0))[-1:] if hi > 15 else []
        elif i == cut_idx:
            hi = s_cut - c.CAR_L - 2.0 - 1.5 * v_cut
            cands = c.spawn_slots(rng, 5.0, hi, c.headway_gap(rng, v_lane, 1.2, 2.5)) if hi > 15 else []
        else:
            cands = c.spawn_slots(rng, 5.0, s_ego + 120.0, c.headway_gap(rng, v_lane, 1.2, 2.5))
        slots += [(i, s, min(v_lane, v_ego)) for s in cands]
    for k in sorted(rng.permutation(len(slots))[:n_bg]):
        i, s, v = slots[k]
        c.add_idm(b, chains[i], s, v, v_lim * float(rng.uniform(0.85, 1.0)))
    return c.finish(b, NAME, seed, side="left" if side > 0 else "right", gap=f"{g0:.1f}")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
