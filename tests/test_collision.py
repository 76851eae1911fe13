"""Collision checks: SAT edge cases, broad phase vs brute force, at-fault rule, TTC."""

from __future__ import annotations

import math

import pytest
import torch

from roadloop.sim.collision import boxes_overlap, ego_collision, pairwise_contacts, time_to_collision
from roadloop.sim.datatypes import AgentType
from roadloop.sim.geometry import box_corners

VEH, STATIC = int(AgentType.VEHICLE), int(AgentType.STATIC)


def scene(*boxes, present=None, kinds=None):
    """One scenario (B=1) from boxes (x, y, yaw, length, width[, speed])."""
    t = torch.tensor([list(b) + [0.0] * (6 - len(b)) for b in boxes], dtype=torch.float32)
    A = len(boxes)
    pres = torch.ones(1, A, dtype=torch.bool) if present is None else torch.tensor([present])
    kind = torch.full((1, A), VEH) if kinds is None else torch.tensor([kinds])
    return dict(xy=t[None, :, :2], yaw=t[None, :, 2], length=t[None, :, 3], width=t[None, :, 4],
                speed=t[None, :, 5], present=pres, kind=kind)


def ego_of(s, ego_speed: float):
    return ego_collision(s["xy"], s["yaw"], s["length"], s["width"], s["present"], s["kind"],
                         torch.tensor([ego_speed]))


def overlap_all_ways(a, b) -> bool:
    """Overlap of two boxes by every API (they must agree); returns the verdict."""
    s = scene(a, b)
    c = box_corners(s["xy"], s["yaw"], s["length"], s["width"])[0]
    v1 = bool(boxes_overlap(c[0], c[1]))
    v2 = bool(boxes_overlap(c[1], c[0]))
    pc = pairwise_contacts(s["xy"], s["yaw"], s["length"], s["width"], s["present"])[0]
    ec = ego_of(s, 1.0)
    verdicts = {v1, v2, bool(pc[0, 1]), bool(pc[1, 0]), bool(ec.collision[0])}
    assert len(verdicts) == 1, (a, b, v1, v2, pc, ec)
    return v1


# --- SAT edge cases -----------------------------------------------------------------------

def test_touching_corners_is_not_a_collision():
    assert not overlap_all_ways((0, 0, 0, 4, 2), (4, 2, 0, 4, 2))  # share corner (2, 1)
    assert not overlap_all_ways((0, 0, 0, 4, 2), (-4, -2, 0, 4, 2))


def test_touching_edges_is_not_a_collision():
    assert not overlap_all_ways((0, 0, 0, 4, 2), (4, 0, 0, 4, 2))  # full shared edge x = 2
    assert not overlap_all_ways((0, 0, 0, 4, 2), (1, 2, 0, 4, 2))  # partial shared edge y = 1
    assert not overlap_all_ways((0, 0, 0, 4.6, 1.9), (4.6, 0, 0, 4.6, 1.9))  # bumper to bumper


def test_box_inside_another_is_a_collision():
    assert overlap_all_ways((0, 0, 0, 10, 10), (1, 1, 0.3, 1, 1))
    assert overlap_all_ways((1, 1, 0.3, 1, 1), (0, 0, 0, 10, 10))
    assert overlap_all_ways((0, 0, 0.7, 4, 2), (0, 0, 0.7, 4, 2))  # identical boxes


def test_parallel_near_miss():
    assert not overlap_all_ways((0, 0, 0, 4.6, 1.9), (1.0, 1.95, 0, 4.6, 1.9))  # 0.05 m gap
    assert overlap_all_ways((0, 0, 0, 4.6, 1.9), (1.0, 1.85, 0, 4.6, 1.9))  # 0.05 m overlap
    assert not overlap_all_ways((0, 0, 0, 4.6, 1.9), (4.65, 0, 0, 4.6, 1.9))  # 0.05 m behind


@pytest.mark.parametrize("delta, hit", [(-0.01, True), (0.0, False), (0.01, False)])
def test_45_degree_box_at_a_corner(delta, hit):
    # a 2 x 2 square rotated 45 deg off the corner (2, 1) of a 4 x 2 box; only the rotated
    # box's own axis separates them (the axis-aligned bounding boxes overlap in every case)
    c = (1.0 + delta) / math.sqrt(2.0)
    assert overlap_all_ways((0, 0, 0, 4, 2), (2 + c, 1 + c, math.pi / 4, 2, 2)) == hit


@pytest.mark.parametrize("gap, hit", [(-0.01, True), (0.01, False)])
def test_45_degree_boxes_corner_to_corner(gap, hit):
    # two diamonds (2 x 2 squares at 45 deg) whose vertices face each other along x
    d = 2 * math.sqrt(2.0) + gap
    assert overlap_all_ways((0, 0, math.pi / 4, 2, 2), (d, 0, -math.pi / 4, 2, 2)) == hit


def test_rotated_rectangles_crossing_without_corners_inside():
    # a "plus" sign: no corner of either box lies inside the other, yet they overlap
    assert overlap_all_ways((0, 0, 0, 6, 1), (0, 0, math.pi / 2, 6, 1))


