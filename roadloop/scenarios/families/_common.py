"""Helpers shared by the procedural families: polylines, lane chains, placement, scripted tracks.

Units: metres, seconds, radians.  Every family scenario has ``T`` steps of ``DT`` s; agent 0
is the ego with a 1-step track on the start of its route.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from roadloop.errors import ScenarioError
from roadloop.scenarios.builder import ScenarioBuilder, arclength, offset_polyline, resample
from roadloop.scenarios.builder import straight as straight_xy
from roadloop.sim.datatypes import DT, AgentType, Scenario, ScenarioMeta, TrafficModel

T = 150  # steps (15 s)
HORIZON = T * DT  # s
WARMUP = 10  # steps
MAX_AGENTS = 32
CAR_L, CAR_W = 4.6, 1.9  # m
MIN_GAP = 2.0  # m, bumper-to-bumper gap between agents at t = 0


def route_need(v_lim: float) -> float:
    """Route length (m) a careful driver cannot exhaust in the scenario: v_lim * 15 s + 30 m."""
    return v_lim * HORIZON + 30.0


def smoothstep(u: np.ndarray | float) -> np.ndarray:
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3 - 2 * u)


def headings(xy: np.ndarray) -> np.ndarray:
    """Heading (N,) rad at each vertex of a polyline (N, 2)."""
    d = np.gradient(np.asarray(xy, float), axis=0)
    return np.arctan2(d[:, 1], d[:, 0])


def interp(xy: np.ndarray, s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Points (..., 2) and headings (...) rad at arc lengths ``s`` along polyline ``xy`` (clamped)."""
    xy = np.asarray(xy, float)
    cs = arclength(xy)
    q = np.clip(np.asarray(s, float), 0.0, cs[-1])
    p = np.stack((np.interp(q, cs, xy[:, 0]), np.interp(q, cs, xy[:, 1])), axis=-1)
    i = np.clip(np.searchsorted(cs, q, side="right") - 1, 0, len(xy) - 2)
    d = xy[i + 1] - xy[i]
    return p, np.arctan2(d[..., 1], d[..., 0])


def cut(xy: np.ndarray, s0: float, s1: float | None = None) -> np.ndarray:
    """The part of polyline ``xy`` between arc lengths s0 and s1 (m), end points interpolated."""
    xy = np.asarray(xy, float)
    cs = arclength(xy)
    s1 = cs[-1] if s1 is None else min(s1, cs[-1])
    s0 = max(0.0, s0)
    if s1 - s0 < 1e-3:
        raise ScenarioError(f"cannot cut an empty piece [{s0:.1f}, {s1:.1f}] m from a {cs[-1]:.1f} m polyline")
    inner = xy[(cs > s0 + 1e-6) & (cs < s1 - 1e-6)]
    return np.concatenate((interp(xy, s0)[0][None], inner, interp(xy, s1)[0][None]))


def centerline(rng: np.random.Generator, length: float, curved: bool, kappa_max: float,
               start=(0.0, 0.0), heading: float = 0.0) -> np.ndarray:
    """Road reference line (N, 2) at 1 m spacing: straight, or with one gentle curve (|kappa| <= kappa_max)."""
    n = int(math.ceil(length)) + 1
    s = np.linspace(0.0, length, n)
    kappa = np.zeros(n)
    if curved:
        a = rng.uniform(0.15, 0.35) * length
        span = rng.uniform(0.3, 0.5) * length
        k = rng.uniform(0.5, 1.0) * kappa_max * rng.choice([-1.0, 1.0])
        ramp = 40.0
        kappa = k * (smoothstep((s - a) / ramp) - smoothstep((s - a - span) / ramp))
    ds = s[1] - s[0]
    th = heading + np.concatenate(([0.0], np.cumsum(0.5 * (kappa[1:] + kappa[:-1]) * ds)))
    steps = np.stack((np.cos(th), np.sin(th)), axis=1) * ds
    xy = np.concatenate(([[0.0, 0.0]], np.cumsum(0.5 * (steps[1:] + steps[:-1]), axis=0)))
    return xy + np.asarray(start, float)


def bezier(p0, h0: float, p3, h3: float, n: int = 32, k: float = 0.45) -> np.ndarray:
    """Cubic Bezier (n, 2) from p0 with heading h0 to p3 with heading h3; handles k * chord long."""
    p0, p3 = np.asarray(p0, float), np.asarray(p3, float)
    c = k * np.linalg.norm(p3 - p0)
    p1 = p0 + c * np.array([math.cos(h0), math.sin(h0)])
    p2 = p3 - c * np.array([math.cos(h3), math.sin(h3)])
    u = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - u) ** 3 * p0 + 3 * (1 - u) ** 2 * u * p1 + 3 * (1 - u) * u ** 2 * p2 + u ** 3 * p3


