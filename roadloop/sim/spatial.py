"""Spatial index of lane segments: constant-cost on-road / lane queries on any map size.

The drivable area is the union of lane *capsules*: every centreline segment swept by the
lane's half width plus ``ON_ROAD_TOL``.  ``build_lane_index`` (numpy, once per batch) flattens
the segments, merges straight runs (exactly, within ``MERGE_TOL``), and buckets them in a
uniform grid per scenario: each cell lists the segments whose capsule may reach it.  A query
reads its cell's candidate list (a fixed-size window of ``n_fast`` entries; the few points
whose cell holds more get a second pass; ``on_road`` and the VLA raster read exactly each cell's
entries instead, ``cell_pairs``) and computes exact point-segment distances, so its cost does not
depend on the number of lanes.

Layout (ragged, so a batch mixing small and city-scale maps wastes no memory on padding): the
segments of all B scenarios are concatenated (S segments + one empty sentinel row), as are
their grids' cells (sum over scenarios of nx * ny cells) and the cells' candidate lists
(CSR: ``cell_table`` holds each cell's start and count in ``cell_entries``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from roadloop.sim.datatypes import Map, _TensorTree

ON_ROAD_TOL = 0.05  # m, slack added to the half lane width
MERGE_TOL = 1e-4  # m, a straight run of lane points is merged if no point deviates more than this


@dataclass(frozen=True, eq=False)
class LaneIndex(_TensorTree):
    """Lane segments bucketed in a uniform grid per scenario (see the module docstring).

    S = segments of all scenarios; the extra row S is an empty sentinel (lane -1, r^2 = -1).
    """

    seg_xy: torch.Tensor  # (S+1, 2, 2) m, segment start / end points
    seg_batch: torch.Tensor  # (S+1,) int64 scenario of the segment (-1 sentinel)
    seg_lane: torch.Tensor  # (S+1,) int64 lane (index in its scenario's map) of the segment, -1 sentinel
    seg_half_width: torch.Tensor  # (S+1,) m, half width of the lane (-1 sentinel)
    seg_heading: torch.Tensor  # (S+1,) rad, driving direction of the segment
    # (8, S+1) hot-path columns (one gather gives contiguous columns): ax, ay m; dx, dy m (end -
    # start); 1/|d|^2 1/m^2 (0 for a point); r^2 m^2, r = half width + tol (-1: sentinel); cos, sin heading
    seg_pack: torch.Tensor
    seg_offset: torch.Tensor  # (B+1,) int64, scenario b owns segments seg_offset[b]:seg_offset[b+1]
    origin: torch.Tensor  # (B, 2) m, lower-left corner of each scenario's grid
    grid_dims: torch.Tensor  # (B, 2) int64 (nx, ny) cells; local cell id = iy * nx + ix
    cell_offset: torch.Tensor  # (B,) int64 global id of each scenario's cell 0
    cell_table: torch.Tensor  # (num_cells, 2) int64 start in cell_entries and count of each cell's list
    cell_entries: torch.Tensor  # (E + N,) int64 segment ids (global) per cell, cell-major; N sentinel pads
    cell_size: float  # m, side of a square cell
    tol: float  # m, on-road tolerance added to the half width
    max_per_cell: int  # N, the longest candidate list (worst case over the batch)
    n_fast: int  # candidates read in the first pass (<= N); longer lists get a second pass

    @property
    def batch_size(self) -> int:
        return self.origin.shape[0]

    def segments(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scenario b's segments: xy (G, 2, 2) m, lane (G,), half width (G,) m, heading (G,) rad."""
        i0, i1 = int(self.seg_offset[b]), int(self.seg_offset[b + 1])
        return self.seg_xy[i0:i1], self.seg_lane[i0:i1], self.seg_half_width[i0:i1], self.seg_heading[i0:i1]


