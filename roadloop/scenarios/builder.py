"""Build single ``Scenario`` objects from Python descriptions (lanes, lights, agents, route).

Not a hot path: used by procedural families, importers and tests.  Conventions:

* lane centrelines are resampled to at most ``LANE_SPACING`` metres between points;
* a light or stop sign puts a stop line across the *end* of the lanes it controls;
* the route polyline is resampled at 1 m (``ROUTE_SPACING``); its stop points are the route
  lanes' stop lines, as arc lengths along the route;
* an agent's path is resampled at 1 m and gets the stop points of the lanes it follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from roadloop.errors import ScenarioError
from roadloop.sim.datatypes import (
    DT,
    Agents,
    AgentType,
    LightState,
    Map,
    Route,
    Scenario,
    ScenarioMeta,
    TrafficModel,
)

LANE_SPACING = 2.0  # m
ROUTE_SPACING = 1.0  # m
PATH_SPACING = 1.0  # m


def resample(xy: np.ndarray, spacing: float) -> np.ndarray:
    """Resample polyline (N, 2) so that consecutive points are at most ``spacing`` m apart.

    Keeps both end points; points are evenly spaced in arc length.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 2:
        raise ScenarioError(f"polyline must have shape (N>=2, 2), got {xy.shape}")
    seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    keep = np.concatenate(([True], seg > 1e-6))
    xy = xy[keep]
    if len(xy) < 2:
        raise ScenarioError("polyline has zero length")
    s = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))))
    n = max(2, int(math.ceil(s[-1] / spacing - 1e-9)) + 1)
    q = np.linspace(0.0, s[-1], n)
    return np.stack((np.interp(q, s, xy[:, 0]), np.interp(q, s, xy[:, 1])), axis=1)


def arclength(xy: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))))


def straight(p0, p1, n: int = 2) -> np.ndarray:
    """Straight polyline from p0 to p1 (n points)."""
    return np.linspace(np.asarray(p0, float), np.asarray(p1, float), n)


def arc(center, radius: float, a0: float, a1: float, n: int = 24) -> np.ndarray:
    """Circular arc around ``center`` from angle a0 to a1 (rad; a1 < a0 runs clockwise)."""
    a = np.linspace(a0, a1, n)
    c = np.asarray(center, float)
    return np.stack((c[0] + radius * np.cos(a), c[1] + radius * np.sin(a)), axis=1)


def offset_polyline(xy: np.ndarray, d: float | np.ndarray) -> np.ndarray:
    """Offset a polyline to its left by ``d`` m (negative: right); d may vary per point."""
    xy = np.asarray(xy, float)
    t = np.gradient(xy, axis=0)
    t /= np.linalg.norm(t, axis=1, keepdims=True).clip(1e-9)
    n = np.stack((-t[:, 1], t[:, 0]), axis=1)
    return xy + n * np.asarray(d, float).reshape(-1, 1)


def smooth_lane_change(a: np.ndarray, b: np.ndarray, s0: float, s1: float) -> np.ndarray:
    """Blend from polyline ``a`` to parallel polyline ``b`` between arc lengths s0..s1 (smoothstep).

    Both are resampled at 1 m on ``a``'s arc length; returns the blended polyline.
    """
    a = resample(a, 1.0)
    sa = arclength(a)
    b = resample(b, 1.0)
    sb = arclength(b)
    q = np.clip(sa, 0, sb[-1])
    bq = np.stack((np.interp(q, sb, b[:, 0]), np.interp(q, sb, b[:, 1])), axis=1)
    u = np.clip((sa - s0) / max(s1 - s0, 1e-6), 0, 1)
    w = (u * u * (3 - 2 * u))[:, None]
    return (1 - w) * a + w * bq


@dataclass
class _Lane:
    xy: np.ndarray
    width: float
    speed_limit: float
    junction: bool
    succ: list[int] = field(default_factory=list)
    pred: list[int] = field(default_factory=list)
    left: int = -1
    right: int = -1
    light: int = -1
    stop: bool = False  # a stop line closes the end of this lane


