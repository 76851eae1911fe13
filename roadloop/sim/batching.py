"""Batch single scenarios into one padded ``Scenario`` and validate scenarios.

``collate`` pads every dimension to the largest in the batch: index fields with -1, masks
with False, stop arc lengths with +inf and everything else with 0.
"""

from __future__ import annotations

import dataclasses

import torch

from roadloop.errors import ScenarioError
from roadloop.sim.datatypes import SCHEMA_VERSION, Agents, Map, Route, Scenario, _TensorTree

_INDEX_FIELDS = {
    "lane_successors", "lane_predecessors", "lane_left", "lane_right", "lane_light",
    "stop_line_lane", "path_stop_light", "lanes", "lane_of_point", "stop_light",
}
_INF_FIELDS = {"path_stop_s", "stop_s"}


def pad_value(name: str, dtype: torch.dtype) -> float | int | bool:
    if dtype == torch.bool:
        return False
    if name in _INDEX_FIELDS:
        return -1
    if name in _INF_FIELDS:
        return float("inf")
    return 0


def _pad_stack(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    nd = tensors[0].dim()
    shape = [max(t.shape[i] for t in tensors) for i in range(nd)]
    out = torch.full((len(tensors), *shape), pad_value(name, tensors[0].dtype), dtype=tensors[0].dtype)
    for b, t in enumerate(tensors):
        out[(b, *[slice(0, s) for s in t.shape])] = t
    return out


def _collate_tree(cls, items: list[_TensorTree]):
    kw = {}
    for f in dataclasses.fields(cls):
        vals = [getattr(x, f.name) for x in items]
        if isinstance(vals[0], torch.Tensor):
            kw[f.name] = _pad_stack(f.name, vals)
        elif isinstance(vals[0], _TensorTree):
            kw[f.name] = _collate_tree(type(vals[0]), vals)
        else:
            kw[f.name] = tuple(vals)
    return cls(**kw)


def collate(scenarios: list[Scenario]) -> Scenario:
    """Stack single scenarios into one batched ``Scenario`` (leading dim B)."""
    if not scenarios:
        raise ScenarioError("cannot batch an empty list of scenarios")
    for s in scenarios:
        if s.batched:
            raise ScenarioError(f"collate expects single scenarios; got a batch ({s.ids[:3]}...)")
    return _collate_tree(Scenario, scenarios)


def unbatch(batch: Scenario, i: int) -> Scenario:
    """Take scenario ``i`` out of a batch (keeps the padding)."""
    kw = {}
    for name in ("map", "agents", "route"):
        kw[name] = getattr(batch, name).map_tensors(lambda t: t[i])
    return Scenario(light_states=batch.light_states[i], light_xy=batch.light_xy[i], meta=batch.meta[i], **kw)


def crop_log(scenario: Scenario, start: int) -> Scenario:
    """The single ``scenario`` from log step ``start`` on: every agent track and light state cut to steps
    ``start..T-1`` (the map and route unchanged), so a rollout of it begins where the log is at ``start``
    (agents as logged there, then the usual warm-up).  ``meta.extra`` records ``log_start``."""
    if scenario.batched:
        raise ScenarioError(f"crop_log expects a single scenario; got a batch ({scenario.ids[:3]}...)")
    T = scenario.num_steps
    if not 0 <= start < T - 1:
        raise ScenarioError(f"scenario '{scenario.meta.scenario_id}': cannot start at log step {start} of {T}")
    if not bool(scenario.agents.valid[0, start]):
        raise ScenarioError(f"scenario '{scenario.meta.scenario_id}': ego has no logged state at step {start}")
    if start == 0:
        return scenario
    a = scenario.agents
    agents = a.replace(xy=a.xy[:, start:], yaw=a.yaw[:, start:], speed=a.speed[:, start:], valid=a.valid[:, start:])
    extra = dict(scenario.meta.extra)
    extra["log_start"] = str(start + int(extra.get("log_start", 0)))
    meta = dataclasses.replace(scenario.meta, extra=tuple(sorted(extra.items())))
    return Scenario(map=scenario.map, agents=agents, route=scenario.route,
                    light_states=scenario.light_states[:, start:], light_xy=scenario.light_xy, meta=meta)


# --- validation -------------------------------------------------------------------------

_EXPECTED_DIMS = {  # field -> number of dims of a single scenario
    **{f: d for f, d in [
        ("lane_xy", 3), ("lane_point_valid", 2), ("lane_width", 1), ("lane_speed_limit", 1),
        ("lane_valid", 1), ("lane_is_junction", 1), ("lane_successors", 2), ("lane_predecessors", 2),
        ("lane_left", 1), ("lane_right", 1), ("lane_light", 1), ("road_edge_xy", 3),
        ("road_edge_valid", 2), ("crosswalk_xy", 3), ("crosswalk_valid", 1), ("stop_line_xy", 3),
        ("stop_line_lane", 1), ("stop_line_valid", 1)]},
}
_AGENT_DIMS = {"xy": 3, "yaw": 2, "speed": 2, "valid": 2, "length": 1, "width": 1, "kind": 1, "model": 1,
               "path_xy": 3, "path_valid": 2, "path_stop_s": 2, "path_stop_light": 2, "desired_speed": 1}
_ROUTE_DIMS = {"lanes": 1, "xy": 2, "valid": 1, "lane_of_point": 1, "speed_limit": 1, "length": 0,
               "stop_s": 1, "stop_light": 1}


def validate(s: Scenario) -> None:
    """Raise ``ScenarioError`` naming scenario and field if ``s`` (single) is malformed."""
    sid = s.meta.scenario_id if not s.batched else "<batch>"
    if s.batched:
        raise ScenarioError("validate() takes a single scenario")
    if s.meta.schema_version != SCHEMA_VERSION:
        raise ScenarioError(
            f"scenario '{sid}': schema version {s.meta.schema_version}, expected {SCHEMA_VERSION}")
    for group, obj, dims in (("map", s.map, _EXPECTED_DIMS), ("agents", s.agents, _AGENT_DIMS),
                             ("route", s.route, _ROUTE_DIMS)):
        for name, want in dims.items():
            t = getattr(obj, name)
            if not isinstance(t, torch.Tensor):
                raise ScenarioError(f"scenario '{sid}': field {group}.{name} is {type(t).__name__}, expected a tensor")
            if t.dim() != want:
                raise ScenarioError(
                    f"scenario '{sid}': field {group}.{name} has shape {tuple(t.shape)}, expected {want} dims")
            if t.is_floating_point():
                bad = torch.isnan(t) if name in _INF_FIELDS else ~torch.isfinite(t)
                if bool(bad.any()):
                    idx = tuple(int(i) for i in bad.nonzero()[0])
                    raise ScenarioError(f"scenario '{sid}': field {group}.{name} has NaN/inf at index {idx}")
    a = s.agents
    A, T = a.xy.shape[0], a.xy.shape[1]
    for name in ("yaw", "speed", "valid"):
        if tuple(getattr(a, name).shape) != (A, T):
            raise ScenarioError(f"scenario '{sid}': field agents.{name} has shape "
                                f"{tuple(getattr(a, name).shape)}, expected ({A}, {T})")
    for name in ("length", "width", "kind", "model", "desired_speed"):
        if getattr(a, name).shape[0] != A:
            raise ScenarioError(f"scenario '{sid}': field agents.{name} has {getattr(a, name).shape[0]} "
                                f"entries, expected {A} (one per agent)")
    if A < 1 or not bool(a.valid[0, 0]):
        raise ScenarioError(f"scenario '{sid}': agent 0 (the ego) must exist at step 0")
    if bool(((a.length <= 0) | (a.width <= 0)).any()):
        i = int(((a.length <= 0) | (a.width <= 0)).nonzero()[0, 0])
        raise ScenarioError(f"scenario '{sid}': agent {i} has non-positive length or width")
    L = s.map.lane_xy.shape[0]
    if L == 0 or not bool(s.map.lane_valid.any()):
        raise ScenarioError(f"scenario '{sid}': map has no valid lanes")
    for name in ("lane_successors", "lane_predecessors", "lane_left", "lane_right"):
        t = getattr(s.map, name)
        if bool(((t < -1) | (t >= L)).any()):
            raise ScenarioError(f"scenario '{sid}': field map.{name} references a lane outside [0, {L})")
    if s.light_states.dim() != 2 or s.light_states.shape[1] != T:
        raise ScenarioError(f"scenario '{sid}': light_states has shape {tuple(s.light_states.shape)}, "
                            f"expected (NL, {T})")
    NL = s.light_states.shape[0]
    if bool((s.map.lane_light >= NL).any()):
        raise ScenarioError(f"scenario '{sid}': map.lane_light references a light >= {NL} lights")
    if not bool(s.route.valid.any()) or float(s.route.length) <= 0:
        raise ScenarioError(f"scenario '{sid}': the ego route is empty")


__all__ = ["collate", "crop_log", "unbatch", "validate", "pad_value", "Map", "Agents", "Route"]