def _next_true(mask: np.ndarray) -> np.ndarray:
    """Index of the first True at or after each position (len(mask) if none)."""
    n = len(mask)
    return np.flip(np.minimum.accumulate(np.flip(np.where(mask, np.arange(n), n))))


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab, ap = b - a, p - a
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-18), 0.0, 1.0)
    return np.linalg.norm(ap - t[:, None] * ab, axis=-1)


def _simplify(pts: np.ndarray, link: np.ndarray) -> np.ndarray:
    """Keep mask (V,) of flat lane points; ``link`` (V-1,) says point i and i+1 form a segment.

    Interior points of straight runs are dropped (adjacent segments collinear within 1e-4 rad);
    a run is kept whole if one of its dropped points would be more than ``MERGE_TOL`` from the
    merged segment.  Chain ends (no link on one side) are always kept.
    """
    V = len(pts)
    keep = np.ones(V, bool)
    if V < 3:
        return keep
    d = pts[1:] - pts[:-1]
    n = np.linalg.norm(d, axis=-1)
    u = d / np.maximum(n, 1e-12)[:, None]
    ok = link & (n > 1e-9)
    cross = u[:-1, 0] * u[1:, 1] - u[:-1, 1] * u[1:, 0]
    dot = (u[:-1] * u[1:]).sum(-1)
    keep[1:-1] = ~(ok[:-1] & ok[1:] & (np.abs(cross) < 1e-4) & (dot > 0))
    dropped = np.nonzero(~keep)[0]
    if len(dropped):
        i0 = np.maximum.accumulate(np.where(keep, np.arange(V), -1))[dropped]
        i1 = _next_true(keep)[dropped]
        bad = _seg_dist(pts[dropped], pts[i0], pts[i1]) > MERGE_TOL
        if bad.any():
            bad_run = np.zeros(V, bool)
            bad_run[i0[bad]] = True
            keep[dropped] |= bad_run[i0]
    return keep


