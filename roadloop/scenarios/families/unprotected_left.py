"""``unprotected_left``: the ego turns left on a permissive green while oncoming traffic goes straight.

Two-phase signal (E-W green, then N-S green): oncoming vehicles have green too, so a careful
driver must wait for an acceptable gap.  Cross traffic waits at red.
"""

from __future__ import annotations

from roadloop.scenarios.families import _common as c
from roadloop.scenarios.families import _intersection as ixm
from roadloop.sim.datatypes import Scenario

NAME = "unprotected_left"
DESCRIPTION = "4-way intersection, ego turns left on a permissive green through a stream of oncoming IDM traffic"


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    n = int(rng.integers(1, 3))
    width = float(rng.uniform(3.2, 3.6))
    v_lim = float(rng.uniform(11.0, 14.0))
    b = c.new_builder()
    ix = ixm.build_layout(b, rng, n, width, v_lim, c.route_need(v_lim) + 30.0, dedicated_left=False)
    phases = [[(0, "all"), (2, "all")], [(1, "all"), (3, "all")]]
    greens = [float(rng.uniform(16.0, 24.0)), float(rng.uniform(16.0, 24.0))]
    ego_arm = int(rng.integers(0, 4))
    p_e = ego_arm % 2
    t_green = float(rng.uniform(-(greens[p_e] - 12.0), 0.5))
    ixm.add_signals(b, ix, phases, greens, ixm.phase_start(greens, p_e) - t_green)

    L = ix.arm_len
    s_ego = L - float(rng.uniform(35.0, 55.0))
    v0 = v_lim * float(rng.uniform(0.4, 0.7))
    ch = c.chain(b, ix.lanes_of(ego_arm, 0, "left"))
    c.add_ego(b, ch.lanes, ch.cut(s_ego, s_ego + c.route_need(v_lim) + 20.0), v0, v_lim)

    # oncoming stream: straight (some right turns from the outer lane), gaps of 1.5-5 s
    onc = (ego_arm + 2) % 4
    for i in range(n):
        v = v_lim * float(rng.uniform(0.7, 0.9))
        slots = c.spawn_slots(rng, L - 170.0, L - 6.0, c.headway_gap(rng, v, 1.5, 5.0))
        for s in slots[-4:]:  # the four nearest the junction
            turns = ["right"] if (i == n - 1 and rng.random() < 0.2) else ["straight"]
            ixm.add_mover(b, rng, ix, onc, i, s, v, turns)
    # cross traffic queues, the ego's other lane, vehicles leaving
    slots = [(arm, i, s, v) for arm in range(4) for i in range(n) if arm != onc and (arm, i) != (ego_arm, 0)
             for s, v in ixm.approach_slots(rng, ix, b, arm, i, max_n=3)]
    n_target = int(rng.integers(3, 10))
    for k in sorted(rng.permutation(len(slots))[:n_target]):
        arm, i, s, v = slots[k]
        turns = ["straight", "right"] if arm == ego_arm else None
        ixm.add_mover(b, rng, ix, arm, i, s, v, turns)
    ixm.add_leavers(b, rng, ix, 0.25)
    return c.finish(b, NAME, seed, lanes=n, ego_green_at=f"{t_green:.1f}")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