@dataclass
class Chain:
    """Lanes driven one after another: their joined centreline and where each lane ends (m)."""

    lanes: list[int]
    xy: np.ndarray  # (N, 2) m
    ends: list[float]  # arc length of each lane's end along ``xy``

    @property
    def length(self) -> float:
        return float(arclength(self.xy)[-1])

    def pose(self, s: float) -> tuple[np.ndarray, float]:
        p, h = interp(self.xy, s)
        return p, float(h)

    def cut(self, s0: float, s1: float | None = None) -> np.ndarray:
        return cut(self.xy, s0, s1)

    def lanes_between(self, s0: float, s1: float) -> list[int]:
        """Lanes of the chain that overlap arc lengths [s0, s1]."""
        starts = ([0.0] + self.ends[:-1]) if self.ends else []
        return [ln for ln, a, e in zip(self.lanes, starts, self.ends, strict=True) if e > s0 + 1e-3 and a < s1 - 1e-3]

    def stop_lanes_between(self, s0: float, s1: float) -> list[int]:
        """Lanes whose end (where a stop line would be) lies in (s0 + 1, s1]."""
        return [ln for ln, e in zip(self.lanes, self.ends, strict=True) if s0 + 1.0 < e <= s1]


def free_path(xy: np.ndarray) -> Chain:
    """A path that follows no lane (pedestrians): no stop lines."""
    return Chain([], np.asarray(xy, float), [])


def chain(b: ScenarioBuilder, lanes: list[int]) -> Chain:
    xy = b.lane_chain_xy(lanes)
    ends, acc = [], 0.0
    prev = None
    for ln in lanes:
        lx = b.lanes[ln].xy
        acc += float(arclength(lx)[-1])
        if prev is not None:
            acc += 0.0 if np.linalg.norm(lx[0] - prev) < 0.5 else float(np.linalg.norm(lx[0] - prev))
        prev = lx[-1]
        ends.append(acc)
    ends[-1] = float(arclength(xy)[-1])
    return Chain(list(lanes), xy, ends)


# --- lanes and edges ------------------------------------------------------------------------

def add_road(b: ScenarioBuilder, ref: np.ndarray, n_fwd: int, n_bwd: int, width: float, v_lim: float,
             edges: bool = True) -> tuple[list[int], list[int]]:
    """Lanes along reference line ``ref``: ``n_fwd`` lanes driving along it on its right, ``n_bwd``
    the other way on its left.  Returns (forward lanes right->left, backward lanes right->left)."""
    fwd = [b.add_lane(offset_polyline(ref, -(n_fwd - 0.5 - i) * width), width, v_lim) for i in range(n_fwd)]
    bwd = [b.add_lane(offset_polyline(ref, (n_bwd - 0.5 - i) * width)[::-1], width, v_lim) for i in range(n_bwd)]
    for group in (fwd, bwd):
        for a, c in zip(group[:-1], group[1:], strict=True):
            b.neighbours(a, left=c)
    if edges:
        b.edge_of_lane(fwd[0], "right")
        if bwd:
            b.edge_of_lane(bwd[0], "right")
        else:
            b.edge_of_lane(fwd[-1], "left")
    return fwd, bwd


# --- placement ------------------------------------------------------------------------------

def spawn_slots(rng: np.random.Generator, s_lo: float, s_hi: float, gap: Callable[[], float],
                blocked: list[tuple[float, float]] = (), length: float = CAR_L, max_n: int = 100) -> list[float]:
    """Centre arc lengths of vehicles placed from s_lo to s_hi with bumper gaps ``gap()`` (m).

    ``blocked`` intervals [a, b] (m, occupied extents of other agents) are kept >= MIN_GAP clear.
    """
    out: list[float] = []
    rear = s_lo + rng.uniform(0.0, 0.5) * gap()
    while len(out) < max_n:
        front = rear + length
        hit = [bb for a, bb in blocked if front > a - MIN_GAP and rear < bb + MIN_GAP]
        if hit:
            rear = max(hit) + MIN_GAP + rng.uniform(0.0, 1.0) * gap()
            continue
        if front > s_hi:
            break
        out.append(rear + 0.5 * length)
        rear = front + max(MIN_GAP, gap())
    return out


def headway_gap(rng: np.random.Generator, v: float, lo: float = 1.0, hi: float = 2.5) -> Callable[[], float]:
    """Random bumper gap (m) of ``MIN_GAP + v * U(lo, hi)`` s."""
    return lambda: MIN_GAP + v * rng.uniform(lo, hi)


