"""Observation side of the VLA policy: BEV raster, ego-history features and route commands.

``render_bev`` draws a (B, frames, C, H, W) bird's-eye raster in the *current* ego frame: the ego
sits ``ego_offset`` of the image above the bottom edge, heading up (row 0 = farthest ahead,
column 0 = farthest left).  All frames share the current ego pose as the reference, so the map
channels are identical across frames and are rendered once (exact, not an approximation); the
past frames show where the agents (including the ego) were, and the light states of that step.

Everything is batched tensor maths: the map channels query the lane spatial index
(``roadloop.sim.spatial``) at the H*W pixel centres of every batch element; boxes, route
segments and stop lines are splatted by testing a small pixel window around each primitive
(B * frames * A windows at once) and ``scatter_reduce(amax)`` into the image.

Measured (2-core CPU, ``torch.set_num_threads(1)``, see ``python -m roadloop.policies.vla.observe --bench``):
B=1: ~5 ms; B=64 (64x64 px, 31 agents, 4 frames): ~320-370 ms per call, ~75% of it in the lane
index query of the 64*4096 pixel centres (``spatial._query``, ~15 candidate segments each).  The
100 ms target is NOT met at B=64; the obvious next step is caching the map channels per decision
step or querying the lane index once per pixel tile.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from roadloop.policies.base import Observation
from roadloop.policies.route_idm import route_window
from roadloop.sim import spatial
from roadloop.sim.datatypes import SimState
from roadloop.sim.geometry import wrap_angle

CHANNELS: list[str] = [
    "drivable",  # 1 inside a lane capsule (half width + tol)
    "lane_cos",  # cos of the nearest lane's heading relative to the ego heading, in [-1, 1]; 0 off road
    "lane_sin",  # sin of the same, in [-1, 1]; 0 off road
    "centreline",  # 1 within 0.3 m of a lane centreline
    "route",  # 1 within 1.0 m of the ego route polyline
    "vehicles",  # 1 inside a vehicle box (the ego included)
    "vru",  # 1 inside a pedestrian or cyclist box
    "static",  # 1 inside a static object box
    "light",  # stop lines of lanes with a light: 1.0 red, 0.5 yellow, 0.25 green, 0 unknown / none
    "crosswalk",  # 1 inside a crosswalk quadrilateral
]
CH = {name: i for i, name in enumerate(CHANNELS)}
_MAP_CH = ("drivable", "lane_cos", "lane_sin", "centreline", "route", "crosswalk")  # same in every frame

COMMANDS: list[str] = [
    "follow the route",
    "turn left at the next intersection",
    "turn right at the next intersection",
    "take the exit",
    "merge onto the main road",
    "keep right",
    "keep left",
]

CENTRELINE_TOL = 0.3  # m (at least half a pixel is used so that lines stay connected)
ROUTE_TOL = 1.0  # m
STOP_LINE_TOL = 0.5  # m, half thickness of a painted stop line
_LIGHT_VALUE = torch.tensor([0.0, 0.25, 0.5, 1.0])  # by LightState: UNKNOWN, GREEN, YELLOW, RED


@dataclass(frozen=True)
class RasterConfig:
    size: int = 64  # pixels per side
    resolution: float = 0.75  # m per pixel
    ego_offset: float = 0.25  # fraction of the image behind the ego (ego row from the bottom)
    frames: int = 4  # current + frames-1 past states at 10 Hz


# ---------------------------------------------------------------------------------------------
# pixel <-> ego-frame geometry

def pixel_centres(cfg: RasterConfig) -> torch.Tensor:
    """Ego-frame coordinates (H*W, 2) m (x forward, y left) of the pixel centres, row-major."""
    n, r = cfg.size, cfg.resolution
    i = torch.arange(n, dtype=torch.float32)
    fwd = (n * (1.0 - cfg.ego_offset) - 0.5 - i) * r  # row i
    left = (n / 2 - 0.5 - i) * r  # column j
    return torch.stack(torch.broadcast_tensors(fwd[:, None], left[None, :]), -1).reshape(-1, 2)


def to_pixel(local: torch.Tensor, cfg: RasterConfig) -> torch.Tensor:
    """Ego-frame points (..., 2) m -> continuous (row, col) (..., 2); integer values are pixel centres."""
    n, r = cfg.size, cfg.resolution
    row = n * (1.0 - cfg.ego_offset) - 0.5 - local[..., 0] / r
    col = n / 2 - 0.5 - local[..., 1] / r
    return torch.stack((row, col), -1)


def _to_ego(xy: torch.Tensor, ego_xy: torch.Tensor, ego_yaw: torch.Tensor) -> torch.Tensor:
    """World points (B, ..., 2) -> frame of the ego pose (B, 2), (B,)."""
    shape = (xy.shape[0],) + (1,) * (xy.dim() - 2)
    c, s = torch.cos(ego_yaw).view(shape), torch.sin(ego_yaw).view(shape)
    d = xy - ego_xy.view(*shape, 2)
    return torch.stack((c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]), -1)


def _window(k: int, centre_rc: torch.Tensor, cfg: RasterConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k x k pixel windows around continuous (row, col) centres (..., 2).

    Returns the window pixels' flat index (..., k*k), in-image mask (..., k*k) and their
    ego-frame centres (..., k*k, 2) m.
    """
    n, r = cfg.size, cfg.resolution
    o = torch.arange(k) - (k - 1) // 2
    rc0 = centre_rc.round().long()
    rows = (rc0[..., 0:1, None] + o[:, None]).expand(*rc0.shape[:-1], k, k).reshape(*rc0.shape[:-1], k * k)
    cols = (rc0[..., 1:2, None] + o[None, :]).expand(*rc0.shape[:-1], k, k).reshape(*rc0.shape[:-1], k * k)
    inside = (rows >= 0) & (rows < n) & (cols >= 0) & (cols < n)
    local = torch.stack(((n * (1.0 - cfg.ego_offset) - 0.5 - rows) * r, (n / 2 - 0.5 - cols) * r), -1)
    return rows.clamp(0, n - 1) * n + cols.clamp(0, n - 1), inside, local.float()


