"""The batched simulator step: ``step(state, controls, cfg) -> state``.

The ego (agent 0) follows its (acceleration, curvature) controls through the kinematic
unicycle; every other agent follows its traffic model (``roadloop.sim.traffic``).  Passing
``controls=None`` replays the ego's log instead (the warm-up before a policy engages).
Per-step checks live in ``roadloop.sim.checks`` and are computed from (previous, next) states.
"""

from __future__ import annotations

import torch

from roadloop.errors import ControlError
from roadloop.sim import dynamics
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import SimState
from roadloop.sim.geometry import point_segment_distance, wrap_angle
from roadloop.sim.traffic import traffic_step

ROUTE_WINDOW = 12  # route segments searched around the last progress (ego moves < 4 m per step)


def check_controls(controls: torch.Tensor, state: SimState) -> None:
    """Raise ``ControlError`` for wrong shapes or non-finite values (never silently clamped)."""
    B = state.batch_size
    if not isinstance(controls, torch.Tensor) or tuple(controls.shape) != (B, 2):
        shape = tuple(controls.shape) if isinstance(controls, torch.Tensor) else type(controls).__name__
        raise ControlError(f"controls must have shape ({B}, 2) (acceleration m/s^2, curvature 1/m), got {shape}")
    bad = ~torch.isfinite(controls)
    if bool(bad.any()):
        b, k = (int(i) for i in bad.nonzero()[0])
        name = ("acceleration", "curvature")[k]
        sid = state.static.scenario.ids[b]
        raise ControlError(f"scenario '{sid}' (batch index {b}): {name} control is {float(controls[b, k])}; "
                           "controls must be finite")


def route_progress(state: SimState, ego_xy: torch.Tensor) -> torch.Tensor:
    """Ego arc length (B,) m along the route, searched in a window around the last value."""
    route = state.static.scenario.route
    ds = state.static.route_ds
    M = route.xy.shape[1]
    W = min(ROUTE_WINDOW, M - 1)
    i0 = (state.route_s / ds - 2).floor().long().clamp(0, M - 1 - W)
    idx = i0.unsqueeze(-1) + torch.arange(W + 1)
    pts = route.xy.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    ok = route.valid.gather(1, idx)
    dist, t = point_segment_distance(ego_xy.unsqueeze(1), pts[:, :-1], pts[:, 1:])
    dist = torch.where(ok[:, 1:], dist, torch.full_like(dist, float("inf")))
    k = dist.argmin(-1, keepdim=True)
    return ((i0.unsqueeze(-1) + k).to(ds.dtype) + t.gather(-1, k)).squeeze(-1) * ds


def step(state: SimState, controls: torch.Tensor | None, cfg: SimConfig) -> SimState:
    """Advance the batch by one step of ``cfg.dt``.

    controls: (B, 2) ego (acceleration m/s^2, curvature 1/m), clipped to the configured
    bounds after a finiteness check; ``None`` replays the ego log.
    """
    dt = cfg.dt
    new = traffic_step(state, dt)
    if controls is None:
        a = state.static.scenario.agents
        tn = min(int(state.t) + 1, a.num_steps - 1)
        exy, eyaw, ev = a.xy[:, 0, tn], a.yaw[:, 0, tn], a.speed[:, 0, tn]
    else:
        check_controls(controls, state)
        acc = controls[:, 0].clamp(cfg.accel_min, cfg.accel_max)
        curv = controls[:, 1].clamp(-cfg.curvature_max, cfg.curvature_max)
        exy, eyaw, ev = dynamics.unicycle_forward(state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0], acc, curv, dt)
    xy = torch.cat((exy.unsqueeze(1), new["xy"][:, 1:]), dim=1)
    yaw = torch.cat((eyaw.unsqueeze(1), new["yaw"][:, 1:]), dim=1)
    speed = torch.cat((ev.unsqueeze(1), new["speed"][:, 1:]), dim=1)
    present = torch.cat((state.present[:, :1], new["present"][:, 1:]), dim=1)
    route_s = route_progress(state, exy)
    return SimState(
        t=state.t + 1, xy=xy, yaw=yaw, speed=speed, accel=(speed - state.speed) / dt,
        yaw_rate=wrap_angle(yaw - state.yaw) / dt, present=present, model=state.model,
        path_s=new["path_s"], stop_done=new["stop_done"], route_s=route_s,
        route_s_max=torch.maximum(state.route_s_max, route_s), static=state.static,
    )
