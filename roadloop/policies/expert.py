"""``expert``: a privileged planner in the spirit of PDM-Closed (nuPlan 2023 winner).

At every decision, for a batch of B scenes:

1. **Forecast** the other agents 4 s ahead with the simulator's own traffic step: IDM agents
   follow their paths (reacting to each other and to a constant-velocity ego), log-replay
   agents are extrapolated at constant velocity (the expert does not peek at the future log).
2. **Proposals** (P per scene, all batched): IDM along the route centreline for target speeds
   {0, 0.25, 0.5, 0.75, 1.0} x the desired speed and lateral offsets {0, -1, +1} m (nudges),
   plus "yield" variants that stop before the next junction entry or crosswalk (unprotected
   turns, pedestrians).  The route itself encodes required lane changes (blocked lanes,
   merges); obstacles in each proposal's corridor are its IDM leaders.
3. **Score** each proposal's first 4 s against the forecast with the simulator's geometry:
   at-fault collision and off-road are multipliers (0), then a weighted sum of progress, a
   safety buffer (no contact with a 1 m longer, 0.4 m wider ego box), comfort and a small
   preference for the nominal proposal (full speed, no offset) and no offset.
4. **Emergency brake**: if every proposal collides within 2 s, brake as hard as allowed.

**Driving like the log.**  When the scenario has a recorded ego log (real-world / SUMO
scenarios, and procedural scenarios once recorded) and the ego is within ``LOG_JOIN`` m of its
logged position, one more proposal follows the logged trajectory (offsets to it fade out over
``LOG_BLEND`` steps).  It is taken whenever it is safe: no at-fault contact within the horizon
and no off-road.  Its check uses the forecast above, except for the agents that are where their
own log has them now (and are not IDM-driven): those are expected to keep following their logs,
since the recording is one consistent, collision-free world.  The log plan comes with its
controls (``unicycle_controls_from_poses``), so it is executed exactly rather than through the
pure-pursuit tracker; every other row of the batch gets the controls the tracker would give.
Raw procedural scenarios (log only at step 0) never offer it, so their recordings are
unchanged.  The AlpaSim score rewards it: its window closes 4 m from the logged path.

It sees ground truth (that is what privileged means).  The chosen plan is returned together
with a short reasoning string naming the deciding factor.
"""

from __future__ import annotations

import torch

from roadloop.policies.base import PLAN_STEPS, Observation, Policy, PolicyOutput
from roadloop.policies.route_idm import (
    desired_speed,
    idm_plan_along_route,
    route_obstacles,
    route_points,
    stop_line_gap,
    update_stop_memory,
)
from roadloop.sim import collision, dynamics
from roadloop.sim.config import IDMParams, SimConfig
from roadloop.sim.datatypes import AgentType, SimState, TrafficModel
from roadloop.sim.geometry import box_corners
from roadloop.sim.state import _project_on_route
from roadloop.sim.step import step

_INF = 1e9
SPEED_FRACS = (0.0, 0.25, 0.5, 0.75, 1.0)
OFFSETS = (0.0, -1.0, 1.0)
HORIZON = 40  # steps (4 s) scored per proposal
FORECAST_EVERY = 5  # decisions between fresh forecasts (re-anchored to current positions between)
LOG_JOIN = 2.0  # m, the log proposal is offered while the ego is this close to its logged position
LOG_BLEND = 20  # steps over which the offset between the ego and its log fades out of the log plan
LOG_CONSISTENT = 0.5  # m, an agent this close to its own logged position is taken to follow its log


