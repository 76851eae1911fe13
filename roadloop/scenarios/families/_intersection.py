"""Signalised 4-way intersection layout shared by ``intersection_protected`` and ``unprotected_left``.

Arms point east, north, west, south (index 0..3, outward heading ``k * pi / 2``).  Right-hand
traffic: on each arm the incoming lanes (towards the centre) lie left of the outward direction,
the outgoing lanes right of it; lane ``i = 0`` is the innermost (leftmost for its direction).
Incoming lanes end at the stop line ``stop`` m from the centre, where outgoing lanes start;
junction lanes (``lane_is_junction``) connect them: straight to the opposite arm, left turns
from lane 0 to the arm at ``arm - 1``, right turns from the outermost lane to ``arm + 1``.
A crosswalk crosses every arm between the junction box and the stop line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from roadloop.scenarios.builder import ScenarioBuilder, arc, light_cycle
from roadloop.scenarios.families import _common as c
from roadloop.sim.datatypes import LightState

TURN_LIMIT = {"straight": None, "left": 9.0, "right": 7.0}  # m/s on junction lanes (None: road limit)
CROSSWALK_W = 3.0  # m
YELLOW = 3.0  # s
ALL_RED = 1.5  # s


@dataclass
class Intersection:
    n: int  # lanes per direction on every arm
    width: float  # m
    stop: float  # m, distance of the stop lines from the centre
    arm_len: float  # m
    v_lim: float  # m/s
    inc: list[list[int]] = field(default_factory=list)  # inc[arm][i] incoming lane
    out: list[list[int]] = field(default_factory=list)  # out[arm][i] outgoing lane
    moves: dict[tuple[int, int, str], int] = field(default_factory=dict)  # (arm, i, turn) -> junction lane
    groups: list[dict[str, list[int]]] = field(default_factory=list)  # per arm: signal group -> lanes i
    lights: dict[tuple[int, str], int] = field(default_factory=dict)  # (arm, group) -> light index

    def turns(self, arm: int, i: int) -> list[str]:
        return [t for t in ("straight", "left", "right") if (arm, i, t) in self.moves]

    def target(self, arm: int, i: int, turn: str) -> tuple[int, int]:
        """(arm, lane i) a movement leaves on."""
        if turn == "straight":
            return (arm + 2) % 4, i
        if turn == "left":
            return (arm - 1) % 4, 0
        return (arm + 1) % 4, self.n - 1

    def lanes_of(self, arm: int, i: int, turn: str) -> list[int]:
        """Lane chain incoming -> junction -> outgoing of a movement."""
        a2, j = self.target(arm, i, turn)
        return [self.inc[arm][i], self.moves[(arm, i, turn)], self.out[a2][j]]

    def group_of(self, arm: int, i: int) -> str:
        return next(g for g, idx in self.groups[arm].items() if i in idx)

    def light_of(self, arm: int, i: int) -> int:
        return self.lights[(arm, self.group_of(arm, i))]


def _frame(arm: int) -> tuple[np.ndarray, np.ndarray]:
    phi = arm * math.pi / 2
    return np.array([math.cos(phi), math.sin(phi)]), np.array([-math.sin(phi), math.cos(phi)])


def build_layout(b: ScenarioBuilder, rng: np.random.Generator, n: int, width: float, v_lim: float,
                 arm_len: float, dedicated_left: bool) -> Intersection:
    """Add the lanes, junction lanes, road edges and crosswalks of a 4-way intersection."""
    corner = float(rng.uniform(5.0, 9.0))  # m, kerb radius at the corners
    box = n * width + corner  # m, half-size of the junction box (kerb corners' centres)
    stop = box + CROSSWALK_W + 1.0
    ix = Intersection(n, width, stop, arm_len, v_lim)
    for arm in range(4):
        u, nv = _frame(arm)
        ix.inc.append([b.add_lane(c.straight_xy(u * (stop + arm_len) + nv * (i + 0.5) * width,
                                                u * stop + nv * (i + 0.5) * width), width, v_lim)
                       for i in range(n)])
        ix.out.append([b.add_lane(c.straight_xy(u * stop - nv * (i + 0.5) * width,
                                                u * (stop + arm_len) - nv * (i + 0.5) * width), width, v_lim)
                       for i in range(n)])
        for i in range(n - 1):  # lane i is left of lane i + 1 for both directions
            b.neighbours(ix.inc[arm][i + 1], left=ix.inc[arm][i])
            b.neighbours(ix.out[arm][i + 1], left=ix.out[arm][i])
        if n == 1:
            turns = {0: ["left", "straight", "right"]}
            ix.groups.append({"all": [0]})
        elif dedicated_left:
            turns = {0: ["left"], 1: ["straight", "right"]}
            ix.groups.append({"left": [0], "main": [1]})
        else:
            turns = {0: ["left", "straight"], 1: ["straight", "right"]}
            ix.groups.append({"all": [0, 1]})
        for i, ts in turns.items():
            for t in ts:
                ix.moves[(arm, i, t)] = -1  # filled below once every arm exists
        # road edges along the arm, kerb arc to the next arm, crosswalk
        for side in (1.0, -1.0):
            off = nv * side * n * width
            b.add_road_edge(c.straight_xy(u * box + off, u * (stop + arm_len) + off))
        centre = u * box + _frame((arm + 1) % 4)[0] * box
        phi = arm * math.pi / 2
        b.add_road_edge(arc(centre, corner, phi - math.pi / 2, phi - math.pi, n=12))
        half = n * width
        b.add_crosswalk([u * box + nv * half, u * (box + CROSSWALK_W) + nv * half,
                         u * (box + CROSSWALK_W) - nv * half, u * box - nv * half])
    for (arm, i, t) in list(ix.moves):
        a2, j = ix.target(arm, i, t)
        p0 = b.lanes[ix.inc[arm][i]].xy[-1]
        p1 = b.lanes[ix.out[a2][j]].xy[0]
        h0 = arm * math.pi / 2 + math.pi
        h1 = a2 * math.pi / 2
        if t == "straight":
            xy = c.straight_xy(p0, p1, 8)
        elif t == "left":
            xy = c.bezier(p0, h0, p1, h1, n=40, k=0.39)
        else:  # right: concentric with the kerb corner (radius corner + w / 2)
            centre = _frame(arm)[0] * box + _frame(a2)[0] * box
            phi = arm * math.pi / 2
            xy = np.concatenate(([p0], arc(centre, corner + 0.5 * width, phi - math.pi / 2, phi - math.pi, 16), [p1]))
        lim = TURN_LIMIT[t] or v_lim
        jl = b.add_lane(xy, width, lim, junction=True)
        b.connect(ix.inc[arm][i], jl)
        b.connect(jl, ix.out[a2][j])
        ix.moves[(arm, i, t)] = jl
    return ix


def add_signals(b: ScenarioBuilder, ix: Intersection, phases: list[list[tuple[int, str]]], greens: list[float],
                t_shift: float) -> float:
    """Fixed-time lights: phase p gives green to its (arm, group)s for ``greens[p]`` s, then yellow,
    then all-red.  Scenario time t corresponds to cycle time ``t + t_shift``.  Returns the cycle (s)."""
    cycle = sum(g + YELLOW + ALL_RED for g in greens)
    start = 0.0
    for groups, g in zip(phases, greens, strict=True):
        states = light_cycle(c.T, g, YELLOW, cycle - g - YELLOW, offset=t_shift - start)
        for arm, grp in groups:
            ix.lights[(arm, grp)] = b.add_light(states, [ix.inc[arm][i] for i in ix.groups[arm][grp]])
        start += g + YELLOW + ALL_RED
    return cycle


def phase_start(greens: list[float], p: int) -> float:
    """Cycle time (s) at which phase ``p`` turns green."""
    return sum(g + YELLOW + ALL_RED for g in greens[:p])


def green_left(b: ScenarioBuilder, light: int) -> float:
    """Seconds of green left at t = 0 (0 if not green)."""
    st = b.lights[light]
    k = 0
    while k < len(st) and st[k] == LightState.GREEN:
        k += 1
    return k * c.DT


def approach_slots(rng: np.random.Generator, ix: Intersection, b: ScenarioBuilder, arm: int, i: int,
                   max_n: int, behind: float = 130.0) -> list[tuple[float, float]]:
    """(arc length, speed) of vehicles on incoming lane (arm, i): a queue at the stop line if its
    light is not green for long, else a moving platoon; all can stop for the line (<= 3 m/s^2)."""
    L = ix.arm_len
    out: list[tuple[float, float]] = []
    if green_left(b, ix.light_of(arm, i)) < 4.0:
        rear = L - 0.5
        for _ in range(int(rng.integers(0, 4))):
            out.append((rear - 0.5 * c.CAR_L, 0.0))
            rear -= c.CAR_L + float(rng.uniform(2.0, 3.0))
        v = ix.v_lim * float(rng.uniform(0.5, 0.8))
        s = rear - 4.0 - v * v / 6.0 - float(rng.uniform(5.0, 30.0)) - 0.5 * c.CAR_L
        if s > 10.0:
            out.append((s, v))
    else:
        v = ix.v_lim * float(rng.uniform(0.6, 0.85))
        slots = c.spawn_slots(rng, L - behind, L - 8.0, c.headway_gap(rng, v, 1.2, 3.0))
        out = [(s, v) for s in slots[::-1]]  # nearest to the junction first
    return out[:max_n]


def add_mover(b: ScenarioBuilder, rng: np.random.Generator, ix: Intersection, arm: int, i: int, s: float,
              v: float, turns: list[str] | None = None) -> int:
    """IDM vehicle at arc length ``s`` of incoming lane (arm, i), taking a random allowed movement."""
    options = [t for t in ix.turns(arm, i) if turns is None or t in turns] or ix.turns(arm, i)
    turn = options[int(rng.integers(0, len(options)))]
    ch = c.chain(b, ix.lanes_of(arm, i, turn))
    desired = ix.v_lim * float(rng.uniform(0.8, 1.0))
    if TURN_LIMIT[turn] is not None:  # IDM does not slow for curves: turning vehicles drive slower
        desired = min(desired, TURN_LIMIT[turn])
    return c.add_idm(b, ch, s, min(v, desired), desired)


def add_leavers(b: ScenarioBuilder, rng: np.random.Generator, ix: Intersection, p: float, skip: set[int] = ()
                ) -> None:
    """With probability ``p`` per outgoing lane, a vehicle driving away from the junction."""
    for arm in range(4):
        for i in range(ix.n):
            lane = ix.out[arm][i]
            if lane in skip or rng.random() >= p or len(b.agents) >= c.MAX_AGENTS:
                continue
            v = ix.v_lim * float(rng.uniform(0.6, 0.9))
            desired = ix.v_lim * float(rng.uniform(0.85, 1.0))
            c.add_idm(b, c.chain(b, [lane]), float(rng.uniform(25.0, 70.0)), v, desired)


__all__ = ["Intersection", "build_layout", "add_signals", "phase_start", "green_left", "approach_slots",
           "add_mover", "add_leavers", "YELLOW", "ALL_RED"]