def build_lane_index(map: Map, cell_size: float = 8.0, max_per_cell: int | None = None,
                     tol: float = ON_ROAD_TOL, n_fast: int | None = None) -> LaneIndex:
    """Build the lane-segment grid index of a batched map (leading B; an unbatched map gets B=1).

    cell_size m: grid cell side.  The grid of each scenario covers the bounding box of its valid
    lane points plus the widest capsule radius and two cells.  ``max_per_cell``: if given, a
    ValueError is raised when a cell needs more candidates.  ``n_fast``: first-pass window
    (default: the 95th percentile of non-empty list lengths, at least 8).  Build runs in numpy
    (float64), vectorised over scenarios, lanes and segments.
    """
    lane_xy = map.lane_xy.detach()
    pv = (map.lane_point_valid & map.lane_valid.unsqueeze(-1)).detach()
    hw_all = 0.5 * map.lane_width.detach()
    if lane_xy.dim() == 3:
        lane_xy, pv, hw_all = lane_xy[None], pv[None], hw_all[None]
    B = pv.shape[0]
    device = map.lane_xy.device
    nz = pv.nonzero().cpu().numpy()  # (V, 3) valid points, sorted by (b, lane, point)
    pts = lane_xy[pv].cpu().to(torch.float64).numpy()  # (V, 2)
    hw_all = hw_all.cpu().to(torch.float64).numpy()
    pb, pl, pp = nz[:, 0], nz[:, 1], nz[:, 2]
    V = len(pts)
    # --- segments: consecutive kept points of one unbroken run of valid lane points ------------
    brk = np.ones(V, bool)  # point starts a new chain
    brk[1:] = (pb[1:] != pb[:-1]) | (pl[1:] != pl[:-1]) | (pp[1:] != pp[:-1] + 1)
    chain = np.cumsum(brk)
    keep = _simplify(pts, ~brk[1:])
    k = np.nonzero(keep)[0]
    m = chain[k[:-1]] == chain[k[1:]]
    i0, i1 = k[:-1][m], k[1:][m]
    a, bpt = pts[i0], pts[i1]
    sb, sl = pb[i0], pl[i0]
    S = len(sb)
    r = hw_all[sb, sl] + tol
    per_b = np.bincount(sb, minlength=B)
    seg_offset = np.concatenate(([0], np.cumsum(per_b)))
    # --- per-scenario grids ------------------------------------------------------------------
    lo, hi, rmax = np.zeros((B, 2)), np.zeros((B, 2)), np.full(B, tol)
    has = per_b > 0
    if S:
        s0 = seg_offset[:-1][has]
        ends = np.concatenate((a, bpt))
        sbb = np.concatenate((sb, sb))
        order = np.argsort(sbb, kind="stable")
        first = np.concatenate(([0], np.cumsum(np.bincount(sbb, minlength=B))[:-1]))[has]
        lo[has] = np.minimum.reduceat(ends[order], first, axis=0)
        hi[has] = np.maximum.reduceat(ends[order], first, axis=0)
        rmax[has] = np.maximum.reduceat(r, s0)
    margin = (rmax + 2.0 * cell_size)[:, None]
    origin = lo - margin
    dims = np.maximum(np.ceil((hi + margin - origin) / cell_size).astype(np.int64), 1)  # (B, 2) nx, ny
    ncell = dims[:, 0] * dims[:, 1]
    cell_offset = np.concatenate(([0], np.cumsum(ncell)[:-1]))
    total_cells = int(ncell.sum())
    # --- (segment, cell) pairs: cells of the capsule's bounding box whose centre is near enough --
    o = origin[sb]
    top = dims[sb] - 1
    c0 = np.clip(np.floor((np.minimum(a, bpt) - r[:, None] - o) / cell_size), 0, top).astype(np.int64)
    c1 = np.clip(np.floor((np.maximum(a, bpt) + r[:, None] - o) / cell_size), 0, top).astype(np.int64)
    wx = c1[:, 0] - c0[:, 0] + 1
    cnt = wx * (c1[:, 1] - c0[:, 1] + 1)
    rep = np.repeat(np.arange(S), cnt)
    off = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    cx = c0[rep, 0] + off % wx[rep]
    cy = c0[rep, 1] + off // wx[rep]
    centre = o[rep] + (np.stack((cx, cy), -1) + 0.5) * cell_size
    near = _seg_dist(centre, a[rep], bpt[rep]) <= r[rep] + cell_size * math.sqrt(0.5) + 1e-3
    rep = rep[near]
    cell = (cell_offset[sb[rep]] + cy[near] * dims[sb[rep], 0] + cx[near])
    order = np.argsort(cell, kind="stable")  # stable: segments stay in index order within a cell
    entries = rep[order]
    counts = np.bincount(cell, minlength=total_cells)
    N = max(int(counts.max(initial=0)), 1)
    if max_per_cell is not None and N > max_per_cell:
        raise ValueError(f"build_lane_index: a cell needs {N} candidate segments > "
                         f"max_per_cell={max_per_cell} (use a smaller cell_size or a larger max_per_cell)")
    if n_fast is None:
        busy = counts[counts > 0]
        n_fast = max(8, int(np.ceil(np.quantile(busy, 0.95)))) if len(busy) else 1
    n_fast = int(min(max(n_fast, 1), N))
    cell_table = np.stack((np.cumsum(counts) - counts, counts), -1)
    entries = np.concatenate((entries, np.full(N, S)))  # reading past the end hits the sentinel
    # --- segment tables (+ sentinel row S) -------------------------------------------------------
    d = bpt - a
    heading = np.arctan2(d[:, 1], d[:, 0])
    len2 = (d * d).sum(-1)
    inv = np.where(len2 > 1e-18, 1.0 / np.maximum(len2, 1e-18), 0.0)
    pack = np.concatenate((a, d, inv[:, None], (r * r)[:, None], np.cos(heading)[:, None],
                           np.sin(heading)[:, None]), -1)
    pack = np.concatenate((pack, [[0, 0, 0, 0, 0, -1, 1, 0]]))
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    cat = lambda x, v: np.concatenate((x, np.full((1, *x.shape[1:]), v, x.dtype)))
    return LaneIndex(
        seg_xy=torch.tensor(cat(np.stack((a, bpt), 1), 0.0), **f32),
        seg_batch=torch.tensor(cat(sb, -1), **i64), seg_lane=torch.tensor(cat(sl, -1), **i64),
        seg_half_width=torch.tensor(cat(r - tol, -1.0), **f32),
        seg_heading=torch.tensor(cat(heading, 0.0), **f32),
        seg_pack=torch.tensor(pack.T.copy(), **f32), seg_offset=torch.tensor(seg_offset, **i64),
        origin=torch.tensor(origin, **f32), grid_dims=torch.tensor(dims, **i64),
        cell_offset=torch.tensor(cell_offset, **i64), cell_table=torch.tensor(cell_table, **i64),
        cell_entries=torch.tensor(entries, **i64), cell_size=float(cell_size), tol=float(tol),
        max_per_cell=N, n_fast=n_fast)


