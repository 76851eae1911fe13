"""``route-idm``: IDM along the route centreline, no lane changes (the baseline policy).

It sees ground truth.  Obstacles along the route: the nearest agent whose box is (or, at
constant velocity, will be within 1-2 s) inside the route corridor ahead, red / yellow lights
and stop signs at the route's stop lines, and the route's end.  The desired speed is the
lowest of the speed limit and the curve speed (lateral acceleration <= 2.5 m/s^2) over the
next stretch of route.  The 64-step plan integrates IDM with the obstacles moving at their
current speed along the route.
"""

from __future__ import annotations

import torch

from roadloop.policies.base import PLAN_STEPS, Observation, Policy, PolicyOutput
from roadloop.sim.config import IDMParams
from roadloop.sim.datatypes import LightState, SimState
from roadloop.sim.geometry import wrap_angle
from roadloop.sim.traffic import idm_acceleration

_INF = 1e9


def route_window(state: SimState, back: float, ahead: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route points from ``back`` m behind to ``ahead`` m ahead of the ego's progress.

    Returns xy (B, W, 2) m, arc length s (B, W) m and validity (B, W).
    """
    st = state.static
    route = st.scenario.route
    ds = st.route_ds
    M = route.xy.shape[1]
    W = min(M, int(round((back + ahead) / float(ds.min().clamp_min(0.2)))) + 1)
    i0 = ((state.route_s - back) / ds).floor().long().clamp(0, max(M - W, 0))
    idx = i0.unsqueeze(-1) + torch.arange(W)
    xy = route.xy.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    return xy, idx.to(ds.dtype) * ds.unsqueeze(-1), route.valid.gather(1, idx)


def route_obstacles(state: SimState, horizons: tuple[float, ...] = (0.0, 1.0, 2.0), margin: float = 0.4,
                    ahead: float = 70.0, lateral_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gap (B,) m and along-route speed (B,) m/s of the nearest agent in the route corridor ahead.

    Agents are tested at their current position and at constant-velocity predictions
    ``horizons`` seconds ahead (so crossing pedestrians and oncoming traffic are yielded to).
    ``lateral_offset`` (m, + left) shifts the corridor sideways (a nudge proposal).
    """
    st = state.static
    ag = st.scenario.agents
    rxy, rs, rvalid = route_window(state, 5.0, ahead)
    rhead = torch.atan2(rxy[:, 1:, 1] - rxy[:, :-1, 1], rxy[:, 1:, 0] - rxy[:, :-1, 0])
    rhead = torch.cat((rhead, rhead[:, -1:]), dim=1)
    if lateral_offset:
        rxy = rxy + lateral_offset * torch.stack((-torch.sin(rhead), torch.cos(rhead)), -1)
    B, A = state.present.shape
    ego_half_w = 0.5 * ag.width[:, :1]
    ego_half_l = 0.5 * ag.length[:, 0]
    dirs = torch.stack((torch.cos(state.yaw), torch.sin(state.yaw)), -1)
    best_gap = torch.full((B,), _INF)
    best_v = torch.zeros(B)
    for h in horizons:
        p = state.xy + (state.speed * h).unsqueeze(-1) * dirs  # (B, A, 2)
        d = torch.linalg.vector_norm(p.unsqueeze(2) - rxy.unsqueeze(1), dim=-1)  # (B, A, W)
        d = torch.where(rvalid.unsqueeze(1), d, torch.full_like(d, _INF))
        dmin, k = d.min(-1)
        s_j = rs.gather(1, k)
        hd = rhead.gather(1, k)
        rel = wrap_angle(state.yaw - hd)
        extent_along = 0.5 * (ag.length * rel.cos().abs() + ag.width * rel.sin().abs())
        extent_across = 0.5 * (ag.length * rel.sin().abs() + ag.width * rel.cos().abs())
        cand = state.present & (dmin < ego_half_w + extent_across + margin)
        cand[:, 0] = False
        gap = s_j - state.route_s.unsqueeze(-1) - ego_half_l.unsqueeze(-1) - extent_along
        cand &= gap > -ego_half_l.unsqueeze(-1)  # not behind the ego
        gap = torch.where(cand, gap.clamp_min(0.0), torch.full_like(gap, _INF))
        g, j = gap.min(-1)
        v_al = (state.speed * rel.cos()).gather(1, j.unsqueeze(-1)).squeeze(-1).clamp_min(0.0)
        if h > 0:
            v_al = torch.zeros_like(v_al)  # a predicted incursion is a standing obstacle
        better = g < best_gap
        best_gap = torch.where(better, g, best_gap)
        best_v = torch.where(better, v_al, best_v)
    return best_gap, best_v


def desired_speed(state: SimState, ahead: float = 40.0, lat_acc: float = 2.5) -> torch.Tensor:
    """Lowest of the speed limit and the curve speed over the next ``ahead`` m (B,) m/s."""
    st = state.static
    route = st.scenario.route
    xy, s, valid = route_window(state, 0.0, ahead)
    idx = (s / st.route_ds.unsqueeze(-1)).round().long().clamp(0, route.xy.shape[1] - 1)
    limit = torch.where(valid, route.speed_limit.gather(1, idx), torch.full_like(s, _INF))
    h = torch.atan2(xy[:, 1:, 1] - xy[:, :-1, 1], xy[:, 1:, 0] - xy[:, :-1, 0])
    seg = torch.linalg.vector_norm(xy[:, 1:] - xy[:, :-1], dim=-1).clamp_min(1e-3)
    curv = (wrap_angle(h[:, 1:] - h[:, :-1]).abs() / seg[:, 1:])
    curv = torch.where(valid[:, 2:], curv, torch.zeros_like(curv))
    # smooth over ~5 m so single kinks don't dominate
    k = min(5, curv.shape[1])
    curv = torch.nn.functional.avg_pool1d(curv.unsqueeze(1), k, 1, padding=k // 2, count_include_pad=False).squeeze(1)
    v_curve = torch.sqrt(lat_acc / curv.clamp_min(1e-4))
    return torch.minimum(limit.amin(-1), v_curve.amin(-1)).clamp_min(1.0)


def stop_line_gap(state: SimState, stopped: torch.Tensor, b_comf: float) -> torch.Tensor:
    """Gap (B,) m to the nearest route stop line the ego must stop at now."""
    st = state.static
    sc = st.scenario
    route = sc.route
    t = min(int(state.t), st.log_len_steps - 1)
    ls = sc.light_states[:, :, t].gather(1, route.stop_light.clamp_min(0))
    front = state.route_s + 0.5 * sc.agents.length[:, 0]
    g = route.stop_s - front.unsqueeze(-1)
    v = state.speed[:, :1]
    red = (ls == LightState.RED) | ((ls == LightState.YELLOW) & (g > v * v / (2 * b_comf)))
    sign = (route.stop_light < 0) & torch.isfinite(route.stop_s) & ~stopped
    must = torch.where(route.stop_light >= 0, red, sign) & (g > -0.5)
    return torch.where(must, g, torch.full_like(g, _INF)).amin(-1)


JERK_LIMIT = 3.5  # m/s^3, plans change acceleration no faster (unless braking harder than comfortable)


def update_stop_memory(stopped: torch.Tensor | None, state: SimState) -> torch.Tensor:
    """Which route stop lines (B, K) the ego has already halted at (within 3 m, < 0.3 m/s)."""
    route = state.static.scenario.route
    if stopped is None or stopped.shape != route.stop_s.shape:
        stopped = torch.zeros_like(route.stop_s, dtype=torch.bool)
    front = state.route_s + 0.5 * state.static.scenario.agents.length[:, 0]
    near = (route.stop_s - front.unsqueeze(-1)).abs() < 3.0
    return stopped | (near & (state.speed[:, :1] < 0.3))


def idm_plan_along_route(state: SimState, v0: torch.Tensor, gap_lead: torch.Tensor, v_lead: torch.Tensor,
                         gap_stop: torch.Tensor, params: torch.Tensor, offset: torch.Tensor | None = None,
                         dt: float = 0.1) -> PolicyOutput:
    """Integrate IDM for 64 steps along the route (obstacles at constant speed) -> plan.

    v0, gaps (m), v_lead: (B,) or (B, P) for P proposals; params (6,); offset (B, P) m lateral.
    The acceleration changes by at most ``JERK_LIMIT`` per second, except that braking harder
    than the comfortable deceleration ``params[1]`` is applied at once (safety first).
    """
    st = state.static
    route = st.scenario.route
    shape1 = (-1, *([1] * (v0.dim() - 1)))
    a_prev = state.accel[:, 0].reshape(shape1).expand_as(v0).clone()
    v = state.speed[:, 0].reshape(-1, *([1] * (v0.dim() - 1))).expand_as(v0).clone()
    s = state.route_s.reshape(v.shape[0], *([1] * (v0.dim() - 1))).expand_as(v0).clone()
    g1, g2 = gap_lead.clone(), gap_stop.clone()
    ss, vs = [], []
    for _ in range(PLAN_STEPS):
        gap = torch.minimum(g1, g2)
        vl = torch.where(g1 <= g2, v_lead, torch.zeros_like(v_lead))
        a_idm = idm_acceleration(v, v0, gap, vl, params)
        a = torch.clamp(a_idm, a_prev - JERK_LIMIT * dt, a_prev + JERK_LIMIT * dt)
        a = torch.where(a_idm < -params[1], torch.minimum(a_idm, a), a)
        a_prev = a
        vn = (v + a * dt).clamp_min(0.0)
        step = 0.5 * (v + vn) * dt
        s = s + step
        g1 = g1 - step + v_lead * dt
        g2 = g2 - step
        v = vn
        ss.append(s)
        vs.append(v)
    s_all = torch.stack(ss, -1)  # (B, [P,] 64)
    xy, yaw = route_points(route.xy, st.route_ds, route.length, s_all)
    if offset is not None:
        n = torch.stack((-torch.sin(yaw), torch.cos(yaw)), -1)
        xy = xy + n * offset.unsqueeze(-1).unsqueeze(-1)
    return PolicyOutput(plan_xy=xy, plan_yaw=yaw, plan_speed=torch.stack(vs, -1))


def route_points(route_xy: torch.Tensor, ds: torch.Tensor, length: torch.Tensor, s: torch.Tensor):
    """Positions (..., 2) and headings (...) on the route at arc lengths ``s`` (B, ...).

    Beyond the route's end the last segment is extended straight.
    """
    B, M = route_xy.shape[:2]
    shape = s.shape
    sf = s.reshape(B, -1)
    u = sf / ds.unsqueeze(-1)
    nmax = (length / ds).round().long().clamp(1, M - 1)
    i0 = u.floor().long().clamp(min=0)
    i0 = torch.minimum(i0, (nmax - 1).unsqueeze(-1))
    w = (u - i0.to(u.dtype)).unsqueeze(-1)
    p0 = route_xy.gather(1, i0.unsqueeze(-1).expand(-1, -1, 2))
    p1 = route_xy.gather(1, (i0 + 1).unsqueeze(-1).expand(-1, -1, 2))
    d = p1 - p0
    xy = p0 + w * d
    yaw = torch.atan2(d[..., 1], d[..., 0])
    return xy.reshape(*shape, 2), yaw.reshape(shape)


class RouteIDM(Policy):
    """IDM along the route centreline (see module docstring)."""

    name = "route-idm"
    version = "1"
    seed_independent = True  # no sampling: seeds do not change a rollout

    def __init__(self, params: IDMParams | None = None):
        p = params or IDMParams(T=1.5, s0=2.5, a_max=1.5, b_comf=3.0)
        self.p = p
        self.params = torch.tensor([p.a_max, p.b_comf, p.b_max, p.s0, p.T, p.lookahead])
        self._stopped: torch.Tensor | None = None

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        self._stopped = torch.zeros_like(state.static.scenario.route.stop_s, dtype=torch.bool)

    def _update_stops(self, state: SimState) -> torch.Tensor:
        self._stopped = update_stop_memory(self._stopped, state)
        return self._stopped

    def act(self, obs: Observation) -> PolicyOutput:
        state = obs.state
        stopped = self._update_stops(state)
        g_lead, v_lead = route_obstacles(state)
        g_stop = stop_line_gap(state, stopped, self.p.b_comf)
        g_end = state.static.route_len - state.route_s - 0.5 * state.static.scenario.agents.length[:, 0]
        g_stop = torch.minimum(g_stop, g_end.clamp_min(0.0) + 1.0)
        v0 = desired_speed(state)
        return idm_plan_along_route(state, v0, g_lead, v_lead, g_stop, self.params)