# --- at-fault rule ------------------------------------------------------------------------

EGO = (0, 0, 0, 4.6, 1.9)


def ego_check(other, ego_speed=5.0, kind=VEH, ego=EGO):
    return ego_of(scene(ego, other, kinds=[VEH, kind]), ego_speed)


def test_rear_ended_ego_is_not_at_fault():
    r = ego_check((-4.5, 0, 0, 4.6, 1.9))
    assert bool(r.collision[0]) and not bool(r.at_fault[0])
    assert int(r.agent[0]) == 1 and int(r.kind[0]) == VEH
    r = ego_check((-4.3, 0.6, 0.2, 4.6, 1.9))  # angled rear hit
    assert bool(r.collision[0]) and not bool(r.at_fault[0])


def test_ego_hitting_lead_vehicle_is_at_fault():
    r = ego_check((4.5, 0, 0, 4.6, 1.9))
    assert bool(r.collision[0]) and bool(r.at_fault[0])


def test_side_swipe_is_at_fault():
    r = ego_check((0.5, 1.8, 0, 4.6, 1.9))
    assert bool(r.collision[0]) and bool(r.at_fault[0])
    r = ego_check((-1.5, -1.85, 0.05, 4.6, 1.9))  # from slightly behind, still beside the ego
    assert bool(r.collision[0]) and bool(r.at_fault[0])


def test_stationary_ego_hit_is_not_at_fault():
    r = ego_check((4.5, 0, math.pi, 4.6, 1.9), ego_speed=0.0)
    assert bool(r.collision[0]) and not bool(r.at_fault[0])
    r = ego_check((0.0, 1.8, 0, 4.6, 1.9), ego_speed=0.04)
    assert bool(r.collision[0]) and not bool(r.at_fault[0])


def test_cone_hit_is_at_fault():
    r = ego_check((2.4, 0.3, 0, 0.5, 0.5), kind=STATIC)
    assert bool(r.collision[0]) and bool(r.at_fault[0]) and int(r.kind[0]) == STATIC
    r = ego_check((-2.4, 0.0, 0, 0.5, 0.5), ego_speed=-1.0, kind=STATIC)  # reversing into it
    assert bool(r.collision[0]) and bool(r.at_fault[0])


def test_lowest_index_agent_reported_and_any_at_fault():
    s = scene(EGO, (30, 0, 0, 4.6, 1.9), (-4.5, 0, 0, 4.6, 1.9), (2.4, 0, 0, 0.5, 0.5),
              kinds=[VEH, VEH, VEH, STATIC])
    r = ego_of(s, 3.0)
    assert int(r.agent[0]) == 2 and int(r.kind[0]) == VEH
    assert bool(r.at_fault[0])  # rear-ended by 2 but also hit the cone 3


def test_absent_agents_are_ignored():
    s = scene(EGO, (1, 0, 0, 4.6, 1.9), (2, 0, 0, 4.6, 1.9), present=[True, False, True])
    pc = pairwise_contacts(s["xy"], s["yaw"], s["length"], s["width"], s["present"])[0]
    assert not pc[1].any() and not pc[:, 1].any() and bool(pc[0, 2])
    r = ego_of(s, 3.0)
    assert int(r.agent[0]) == 2
    s["present"][0, 0] = False  # absent ego collides with nothing
    r = ego_of(s, 3.0)
    assert not bool(r.collision[0]) and int(r.agent[0]) == -1 and int(r.kind[0]) == -1


# --- batched / broad phase ------------------------------------------------------------------

def random_scene(B, A, extent, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, A, 2, generator=g) * extent
    yaw = (torch.rand(B, A, generator=g) * 2 - 1) * math.pi
    length = torch.rand(B, A, generator=g) * 4.5 + 0.3
    width = torch.rand(B, A, generator=g) * 2.0 + 0.3
    present = torch.rand(B, A, generator=g) > 0.15
    speed = (torch.rand(B, A, generator=g) * 2 - 0.5) * 10
    return xy, yaw, length, width, present, speed


def brute_contacts(xy, yaw, length, width, present):
    c = box_corners(xy, yaw, length, width)
    A = xy.shape[1]
    m = boxes_overlap(c[:, :, None], c[:, None, :]) & present[:, :, None] & present[:, None, :]
    return m & ~torch.eye(A, dtype=torch.bool)


@pytest.mark.parametrize("extent", [15.0, 40.0])
def test_broad_phase_matches_brute_force_sat(extent):
    xy, yaw, length, width, present, speed = random_scene(16, 32, extent, seed=int(extent))
    got = pairwise_contacts(xy, yaw, length, width, present)
    want = brute_contacts(xy, yaw, length, width, present)
    assert int(want.sum()) > 100  # many overlaps
    assert torch.equal(got, want)
    assert torch.equal(got, got.transpose(1, 2)) and not got.diagonal(dim1=1, dim2=2).any()
    kind = torch.zeros(16, 32, dtype=torch.int64)
    r = ego_collision(xy, yaw, length, width, present, kind, speed[:, 0])
    assert torch.equal(r.collision, want[:, 0].any(1))
    first = torch.where(want[:, 0], torch.arange(32), 99).amin(1)
    assert torch.equal(r.agent, torch.where(r.collision, first, -1))