def _splat_segments(img: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, radius: float,
                    value: torch.Tensor, valid: torch.Tensor, cfg: RasterConfig) -> None:
    """Paint pixels within ``radius`` m of segments a-b (..., 2) (ego frame) with ``value`` (...), amax.

    ``img`` is the flat image buffer (N,); ``base`` (...) the offset of each segment's H*W plane.
    """
    if a.numel() == 0:
        return
    seg_len = torch.linalg.vector_norm(b - a, dim=-1)
    span = float(torch.where(valid, seg_len, 0.0).max()) if valid.any() else 0.0
    k = 2 * int(math.ceil((0.5 * span + radius) / cfg.resolution)) + 3
    flat, inside, pts = _window(k, to_pixel(0.5 * (a + b), cfg), cfg)  # (..., K), (..., K, 2)
    ab = (b - a).unsqueeze(-2)
    ap = pts - a.unsqueeze(-2)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)).clamp(0.0, 1.0)
    d2 = ((ap - t.unsqueeze(-1) * ab) ** 2).sum(-1)
    hit = inside & (d2 <= radius * radius) & valid.unsqueeze(-1)
    val = torch.where(hit, value.unsqueeze(-1).expand_as(d2), 0.0)
    img.scatter_reduce_(0, (base.unsqueeze(-1) + flat).reshape(-1), val.reshape(-1), "amax")