class _Res(NamedTuple):
    on: torch.Tensor  # (M,) bool, inside some candidate capsule
    aligned: torch.Tensor | None  # (M,) bool, inside a candidate capsule heading within 90 deg of yaw
    d2: torch.Tensor | None  # (M,) m^2, squared distance to the nearest containing candidate (inf: none)
    seg: torch.Tensor | None  # (M,) int64 that segment (sentinel S if none)


def _scan(points: torch.Tensor, cs: torch.Tensor | None, start: torch.Tensor, lo: int, hi: int,
          index: LaneIndex, nearest: bool) -> _Res:
    """Capsule tests of points (M, 2) against cell_entries[start + lo : start + hi] (start (M,));
    ``cs`` (M, 2) cos, sin of the query headings (None: no heading test)."""
    M, n = start.shape[0], hi - lo
    idx = (start.unsqueeze(-1) + torch.arange(lo, hi, device=start.device)).view(-1)
    cand = index.cell_entries.index_select(0, idx)  # (M * n,)
    f = index.seg_pack.index_select(1, cand).view(8, M, n)  # contiguous columns
    apx = points[:, :1] - f[0]
    apy = points[:, 1:] - f[1]
    dx, dy = f[2], f[3]
    t = torch.addcmul(apx * dx, apy, dy).mul_(f[4]).clamp_(0.0, 1.0)
    qx, qy = apx.sub_(t * dx), apy.sub_(t * dy)
    d2 = torch.addcmul(qx * qx, qy, qy)
    inside = d2 <= f[5]
    on = inside.any(-1)
    if cs is None:
        return _Res(on, None, None, None)
    al = (inside & (torch.addcmul(cs[:, :1] * f[6], cs[:, 1:], f[7]) >= 0)).any(-1)
    if not nearest:
        return _Res(on, al, None, None)
    best, j = torch.where(inside, d2, torch.inf).min(-1, keepdim=True)
    seg = torch.where(on, cand.view(M, n).gather(-1, j).squeeze(-1), index.seg_pack.shape[1] - 1)
    return _Res(on, al, best.squeeze(-1), seg)


