"""Lane spatial index: on-road / wrong-way / nearest-lane queries, index vs brute force, scale."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from roadloop.scenarios.builder import ScenarioBuilder, arc, straight
from roadloop.sim import spatial
from roadloop.sim.batching import collate
from roadloop.sim.datatypes import ScenarioMeta


def make_index(lanes, widths=None, **kw):
    """Index (B=1) of a map built with ScenarioBuilder from lane polylines."""
    b = ScenarioBuilder(2)
    for i, xy in enumerate(lanes):
        b.add_lane(xy, width=3.5 if widths is None else widths[i])
    b.set_route([0])
    b.add_agent([[0.0, 0.0]], 0.0, 0.0)
    sc = b.build(ScenarioMeta("t/0", "t", 0, "test"))
    return spatial.build_lane_index(collate([sc]).map, **kw), sc


def T(x):
    return torch.tensor(x, dtype=torch.float32)


def off(index, x, y, yaw, length=4.6, width=1.9) -> bool:
    return bool(spatial.offroad(T([[x, y]]), T([yaw]), T([length]), T([width]), index)[0])


# --- named cases -------------------------------------------------------------------------

def test_box_fully_in_lane_is_on_road():
    idx, _ = make_index([straight((0, 0), (100, 0))])
    assert not off(idx, 50, 0, 0.0)
    assert not off(idx, 50, 0.8, 0.0)  # corners at 1.75 m = half width
    assert off(idx, 50, 0.9, 0.0)  # corners at 1.85 m > half width + 0.05
    assert off(idx, 0.0, 0, 0.0)  # rear overhangs the lane start by 2.3 m
    assert not off(idx, 1.0, 0, 0.0)  # 1.3 m overhang stays inside the round end cap
    pts = spatial.footprint_points(T([[50, 0]]), T([0.0]), T([4.6]), T([1.9]), centre=True)
    assert pts.shape == (1, 9, 2) and spatial.on_road(pts, idx).all()


def test_box_straddling_edge_of_curved_lane_is_offroad():
    # quarter circle of radius 25 m around (0, 25), from (0, 0) to (25, 25), counter-clockwise
    idx, _ = make_index([arc((0, 25), 25.0, -math.pi / 2, 0.0, n=40)])
    phi = -math.pi / 4
    for dr, is_off in [(0.0, False), (0.5, False), (1.0, True), (-1.0, True), (-0.5, False)]:
        rad = 25.0 + dr
        x, y = rad * math.cos(phi), 25.0 + rad * math.sin(phi)
        assert off(idx, x, y, phi + math.pi / 2) == is_off, dr


def test_box_in_junction_covered_by_two_overlapping_lanes_is_on_road():
    through = straight((-40, 0), (40, 0))
    turn = np.concatenate((straight((-40, 0), (-10, 0), 16), arc((-10, 25), 25.0, -math.pi / 2, 0.0, 40)[1:]))
    box = (0.0, 1.0, 0.2)  # where the left turn has drifted ~2 m from the through lane
    both, _ = make_index([through, turn])
    only_through, _ = make_index([through])
    only_turn, _ = make_index([turn])
    assert not off(both, *box)
    assert off(only_through, *box) and off(only_turn, *box)


def test_point_in_gap_between_lanes_is_off_road():
    idx, _ = make_index([straight((0, 0), (100, 0)), straight((0, 5.5), (100, 5.5))])  # 2 m gap
    pts = T([[[50, 0], [50, 1.79], [50, 2.0], [50, 2.75], [50, 3.5], [50, 3.71], [50, 5.5]]])
    on = spatial.on_road(pts, idx)
    assert on.tolist() == [[True, True, False, False, False, True, True]]


def test_wrong_way_on_two_lane_two_way_road():
    idx, sc = make_index([straight((0, 0), (200, 0)), straight((200, 3.5), (0, 3.5))])
    pts = T([[[50, 0.0], [50, 3.5], [50, 3.5], [50, 1.75], [50, 10.0], [50, 0.3]]])
    yaw = T([[0.0, 0.0, math.pi, 0.0, 0.0, 2.0]])
    on, ok, lane = spatial.lane_query(pts, yaw, idx)
    assert on.tolist() == [[True, True, True, True, False, True]]
    # own lane ok; opposite lane against its direction wrong; on the shared line one lane agrees;
    # off road is never wrong way; 115 degrees off the lane direction is wrong way
    assert ok.tolist() == [[True, False, True, True, True, False]]
    assert lane.tolist() == [[0, 1, 1, 0, -1, 0]] or lane.tolist() == [[0, 1, 1, 1, -1, 0]]
    m = spatial.ego_map_check(T([[50, 3.5], [50, 0.0]]), T([0.0, 0.0]), T([4.6, 4.6]), T([1.9, 1.9]),
                              spatial.build_lane_index(collate([sc, sc]).map))
    assert m.wrong_way.tolist() == [True, False] and m.offroad.tolist() == [False, False]
    assert m.lane.tolist() == [1, 0]


def test_nearest_lane_and_outside_points():
    idx, _ = make_index([straight((0, 0), (100, 0)), straight((0, 3.0), (100, 3.0))])  # overlapping lanes
    pts = T([[[50, 1.0], [50, 2.0], [50, -1.0], [500, 0.0], [-500, -500], [float("nan"), 0.0]]])
    on, ok, lane = spatial.lane_query(pts, torch.zeros(1, 6), idx)
    assert on.tolist() == [[True, True, True, False, False, False]]
    assert lane.tolist() == [[0, 1, 0, -1, -1, -1]]
    assert ok.all()


# --- index vs brute force ------------------------------------------------------------------

def random_map_scenario(seed: int, num_lanes: int, extent: float):
    """Random lanes: straight runs, arcs and kinks, random widths, some lanes crossing."""
    rng = np.random.default_rng(seed)
    b = ScenarioBuilder(2)
    for _ in range(num_lanes):
        p = rng.uniform(0, extent, 2)
        h = rng.uniform(-math.pi, math.pi)
        pts = [p]
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(0, 3)
            if kind == 0:  # straight
                p = p + rng.uniform(5, 40) * np.array([math.cos(h), math.sin(h)])
                pts.append(p)
            elif kind == 1:  # arc
                rad, turn = rng.uniform(8, 40), rng.uniform(-1.5, 1.5)
                c = p + rad * np.sign(turn) * np.array([-math.sin(h), math.cos(h)])
                a0 = math.atan2(p[1] - c[1], p[0] - c[0])
                seg = arc(c, rad, a0, a0 + turn, 12)
                pts.extend(seg[1:])
                p, h = seg[-1], h + turn
            else:  # kink
                h += rng.uniform(-1.0, 1.0)
        if len(pts) < 2:
            pts.append(p + 10 * np.array([math.cos(h), math.sin(h)]))
        b.add_lane(np.array(pts), width=float(rng.uniform(2.5, 4.5)))
    b.set_route([0])
    b.add_agent([[0.0, 0.0]], 0.0, 0.0)
    return b.build(ScenarioMeta(f"rand/{seed}", "t", seed, "test"))


def brute_force(points, yaw, the_map, tol=spatial.ON_ROAD_TOL):
    """Reference on_road / heading_ok / nearest lane over every raw segment (float64), plus a
    mask of points within 1 mm of some capsule boundary (numerically ambiguous, not compared)."""
    xy = the_map.lane_xy.double()
    pv = the_map.lane_point_valid & the_map.lane_valid.unsqueeze(-1)
    a, b = xy[:, :-1], xy[:, 1:]  # (L, P-1, 2)
    ok = pv[:, :-1] & pv[:, 1:]
    r = (0.5 * the_map.lane_width.double() + tol).unsqueeze(-1)
    p = points.double().view(-1, 1, 1, 2)
    ab, ap = b - a, p - a
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-18)).clamp(0, 1)
    d = torch.linalg.vector_norm(ap - t.unsqueeze(-1) * ab, dim=-1)  # (Q, L, P-1)
    inside = (d <= r) & ok
    ambiguous = (((d - r).abs() < 1e-3) & ok).flatten(1).any(1)
    on = inside.flatten(1).any(1)
    hd = torch.atan2(ab[..., 1], ab[..., 0])
    yaw = yaw.double().view(-1, 1, 1)
    aligned = (torch.cos(yaw - hd) >= 0) & inside
    heading_ok = ~on | aligned.flatten(1).any(1)
    dm = torch.where(inside, d, torch.inf).amin(-1)  # (Q, L)
    lane = torch.where(on, dm.argmin(-1), -1)
    return on, heading_ok, lane, ambiguous


def test_index_matches_brute_force_on_random_maps():
    scenes = [random_map_scenario(s, n, e) for s, n, e in [(0, 40, 120.0), (1, 8, 60.0), (2, 60, 200.0)]]
    batch = collate(scenes)  # different map sizes: padded lanes / points are ignored
    idx = spatial.build_lane_index(batch.map, cell_size=6.0)
    g = torch.Generator().manual_seed(0)
    Q = 3000
    pts = torch.rand(3, Q, 2, generator=g) * 240.0 - 20.0
    for i, sc in enumerate(scenes):  # half the points within 3 m of a lane point (edges, overlaps)
        lane_pts = sc.map.lane_xy[sc.map.lane_point_valid]
        pick = torch.randint(0, len(lane_pts), (Q // 2,), generator=g)
        pts[i, : Q // 2] = lane_pts[pick] + (torch.rand(Q // 2, 2, generator=g) * 2 - 1) * 3.0
    yaw = (torch.rand(3, Q, generator=g) * 2 - 1) * math.pi
    pts[1, -3:] = float("nan")  # off road, never an error
    on, ok, lane = spatial.lane_query(pts, yaw, idx)
    assert not on[1, -3:].any()
    assert torch.equal(spatial.on_road(pts, idx), on)  # the ragged query (cell_pairs) agrees with the windowed one
    total_on = 0
    for i, sc in enumerate(scenes):
        w_on, w_ok, w_lane, amb = brute_force(pts[i], yaw[i], sc.map)
        keep = ~amb
        assert int(amb.sum()) < 10
        assert torch.equal(on[i][keep], w_on[keep])
        assert torch.equal(ok[i][keep], w_ok[keep])
        assert torch.equal(lane[i][keep], w_lane[keep])
        total_on += int(w_on.sum())
    assert total_on > 2000 and int((~ok).sum()) > 500  # many on-road and wrong-way points tested
    assert idx.max_per_cell >= idx.n_fast  # both query passes exercised when N > n_fast
    # a forced small first pass gives the same answers (everything through the overflow pass)
    idx2 = spatial.build_lane_index(batch.map, cell_size=6.0, n_fast=1)
    for a_, b_ in zip(spatial.lane_query(pts, yaw, idx2), (on, ok, lane), strict=True):
        assert torch.equal(a_, b_)
    assert torch.equal(spatial.on_road(pts, idx2), on)


def test_index_layout_and_options():
    sc = random_map_scenario(3, 10, 80.0)
    idx = spatial.build_lane_index(sc.map)  # unbatched map -> B = 1
    assert idx.batch_size == 1 and idx.origin.shape == (1, 2)
    xy, lane, hw, hd = idx.segments(0)
    assert xy.shape[1:] == (2, 2) and lane.min() >= 0 and (hw > 0).all()
    assert idx.seg_pack.dtype == torch.float32 and idx.cell_entries.dtype == torch.int64
    with pytest.raises(ValueError, match="max_per_cell"):
        spatial.build_lane_index(sc.map, max_per_cell=1)
    # a scenario without valid lanes: everything is off road
    empty = sc.map.replace(lane_valid=torch.zeros_like(sc.map.lane_valid))
    idx2 = spatial.build_lane_index(collate([sc, sc.replace(map=empty)]).map)
    pts = sc.map.lane_xy[0, :4].expand(2, 4, 2)
    assert spatial.on_road(pts, idx2).tolist() == [[True] * 4, [False] * 4]
    # straight runs are merged: a 100 m straight lane (51 points) is one segment
    idx1, _ = make_index([straight((0, 0), (100, 0))])
    assert idx1.segments(0)[0].shape[0] == 1


# --- scale -------------------------------------------------------------------------------------

def grid_map_scenario(n: int = 40, block: float = 100.0, wiggle: float = 0.0):
    """n x n blocks: (n+1) rows and columns of roads, each cut into n lanes of ``block`` m
    (2 * n * (n + 1) lanes).  ``wiggle`` m adds a sinusoidal sway so no run is straight."""
    b = ScenarioBuilder(2)
    s = np.linspace(0.0, block, 51)
    sway = wiggle * np.sin(s / block * 2 * math.pi)
    for k in range(n + 1):
        for j in range(n):
            b.add_lane(np.stack((j * block + s, k * block + sway), 1))
            b.add_lane(np.stack((k * block + sway, j * block + s), 1))
    b.set_route([0])
    b.add_agent([[0.0, 0.0]], 0.0, 0.0)
    return b.build(ScenarioMeta("grid", "t", 0, "test"))


def test_large_grid_map_builds_fast_and_queries_stay_fast():
    sc = grid_map_scenario(40, 100.0, wiggle=0.5)  # 3280 lanes, 164k raw segments, 4 km x 4 km
    assert sc.map.lane_xy.shape[0] == 3280
    t0 = time.perf_counter()
    idx = spatial.build_lane_index(sc.map)
    t_build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(1, 4096, 2, generator=g) * 4000.0
    # points near roads: snap half of them close to a grid line
    near = pts[0, :2048].clone()
    near[:, 1] = torch.round(near[:, 1] / 100.0) * 100.0 + (torch.rand(2048, generator=g) - 0.5) * 5.0
    pts[0, :2048] = near
    yaw = torch.zeros(1, 4096)
    spatial.lane_query(pts, yaw, idx)
    t0 = time.perf_counter()
    on, ok, lane = spatial.lane_query(pts, yaw, idx)
    t_query = time.perf_counter() - t0
    print(f"\ngrid map: {sc.map.lane_xy.shape[0]} lanes, {idx.seg_xy.shape[0] - 1} segments, "
          f"{idx.cell_table.shape[0]} cells, N={idx.max_per_cell} (first pass {idx.n_fast}); "
          f"build {t_build:.2f} s, query of 4096 points {t_query * 1e3:.1f} ms")
    assert t_build < 10.0 and t_query < 0.5
    # brute force on a subset of the points (all raw segments)
    sub = torch.arange(0, 4096, 64)
    w_on, w_ok, w_lane, amb = brute_force(pts[0, sub], yaw[0, sub], sc.map)
    keep = ~amb
    assert int(w_on.sum()) > 10
    assert torch.equal(on[0, sub][keep], w_on[keep]) and torch.equal(lane[0, sub][keep], w_lane[keep])