def _splat_boxes(img: torch.Tensor, base: torch.Tensor, centre: torch.Tensor, yaw: torch.Tensor,
                 half_len: torch.Tensor, half_wid: torch.Tensor, valid: torch.Tensor, cfg: RasterConfig) -> None:
    """Paint 1 inside oriented boxes (ego frame centre (..., 2), yaw (...), half sizes (...))."""
    if centre.numel() == 0 or not bool(valid.any()):
        return
    diag = torch.where(valid, torch.sqrt(half_len ** 2 + half_wid ** 2), 0.0).max()
    k = 2 * int(math.ceil(float(diag) / cfg.resolution)) + 3
    flat, inside, pts = _window(k, to_pixel(centre, cfg), cfg)
    d = pts - centre.unsqueeze(-2)
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)
    u = c * d[..., 0] + s * d[..., 1]
    v = -s * d[..., 0] + c * d[..., 1]
    hit = inside & (u.abs() <= half_len.unsqueeze(-1)) & (v.abs() <= half_wid.unsqueeze(-1)) & valid.unsqueeze(-1)
    img.scatter_reduce_(0, (base.unsqueeze(-1) + flat).reshape(-1), hit.float().reshape(-1), "amax")


# ---------------------------------------------------------------------------------------------
# channels

def _lane_index(state: SimState) -> spatial.LaneIndex:
    idx = state.static.lane_index
    return idx if idx is not None else spatial.build_lane_index(state.static.scenario.map)


def _map_channels(state: SimState, cfg: RasterConfig) -> dict[str, torch.Tensor]:
    """drivable, lane_cos, lane_sin, centreline, crosswalk at the current ego pose: each (B, H*W)."""
    B = state.batch_size
    pix = pixel_centres(cfg)  # (HW, 2)
    ex, eyaw = state.xy[:, 0], state.yaw[:, 0]
    c, s = torch.cos(eyaw)[:, None], torch.sin(eyaw)[:, None]
    wx = ex[:, None, 0] + c * pix[:, 0] - s * pix[:, 1]
    wy = ex[:, None, 1] + s * pix[:, 0] + c * pix[:, 1]
    world = torch.stack((wx, wy), -1)  # (B, HW, 2)
    index = _lane_index(state)
    res = spatial._query(world, eyaw[:, None].expand(B, pix.shape[0]), index, nearest=True)
    on = res.on.view(B, -1)
    d2 = res.d2.view(B, -1)
    hc = index.seg_pack[6].index_select(0, res.seg).view(B, -1)
    hs = index.seg_pack[7].index_select(0, res.seg).view(B, -1)
    rel_c = hc * c + hs * s  # cos(h - yaw_e)
    rel_s = hs * c - hc * s  # sin(h - yaw_e)
    out = {
        "drivable": on.float(),
        "lane_cos": torch.where(on, rel_c, 0.0),
        "lane_sin": torch.where(on, rel_s, 0.0),
        "centreline": (on & (d2 <= max(CENTRELINE_TOL, 0.5 * cfg.resolution + 1e-3) ** 2)).float(),
    }
    # crosswalks: point in convex quad (either winding), (B, HW, Cw)
    m = state.static.scenario.map
    q = _to_ego(m.crosswalk_xy, ex, eyaw)  # (B, Cw, 4, 2)
    e0, e1 = q, q.roll(-1, dims=-2)
    p = pix.view(1, -1, 1, 1, 2)
    cross = ((e1 - e0)[:, None, ..., 0] * (p[..., 1] - e0[:, None, ..., 1])
             - (e1 - e0)[:, None, ..., 1] * (p[..., 0] - e0[:, None, ..., 0]))  # (B, HW, Cw, 4)
    in_q = ((cross >= 0).all(-1) | (cross <= 0).all(-1)) & m.crosswalk_valid[:, None, :]
    out["crosswalk"] = in_q.any(-1).float()
    return out