class Expert(Policy):
    """Privileged PDM-Closed-style planner (see module docstring)."""

    name = "expert"
    version = "1"
    seed_independent = True  # no sampling: seeds do not change a rollout

    def __init__(self, params: IDMParams | None = None, horizon: int = HORIZON):
        p = params or IDMParams(T=1.5, s0=2.5, a_max=1.5, b_comf=3.0)
        self.p = p
        self.params = torch.tensor([p.a_max, p.b_comf, p.b_max, p.s0, p.T, p.lookahead])
        self.horizon = horizon
        self.fc_cfg = SimConfig(check_collision=False, check_offroad=False, check_ttc=False)
        # proposal table: (speed fraction, offset, yield)
        props = [(f, o, False) for o in OFFSETS for f in SPEED_FRACS]
        props += [(f, 0.0, True) for f in SPEED_FRACS[1:]]
        self.frac = torch.tensor([x[0] for x in props])
        self.offset = torch.tensor([x[1] for x in props])
        self.yield_ = torch.tensor([x[2] for x in props])
        self.nominal = props.index((1.0, 0.0, False))
        self._stopped: torch.Tensor | None = None
        self._yield_pts: tuple | None = None  # (static state, yield points, junction mask): _yield_points

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        self._stopped = torch.zeros_like(state.static.scenario.route.stop_s, dtype=torch.bool)
        self._fc = None
        self._log_s = None
        self._yield_pts = None

    # --- the logged ego trajectory ----------------------------------------------------------
    def _log_route_s(self, state: SimState) -> torch.Tensor:
        """Arc length (B, T) m along the route of each logged ego position (cached per rollout)."""
        sc = state.static.scenario
        if self._log_s is None or self._log_s.shape[0] != state.batch_size:
            a, r = sc.agents, sc.route
            B, T = a.valid.shape[0], a.num_steps
            xy = a.xy[:, 0].reshape(B * T, 2)
            rep = lambda x: x.repeat_interleave(T, 0)
            s = _project_on_route(xy, rep(r.xy), rep(r.valid)).view(B, T)
            self._log_s = torch.cummax(s, -1).values
        return self._log_s

    def log_plan(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The proposal that follows the logged ego trajectory from now on.

        Returns xy (B, 64, 2) m, yaw (B, 64) rad, speed (B, 64) m/s and ``ok`` (B,): the log is
        valid from now to its end (or for the whole plan) and the ego is within ``LOG_JOIN`` m of it.
        Beyond the log's end the plan continues along the route at the last logged speed; the
        ego's current offset to its log fades out over ``LOG_BLEND`` steps.
        """
        st = state.static
        a = st.scenario.agents
        T = a.num_steps
        t = min(int(state.t), T - 1)
        B = state.batch_size
        k = torch.arange(1, PLAN_STEPS + 1)
        idx = (t + k).clamp_max(T - 1)
        inlog = (t + k) <= T - 1  # (64,)
        lxy, lyaw, lsp, lval = a.xy[:, 0, idx], a.yaw[:, 0, idx], a.speed[:, 0, idx], a.valid[:, 0, idx]
        ok = a.valid[:, 0, t:].all(-1) & (T - 1 - t >= 1)
        err = state.xy[:, 0] - a.xy[:, 0, t]
        ok &= torch.linalg.vector_norm(err, dim=-1) < LOG_JOIN
        if not bool(inlog.all()):  # continue along the route at the last logged speed
            s_end = self._log_route_s(state)[:, T - 1]
            v_end = a.speed[:, 0, T - 1]
            extra = (t + k - (T - 1)).clamp_min(0).to(v_end.dtype) * 0.1
            rxy, ryaw = route_points(st.scenario.route.xy, st.route_ds, st.route_len,
                                     s_end.unsqueeze(-1) + v_end.unsqueeze(-1) * extra)
            # shift so the continuation starts exactly at the last logged position
            r0, _ = route_points(st.scenario.route.xy, st.route_ds, st.route_len, s_end.unsqueeze(-1))
            rxy = rxy + (a.xy[:, 0, T - 1] - r0[:, 0]).unsqueeze(1)
            lxy = torch.where(inlog.view(1, -1, 1), lxy, rxy)
            lyaw = torch.where(inlog.view(1, -1), lyaw, ryaw)
            lsp = torch.where(inlog.view(1, -1), lsp, v_end.unsqueeze(-1).expand(B, PLAN_STEPS))
        u = (k.to(err.dtype) / LOG_BLEND).clamp_max(1.0)
        w = 1.0 - u * u * (3.0 - 2.0 * u)  # smoothstep fade of the current offset
        xy = lxy + w.view(1, -1, 1) * err.unsqueeze(1)
        ok &= (lval | ~inlog.view(1, -1)).all(-1)
        return xy, lyaw, lsp, ok

    def _log_forecast(self, state: SimState, fxy, fyaw, fpres):
        """The forecast used to check the log proposal: agents that are where their own log has
        them now (within ``LOG_CONSISTENT`` m) and are not IDM-driven follow their logs.  Steps
        after the scenario's last logged step are not checked (the rollout ends there)."""
        a = state.static.scenario.agents
        T = a.num_steps
        t = min(int(state.t), T - 1)
        H = fxy.shape[1]
        k = torch.arange(1, H + 1)
        idx = (t + k).clamp_max(T - 1)
        inlog = ((t + k) <= T - 1).view(1, H, 1)
        d = torch.linalg.vector_norm(state.xy - a.xy[:, :, t], dim=-1)
        cons = (state.present & a.valid[:, :, t] & (d < LOG_CONSISTENT) & (state.model != TrafficModel.IDM))
        cons = cons.unsqueeze(1) & inlog  # (B, H, A)
        lxy = a.xy[:, :, idx].transpose(1, 2)  # (B, H, A, 2)
        lyaw = a.yaw[:, :, idx].transpose(1, 2)
        lval = a.valid[:, :, idx].transpose(1, 2)
        # the scenario ends with its log: what would happen after it is not checked
        pres = torch.where(cons, lval, fpres) & inlog
        return torch.where(cons.unsqueeze(-1), lxy, fxy), torch.where(cons, lyaw, fyaw), pres

    def _tracking_controls(self, state: SimState, xy: torch.Tensor, speed: torch.Tensor,
                           rows: torch.Tensor) -> torch.Tensor:
        """Controls (R, 64, 2) the rollout's plan tracker would apply, step after step, to follow
        ``xy``/``speed`` (B, 64, ...) in the batch ``rows`` (R,) (the ego's motion is
        deterministic, so this reproduces what the rollout would do with the plan alone)."""
        sim = self.fc_cfg
        bounds = dynamics.ActionBounds(accel_min=sim.accel_min, accel_max=sim.accel_max,
                                       curvature_max=sim.curvature_max)
        xy, speed = xy[rows], speed[rows]
        p, th, v = state.xy[rows, 0], state.yaw[rows, 0], state.speed[rows, 0]
        out = []
        for j in range(PLAN_STEPS):
            pxy, psp = xy[:, j:], speed[:, j:]
            if pxy.shape[1] < 2:
                pxy, psp = torch.cat((pxy, pxy), 1), torch.cat((psp, psp), 1)
            c = dynamics.track_plan(p, th, v, pxy, psp, dt=sim.dt, bounds=bounds, speed_time=sim.dt)
            out.append(c)
            p, th, v = dynamics.unicycle_forward(p, th, v, c[:, 0], c[:, 1], sim.dt, bounds)
        return torch.stack(out, 1)

    def executed_controls(self, state: SimState, out: PolicyOutput) -> torch.Tensor:
        """(B, 64, 2) controls (accel m/s^2, curvature 1/m) the ego would execute following ``out``, this
        expert's output for ``state``: its own controls where it gives them (the log plan), otherwise the
        plan tracker's.  The plans run along the route centreline, so from an ego off that line their
        first waypoints are not reachable: these controls are what the expert would actually drive."""
        if out.controls is not None:
            return out.controls
        if out.plan_speed is None:
            raise ValueError("Expert.executed_controls: the output has no plan_speed (not this expert's output)")
        return self._tracking_controls(state, out.plan_xy, out.plan_speed, torch.arange(state.batch_size))

    # --- helpers ------------------------------------------------------------------------
    def _update_stops(self, state: SimState) -> torch.Tensor:
        self._stopped = update_stop_memory(self._stopped, state)
        return self._stopped

    def cached_forecast(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forecast for the next ``horizon`` steps, recomputed every ``FORECAST_EVERY`` steps.

        In between, the stored forecast is shifted in time and translated so that each agent's
        first forecast position is its current position (presence from the current state).
        """
        t = int(state.t)
        fc = getattr(self, "_fc", None)
        if fc is None or fc[0].shape[0] != state.batch_size or not (0 <= t - fc[3] < FORECAST_EVERY):
            xy, yaw, pres = self.forecast(state, self.horizon + FORECAST_EVERY)
            self._fc = fc = (xy, yaw, pres, t, state.xy)
        xy, yaw, pres, t0, xy0 = fc
        k = t - t0
        H = self.horizon
        if k == 0:
            return xy[:, :H], yaw[:, :H], pres[:, :H]
        ref = xy[:, k - 1]  # forecast of the current positions
        shift = torch.where(state.present.unsqueeze(-1), state.xy - ref, torch.zeros_like(ref))
        return xy[:, k:k + H] + shift.unsqueeze(1), yaw[:, k:k + H], pres[:, k:k + H] & state.present.unsqueeze(1)

    def forecast(self, state: SimState, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Other agents over ``steps``: xy (B, H, A, 2), yaw (B, H, A), present (B, H, A)."""
        model = torch.where(state.model == TrafficModel.LOG, torch.full_like(state.model, TrafficModel.CONST_VEL),
                            state.model)
        s = state.replace(model=model, t=state.t.clone())
        B = state.batch_size
        zero = torch.zeros(B, 2)
        xs, ys, ps = [], [], []
        for _ in range(steps or self.horizon):
            s = step(s, zero, self.fc_cfg)
            xs.append(s.xy)
            ys.append(s.yaw)
            ps.append(s.present)
        return torch.stack(xs, 1), torch.stack(ys, 1), torch.stack(ps, 1)

    def _yield_points(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        """Route points (B, M) bool where the ego must yield (a junction entry or a crosswalk) and the
        junction mask (B, M): static per rollout, so computed once for each ``state.static``."""
        st = state.static
        if self._yield_pts is not None and self._yield_pts[0] is st:
            return self._yield_pts[1], self._yield_pts[2]
        sc = st.scenario
        route = sc.route
        junc = sc.map.lane_is_junction.gather(1, route.lane_of_point.clamp_min(0)) & route.valid
        pts = junc & ~torch.cat((junc[:, :1], junc[:, :-1]), 1)  # junction entries
        # crosswalks: route points inside any crosswalk quad (axis test against its edges)
        cw = sc.map.crosswalk_xy  # (B, C, 4, 2)
        if cw.shape[1] > 0:
            e = torch.roll(cw, -1, dims=2) - cw  # (B, C, 4, 2)
            rel = route.xy.unsqueeze(1).unsqueeze(3) - cw.unsqueeze(2)  # (B, C, M, 4, 2)
            cross = e.unsqueeze(2)[..., 0] * rel[..., 1] - e.unsqueeze(2)[..., 1] * rel[..., 0]
            inside = ((cross >= 0).all(-1) | (cross <= 0).all(-1)) & sc.map.crosswalk_valid.unsqueeze(-1)
            pts = pts | (inside.any(1) & route.valid)
        self._yield_pts = (st, pts, junc)
        return pts, junc

    def _junction_gap(self, state: SimState) -> torch.Tensor:
        """Gap (B,) m from the ego front to the next junction entry or crosswalk on the route."""
        st = state.static
        M = st.scenario.route.xy.shape[1]
        ds = st.route_ds
        pts, junc = self._yield_points(state)
        s_pts = torch.arange(M).unsqueeze(0) * ds.unsqueeze(-1)
        front = state.route_s + 0.5 * st.scenario.agents.length[:, 0]
        ahead = s_pts > front.unsqueeze(-1) + 0.5
        in_junction = junc.gather(1, (state.route_s / ds).round().long().clamp(0, M - 1).unsqueeze(-1)).squeeze(-1)
        g = torch.where(pts & ahead, s_pts - front.unsqueeze(-1), torch.full_like(s_pts, _INF)).amin(-1)
        return torch.where(in_junction, torch.full_like(g, _INF), g)

    # --- act ------------------------------------------------------------------------------
    def act(self, obs: Observation) -> PolicyOutput:
        state = obs.state
        st = state.static
        ag = st.scenario.agents
        B = state.batch_size
        P = self.frac.numel()
        H = self.horizon
        stopped = self._update_stops(state)

        g_stop = stop_line_gap(state, stopped, self.p.b_comf)
        g_end = st.route_len - state.route_s - 0.5 * ag.length[:, 0]
        g_stop = torch.minimum(g_stop, g_end.clamp_min(0.0) + 1.0)
        g_yield = self._junction_gap(state)
        v_des = desired_speed(state)

        gl, vl = [], []
        for o in OFFSETS:
            g, v = route_obstacles(state, lateral_offset=o)
            gl.append(g)
            vl.append(v)
        gl, vl = torch.stack(gl, -1), torch.stack(vl, -1)  # (B, 3)
        oi = torch.tensor([OFFSETS.index(float(o)) for o in self.offset])
        g_lead, v_lead = gl[:, oi], vl[:, oi]  # (B, P)
        stop_p = torch.where(self.yield_.unsqueeze(0), torch.minimum(g_stop.unsqueeze(-1), g_yield.unsqueeze(-1)),
                             g_stop.unsqueeze(-1).expand(B, P))
        v0 = (v_des.unsqueeze(-1) * self.frac).clamp_min(0.05)
        plans = idm_plan_along_route(state, v0, g_lead, v_lead, stop_p, self.params,
                                     offset=self.offset.unsqueeze(0).expand(B, P))
        pxy, pyaw, psp = plans.plan_xy, plans.plan_yaw, plans.plan_speed  # (B, P, 64, ...)

        fxy, fyaw, fpres = self.cached_forecast(state)  # (B, H, A, ...)
        hit_t, buf_hit, off = self._evaluate(state, pxy[:, :, :H], pyaw[:, :, :H], fxy, fyaw, fpres)

        prog = plans.plan_speed[:, :, :H].sum(-1) * 0.1
        prog_n = prog / prog.amax(-1, keepdim=True).clamp_min(1e-3)
        acc = torch.diff(psp[:, :, :H], dim=-1, prepend=state.speed[:, :1, None].expand(B, P, 1)) / 0.1
        comfort = ((acc > -4.05) & (acc < 2.4)).all(-1).float()
        safe = (hit_t >= _INF) & ~off
        score = safe.float() * (5 * prog_n + 5 * (~buf_hit).float() + 2 * comfort
                                - 0.5 * self.offset.abs() - 0.3 * self.yield_.float()) / 12.0
        score[:, self.nominal] += 0.05 * safe[:, self.nominal].float()
        best = score.argmax(-1)
        # emergency: nothing is safe and a collision is < 2 s away -> hardest braking
        any_safe = safe.any(-1)
        soon = hit_t.amin(-1) < 20
        best = torch.where(any_safe, best, hit_t.argmax(-1))
        emergency = ~any_safe & soon
        idx = best.view(B, 1, 1, 1)
        out_xy = pxy.gather(1, idx.expand(B, 1, PLAN_STEPS, 2)).squeeze(1)
        out_yaw = pyaw.gather(1, idx[..., 0].expand(B, 1, PLAN_STEPS)).squeeze(1)
        out_sp = psp.gather(1, idx[..., 0].expand(B, 1, PLAN_STEPS)).squeeze(1)
        if bool(emergency.any()):
            bxy, byaw, bsp = self._brake_plan(state)
            e = emergency.view(B, 1)
            out_xy = torch.where(e.unsqueeze(-1), bxy, out_xy)
            out_yaw = torch.where(e, byaw, out_yaw)
            out_sp = torch.where(e, bsp, out_sp)
        controls = None
        lxy, lyaw, lsp, lok = self.log_plan(state)
        if bool(lok.any()):  # drive like the log where that is safe
            gxy, gyaw, gpres = self._log_forecast(state, fxy, fyaw, fpres)
            l_hit, _, l_off = self._evaluate(state, lxy[:, None, :H], lyaw[:, None, :H], gxy, gyaw, gpres,
                                             offroad_of=torch.ones(1, dtype=torch.bool))
            use = lok & (l_hit[:, 0] >= _INF) & ~l_off[:, 0]
            if bool(use.any()):
                u = use.view(B, 1)
                pose_xy = torch.cat((state.xy[:, :1], lxy), 1)
                pose_yaw = torch.cat((state.yaw[:, :1], lyaw), 1)
                controls = dynamics.unicycle_controls_from_poses(pose_xy, pose_yaw, state.speed[:, 0])
                rest = (~use).nonzero().flatten()
                if rest.numel():
                    controls[rest] = self._tracking_controls(state, out_xy, out_sp, rest)
                out_xy = torch.where(u.unsqueeze(-1), lxy, out_xy)
                out_yaw = torch.where(u, lyaw, out_yaw)
                out_sp = torch.where(u, lsp, out_sp)
                # explain the log rows by the scene's factors, as for the nominal proposal
                best = torch.where(use, torch.full_like(best, self.nominal), best)
                emergency = emergency & ~use
        text = self._explain(best, emergency, g_lead, g_stop, g_yield, v_des, state)
        return PolicyOutput(plan_xy=out_xy, plan_yaw=out_yaw, plan_speed=out_sp, controls=controls, reasoning=text)

    def _brake_plan(self, state: SimState):
        st = state.static
        v = state.speed[:, 0]
        t = torch.arange(1, PLAN_STEPS + 1, dtype=v.dtype) * 0.1
        b = self.p.b_max
        vs = (v.unsqueeze(-1) - b * t).clamp_min(0.0)
        t_stop = (v / b).unsqueeze(-1)
        dist = torch.where(t < t_stop, v.unsqueeze(-1) * t - 0.5 * b * t * t, (v * v / (2 * b)).unsqueeze(-1))
        s = state.route_s.unsqueeze(-1) + dist
        xy, yaw = route_points(st.scenario.route.xy, st.route_ds, st.route_len, s)
        return xy, yaw, vs

    def _evaluate(self, state, pxy, pyaw, fxy, fyaw, fpres, offroad_of: torch.Tensor | None = None):
        """First at-fault hit step (B, P) (INF if none), buffer contact (B, P), off-road (B, P).

        ``offroad_of`` (P,) bool: the proposals checked for off-road (default: the offset ones;
        centreline proposals follow the route)."""
        st = state.static
        ag = st.scenario.agents
        B, P, H, _ = pxy.shape
        A = fxy.shape[2]
        L, W = ag.length, ag.width
        # broad phase on all (B, P, H, A): squared centre distances, x and y apart (no (..., 2) temporaries;
        # dx dx + dy dy is the bits of the sum over the last axis of d * d)
        dx = pxy[..., 0].unsqueeze(3) - fxy[..., 0].unsqueeze(1)  # (B, P, H, A)
        dy = pxy[..., 1].unsqueeze(3) - fxy[..., 1].unsqueeze(1)
        d2 = dx.mul_(dx).add_(dy.mul_(dy))
        r = 0.5 * torch.sqrt(L * L + W * W)  # (B, A)
        reach = (r[:, :1] + 0.6 + r).view(B, 1, 1, A)
        pres = fpres.unsqueeze(1).clone()  # (B, 1, H, A)
        pres[..., 0] = False
        cand = (d2 < reach * reach) & pres
        hit = torch.zeros(B, P, H, A, dtype=torch.bool)
        buf = torch.zeros(B, P, H, A, dtype=torch.bool)
        k = cand.nonzero()
        if k.numel():
            b, p, h, a = k.unbind(-1)
            exy, eyaw = pxy[b, p, h], pyaw[b, p, h]
            oxy, oyaw = fxy[b, h, a], fyaw[b, h, a]
            ce = box_corners(exy, eyaw, L[b, 0], W[b, 0])
            co = box_corners(oxy, oyaw, L[b, a], W[b, a])
            ov = collision.boxes_overlap(ce, co)
            # rear-ended contacts are not the ego's fault (other agent behind the ego)
            rel = oxy - exy
            x = rel[:, 0] * torch.cos(eyaw) + rel[:, 1] * torch.sin(eyaw)
            y = -rel[:, 0] * torch.sin(eyaw) + rel[:, 1] * torch.cos(eyaw)
            rear = (x < -0.5 * L[b, 0]) & (y.abs() <= -x) & (ag.kind[b, a] != int(AgentType.STATIC))
            hit[b, p, h, a] = ov & ~rear
            fwd = exy + 0.5 * torch.stack((torch.cos(eyaw), torch.sin(eyaw)), -1)
            cb = box_corners(fwd, eyaw, L[b, 0] + 1.0, W[b, 0] + 0.4)
            buf[b, p, h, a] = collision.boxes_overlap(cb, co) & ~rear
        steps = torch.arange(H).view(1, 1, H)
        any_hit = hit.any(-1)
        hit_t = torch.where(any_hit, steps, torch.full_like(steps, int(_INF))).amin(-1).float()
        hit_t = torch.where(hit_t >= H, torch.full_like(hit_t, _INF), hit_t)
        off = torch.zeros(B, P, dtype=torch.bool)
        shifted = ((self.offset != 0) if offroad_of is None else offroad_of).nonzero().flatten()
        if st.lane_index is not None and shifted.numel():
            from roadloop.sim import spatial

            sub = slice(3, H, 4)
            qx, qy = pxy[:, shifted, sub], pyaw[:, shifted, sub]
            cxy = box_corners(qx, qy, L[:, 0].view(B, 1, 1), W[:, 0].view(B, 1, 1))
            Ps, Hs = cxy.shape[1], cxy.shape[2]
            on = spatial.on_road(cxy.reshape(B, -1, 2), st.lane_index)
            off[:, shifted] = ~on.view(B, Ps, Hs * 4).all(-1)
        return hit_t, buf.any(-1).any(-1), off

    def _explain(self, best, emergency, g_lead, g_stop, g_yield, v_des, state) -> list[str]:
        out = []
        for b in range(best.shape[0]):
            p = int(best[b])
            f, o, y = float(self.frac[p]), float(self.offset[p]), bool(self.yield_[p])
            if bool(emergency[b]):
                out.append("A collision is imminent, so brake hard.")
            elif y:
                out.append("Cross traffic or pedestrians may enter the path ahead, so yield before the conflict area.")
            elif o != 0.0:
                side = "left" if o > 0 else "right"
                out.append(f"An obstacle narrows the lane, so nudge {side} and pass it.")
            elif float(g_stop[b]) < 30.0 and float(g_stop[b]) <= float(g_lead[b, p]):
                out.append("The light ahead requires stopping at the stop line, so slow down and stop.")
            elif float(g_lead[b, p]) < 40.0:
                out.append("A vehicle ahead is close in the lane, so keep a safe gap and follow it.")
            elif f < 1.0:
                out.append("Other traffic may conflict with the path, so slow down.")
            else:
                out.append("The lane ahead is clear, so keep lane and continue at the speed limit.")
        return out
