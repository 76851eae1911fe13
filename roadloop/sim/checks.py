"""Per-step checks on the ego, batched: collision (at-fault or not), off-road, wrong way,
red light, speeding, progress, distance to the log and time-to-collision.

``compute_checks(prev, state, cfg)`` looks at the transition prev -> state.  Checks that are
turned off in ``SimConfig`` return "no event" (False / 0 / inf).  See docs/metrics.md.
"""

from __future__ import annotations

import torch

from roadloop.sim import collision, spatial
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import LightState, SimState, StepChecks


def compute_checks(prev: SimState, state: SimState, cfg: SimConfig) -> StepChecks:
    st = state.static
    sc = st.scenario
    ag = sc.agents
    B, A = state.present.shape
    exy, eyaw, ev = state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0]
    elen, ewid = ag.length[:, 0], ag.width[:, 0]
    false = torch.zeros(B, dtype=torch.bool)

    if cfg.check_collision:
        contacts = collision.pairwise_contacts(state.xy, state.yaw, ag.length, ag.width, state.present)
        ego = collision.ego_collision(state.xy, state.yaw, ag.length, ag.width, state.present, ag.kind, ev)
        coll, fault, who, kind = ego.collision, ego.at_fault, ego.agent, ego.kind
        n_pairs = contacts[:, 1:, 1:].sum((-1, -2)) // 2
    else:
        coll, fault = false, false
        who = kind = torch.full((B,), -1, dtype=torch.int64)
        n_pairs = torch.zeros(B, dtype=torch.int64)

    if cfg.check_offroad:
        mc = spatial.ego_map_check(exy, eyaw, elen, ewid, st.lane_index)
        off, wrong = mc.offroad, mc.wrong_way
    else:
        off, wrong = false, false

    # red light: the ego's front crossed a stop line of its route during this step on red
    route = sc.route
    half = 0.5 * elen
    f0, f1 = prev.route_s + half, state.route_s + half
    crossed = (route.stop_s > f0.unsqueeze(-1)) & (route.stop_s <= f1.unsqueeze(-1))
    t = min(int(prev.t), st.log_len_steps - 1)
    ls = sc.light_states[:, :, t].gather(1, route.stop_light.clamp_min(0))
    red = (crossed & (route.stop_light >= 0) & (ls == LightState.RED)).any(-1)

    M = route.xy.shape[1]
    i = (state.route_s / st.route_ds).round().long().clamp(0, M - 1)
    limit = route.speed_limit.gather(1, i.unsqueeze(-1)).squeeze(-1)
    speeding = (ev - limit).clamp_min(0.0)

    tl = min(int(state.t), st.log_len_steps - 1)
    d_log = torch.linalg.vector_norm(exy - ag.xy[:, 0, tl], dim=-1)
    d_log = torch.where(ag.valid[:, 0, tl], d_log, torch.full_like(d_log, float("nan")))

    if cfg.check_ttc:
        ttc = collision.time_to_collision(state.xy, state.yaw, state.speed, ag.length, ag.width, state.present,
                                          horizon=cfg.ttc_horizon, dt=cfg.dt)
    else:
        ttc = torch.full((B,), float("inf"))

    return StepChecks(collision=coll, collision_at_fault=fault, collision_agent=who, collision_kind=kind,
                      offroad=off, wrong_way=wrong, red_light=red, speeding=speeding, progress=state.route_s,
                      dist_to_log=d_log, ttc=ttc, agent_collision=n_pairs)