def test_far_coordinates_and_no_contacts():
    xy, yaw, length, width, present, _ = random_scene(4, 8, 2000.0, seed=3)
    xy = xy + 5000.0
    got = pairwise_contacts(xy, yaw, length, width, present)
    assert torch.equal(got, brute_contacts(xy, yaw, length, width, present))


def test_batched_shapes_and_dtypes():
    B, A = 3, 5
    xy, yaw, length, width, present, speed = random_scene(B, A, 10.0, seed=1)
    kind = torch.zeros(B, A, dtype=torch.int64)
    pc = pairwise_contacts(xy, yaw, length, width, present)
    assert pc.shape == (B, A, A) and pc.dtype == torch.bool
    r = ego_collision(xy, yaw, length, width, present, kind, speed[:, 0])
    for f, dt in zip(r, (torch.bool, torch.bool, torch.int64, torch.int64), strict=True):
        assert f.shape == (B,) and f.dtype == dt
    ttc = time_to_collision(xy, yaw, speed, length, width, present)
    assert ttc.shape == (B,) and ttc.dtype == torch.float32
    assert boxes_overlap(torch.zeros(2, 3, 4, 2), torch.zeros(4, 2)).shape == (2, 3)
    one = pairwise_contacts(xy[:, :1], yaw[:, :1], length[:, :1], width[:, :1], present[:, :1])
    assert one.shape == (B, 1, 1) and not one.any()


# --- time to collision -------------------------------------------------------------------

def ttc_of(*boxes, **kw):
    s = scene(*boxes)
    ttc = time_to_collision(s["xy"], s["yaw"], s["speed"], s["length"], s["width"], s["present"], **kw)
    return float(ttc[0])


def test_ttc_head_on_matches_analytic_time():
    ego, other = (0, 0, 0, 4.6, 1.9, 10.0), (50, 0.5, math.pi, 4.6, 1.9, 10.0)
    t_star = (50 - 4.6) / 20.0  # bumpers meet at 2.27 s
    t = ttc_of(ego, other)
    assert t_star < t <= t_star + 0.1 + 1e-6
    assert t == pytest.approx(2.3, abs=1e-6)
    assert ttc_of(ego, other, dt=None) == pytest.approx(t_star, abs=1e-5)


def test_ttc_diverging_stationary_rear_and_current_overlap():
    ego = (0, 0, 0, 4.6, 1.9, 10.0)
    assert ttc_of(ego, (-20, 0, math.pi, 4.6, 1.9, 10.0)) == math.inf  # driving apart
    assert ttc_of(ego, (20, 3.0, 0, 4.6, 1.9, 10.0)) == math.inf  # parallel lanes, same speed
    assert ttc_of(ego, (40, 0, 0, 4.6, 1.9, 15.0)) == math.inf  # lead is faster
    assert ttc_of(ego, (19, 0, 0, 4.6, 1.9, 5.0)) == pytest.approx(2.9, abs=1e-6)  # closing 5 m/s: 2.88 s
    stopped = (0, 0, 0, 4.6, 1.9, 0.0)
    assert ttc_of(stopped, (10, 0, math.pi, 4.6, 1.9, 10.0)) == math.inf  # nuPlan: ego stopped
    follower = (-10, 0, 0, 4.6, 1.9, 15.0)  # closing from behind at 5 m/s: not the ego's TTC
    assert ttc_of(ego, follower) == math.inf
    assert ttc_of(ego, follower, exclude_rear=False) == pytest.approx(1.1, abs=1e-6)
    assert ttc_of(ego, (4.0, 0.5, 0.3, 4.6, 1.9, 0.0)) == 0.0


def test_ttc_matches_brute_force_stepping():
    B, A, dt, n = 64, 16, 0.1, 30
    xy, yaw, length, width, present, speed = random_scene(B, A, 40.0, seed=7)
    speed[:, 0] = speed[:, 0].abs() + 1.0
    got = time_to_collision(xy, yaw, speed, length, width, present, horizon=3.0, dt=dt, exclude_rear=False)
    vel = speed.unsqueeze(-1) * torch.stack((torch.cos(yaw), torch.sin(yaw)), -1)
    want = torch.full((B,), math.inf)
    for k in range(n, -1, -1):  # descending: the last assignment is the first step
        c = box_corners(xy.double() + vel.double() * (k * dt), yaw.double(), length.double(), width.double())
        hit = boxes_overlap(c[:, :1], c) & present & present[:, :1]
        hit[:, 0] = False
        want = torch.where(hit.any(1), torch.tensor(k * dt, dtype=torch.float32), want)
    assert torch.isfinite(want).sum() > 10 and torch.isinf(want).sum() > 5
    assert torch.allclose(got, want, atol=1e-5)
