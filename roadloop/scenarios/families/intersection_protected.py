"""``intersection_protected``: signalised 4-way intersection with protected phases only.

One lane per direction: split phasing (each approach gets its own green, so every movement is
protected).  Two lanes: a dedicated left-turn lane with a protected arrow phase, four phases
(E-W through, E-W left, N-S through, N-S left).  The ego goes straight or turns left; its light
may be red at the start.  Cross and oncoming IDM traffic obeys the lights.
"""

from __future__ import annotations

import math

from roadloop.scenarios.families import _common as c
from roadloop.scenarios.families import _intersection as ixm
from roadloop.sim.datatypes import Scenario

NAME = "intersection_protected"
DESCRIPTION = "signalised 4-way intersection, protected phases; ego goes straight or left on an arrow, may start at red"


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    n = int(rng.integers(1, 3))
    width = float(rng.uniform(3.2, 3.6))
    v_lim = float(rng.uniform(11.0, 14.0))
    b = c.new_builder()
    ix = ixm.build_layout(b, rng, n, width, v_lim, c.route_need(v_lim) + 30.0, dedicated_left=n == 2)
    if n == 1:
        phases = [[(a, "all")] for a in range(4)]
        greens = [float(rng.uniform(7.0, 10.0)) for _ in range(4)]
    else:
        phases = [[(0, "main"), (2, "main")], [(0, "left"), (2, "left")],
                  [(1, "main"), (3, "main")], [(1, "left"), (3, "left")]]
        greens = [float(rng.uniform(8.0, 12.0)), float(rng.uniform(6.0, 8.0)),
                  float(rng.uniform(8.0, 12.0)), float(rng.uniform(6.0, 8.0))]
    ego_arm = int(rng.integers(0, 4))
    turn = "left" if rng.random() < 0.5 else "straight"
    ego_i = 0 if (n == 1 or turn == "left") else 1
    grp = ix.group_of(ego_arm, ego_i)
    p_e = next(p for p, gs in enumerate(phases) if (ego_arm, grp) in gs)
    t_green = float(rng.uniform(-(greens[p_e] - 6.0), 5.0))  # s, when the ego's green starts
    ixm.add_signals(b, ix, phases, greens, ixm.phase_start(greens, p_e) - t_green)

    # the ego and the vehicles ahead of it in its lane
    L = ix.arm_len
    ahead: list[tuple[float, float]] = []
    if ixm.green_left(b, ix.light_of(ego_arm, ego_i)) < 4.0:  # red (or about to be): a queue
        rear = L - 0.5
        for _ in range(int(rng.integers(0, 3))):
            ahead.append((rear - 0.5 * c.CAR_L, 0.0))
            rear -= c.CAR_L + float(rng.uniform(2.0, 3.0))
        d_free = float(rng.uniform(30.0, 50.0))
        v0 = min(v_lim * float(rng.uniform(0.5, 0.85)), math.sqrt(2.0 * 2.0 * (d_free - 4.0)))
        s_ego = rear - d_free - 0.5 * c.CAR_L
    else:
        v0 = v_lim * float(rng.uniform(0.6, 0.85))
        s_ego = L - float(rng.uniform(35.0, 60.0))
        s_lead = s_ego + c.CAR_L + c.MIN_GAP + v0 * float(rng.uniform(1.5, 2.5))
        if rng.random() < 0.5 and s_lead < L - 5.0:
            ahead.append((s_lead, v0))
    ch = c.chain(b, ix.lanes_of(ego_arm, ego_i, turn))
    c.add_ego(b, ch.lanes, ch.cut(s_ego, s_ego + c.route_need(v_lim) + 20.0), v0, v_lim)
    for s, v in ahead:
        ixm.add_mover(b, rng, ix, ego_arm, ego_i, s, v)

    # everyone else: queues at red lights, platoons on green, some vehicles leaving
    slots = [(arm, i, s, v) for arm in range(4) for i in range(n) if (arm, i) != (ego_arm, ego_i)
             for s, v in ixm.approach_slots(rng, ix, b, arm, i, max_n=4)]
    n_target = int(rng.integers(6, 17))
    for k in sorted(rng.permutation(len(slots))[:n_target]):
        arm, i, s, v = slots[k]
        ixm.add_mover(b, rng, ix, arm, i, s, v)
    ixm.add_leavers(b, rng, ix, 0.3)
    return c.finish(b, NAME, seed, lanes=n, turn=turn, ego_green_at=f"{t_green:.1f}")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