def _query(points: torch.Tensor, yaw: torch.Tensor | None, index: LaneIndex, nearest: bool) -> _Res:
    """Two-pass query of points (B, P, 2) m: first ``n_fast`` candidates, then the overflow.

    Returns flat (B * P,) results.
    """
    B, P = points.shape[:2]
    g = ((points - index.origin.unsqueeze(1)) * (1.0 / index.cell_size)).floor_().nan_to_num_(0.0)
    dims = index.grid_dims.unsqueeze(1).to(g.dtype)
    g = torch.minimum(g.clamp_min_(0.0), dims - 1)  # outside points read a border cell (exact test)
    cell = torch.addcmul(g[..., 0], g[..., 1], dims[..., 0]).long() + index.cell_offset.unsqueeze(1)
    sc = index.cell_table.index_select(0, cell.view(-1))  # (B * P, 2) start, count
    start = sc[:, 0]
    pts = points.reshape(B * P, 2)
    cs = None if yaw is None else torch.stack((torch.cos(yaw), torch.sin(yaw)), -1).view(B * P, 2)
    res = _scan(pts, cs, start, 0, index.n_fast, index, nearest)
    if index.max_per_cell > index.n_fast:
        over = (sc[:, 1] > index.n_fast).nonzero().squeeze(1)
        if over.numel():
            r2 = _scan(pts.index_select(0, over), None if cs is None else cs.index_select(0, over),
                       start.index_select(0, over), index.n_fast, index.max_per_cell, index, nearest)
            on, al, d2, seg = res  # fresh tensors: merge in place
            on[over] |= r2.on
            if al is not None:
                al[over] |= r2.aligned
            if nearest:
                better = r2.d2 < d2[over]
                d2[over] = torch.where(better, r2.d2, d2[over])
                seg[over] = torch.where(better, r2.seg, seg[over])
    return res


class CellPairs(NamedTuple):
    """Every (point, candidate segment) pair of a ragged query (E pairs, E = the points' candidate counts)."""

    point: torch.Tensor  # (E,) int64 flat point index (b * P + p)
    seg: torch.Tensor  # (E,) int64 candidate segment
    d2: torch.Tensor  # (E,) float32 m^2, squared distance from the point to the segment
    r2: torch.Tensor  # (E,) float32 m^2, the segment's capsule radius squared: inside iff d2 <= r2


def cell_pairs(x: torch.Tensor, y: torch.Tensor, index: LaneIndex) -> CellPairs:
    """Capsule distances of points x, y (B, P) m to exactly the candidates of each point's grid cell.

    The cells, the clamping of outside points to a border cell and the distance arithmetic are
    ``_query``'s / ``_scan``'s operation for operation (so the same bits), but *ragged*: a point meets
    its cell's ``count`` candidates (mean ~1.3 for points on and near a road) instead of a fixed window
    of ``n_fast`` (~15), and overflow cells need no second pass.  Callers reduce per point
    (``on_road``: any inside; the VLA raster's nearest lane: a deterministic min).
    """
    B, P = x.shape
    M = B * P
    inv = 1.0 / index.cell_size
    dims = index.grid_dims.to(x.dtype)
    gx = ((x - index.origin[:, 0:1]) * inv).floor_().nan_to_num_(0.0).clamp_min_(0.0)
    gy = ((y - index.origin[:, 1:2]) * inv).floor_().nan_to_num_(0.0).clamp_min_(0.0)
    gx = torch.minimum(gx, dims[:, 0:1] - 1)  # outside points read a border cell (empty: off road)
    gy = torch.minimum(gy, dims[:, 1:2] - 1)
    cell = (torch.addcmul(gx, gy, dims[:, 0:1]).long() + index.cell_offset.unsqueeze(1)).view(-1)
    start = index.cell_table[:, 0].index_select(0, cell)
    count = index.cell_table[:, 1].index_select(0, cell)
    E = int(count.sum())
    pid = torch.repeat_interleave(torch.arange(M, device=x.device), count, output_size=E)  # (E,) point of each pair
    # entry of pair e = start[pid] + (e - first pair of pid)
    shift = torch.repeat_interleave(start.sub_(torch.cumsum(count, 0).sub_(count)), count, output_size=E)
    cand = index.cell_entries.index_select(0, shift.add_(torch.arange(E, device=x.device)))  # (E,) segment ids
    f = [index.seg_pack[i].index_select(0, cand) for i in range(6)]  # ax, ay, dx, dy, 1/|d|^2, r^2
    apx = x.reshape(-1).index_select(0, pid).sub_(f[0])
    apy = y.reshape(-1).index_select(0, pid).sub_(f[1])
    dx, dy = f[2], f[3]
    t = torch.addcmul(apx * dx, apy, dy).mul_(f[4]).clamp_(0.0, 1.0)
    qx, qy = apx.sub_(t * dx), apy.sub_(t * dy)
    return CellPairs(pid, cand, torch.addcmul(qx * qx, qy, qy), f[5])


