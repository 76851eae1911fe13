"""Initial ``SimState`` from a scenario batch, and the static lookups the step reuses.

Everything that does not change during a rollout (uniformly resampled agent paths, their
headings, per-agent IDM parameters, the lane spatial index) is computed once here and shared
by every ``SimState`` of the rollout through ``SimState.static``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roadloop.errors import ScenarioError
from roadloop.sim import spatial
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import AgentType, Scenario, SimState, TrafficModel, _TensorTree
from roadloop.sim.geometry import interp_polyline, point_segment_distance, polyline_arclength


@dataclass(frozen=True, eq=False)
class SimStatic(_TensorTree):
    """Per-rollout constants.  B scenarios, A agents, N path points."""

    scenario: Scenario  # batched scenario
    path_table: torch.Tensor  # (B, A, N, 5) per path point: x, y (m), dx, dy to next point (m), heading (rad)
    path_ds: torch.Tensor  # (B, A) m, uniform spacing of path points
    path_len: torch.Tensor  # (B, A) m, path length (0: no path)
    spawn_s: torch.Tensor  # (B, A) m, path arc length at the agent's first valid log step
    first_step: torch.Tensor  # (B, A) int64 first valid log step (T if never valid)
    idm: torch.Tensor  # (B, A, 6) per-agent IDM a_max, b_comf, b_max, s0, T, lookahead
    path_xy_rows: torch.Tensor  # (B * A * N, 2) m, path points as rows (one lookup per point)
    path_n: int  # N, points per path row
    path_last: torch.Tensor  # (B, A) index of the last valid path point (float)
    inv_path_ds: torch.Tensor  # (B, A) 1/m
    half_len: torch.Tensor  # (B, A) m
    half_wid: torch.Tensor  # (B, A) m
    corridor: torch.Tensor  # (B, A) m, half width + lateral margin of the agent's corridor
    lane_index: object | None  # spatial.LaneIndex (None when off-road checks are off)
    route_len: torch.Tensor  # (B,) m, valid route length
    route_ds: torch.Tensor  # (B,) m, spacing of the route points (<= 1 m)
    log_len_steps: int  # T


def _uniform_paths(xy: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample paths (B, A, N, 2) to uniform spacing over their valid part."""
    n = valid.sum(-1)  # (B, A)
    s = polyline_arclength(xy, valid)  # invalid points repeat last s
    length = s.gather(-1, (n - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1) * (n >= 2)
    N = xy.shape[-2]
    steps = (n - 1).clamp_min(1).to(xy.dtype)
    ds = length / steps
    q = torch.arange(N, dtype=xy.dtype).expand(*n.shape, N) * ds.unsqueeze(-1)
    q = torch.minimum(q, length.unsqueeze(-1))
    # make s strictly usable by searchsorted over the valid part: pad invalid tail with +big
    s_sorted = torch.where(valid, s, s.new_tensor(1e9) + torch.arange(N, dtype=s.dtype))
    out = interp_polyline(xy, s_sorted, q)
    return out, ds, length


def init_state(scenario: Scenario, cfg: SimConfig | None = None, t0: int = 0) -> SimState:
    """Build the state of a scenario batch at log step ``t0`` (agents as logged)."""
    cfg = (cfg or SimConfig()).validate()
    if not scenario.batched:
        raise ScenarioError("init_state expects a batched scenario (use roadloop.sim.batching.collate)")
    a = scenario.agents
    B, A, T = a.valid.shape
    if not 0 <= t0 < T:
        raise ScenarioError(f"t0={t0} outside the scenario's {T} steps")
    if not bool(a.valid[:, 0, t0].all()):
        b = int((~a.valid[:, 0, t0]).nonzero()[0, 0])
        raise ScenarioError(f"scenario '{scenario.ids[b]}': ego has no logged state at step {t0}")

    path, ds, plen = _uniform_paths(a.path_xy, a.path_valid)
    d = torch.cat((path[..., 1:, :] - path[..., :-1, :], torch.zeros_like(path[..., :1, :])), dim=-2)
    head = torch.atan2(d[..., 1], d[..., 0])
    # last point keeps the previous heading
    head = torch.cat((head[..., :-1], head[..., -2:-1]), dim=-1) if path.shape[-2] > 1 else head
    n = a.path_valid.sum(-1)
    last = (n - 1).clamp_min(0)
    idx = torch.arange(path.shape[-2]).expand_as(head)
    head = torch.where(idx >= last.unsqueeze(-1), head.gather(-1, (last - 1).clamp_min(0).unsqueeze(-1)), head)
    table = torch.cat((path, d, head.unsqueeze(-1)), dim=-1)

    first = torch.where(a.valid.any(-1), a.valid.to(torch.int8).argmax(-1), torch.full((B, A), T))
    fxy = a.xy.gather(2, first.clamp_max(T - 1).view(B, A, 1, 1).expand(B, A, 1, 2)).squeeze(2)
    spawn_s = _project_on_paths(fxy, path, ds, plen)

    ped = a.kind == AgentType.PEDESTRIAN  # cyclists use the vehicle parameters
    vp, pp = cfg.vehicle_idm, cfg.pedestrian_idm
    pv = torch.tensor([vp.a_max, vp.b_comf, vp.b_max, vp.s0, vp.T, vp.lookahead])
    pq = torch.tensor([pp.a_max, pp.b_comf, pp.b_max, pp.s0, pp.T, pp.lookahead])
    idm = torch.where(ped.unsqueeze(-1), pq, pv)
    margin = torch.where(ped, torch.tensor(pp.lateral_margin), torch.tensor(vp.lateral_margin))

    lane_index = None
    if cfg.check_offroad:
        lane_index = spatial.build_lane_index(scenario.map, cell_size=cfg.lane_index_cell)
    model0 = torch.where(a.kind == AgentType.STATIC, torch.full_like(a.model, TrafficModel.STATIC), a.model)
    static = SimStatic(scenario=scenario, path_table=table, path_ds=ds, path_len=plen, spawn_s=spawn_s,
                       first_step=first, idm=idm, lane_index=lane_index,
                       path_xy_rows=path.contiguous().view(-1, 2),
                       path_n=path.shape[-2], path_last=(n - 1).clamp_min(0).to(path.dtype),
                       inv_path_ds=1.0 / ds.clamp_min(1e-6),
                       half_len=0.5 * a.length, half_wid=0.5 * a.width, corridor=0.5 * a.width + margin,
                       route_len=scenario.route.length,
                       route_ds=scenario.route.length / (scenario.route.valid.sum(-1) - 1).clamp_min(1),
                       log_len_steps=T)

    present = a.valid[:, :, t0]
    xy = a.xy[:, :, t0]
    model = model0
    # agents with a model that needs a path but have none fall back to log replay
    needs_path = model == TrafficModel.IDM
    model = torch.where(needs_path & (plen <= 0), torch.full_like(model, TrafficModel.LOG), model)
    path_s = _project_on_paths(xy, path, ds, plen)
    route_s = _project_on_route(xy[:, 0], scenario.route.xy, scenario.route.valid)
    K = a.path_stop_s.shape[-1]
    zeros = torch.zeros(B, A)
    return SimState(
        t=torch.tensor(t0), xy=xy, yaw=a.yaw[:, :, t0], speed=a.speed[:, :, t0], accel=zeros.clone(),
        yaw_rate=zeros.clone(), present=present, model=model, path_s=path_s,
        stop_done=torch.zeros(B, A, K, dtype=torch.bool), route_s=route_s, route_s_max=route_s.clone(),
        static=static,
    )


def _project_on_paths(xy: torch.Tensor, path: torch.Tensor, ds: torch.Tensor, plen: torch.Tensor) -> torch.Tensor:
    """Arc length (B, A) of the closest point of each agent's path to ``xy`` (B, A, 2).  Init only."""
    if path.shape[-2] < 2:
        return torch.zeros(xy.shape[:-1])
    pa, pb = path[..., :-1, :], path[..., 1:, :]
    dist, t = point_segment_distance(xy.unsqueeze(-2), pa, pb)  # (B, A, N-1)
    i = dist.argmin(-1, keepdim=True)
    s = (i.squeeze(-1).to(xy.dtype) + t.gather(-1, i).squeeze(-1)) * ds
    return torch.minimum(s, plen)


def _project_on_route(xy: torch.Tensor, route_xy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Arc length (B,) of the closest route point to ``xy`` (B, 2) over the whole route.  Init only."""
    pa, pb = route_xy[:, :-1], route_xy[:, 1:]
    dist, t = point_segment_distance(xy.unsqueeze(1), pa, pb)
    dist = torch.where(valid[:, 1:], dist, torch.full_like(dist, float("inf")))
    i = dist.argmin(-1, keepdim=True)
    seg = torch.linalg.vector_norm(pb - pa, dim=-1)
    cum = torch.cat((torch.zeros_like(seg[:, :1]), seg.cumsum(-1)), dim=-1)
    return cum.gather(-1, i).squeeze(-1) + t.gather(-1, i).squeeze(-1) * seg.gather(-1, i).squeeze(-1)


def path_lookup(table: torch.Tensor, ds: torch.Tensor, plen: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Point on uniformly sampled paths at arc length ``s``.

    table (B, A, N, 5), ds/plen (B, A), s (B, A, Q) m  ->  (B, A, Q, 3): x, y (m), heading (rad).
    """
    N = table.shape[-2]
    u = torch.clamp(s, min=0.0) / ds.clamp_min(1e-6).unsqueeze(-1)
    u = torch.minimum(u, (plen / ds.clamp_min(1e-6)).unsqueeze(-1))
    i0 = u.floor().clamp(0, N - 1)
    w = (u - i0).unsqueeze(-1)
    rows = table.gather(2, i0.long().unsqueeze(-1).expand(*i0.shape, 5))
    xy = rows[..., 0:2] + w * rows[..., 2:4]
    return torch.cat((xy, rows[..., 4:5]), dim=-1)


__all__ = ["SimStatic", "init_state", "path_lookup", "interp_polyline"]
