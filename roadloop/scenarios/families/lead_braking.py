"""``lead_braking``: the ego follows a lead vehicle that brakes hard (scripted), IDM traffic alongside."""

from __future__ import annotations

from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import Scenario

NAME = "lead_braking"
DESCRIPTION = "ego follows a scripted lead that brakes at 5-8 m/s^2 to a stop (maybe resumes); IDM traffic alongside"


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    v_lim = float(rng.uniform(12.0, 28.0))
    width = float(rng.uniform(3.3, 3.75))
    ego_right = bool(rng.random() < 0.5)  # ego in the right lane, traffic on its left (or vice versa)
    s_ego = float(rng.uniform(40.0, 70.0))
    v_ego = v_lim * float(rng.uniform(0.8, 0.95))
    headway = float(rng.uniform(1.6, 2.6))  # s
    gap = max(8.0, v_ego * headway)  # bumper gap to the lead
    s_lead = s_ego + c.CAR_L + gap
    length = s_ego + c.route_need(v_lim) + 150.0
    ref = c.centerline(rng, length, bool(rng.random() < 0.4), kappa_max=min(1 / 150, 2.0 / v_lim**2))

    b = c.new_builder()
    lanes, _ = c.add_road(b, ref, 2, 0, width, v_lim)
    ego_lane, other = (lanes[0], lanes[1]) if ego_right else (lanes[1], lanes[0])
    ch_ego, ch_other = c.chain(b, [ego_lane]), c.chain(b, [other])
    c.add_ego(b, [ego_lane], ch_ego.cut(s_ego, s_ego + c.route_need(v_lim) + 20.0), v_ego, v_lim)

    # the lead: cruise, brake hard to a stop, maybe wait and drive off again
    v_lead = v_ego * float(rng.uniform(0.95, 1.05))
    t_brake = float(rng.uniform(2.0, 5.0))
    decel = float(rng.uniform(5.0, 8.0))
    t_stop = v_lead / decel
    phases = [(t_brake, 0.0), (t_stop + 0.2, -decel)]
    resume = bool(rng.random() < 0.5)
    if resume:
        phases += [(float(rng.uniform(2.0, 4.0)), 0.0), (c.HORIZON, float(rng.uniform(1.5, 2.5)))]
    s_rel, _ = c.speed_profile(v_lead, c.accel_schedule(phases), v_max=v_lim)
    xy, yaw, speed = c.track_along(ch_ego.xy, s_lead + s_rel)
    b.add_agent(xy, yaw, speed, length=c.CAR_L, width=c.CAR_W)

    # background IDM traffic in the adjacent lane, plus maybe a vehicle ahead of the lead
    v_bg = v_lim * float(rng.uniform(0.7, 0.95))
    n_bg = int(rng.integers(3, 9))
    slots = c.spawn_slots(rng, 5.0, s_ego + 150.0, c.headway_gap(rng, v_bg, 1.0, 2.5))
    for k in sorted(rng.permutation(len(slots))[:n_bg]):
        c.add_idm(b, ch_other, slots[k], v_bg, v_lim * float(rng.uniform(0.85, 1.05)))
    return c.finish(b, NAME, seed, decel=f"{decel:.2f}", resume=resume)


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