def on_road(points: torch.Tensor, index: LaneIndex) -> torch.Tensor:
    """points (B, P, 2) m -> (B, P) bool: within half width + tol of some lane segment.

    Points outside the scenario's grid are off road (no capsule reaches there).  Ragged
    (``cell_pairs``): the same answer as the windowed ``_query``, with a tenth of its distance tests.
    """
    B, P = points.shape[:2]
    pr = cell_pairs(points[..., 0], points[..., 1], index)
    on = torch.zeros(B * P, dtype=torch.bool, device=points.device)
    on[pr.point[pr.d2 <= pr.r2]] = True  # writes only True: duplicates agree, deterministic
    return on.view(B, P)


def lane_query(points: torch.Tensor, yaw: torch.Tensor, index: LaneIndex
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lanes under points (B, P, 2) m with headings yaw (B, P) rad.

    Returns on_road (B, P) bool; heading_ok (B, P) bool, False iff the point is on road and
    every segment containing it points more than 90 degrees away from yaw (wrong way);
    nearest_lane (B, P) int64, lane of the containing segment closest to the point, -1 off road.
    """
    res = _query(points, yaw, index, nearest=True)
    shape = points.shape[:2]
    lane = index.seg_lane.index_select(0, res.seg).view(shape)
    return res.on.view(shape), (~res.on | res.aligned).view(shape), lane


_FOOT = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1], [1, 0], [0, 1], [-1, 0], [0, -1], [0, 0]],
                     dtype=torch.float32)  # corners (as geometry.box_corners), edge midpoints, centre


def footprint_points(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor,
                     centre: bool = False) -> torch.Tensor:
    """Box corners then edge midpoints (and the centre): xy (B, 2), yaw/length/width (B,) -> (B, 8|9, 2)."""
    f = _FOOT[: 9 if centre else 8].to(xy)
    lx, ly = f[:, 0] * (0.5 * length).unsqueeze(-1), f[:, 1] * (0.5 * width).unsqueeze(-1)  # (B, K)
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)
    return torch.stack((xy[:, :1] + c * lx - s * ly, xy[:, 1:] + s * lx + c * ly), -1)


def offroad(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor,
            index: LaneIndex) -> torch.Tensor:
    """Ego footprint leaves the drivable area: xy (B, 2) m, yaw/length/width (B,) -> (B,) bool.

    True iff one of the 4 box corners or 4 edge midpoints is not on road.
    """
    return ~on_road(footprint_points(xy, yaw, length, width), index).all(-1)


class MapCheck(NamedTuple):
    offroad: torch.Tensor  # (B,) bool, a footprint corner / edge midpoint is off road
    wrong_way: torch.Tensor  # (B,) bool, centre on road and every lane there opposes the heading
    lane: torch.Tensor  # (B,) int64 nearest lane containing the centre, -1 none


def ego_map_check(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor,
                  index: LaneIndex) -> MapCheck:
    """``offroad`` plus the centre's ``lane_query`` in one pass over 9 points per scenario."""
    pts = footprint_points(xy, yaw, length, width, centre=True)
    on, ok, lane = lane_query(pts, yaw.unsqueeze(-1).expand(-1, 9), index)
    return MapCheck(~on[:, :8].all(-1), ~ok[:, 8], lane[:, 8])


__all__ = ["ON_ROAD_TOL", "LaneIndex", "build_lane_index", "on_road", "lane_query", "footprint_points",
           "offroad", "MapCheck", "ego_map_check"]
