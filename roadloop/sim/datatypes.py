"""Core datatypes: immutable dataclasses of tensors.

Every class here is *shape-agnostic over leading batch dimensions*: a single scenario has
no leading dimension (``lane_xy`` is ``(L, P, 2)``), a batch of B scenarios has one
(``(B, L, P, 2)``).  Field comments give the shape with ``...`` standing for those leading
dimensions, and the unit.  All geometry is in the scenario's local frame (see
``docs/frames.md``): x east / y north in metres, yaw in radians counter-clockwise from +x.

Padding convention: index tensors use ``-1`` for "none"; every padded entity has a
validity mask; padded geometry is filled with zeros (never NaN) so that batched maths
stays finite, and results computed for padded entries are masked out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

SCHEMA_VERSION = 1
DT = 0.1  # s, simulator and log time step (10 Hz)


class AgentType(IntEnum):
    VEHICLE = 0
    PEDESTRIAN = 1
    CYCLIST = 2
    STATIC = 3  # cones, barriers, parked cars: never move


class TrafficModel(IntEnum):
    """How a non-ego agent moves in closed loop (chosen per agent)."""

    LOG = 0  # replay the logged track
    CONST_VEL = 1  # keep the speed and heading of the first step
    IDM = 2  # IDM car following along ``Agents.path``; pedestrians walk their path
    STATIC = 3  # does not move (static objects)


class LightState(IntEnum):
    UNKNOWN = 0
    GREEN = 1
    YELLOW = 2
    RED = 3


def _replace(obj, **kw):
    return dataclasses.replace(obj, **kw)


class _TensorTree:
    """Mixin: map a function over every tensor field (recursively)."""

    def map_tensors(self, fn):
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "static":
                kw[f.name] = v
            elif isinstance(v, torch.Tensor):
                kw[f.name] = fn(v)
            elif isinstance(v, _TensorTree):
                kw[f.name] = v.map_tensors(fn)
            else:
                kw[f.name] = v
        return type(self)(**kw)

    def to(self, device: torch.device | str):
        return self.map_tensors(lambda t: t.to(device))

    def replace(self, **kw):
        return _replace(self, **kw)

    def tensor_items(self, prefix: str = ""):
        """Yield ``(dotted_name, tensor)`` for every tensor field, recursively."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                yield prefix + f.name, v
            elif isinstance(v, _TensorTree):
                yield from v.tensor_items(prefix + f.name + ".")


@dataclass(frozen=True, eq=False)
class Map(_TensorTree):
    """Road map: lanes with their graph, road edges, crosswalks, stop lines, light bindings."""

    lane_xy: torch.Tensor  # (..., L, P, 2) m, lane centreline points in driving order
    lane_point_valid: torch.Tensor  # (..., L, P) bool
    lane_width: torch.Tensor  # (..., L) m
    lane_speed_limit: torch.Tensor  # (..., L) m/s
    lane_valid: torch.Tensor  # (..., L) bool
    lane_is_junction: torch.Tensor  # (..., L) bool, lane lies inside an intersection
    lane_successors: torch.Tensor  # (..., L, S) int64 lane index, -1 none
    lane_predecessors: torch.Tensor  # (..., L, S) int64 lane index, -1 none
    lane_left: torch.Tensor  # (..., L) int64 left neighbour a lane change may go to, -1 none
    lane_right: torch.Tensor  # (..., L) int64 right neighbour, -1 none
    lane_light: torch.Tensor  # (..., L) int64 traffic light controlling the lane's end, -1 none
    road_edge_xy: torch.Tensor  # (..., E, Q, 2) m, road boundary polylines
    road_edge_valid: torch.Tensor  # (..., E, Q) bool
    crosswalk_xy: torch.Tensor  # (..., C, 4, 2) m, crosswalk quadrilaterals
    crosswalk_valid: torch.Tensor  # (..., C) bool
    stop_line_xy: torch.Tensor  # (..., K, 2, 2) m, stop line segments
    stop_line_lane: torch.Tensor  # (..., K) int64 lane whose end the line closes, -1 none
    stop_line_valid: torch.Tensor  # (..., K) bool

    @property
    def num_lanes(self) -> int:
        return self.lane_xy.shape[-3]


@dataclass(frozen=True, eq=False)
class Agents(_TensorTree):
    """Logged agent tracks at 10 Hz.  Agent 0 is always the ego (its log is the expert log)."""

    xy: torch.Tensor  # (..., A, T, 2) m, box centre
    yaw: torch.Tensor  # (..., A, T) rad
    speed: torch.Tensor  # (..., A, T) m/s, signed along the heading
    valid: torch.Tensor  # (..., A, T) bool, agent exists at that step
    length: torch.Tensor  # (..., A) m
    width: torch.Tensor  # (..., A) m
    kind: torch.Tensor  # (..., A) int64 AgentType
    model: torch.Tensor  # (..., A) int64 default TrafficModel in closed loop (ego: ignored)
    path_xy: torch.Tensor  # (..., A, N, 2) m, path polyline for IDM / walking agents
    path_valid: torch.Tensor  # (..., A, N) bool
    path_stop_s: torch.Tensor  # (..., A, K) m, arc length along the path of stop points; +inf pad
    path_stop_light: torch.Tensor  # (..., A, K) int64 light at that stop, -1 = stop sign/none
    desired_speed: torch.Tensor  # (..., A) m/s, IDM target speed

    @property
    def num_agents(self) -> int:
        return self.xy.shape[-3]

    @property
    def num_steps(self) -> int:
        return self.xy.shape[-2]