def add_ego(b: ScenarioBuilder, route_lanes: list[int], route_xy: np.ndarray, speed: float, v_lim: float) -> int:
    """Set the route and add the ego (agent 0) at the route start with a 1-step track."""
    if b.agents:
        raise ScenarioError("the ego must be the first agent added")
    b.set_route(route_lanes, xy=route_xy)
    r = b.route_xy
    yaw = math.atan2(r[1, 1] - r[0, 1], r[1, 0] - r[0, 0])
    return b.add_agent(r[:1], yaw, speed, length=CAR_L, width=CAR_W, model=TrafficModel.LOG, desired_speed=v_lim)


def add_idm(b: ScenarioBuilder, ch: Chain, s: float, speed: float, desired: float, *, length: float = CAR_L,
            width: float = CAR_W, kind: AgentType = AgentType.VEHICLE, extra: float = 40.0) -> int:
    """IDM agent at arc length ``s`` of chain ``ch`` with a path from there for the whole scenario."""
    s_end = min(ch.length, s + desired * HORIZON + extra)
    path = resample(ch.cut(s, s_end), 1.0)  # as the builder stores it
    p, yaw = path[0], math.atan2(path[1, 1] - path[0, 1], path[1, 0] - path[0, 0])
    return b.add_agent(p[None], yaw, speed, length=length, width=width, kind=kind, model=TrafficModel.IDM,
                       path=path, path_lanes=ch.stop_lanes_between(s, s_end), desired_speed=desired)


# --- scripted (log-replay) tracks -------------------------------------------------------------

def speed_profile(v0: float, accel: np.ndarray, v_max: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """Integrate per-step accelerations (T,) m/s^2 from speed v0: returns (s (T,) m, v (T,) m/s)."""
    n = len(accel)
    v = np.empty(n)
    s = np.empty(n)
    v[0], s[0] = v0, 0.0
    for t in range(n - 1):
        v[t + 1] = min(max(v[t] + accel[t] * DT, 0.0), v_max)
        s[t + 1] = s[t] + 0.5 * (v[t] + v[t + 1]) * DT
    return s, v


def accel_schedule(phases: list[tuple[float, float]], n: int = T) -> np.ndarray:
    """Per-step accelerations (n,) from [(duration s, accel m/s^2), ...]; the rest is 0."""
    a = np.zeros(n)
    t0 = 0
    for dur, acc in phases:
        t1 = min(n, t0 + int(round(dur / DT)))
        a[t0:t1] = acc
        t0 = t1
    return a


def track_along(path: np.ndarray, s: np.ndarray, lateral: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Track (xy (T, 2), yaw (T,), speed (T,)) at arc lengths ``s`` (T,) along ``path``, offset
    ``lateral`` (T,) m to the left.  Yaw and speed are finite differences of the positions."""
    p, h = interp(path, s)
    if lateral is not None:
        p = p + np.stack((-np.sin(h), np.cos(h)), axis=1) * np.asarray(lateral)[:, None]
    vel = np.gradient(p, DT, axis=0)
    speed = np.linalg.norm(vel, axis=1)
    yaw = np.array(h, float)
    moving = speed > 0.2
    yaw[moving] = np.arctan2(vel[moving, 1], vel[moving, 0])
    for t in range(1, len(yaw)):  # keep the last heading while standing
        if not moving[t]:
            yaw[t] = yaw[t - 1]
    speed[speed < 1e-3] = 0.0
    return p, np.unwrap(yaw), speed


# --- meta / finish ------------------------------------------------------------------------------

def make_meta(family: str, seed: int, **extra: object) -> ScenarioMeta:
    return ScenarioMeta(scenario_id=f"{family}/{seed:06d}", family=family, seed=int(seed), source="procedural",
                        warmup_steps=WARMUP, extra=tuple(sorted((k, str(v)) for k, v in extra.items())))


def finish(b: ScenarioBuilder, family: str, seed: int, **extra: object) -> Scenario:
    """Check the agent budget and build the scenario."""
    if len(b.agents) > MAX_AGENTS:
        raise ScenarioError(f"{family} seed {seed}: {len(b.agents)} agents, at most {MAX_AGENTS} allowed")
    return b.build(make_meta(family, seed, **extra))


def rng_for(family: str, seed: int) -> np.random.Generator:
    """The family's random generator: a function of the seed only."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ScenarioError(f"{family}: seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def new_builder() -> ScenarioBuilder:
    return ScenarioBuilder(T)


__all__ = ["T", "DT", "CAR_L", "CAR_W", "MIN_GAP", "Chain", "chain", "free_path", "cut", "interp", "resample", "bezier",
           "centerline", "add_road", "spawn_slots", "headway_gap", "add_ego", "add_idm", "speed_profile",
           "accel_schedule", "track_along", "make_meta", "finish", "rng_for", "new_builder", "route_need",
           "smoothstep", "headings", "offset_polyline", "arclength", "straight_xy"]
