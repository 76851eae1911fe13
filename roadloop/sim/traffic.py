"""Traffic models for the non-ego agents, batched over B scenarios x A agents.

Each agent follows the model in ``SimState.model``:

* ``LOG``: replays its logged track (appears and disappears with the log's validity mask);
* ``CONST_VEL``: keeps the heading and speed it had when it appeared;
* ``IDM``: Intelligent Driver Model car following along its path (``Agents.path_xy``).  The
  leader is the nearest present agent (the ego included) ahead whose box lies in the agent's
  path corridor, so IDM agents react to the ego, to each other, to pedestrians and to static
  objects.  Stop points on the path (stop lines) act as a standing obstacle while their light
  is red (or yellow and there is room to stop), and stop signs until the agent has halted.
  Pedestrians use the same model with pedestrian parameters: they walk their path (across
  crosswalks) and wait for vehicles in their way.  An agent that reaches its path end leaves.
* ``STATIC``: never moves.

All agents are computed together with dense (B, A, A) pair tensors (no per-agent loops).
"""

from __future__ import annotations

import torch

from roadloop.sim.datatypes import LightState, SimState, TrafficModel
from roadloop.sim.state import path_lookup

_INF = 1e9


def idm_acceleration(v: torch.Tensor, v0: torch.Tensor, gap: torch.Tensor, v_lead: torch.Tensor,
                     params: torch.Tensor) -> torch.Tensor:
    """IDM acceleration (m/s^2).

    v, v0, gap (m), v_lead: (...); params (..., 6): a_max, b_comf, b_max, s0, T, lookahead.
    ``gap`` >= 1e8 means no leader (free road).
    """
    a, b, bmax, s0, T = params[..., 0], params[..., 1], params[..., 2], params[..., 3], params[..., 4]
    s_star = s0 + torch.clamp(v * T + v * (v - v_lead) / (2.0 * torch.sqrt(a * b)), min=0.0)
    free = 1.0 - (v / v0.clamp_min(0.1)) ** 4
    inter = (s_star / gap.clamp_min(0.1)) ** 2
    return torch.clamp(a * (free - inter), min=-bmax, max=a)