def _light_values(state: SimState, t: int) -> torch.Tensor:
    """Value (B, K) of each stop line at log step t (0 for lines without a light)."""
    sc = state.static.scenario
    m = sc.map
    lane = m.stop_line_lane.clamp_min(0)
    light = m.lane_light.gather(1, lane)
    ok = m.stop_line_valid & (m.stop_line_lane >= 0) & (light >= 0)
    if sc.light_states.shape[1] == 0:
        return torch.zeros(ok.shape)
    t = min(max(t, 0), sc.light_states.shape[2] - 1)
    ls = sc.light_states[:, :, t].gather(1, light.clamp_min(0))
    return torch.where(ok, _LIGHT_VALUE[ls.clamp(0, 3)], 0.0)


def render_bev(state_history: list[SimState], cfg: RasterConfig | None = None) -> torch.Tensor:
    """BEV raster (B, frames, C, H, W) float32 in [0, 1] (lane_cos / lane_sin in [-1, 1], see below).

    ``state_history``: the last states, oldest first (the last one is "now"); if fewer than
    ``cfg.frames`` are given the oldest is repeated.  All frames are drawn in the current ego
    frame.  Channels: ``CHANNELS``.  lane_cos / lane_sin are the cos / sin of the lane heading
    relative to the ego heading and may be negative (oncoming lanes); 0 off road.
    """
    cfg = cfg or RasterConfig()
    F, n = cfg.frames, cfg.size
    hist = list(state_history[-F:])
    hist = [hist[0]] * (F - len(hist)) + hist
    now = hist[-1]
    B, A = now.xy.shape[:2]
    C, HW = len(CHANNELS), n * n
    ego_xy, ego_yaw = now.xy[:, 0], now.yaw[:, 0]
    img = torch.zeros(B, F, C, HW)

    # map channels: once, copied to every frame
    mp = _map_channels(now, cfg)
    for name, v in mp.items():
        img[:, :, CH[name]] = v.unsqueeze(1)
    flat = img.view(-1)
    plane = lambda ch: (torch.arange(B)[:, None] * F + torch.arange(F)[None, :]) * (C * HW) + ch * HW  # (B, F)

    # route: segments of the route polyline in view, painted into frame 0 then copied (same in every frame)
    reach = cfg.size * cfg.resolution * math.hypot(max(cfg.ego_offset, 1.0 - cfg.ego_offset), 0.5) + 2.0
    rxy, _, rvalid = route_window(now, reach, reach)
    rl = _to_ego(rxy, ego_xy, ego_yaw)
    seg_ok = rvalid[:, 1:] & rvalid[:, :-1]
    base = plane(CH["route"])[:, :1].expand(B, seg_ok.shape[1])
    _splat_segments(flat, base, rl[:, :-1], rl[:, 1:], ROUTE_TOL, torch.ones(base.shape), seg_ok, cfg)
    img[:, 1:, CH["route"]] = img[:, :1, CH["route"]]

    # stop lines with their light state at each frame's step
    m = now.static.scenario.map
    sl = _to_ego(m.stop_line_xy, ego_xy, ego_yaw)  # (B, K, 2, 2)
    vals = torch.stack([_light_values(s, int(s.t)) for s in hist], 1)  # (B, F, K)
    K = vals.shape[-1]
    if K:
        base = plane(CH["light"])[:, :, None].expand(B, F, K)
        _splat_segments(flat, base, sl[:, None, :, 0].expand(B, F, K, 2), sl[:, None, :, 1].expand(B, F, K, 2),
                        STOP_LINE_TOL, vals, vals > 0, cfg)

    # agents of every frame, in the current ego frame
    ag = now.static.scenario.agents
    xy = torch.stack([s.xy for s in hist], 1)  # (B, F, A, 2)
    yaw = torch.stack([s.yaw for s in hist], 1)
    present = torch.stack([s.present for s in hist], 1)
    loc = _to_ego(xy.view(B, F * A, 2), ego_xy, ego_yaw).view(B, F, A, 2)
    ryaw = wrap_angle(yaw - ego_yaw.view(B, 1, 1))
    kind_ch = torch.tensor([CH["vehicles"], CH["vru"], CH["vru"], CH["static"]])[ag.kind.clamp(0, 3)]  # (B, A)
    base = (torch.arange(B).view(B, 1, 1) * F + torch.arange(F).view(1, F, 1)) * (C * HW) \
        + kind_ch.view(B, 1, A) * HW
    # boxes smaller than a pixel are grown to half a pixel (+eps) per side so they never vanish
    grow = 0.5 * cfg.resolution + 1e-3
    hl = (0.5 * ag.length).clamp_min(grow).view(B, 1, A).expand(B, F, A)
    hw = (0.5 * ag.width).clamp_min(grow).view(B, 1, A).expand(B, F, A)
    _splat_boxes(flat, base, loc, ryaw, hl, hw, present, cfg)
    return img.view(B, F, C, n, n)


