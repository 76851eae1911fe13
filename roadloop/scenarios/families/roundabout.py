"""``roundabout``: single-lane roundabout (radius 15-25 m) with 3-4 arms, counter-clockwise traffic.

Each arm has an entry lane (left of the outward direction) and an exit lane (right of it),
separated by a splitter island.  The circle is split at every merge (entry) and diverge (exit)
point into junction lanes whose successors close a cycle; entry / exit connectors are junction
lanes too.  The ego enters from one arm and takes the 1st, 2nd or 3rd exit; entering, circulating
and leaving IDM vehicles share the roundabout.
"""

from __future__ import annotations

import math

import numpy as np

from roadloop.errors import ScenarioError
from roadloop.scenarios.builder import arc
from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import Scenario

NAME = "roundabout"
DESCRIPTION = "single-lane roundabout with 3-4 arms; the ego enters and takes an exit among IDM traffic"
CIRCLE_LIMIT = 8.0  # m/s
CONNECTOR_LIMIT = 7.0  # m/s


def _arc_n(radius: float, a0: float, a1: float) -> int:
    return max(4, int(radius * abs(a1 - a0) / 1.5) + 1)


def _merge_angle(R: float, r_e: float, o: float) -> float:
    """Angle (rad) from an arm's axis of the point where its entry connector joins the circle.

    In the arm's frame the connector runs from (r_e, o) heading pi to the circle at angle delta
    heading delta + pi/2; it is a single right-hand curve when its chord points halfway between
    those headings, (3 pi / 2 + delta) / 2.  Solved by bisection.
    """
    def err(d: float) -> float:
        chord = math.atan2(R * math.sin(d) - o, R * math.cos(d) - r_e) % (2 * math.pi)
        return chord - (0.75 * math.pi + 0.5 * d)

    lo, hi = 0.05, 1.2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if err(lo) * err(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def build_raw(seed: int) -> Scenario:
    rng = c.rng_for(NAME, seed)
    R = float(rng.uniform(15.0, 25.0))  # m, circle lane centreline radius
    wc = float(rng.uniform(4.5, 5.5))  # m, circle lane width
    w = float(rng.uniform(3.3, 3.6))
    v_lim = float(rng.uniform(11.0, 14.0))
    k = int(rng.integers(3, 5))
    base = float(rng.uniform(0.0, 2 * math.pi))
    phis = [base + j * 2 * math.pi / k + float(rng.uniform(-0.08, 0.08)) for j in range(k)]
    o = w / 2 + 0.75  # m, lane centre offset from the arm axis (splitter island half-width 0.75)
    r_e = R + wc / 2 + float(rng.uniform(4.0, 7.0))  # m, where arm lanes meet the connectors
    delta = _merge_angle(R, r_e, o)  # rad, merge / diverge points either side of an arm
    gaps = np.diff(np.array(phis + [phis[0] + 2 * math.pi]))
    if R * (gaps.min() - 2 * delta) < 2.0:
        raise ScenarioError(f"{NAME} seed {seed}: arms too close for the merge geometry")
    arm_len = c.route_need(v_lim) + 20.0

    b = c.new_builder()
    ent, ext, econ, xcon, short, long_ = [], [], [], [], [], []
    for phi in phis:
        u = np.array([math.cos(phi), math.sin(phi)])
        nv = np.array([-u[1], u[0]])
        ent.append(b.add_lane(c.straight_xy(u * (r_e + arm_len) + nv * o, u * r_e + nv * o), w, v_lim))
        ext.append(b.add_lane(c.straight_xy(u * r_e - nv * o, u * (r_e + arm_len) - nv * o), w, v_lim))
        for side in (1.0, -1.0):
            off = nv * side * (o + w / 2)
            b.add_road_edge(c.straight_xy(u * r_e + off, u * (r_e + arm_len) + off))
    for j, phi in enumerate(phis):  # circle pieces: diverge_j -> merge_j (short), merge_j -> diverge_j+1 (long)
        nxt = phis[(j + 1) % k] + (2 * math.pi if j == k - 1 else 0.0)
        a_d, a_m, a_n = phi - delta, phi + delta, nxt - delta
        short.append(b.add_lane(arc((0, 0), R, a_d, a_m, _arc_n(R, a_d, a_m)), wc, CIRCLE_LIMIT, junction=True))
        long_.append(b.add_lane(arc((0, 0), R, a_m, a_n, _arc_n(R, a_m, a_n)), wc, CIRCLE_LIMIT, junction=True))
    for phi in phis:
        u = np.array([math.cos(phi), math.sin(phi)])
        nv = np.array([-u[1], u[0]])
        pm = R * np.array([math.cos(phi + delta), math.sin(phi + delta)])
        pd = R * np.array([math.cos(phi - delta), math.sin(phi - delta)])
        econ.append(b.add_lane(c.bezier(u * r_e + nv * o, phi + math.pi, pm, phi + delta + math.pi / 2, k=0.4),
                               w, CONNECTOR_LIMIT, junction=True))
        xcon.append(b.add_lane(c.bezier(pd, phi - delta + math.pi / 2, u * r_e - nv * o, phi, k=0.4),
                               w, CONNECTOR_LIMIT, junction=True))
    for j in range(k):
        jn = (j + 1) % k
        b.connect(ent[j], econ[j])
        b.connect(econ[j], long_[j])
        b.connect(short[j], long_[j])
        b.connect(long_[j], short[jn])
        b.connect(long_[j], xcon[jn])
        b.connect(xcon[jn], ext[jn])
    # edges: central island; outer kerb = connectors' outer sides + circle arcs between arms
    b.add_road_edge(arc((0, 0), R - wc / 2, 0.0, 2 * math.pi, 64))
    for j, phi in enumerate(phis):
        nxt = phis[(j + 1) % k] + (2 * math.pi if j == k - 1 else 0.0)
        a0, a1 = phi + delta, nxt - delta
        b.add_road_edge(arc((0, 0), R + wc / 2, a0, a1, _arc_n(R, a0, a1)))
        b.edge_of_lane(econ[j], "right")
        b.edge_of_lane(xcon[j], "right")

    def chain_from(j: int, exit_j: int, start: str) -> list[int]:
        """Lanes from arm j's entry (or circle piece ``start``) to arm exit_j's exit lane."""
        lanes = [ent[j], econ[j], long_[j]] if start == "entry" else [long_[j]]
        q = (j + 1) % k
        while q != exit_j:
            lanes += [short[q], long_[q]]
            q = (q + 1) % k
        return lanes + [xcon[exit_j], ext[exit_j]]

    je = int(rng.integers(0, k))
    m = int(rng.integers(1, k))
    ch = c.chain(b, chain_from(je, (je + m) % k, "entry"))
    s_ego = arm_len - float(rng.uniform(30.0, 60.0))
    v0 = float(rng.uniform(7.0, 11.0))
    c.add_ego(b, ch.lanes, ch.cut(s_ego, s_ego + c.route_need(v_lim) + 20.0), v0, v_lim)

    def desired() -> float:
        return float(min(CIRCLE_LIMIT, math.sqrt(2.5 * R)) * rng.uniform(0.85, 1.0))

    # entering traffic on the other arms
    for j in range(k):
        if j == je:
            continue
        x = (j + int(rng.integers(1, k))) % k
        ch_j = c.chain(b, chain_from(j, x, "entry"))
        v = float(rng.uniform(5.0, 8.0))
        for s in c.spawn_slots(rng, arm_len - 110.0, arm_len - 25.0, c.headway_gap(rng, v, 1.5, 4.0), max_n=2):
            if rng.random() < 0.6:
                c.add_idm(b, ch_j, s, v, desired())
    # circulating traffic on the long circle pieces (not on the piece the ego merges into)
    for j in range(k):
        if j == je or rng.random() < 0.5:
            continue
        x = (j + 1 + int(rng.integers(0, k - 1))) % k
        ch_j = c.chain(b, chain_from(j, x, "circle"))
        seg = ch_j.ends[0]
        c.add_idm(b, ch_j, float(rng.uniform(0.2, 0.6)) * seg, float(rng.uniform(5.0, 7.0)), desired())
    # vehicles leaving on exit lanes
    for j in range(k):
        if rng.random() < 0.4:
            c.add_idm(b, c.chain(b, [ext[j]]), float(rng.uniform(10.0, 50.0)), float(rng.uniform(6.0, 9.0)),
                      v_lim * float(rng.uniform(0.8, 1.0)))
    return c.finish(b, NAME, seed, arms=k, exit=m, radius=f"{R:.1f}")


__all__ = ["NAME", "DESCRIPTION", "build_raw"]