def leader_gaps(state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
    """Gap (B, A) m to, and speed (B, A) m/s of, each agent's leader along its path corridor.

    Broad phase on all (i, j) pairs: j is present, ahead of i (0 < forward distance < i's
    lookahead).  Narrow phase on the candidate list only: j's box must reach into i's corridor
    around i's path at j's forward distance (path point looked up in the uniform path table),
    the gap is the forward distance minus both half extents along i's heading.
    """
    st = state.static
    xy, yaw, v = state.xy, state.yaw, state.speed
    B, A = v.shape
    c, s = torch.cos(yaw), torch.sin(yaw)
    x, y = xy[..., 0], xy[..., 1]
    dx = x.unsqueeze(1) - x.unsqueeze(2)  # (B, i, j): x_j - x_i
    dy = y.unsqueeze(1) - y.unsqueeze(2)
    fwd = dx * c.unsqueeze(-1) + dy * s.unsqueeze(-1)
    follower = state.present & (state.model == TrafficModel.IDM)
    cand = (fwd > 0) & (fwd < st.idm[..., 5].unsqueeze(-1)) & follower.unsqueeze(-1) & state.present.unsqueeze(1)
    k = cand.view(-1).nonzero().squeeze(1)  # flat (b, i, j) pair index
    gap = torch.full((B * A,), _INF)
    lead = torch.zeros(B * A, dtype=torch.int64)
    if k.numel():
        bi = torch.div(k, A, rounding_mode="floor")  # flat agent index (b * A + i) of the follower
        bj = bi - torch.remainder(bi, A) + torch.remainder(k, A)  # ... and of the candidate leader j
        f = fwd.view(-1).index_select(0, k)
        # one packed row per agent: x, y, yaw, half length, half width, corridor, s/ds, 1/ds, last
        tab = torch.stack((xy[..., 0], xy[..., 1], yaw, st.half_len, st.half_wid, st.corridor,
                           state.path_s * st.inv_path_ds, st.inv_path_ds, st.path_last), -1).view(B * A, 9)
        ri, rj = tab.index_select(0, bi), tab.index_select(0, bj)
        # i's path point at the forward distance of j (nearest uniform sample)
        u = torch.addcmul(ri[:, 6], f, ri[:, 7])
        u = torch.minimum(u.clamp_min(0.0), ri[:, 8]).round().long() + bi * st.path_n
        p = st.path_xy_rows.index_select(0, u)
        lx = rj[:, 0] - p[:, 0]
        ly = rj[:, 1] - p[:, 1]
        dyaw = rj[:, 2] - ri[:, 2]
        cd, sd = torch.cos(dyaw).abs_(), torch.sin(dyaw).abs_()
        along = torch.addcmul(rj[:, 3] * cd, rj[:, 4], sd)
        across = torch.addcmul(rj[:, 3] * sd, rj[:, 4], cd).add_(ri[:, 5])
        ok = torch.addcmul(lx * lx, ly, ly) < across * across
        g = torch.where(ok, f - along - ri[:, 3], _INF)
        gap.scatter_reduce_(0, bi, g, reduce="amin")
        # the leader's index: the candidate whose gap equals the minimum
        is_min = ok & (g == gap[bi])
        lead.scatter_reduce_(0, bi[is_min], bj[is_min], reduce="amax", include_self=False)
    gap = gap.view(B, A)
    vl = v.reshape(-1)[lead].view(B, A) * torch.cos(yaw.reshape(-1)[lead].view(B, A) - yaw)
    return gap, torch.where(gap < _INF, vl, v)


def stop_gaps(state: SimState, lights_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gap (B, A) m to the nearest active stop point, and the updated stop-sign memory (B, A, K)."""
    st = state.static
    ag = st.scenario.agents
    stop_s, light = ag.path_stop_s, ag.path_stop_light
    front = state.path_s + 0.5 * ag.length
    g = stop_s - front.unsqueeze(-1)  # (B, A, K)
    ls = lights_now.gather(1, light.clamp_min(0).flatten(1)).view_as(light)
    v = state.speed.unsqueeze(-1)
    b = st.idm[..., 1].unsqueeze(-1)
    red = (ls == LightState.RED) | ((ls == LightState.YELLOW) & (g > v * v / (2 * b)))
    is_sign = (light < 0) & torch.isfinite(stop_s)
    red = torch.where(light >= 0, red, is_sign & ~state.stop_done)
    active = red & (g > -0.5)
    gap = torch.where(active, g, torch.full_like(g, _INF)).amin(-1)
    done = state.stop_done | (is_sign & (g.abs() < 3.0) & (v < 0.3))
    return gap, done


def traffic_step(state: SimState, dt: float) -> dict[str, torch.Tensor]:
    """Advance every non-ego agent by one step.  Returns new xy, yaw, speed, present, path_s, stop_done."""
    st = state.static
    ag = st.scenario.agents
    t = int(state.t)
    T = st.log_len_steps
    model = state.model

    # --- IDM along paths -------------------------------------------------------------------
    lights_now = st.scenario.light_states[:, :, min(t, T - 1)]
    g_lead, v_lead = leader_gaps(state)
    g_stop, stop_done = stop_gaps(state, lights_now)
    use_stop = g_stop < g_lead
    gap = torch.where(use_stop, g_stop, g_lead)
    vl = torch.where(use_stop, torch.zeros_like(v_lead), v_lead)
    acc = idm_acceleration(state.speed, ag.desired_speed, gap, vl, st.idm)
    v_new = torch.clamp(state.speed + acc * dt, min=0.0)
    s_new = state.path_s + 0.5 * (state.speed + v_new) * dt
    p = path_lookup(st.path_table, st.path_ds, st.path_len, s_new.unsqueeze(-1)).squeeze(-2)
    idm_present = state.present & (s_new < st.path_len - 0.05)

    # --- log replay ------------------------------------------------------------------------
    tn = t + 1
    if tn < T:
        log_xy, log_yaw, log_v, log_ok = ag.xy[:, :, tn], ag.yaw[:, :, tn], ag.speed[:, :, tn], ag.valid[:, :, tn]
    else:
        log_xy, log_yaw, log_v = state.xy, state.yaw, state.speed
        log_ok = torch.zeros_like(state.present)

    # --- constant velocity -----------------------------------------------------------------
    cv_xy = state.xy + (state.speed * dt).unsqueeze(-1) * torch.stack((torch.cos(state.yaw), torch.sin(state.yaw)), -1)

    is_idm = (model == TrafficModel.IDM).unsqueeze(-1)
    is_log = (model == TrafficModel.LOG).unsqueeze(-1)
    is_cv = (model == TrafficModel.CONST_VEL).unsqueeze(-1)
    xy = torch.where(is_idm, p[..., :2], torch.where(is_log, log_xy, torch.where(is_cv, cv_xy, state.xy)))
    m1 = is_idm.squeeze(-1)
    ml = is_log.squeeze(-1)
    yaw = torch.where(m1, p[..., 2], torch.where(ml, log_yaw, state.yaw))
    still = torch.where(is_cv.squeeze(-1), state.speed, torch.zeros_like(state.speed))
    speed = torch.where(m1, v_new, torch.where(ml, log_v, still))
    present = torch.where(m1, idm_present, torch.where(ml, log_ok, state.present))
    path_s = torch.where(m1, s_new, state.path_s)

    # --- agents that appear in the log now (IDM / constant velocity keep their own model) ---
    spawn = (~state.present) & (st.first_step == tn) & ~ml & (tn < T)
    if bool(spawn.any()):
        xy = torch.where(spawn.unsqueeze(-1), log_xy, xy)
        yaw = torch.where(spawn, log_yaw, yaw)
        speed = torch.where(spawn, log_v, speed)
        present = present | spawn
        path_s = torch.where(spawn, st.spawn_s, path_s)
    return {"xy": xy, "yaw": yaw, "speed": speed, "present": present, "path_s": path_s, "stop_done": stop_done}