# ---------------------------------------------------------------------------------------------
# ego history and route commands

def ego_history_features(obs: Observation) -> torch.Tensor:
    """(B, 16, 5): past ego poses in the current ego frame: x, y (m), cos, sin of relative yaw, speed (m/s).

    Oldest first; the last row is the current pose (0, 0, 1, 0, v).
    """
    xy, yaw, v = obs.ego_history_xy, obs.ego_history_yaw, obs.ego_history_speed
    loc = _to_ego(xy, xy[:, -1], yaw[:, -1])
    rel = yaw - yaw[:, -1:]
    return torch.cat((loc, torch.cos(rel)[..., None], torch.sin(rel)[..., None], v[..., None]), -1)


TURN_LOOKAHEAD = 40.0  # m, intersections / exits / lane changes this far ahead are announced
MERGE_LOOKAHEAD = 300.0  # m, a ramp's merge is announced from anywhere on the ramp
TURN_ANGLE = 0.5  # rad, heading change across the junction that counts as a turn
_FOLLOW, _LEFT, _RIGHT, _EXIT, _MERGE, _KEEP_R, _KEEP_L = range(7)


def route_command(state: SimState) -> list[str]:
    """One navigation command per batch element (``COMMANDS``) from the route geometry ahead.

    Vectorised: the route window's lane transitions are classified with the lane graph (lane
    change left / right, lane change out of an ending lane into a continuing one = merge, entry into a junction lane,
    leaving a lane that forks = exit); the first event ahead decides; the heading change over
    the 30 m after entering a junction decides left / right / straight ("follow the route").
    """
    st = state.static
    m = st.scenario.map
    route = st.scenario.route
    B = state.batch_size
    xy, s, valid = route_window(state, 0.0, MERGE_LOOKAHEAD)
    W = xy.shape[1]
    idx = (s / st.route_ds.unsqueeze(-1)).round().long().clamp(0, route.xy.shape[1] - 1)
    lane = route.lane_of_point.gather(1, idx)  # (B, W)
    ahead = s - state.route_s.unsqueeze(-1)  # m
    head = torch.atan2(xy[:, 1:, 1] - xy[:, :-1, 1], xy[:, 1:, 0] - xy[:, :-1, 0])
    head = torch.cat((head, head[:, -1:]), 1)  # (B, W)
    p, q = lane[:, :-1], lane[:, 1:]  # transitions between consecutive points
    tr = (p != q) & valid[:, 1:] & (p >= 0) & (q >= 0)
    pc, qc = p.clamp_min(0), q.clamp_min(0)
    left = m.lane_left.gather(1, pc) == q
    right = m.lane_right.gather(1, pc) == q
    succ = m.lane_successors.gather(1, pc.unsqueeze(-1).expand(-1, -1, m.lane_successors.shape[-1]))  # (B, W-1, S)
    n_succ = (succ >= 0).sum(-1)
    is_succ = (succ == q.unsqueeze(-1)).any(-1)
    junction_in = is_succ & m.lane_is_junction.gather(1, qc) & ~m.lane_is_junction.gather(1, pc)
    exit_ = is_succ & ~junction_in & (n_succ >= 2) & ~m.lane_is_junction.gather(1, pc)
    q_succ = (m.lane_successors.gather(1, qc.unsqueeze(-1).expand(-1, -1, m.lane_successors.shape[-1])) >= 0).any(-1)
    merge = (left | right) & (n_succ == 0) & q_succ  # out of an ending lane into one that goes on
    a = ahead[:, 1:]
    # heading change across a junction: from the entry point to 30 m later (clamped to the window)
    k30 = (torch.arange(W - 1) + int(round(30.0 / float(st.route_ds.min().clamp_min(0.2))))).clamp(max=W - 1)
    last = (valid.sum(1) - 1).clamp_min(0).unsqueeze(-1)
    dh = wrap_angle(head.gather(1, torch.minimum(k30.expand(B, -1), last)) - head[:, :-1])
    turn = torch.where(dh > TURN_ANGLE, _LEFT, torch.where(dh < -TURN_ANGLE, _RIGHT, _FOLLOW))
    cmd = torch.full_like(p, -1)
    near = a <= TURN_LOOKAHEAD
    cmd = torch.where(tr & near & right, _KEEP_R, cmd)
    cmd = torch.where(tr & near & left, _KEEP_L, cmd)
    cmd = torch.where(tr & near & exit_, _EXIT, cmd)
    cmd = torch.where(tr & near & junction_in, turn, cmd)
    cmd = torch.where(tr & merge, _MERGE, cmd)
    # a merge ahead with no intersection before it wins on a ramp; otherwise the first event
    event = (cmd >= 0) & ~((cmd == _FOLLOW) & ~junction_in)
    first = torch.where(event, torch.arange(W - 1).expand(B, -1), W).min(1).values
    out = torch.where(first < W - 1, cmd.gather(1, first.clamp(max=W - 2).unsqueeze(-1)).squeeze(-1), _FOLLOW)
    return [COMMANDS[int(i)] for i in out.clamp_min(0)]