@dataclass
class _Agent:
    xy: np.ndarray  # (T, 2)
    yaw: np.ndarray  # (T,)
    speed: np.ndarray  # (T,)
    valid: np.ndarray  # (T,) bool
    length: float
    width: float
    kind: int
    model: int
    path: np.ndarray | None
    path_stops: list[tuple[float, int]]
    desired_speed: float


class ScenarioBuilder:
    """Accumulates lanes, lights, objects and agents, then ``build()``s a ``Scenario``."""

    def __init__(self, num_steps: int):
        if num_steps < 2:
            raise ScenarioError(f"num_steps must be >= 2, got {num_steps}")
        self.T = num_steps
        self.lanes: list[_Lane] = []
        self.lights: list[np.ndarray] = []  # each (T,) LightState
        self.light_xy: list[np.ndarray] = []
        self.crosswalks: list[np.ndarray] = []
        self.edges: list[np.ndarray] = []
        self.agents: list[_Agent] = []
        self.route_lanes: list[int] = []
        self.route_xy: np.ndarray | None = None

    # --- map --------------------------------------------------------------------------
    def add_lane(self, xy, width: float = 3.5, speed_limit: float = 13.9, junction: bool = False) -> int:
        """Add a lane with centreline ``xy`` (N, 2) m in driving order; returns its index."""
        self.lanes.append(_Lane(resample(np.asarray(xy, float), LANE_SPACING), float(width),
                                float(speed_limit), bool(junction)))
        return len(self.lanes) - 1

    def connect(self, a: int, b: int) -> None:
        """Lane ``b`` continues lane ``a``."""
        if b not in self.lanes[a].succ:
            self.lanes[a].succ.append(b)
            self.lanes[b].pred.append(a)

    def neighbours(self, lane: int, left: int | None = None, right: int | None = None) -> None:
        """Allow lane changes from ``lane`` to ``left`` / ``right`` (and back)."""
        if left is not None:
            self.lanes[lane].left = left
            self.lanes[left].right = lane
        if right is not None:
            self.lanes[lane].right = right
            self.lanes[right].left = lane

    def add_light(self, states: np.ndarray, lanes: list[int]) -> int:
        """Add a traffic light with per-step ``states`` (T,) LightState controlling ``lanes``' ends."""
        states = np.asarray(states, dtype=np.int64)
        if states.shape != (self.T,):
            raise ScenarioError(f"light states must have shape ({self.T},), got {states.shape}")
        self.lights.append(states)
        self.light_xy.append(self.lanes[lanes[0]].xy[-1].copy())
        for ln in lanes:
            self.lanes[ln].light = len(self.lights) - 1
            self.lanes[ln].stop = True
        return len(self.lights) - 1

    def add_stop_sign(self, lanes: list[int]) -> None:
        for ln in lanes:
            self.lanes[ln].stop = True

    def add_crosswalk(self, quad) -> int:
        self.crosswalks.append(np.asarray(quad, float).reshape(4, 2))
        return len(self.crosswalks) - 1

    def add_road_edge(self, xy) -> None:
        self.edges.append(resample(np.asarray(xy, float), LANE_SPACING))

    def edge_of_lane(self, lane: int, side: str) -> None:
        """Add the lane's left or right boundary as a road edge."""
        ln = self.lanes[lane]
        d = 0.5 * ln.width * (1 if side == "left" else -1)
        self.edges.append(offset_polyline(ln.xy, d))

    # --- route and agents ---------------------------------------------------------------
    def lane_chain_xy(self, lanes: list[int]) -> np.ndarray:
        pts = [self.lanes[lanes[0]].xy]
        for a, b in zip(lanes[:-1], lanes[1:], strict=True):
            if b not in self.lanes[a].succ and b not in (self.lanes[a].left, self.lanes[a].right):
                raise ScenarioError(f"lane {b} does not follow lane {a} (not a successor or neighbour)")
            nxt = self.lanes[b].xy
            pts.append(nxt[1:] if np.linalg.norm(nxt[0] - pts[-1][-1]) < 0.5 else nxt)
        return np.concatenate(pts, axis=0)

    def stops_along(self, lanes: list[int], xy: np.ndarray) -> list[tuple[float, int]]:
        """Stop points (arc length along ``xy``, light or -1) of the lanes' stop lines."""
        xy = resample(xy, 1.0)
        s = arclength(xy)
        out = []
        for ln in lanes:
            lane = self.lanes[ln]
            if not lane.stop:
                continue
            d = np.linalg.norm(xy - lane.xy[-1], axis=1)
            i = int(np.argmin(d))
            if d[i] < 0.5 * lane.width + 0.5:
                out.append((float(s[i]), lane.light))
        return sorted(out)

    def set_route(self, lanes: list[int], xy=None) -> None:
        """Ego route through ``lanes``; its polyline is the lanes' centrelines unless ``xy`` given."""
        self.route_lanes = list(lanes)
        self.route_xy = resample(self.lane_chain_xy(lanes) if xy is None else np.asarray(xy, float), ROUTE_SPACING)

    def add_agent(self, xy, yaw, speed, valid=None, *, length: float = 4.6, width: float = 1.9,
                  kind: AgentType = AgentType.VEHICLE, model: TrafficModel = TrafficModel.LOG,
                  path=None, path_lanes: list[int] | None = None, desired_speed: float = 0.0) -> int:
        """Add an agent with a logged track (T, 2)/(T,)/(T,) (shorter tracks are padded invalid).

        ``path`` (N, 2) or ``path_lanes`` gives the polyline IDM / walking agents follow; with
        both, ``path`` is the polyline and ``path_lanes`` (the lanes it runs along) give its stops.
        Returns the agent index (the first agent added is the ego).
        """
        T = self.T
        xy = np.asarray(xy, float).reshape(-1, 2)
        n = len(xy)
        if n > T:
            raise ScenarioError(f"agent track has {n} steps, scenario has {T}")
        yaw = np.broadcast_to(np.asarray(yaw, float), (n,))
        speed = np.broadcast_to(np.asarray(speed, float), (n,))
        v = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
        pad = T - n
        P = lambda a, val: np.concatenate((a, np.full((pad, *a.shape[1:]), val, a.dtype)))
        stops: list[tuple[float, int]] = []
        if path_lanes is not None:
            if path is None:
                path = self.lane_chain_xy(path_lanes)
            stops = self.stops_along(path_lanes, np.asarray(path, float))
        if path is not None:
            path = resample(np.asarray(path, float), PATH_SPACING)
        self.agents.append(_Agent(P(xy, 0.0), P(yaw.astype(float), 0.0), P(speed.astype(float), 0.0),
                                  P(v, False), float(length), float(width), int(kind), int(model),
                                  path, stops, float(desired_speed)))
        return len(self.agents) - 1

    def add_static(self, xy, yaw: float = 0.0, length: float = 0.5, width: float = 0.5,
                   kind: AgentType = AgentType.STATIC) -> int:
        """A static object (cone: 0.5 x 0.5 m; parked car: 4.6 x 1.9 m) present the whole scenario."""
        T = self.T
        return self.add_agent(np.tile(np.asarray(xy, float), (T, 1)), yaw, 0.0, length=length,
                              width=width, kind=kind, model=TrafficModel.STATIC)

    def set_agent_log(self, i: int, xy: np.ndarray, yaw: np.ndarray, speed: np.ndarray, valid: np.ndarray) -> None:
        """Replace agent ``i``'s logged track (full length T)."""
        a = self.agents[i]
        a.xy, a.yaw, a.speed, a.valid = (np.asarray(xy, float), np.asarray(yaw, float),
                                         np.asarray(speed, float), np.asarray(valid, bool))

    # --- build ----------------------------------------------------------------------------
    def build(self, meta: ScenarioMeta) -> Scenario:
        if not self.lanes:
            raise ScenarioError(f"scenario '{meta.scenario_id}': no lanes")
        if not self.agents:
            raise ScenarioError(f"scenario '{meta.scenario_id}': no agents (agent 0 must be the ego)")
        if self.route_xy is None:
            raise ScenarioError(f"scenario '{meta.scenario_id}': no route set")
        f32, i64 = torch.float32, torch.int64
        L = len(self.lanes)
        P = max(len(ln.xy) for ln in self.lanes)
        S = max(1, max(max(len(ln.succ), len(ln.pred)) for ln in self.lanes))
        lane_xy = np.zeros((L, P, 2))
        lane_pv = np.zeros((L, P), bool)
        succ = -np.ones((L, S), np.int64)
        pred = -np.ones((L, S), np.int64)
        for i, ln in enumerate(self.lanes):
            lane_xy[i, : len(ln.xy)] = ln.xy
            lane_pv[i, : len(ln.xy)] = True
            succ[i, : len(ln.succ)] = ln.succ
            pred[i, : len(ln.pred)] = ln.pred
        stop_lanes = [i for i, ln in enumerate(self.lanes) if ln.stop]
        K = max(1, len(stop_lanes))
        stop_xy = np.zeros((K, 2, 2))
        stop_lane = -np.ones(K, np.int64)
        for k, i in enumerate(stop_lanes):
            ln = self.lanes[i]
            d = ln.xy[-1] - ln.xy[-2]
            n = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-9)
            stop_xy[k] = [ln.xy[-1] + n * ln.width / 2, ln.xy[-1] - n * ln.width / 2]
            stop_lane[k] = i
        Q = max([len(e) for e in self.edges] + [2])
        E = max(1, len(self.edges))
        edge_xy = np.zeros((E, Q, 2))
        edge_v = np.zeros((E, Q), bool)
        for i, e in enumerate(self.edges):
            edge_xy[i, : len(e)] = e
            edge_v[i, : len(e)] = True
        C = max(1, len(self.crosswalks))
        cw = np.zeros((C, 4, 2))
        for i, c in enumerate(self.crosswalks):
            cw[i] = c
        the_map = Map(
            lane_xy=torch.tensor(lane_xy, dtype=f32),
            lane_point_valid=torch.tensor(lane_pv),
            lane_width=torch.tensor([ln.width for ln in self.lanes], dtype=f32),
            lane_speed_limit=torch.tensor([ln.speed_limit for ln in self.lanes], dtype=f32),
            lane_valid=torch.ones(L, dtype=torch.bool),
            lane_is_junction=torch.tensor([ln.junction for ln in self.lanes]),
            lane_successors=torch.tensor(succ),
            lane_predecessors=torch.tensor(pred),
            lane_left=torch.tensor([ln.left for ln in self.lanes], dtype=i64),
            lane_right=torch.tensor([ln.right for ln in self.lanes], dtype=i64),
            lane_light=torch.tensor([ln.light for ln in self.lanes], dtype=i64),
            road_edge_xy=torch.tensor(edge_xy, dtype=f32),
            road_edge_valid=torch.tensor(edge_v),
            crosswalk_xy=torch.tensor(cw, dtype=f32),
            crosswalk_valid=torch.tensor([i < len(self.crosswalks) for i in range(C)]),
            stop_line_xy=torch.tensor(stop_xy, dtype=f32),
            stop_line_lane=torch.tensor(stop_lane),
            stop_line_valid=torch.tensor([i < len(stop_lanes) for i in range(K)]),
        )
        agents = self._build_agents()
        route = self._build_route()
        NL = max(1, len(self.lights))
        ls = np.full((NL, self.T), int(LightState.UNKNOWN), np.int64)
        lxy = np.zeros((NL, 2))
        for i, (st, p) in enumerate(zip(self.lights, self.light_xy, strict=True)):
            ls[i], lxy[i] = st, p
        return Scenario(map=the_map, agents=agents, route=route, light_states=torch.tensor(ls),
                        light_xy=torch.tensor(lxy, dtype=f32), meta=meta)

    def _build_agents(self) -> Agents:
        f32 = torch.float32
        A = len(self.agents)
        N = max([len(a.path) for a in self.agents if a.path is not None] + [2])
        K = max([len(a.path_stops) for a in self.agents] + [1])
        path = np.zeros((A, N, 2))
        pv = np.zeros((A, N), bool)
        ss = np.full((A, K), np.inf)
        sl = -np.ones((A, K), np.int64)
        for i, a in enumerate(self.agents):
            if a.path is not None:
                path[i, : len(a.path)] = a.path
                pv[i, : len(a.path)] = True
            for k, (s, li) in enumerate(a.path_stops):
                ss[i, k], sl[i, k] = s, li
        st = lambda name: np.stack([getattr(a, name) for a in self.agents])
        return Agents(
            xy=torch.tensor(st("xy"), dtype=f32), yaw=torch.tensor(st("yaw"), dtype=f32),
            speed=torch.tensor(st("speed"), dtype=f32), valid=torch.tensor(st("valid")),
            length=torch.tensor([a.length for a in self.agents], dtype=f32),
            width=torch.tensor([a.width for a in self.agents], dtype=f32),
            kind=torch.tensor([a.kind for a in self.agents], dtype=torch.int64),
            model=torch.tensor([a.model for a in self.agents], dtype=torch.int64),
            path_xy=torch.tensor(path, dtype=f32), path_valid=torch.tensor(pv),
            path_stop_s=torch.tensor(ss, dtype=f32), path_stop_light=torch.tensor(sl),
            desired_speed=torch.tensor([a.desired_speed for a in self.agents], dtype=f32),
        )

    def _build_route(self) -> Route:
        xy = self.route_xy
        M = len(xy)
        # lane of each route point: nearest lane among the route lanes
        lane_of = np.zeros(M, np.int64)
        best = np.full(M, np.inf)
        for ln in self.route_lanes:
            lx = self.lanes[ln].xy
            seg_a, seg_b = lx[:-1], lx[1:]
            ab = seg_b - seg_a
            ap = xy[:, None, :] - seg_a[None]
            t = np.clip((ap * ab[None]).sum(-1) / (ab * ab).sum(-1).clip(1e-12)[None], 0, 1)
            d = np.linalg.norm(ap - t[..., None] * ab[None], axis=-1).min(1)
            better = d < best
            lane_of[better], best[better] = ln, d[better]
        stops = self.stops_along(self.route_lanes, xy)
        K = max(1, len(stops))
        ss = np.full(K, np.inf)
        sl = -np.ones(K, np.int64)
        for k, (s, li) in enumerate(stops):
            ss[k], sl[k] = s, li
        return Route(
            lanes=torch.tensor(self.route_lanes, dtype=torch.int64),
            xy=torch.tensor(xy, dtype=torch.float32),
            valid=torch.ones(M, dtype=torch.bool),
            lane_of_point=torch.tensor(lane_of),
            speed_limit=torch.tensor([self.lanes[i].speed_limit for i in lane_of], dtype=torch.float32),
            length=torch.tensor(float(arclength(xy)[-1]), dtype=torch.float32),
            stop_s=torch.tensor(ss, dtype=torch.float32),
            stop_light=torch.tensor(sl),
        )


def light_cycle(num_steps: int, green: float, yellow: float, red: float, offset: float = 0.0) -> np.ndarray:
    """Per-step states (T,) of a fixed-time light: green, yellow, red durations in s, offset in s."""
    t = np.arange(num_steps) * DT + offset
    period = green + yellow + red
    ph = np.mod(t, period)
    out = np.where(ph < green, LightState.GREEN, np.where(ph < green + yellow, LightState.YELLOW, LightState.RED))
    return out.astype(np.int64)
