"""Tiny hand-built scenes for tests and examples (deterministic, no generation cost)."""

from __future__ import annotations

import numpy as np

from roadloop.scenarios.builder import ScenarioBuilder, light_cycle, straight
from roadloop.sim.datatypes import AgentType, LightState, ScenarioMeta, TrafficModel


def straight_road(num_steps: int = 80, ego_speed: float = 10.0, length: float = 400.0, lanes: int = 2,
                  warmup: int = 10, log_speed: float | None = None, sid: str = "test/straight",
                  ego_x: float = 10.0):
    """A straight multi-lane road along +x; the ego in lane 0 at ``ego_x`` with a constant-speed log.

    Returns the builder (so tests can add agents) and the lane ids.
    """
    b = ScenarioBuilder(num_steps)
    ids = [b.add_lane(straight((0, 3.5 * i), (length, 3.5 * i)), 3.5, 15.0) for i in range(lanes)]
    for i in range(lanes - 1):
        b.neighbours(ids[i], left=ids[i + 1])
    b.edge_of_lane(ids[0], "right")
    b.edge_of_lane(ids[-1], "left")
    b.set_route([ids[0]])
    v = ego_speed if log_speed is None else log_speed
    t = np.arange(num_steps) * 0.1
    b.add_agent(np.stack((ego_x + v * t, np.zeros_like(t)), 1), 0.0, v)
    b.meta = ScenarioMeta(sid, "test", 0, "test", warmup_steps=warmup)
    return b, ids


def build(b: ScenarioBuilder):
    return b.build(b.meta)


def lead_vehicle_scene(gap: float = 30.0, lead_speed: float = 5.0, ego_speed: float = 10.0, num_steps: int = 80,
                       model: TrafficModel = TrafficModel.IDM):
    b, ids = straight_road(num_steps, ego_speed)
    x = 10 + gap + 4.6
    t = np.arange(num_steps) * 0.1
    b.add_agent(np.stack((x + lead_speed * t, np.zeros_like(t)), 1), 0.0, lead_speed, model=model,
                path_lanes=[ids[0]], desired_speed=lead_speed)
    return build(b)


def red_light_scene(num_steps: int = 120, stop_x: float = 100.0):
    """Two lanes in a row with a light at the end of the first one, red throughout."""
    b = ScenarioBuilder(num_steps)
    l0 = b.add_lane(straight((0, 0), (stop_x, 0)))
    l1 = b.add_lane(straight((stop_x, 0), (400, 0)))
    b.connect(l0, l1)
    b.add_light(np.full(num_steps, int(LightState.RED)), [l0])
    b.set_route([l0, l1])
    b.add_agent([[10.0, 0.0]], 0.0, 10.0)
    b.add_agent([[40.0, 0.0]], 0.0, 8.0, model=TrafficModel.IDM, path_lanes=[l0, l1], desired_speed=12.0)
    return b.build(ScenarioMeta("test/red", "test", 0, "test", warmup_steps=0))


def green_cycle(num_steps: int) -> np.ndarray:
    return light_cycle(num_steps, 10.0, 3.0, 10.0)


__all__ = ["straight_road", "build", "lead_vehicle_scene", "red_light_scene", "AgentType", "TrafficModel"]