def command_index(commands: list[str]) -> torch.Tensor:
    """(B,) int64 index of each command in ``COMMANDS`` (for the model's embedding)."""
    return torch.tensor([COMMANDS.index(c) for c in commands], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# preview / benchmark

def _preview(family: str, seed: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from roadloop.scenarios.families import FAMILIES
    from roadloop.sim.batching import collate
    from roadloop.sim.state import init_state

    state = init_state(collate([FAMILIES[family].build_raw(seed)]))
    img = render_bev([state], RasterConfig())[0, -1]
    cmd = route_command(state)[0]
    fig, axes = plt.subplots(2, 5, figsize=(15, 6.5))
    for k, ax in enumerate(axes.flat):
        lo = -1.0 if CHANNELS[k] in ("lane_cos", "lane_sin") else 0.0
        ax.imshow(img[k].numpy(), vmin=lo, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(CHANNELS[k])
        ax.axis("off")
    fig.suptitle(f"{family} seed {seed}: {cmd!r}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _bench() -> None:
    import time

    from roadloop.scenarios.families import FAMILIES
    from roadloop.sim.batching import collate
    from roadloop.sim.state import init_state

    torch.set_num_threads(1)
    raws = [FAMILIES[f].build_raw(s) for s in range(8) for f in ("intersection_protected", "multilane_traffic")]
    for B in (1, 64):
        st = init_state(collate([raws[i % len(raws)] for i in range(B)]))
        hist = [st] * 4
        render_bev(hist)
        t0 = time.perf_counter()
        for _ in range(5):
            render_bev(hist)
        print(f"B={B} agents={st.num_agents}: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms per render_bev")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench"]:
        _bench()
    else:
        _preview(sys.argv[1], int(sys.argv[2]), sys.argv[3])