@dataclass(frozen=True, eq=False)
class Route(_TensorTree):
    """The ego's route: its lane sequence and the centreline polyline resampled every 1 m."""

    lanes: torch.Tensor  # (..., R) int64 lane indices in order, -1 pad
    xy: torch.Tensor  # (..., M, 2) m, centreline, one point per metre of arc length
    valid: torch.Tensor  # (..., M) bool
    lane_of_point: torch.Tensor  # (..., M) int64 lane each route point lies on
    speed_limit: torch.Tensor  # (..., M) m/s at each route point
    length: torch.Tensor  # (...) m, arc length of the valid part
    stop_s: torch.Tensor  # (..., K) m, arc length of stop lines along the route, +inf pad
    stop_light: torch.Tensor  # (..., K) int64 light at that stop, -1 = stop sign


@dataclass(frozen=True)
class ScenarioMeta:
    """Plain-Python metadata of one scenario."""

    scenario_id: str  # unique within a suite, e.g. "cut_in/000017"
    family: str
    seed: int
    source: str  # "procedural", "sumo:<network>", ...
    schema_version: int = SCHEMA_VERSION
    warmup_steps: int = 10  # steps of log replay before the policy engages (not scored)
    extra: tuple[tuple[str, str], ...] = ()  # free key/value pairs (projection, network, ...)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @staticmethod
    def from_json(d: dict) -> ScenarioMeta:
        d = dict(d)
        d["extra"] = tuple(sorted((str(k), str(v)) for k, v in d.get("extra", {}).items()))
        return ScenarioMeta(**d)


@dataclass(frozen=True, eq=False)
class Scenario(_TensorTree):
    """One scene (no batch dim) or a batch of scenes (leading B dim, ``meta`` a tuple)."""

    map: Map
    agents: Agents
    route: Route
    light_states: torch.Tensor  # (..., NL, T) int64 LightState of each light at each step
    light_xy: torch.Tensor  # (..., NL, 2) m, where each light's stop line is (for display)
    meta: ScenarioMeta | tuple[ScenarioMeta, ...]

    @property
    def num_steps(self) -> int:
        return self.agents.num_steps

    @property
    def batched(self) -> bool:
        return isinstance(self.meta, tuple)

    @property
    def batch_size(self) -> int:
        return len(self.meta) if isinstance(self.meta, tuple) else 1

    @property
    def ids(self) -> list[str]:
        metas = self.meta if isinstance(self.meta, tuple) else (self.meta,)
        return [m.scenario_id for m in metas]


@dataclass(frozen=True, eq=False)
class SimState(_TensorTree):
    """The dynamic state of a batch of B scenarios with up to A agents each (agent 0 = ego)."""

    t: torch.Tensor  # () int64 current step index into the log (same for the whole batch)
    xy: torch.Tensor  # (B, A, 2) m
    yaw: torch.Tensor  # (B, A) rad
    speed: torch.Tensor  # (B, A) m/s
    accel: torch.Tensor  # (B, A) m/s^2, longitudinal acceleration applied in the last step
    yaw_rate: torch.Tensor  # (B, A) rad/s over the last step
    present: torch.Tensor  # (B, A) bool, agent exists now
    model: torch.Tensor  # (B, A) int64 TrafficModel each agent follows (ego entry unused)
    path_s: torch.Tensor  # (B, A) m, arc length along the agent's path
    stop_done: torch.Tensor  # (B, A, K) bool, agent has already halted at that stop sign
    route_s: torch.Tensor  # (B,) m, ego progress along its route
    route_s_max: torch.Tensor  # (B,) m, furthest progress so far
    static: Any  # roadloop.sim.state.SimStatic: the scenario batch + precomputed lookups (shared)

    @property
    def batch_size(self) -> int:
        return self.xy.shape[0]

    @property
    def num_agents(self) -> int:
        return self.xy.shape[1]


@dataclass(frozen=True, eq=False)
class StepChecks(_TensorTree):
    """Per-step check results for the ego, each (B,).  See docs/metrics.md."""

    collision: torch.Tensor  # (B,) bool, ego box overlaps another present agent
    collision_at_fault: torch.Tensor  # (B,) bool, front/lateral collision (rear-ended is not)
    collision_agent: torch.Tensor  # (B,) int64 agent hit (-1 none); lowest index if several
    collision_kind: torch.Tensor  # (B,) int64 AgentType of the agent hit, -1 none
    offroad: torch.Tensor  # (B,) bool, a corner of the ego box is outside every lane
    wrong_way: torch.Tensor  # (B,) bool, ego heading opposes every lane under its centre
    red_light: torch.Tensor  # (B,) bool, ego crossed a stop line on red during this step
    speeding: torch.Tensor  # (B,) m/s, ego speed above the local limit (0 if not)
    progress: torch.Tensor  # (B,) m, ego arc length along the route
    dist_to_log: torch.Tensor  # (B,) m, ego distance to its logged position (NaN: no log)
    ttc: torch.Tensor  # (B,) s, time to collision at constant velocity (inf if none in 3 s)
    agent_collision: torch.Tensor  # (B,) int64 number of non-ego agent pairs in contact
