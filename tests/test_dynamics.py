"""Tests for roadloop.sim.dynamics: unicycle/bicycle models, control fitting, plan tracking."""

from __future__ import annotations

import math

import pytest
import torch

from roadloop.errors import ConfigError, ControlError
from roadloop.sim.dynamics import (
    ActionBounds,
    bicycle_forward,
    bicycle_inverse,
    bicycle_rollout,
    plan_from_controls,
    track_plan,
    unicycle_controls_from_poses,
    unicycle_forward,
    unicycle_inverse,
    unicycle_rollout,
)
from roadloop.sim.geometry import wrap_angle

SHAPES = [(), (5,), (3, 4), (2, 3, 7)]
B = ActionBounds()


def _states(shape, gen, dtype=torch.float64):
    xy = (torch.rand((*shape, 2), generator=gen, dtype=dtype) - 0.5) * 200.0
    yaw = (torch.rand(tuple(shape), generator=gen, dtype=dtype) - 0.5) * 2 * math.pi
    speed = torch.rand(tuple(shape), generator=gen, dtype=dtype) * 30.0
    return xy, yaw, speed


def _controls(shape, gen, dtype=torch.float64):
    accel = (torch.rand(tuple(shape), generator=gen, dtype=dtype) * 2 - 1) * B.accel_max
    curv = (torch.rand(tuple(shape), generator=gen, dtype=dtype) * 2 - 1) * B.curvature_max
    return accel, curv


def _assert_same_state(a, b, tol):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=0)
    assert float(wrap_angle(a[1] - b[1]).abs().max()) < tol
    torch.testing.assert_close(a[2], b[2], atol=tol, rtol=0)


# --------------------------------------------------------------------------- bounds


def test_action_bounds_defaults_and_validate():
    b = ActionBounds()
    assert (b.accel_min, b.accel_max, b.curvature_max, b.steer_max, b.wheelbase) == (-9.8, 9.8, 0.2, 0.6, 2.8)
    b.validate()
    for kw in (
        {"accel_min": 1.0, "accel_max": 1.0},
        {"accel_min": 3.0, "accel_max": -3.0},
        {"curvature_max": 0.0},
        {"steer_max": -0.1},
        {"wheelbase": 0.0},
        {"accel_max": float("nan")},
        {"curvature_max": float("nan")},
        {"steer_max": 2.0},
    ):
        with pytest.raises(ConfigError):
            ActionBounds(**kw)


# --------------------------------------------------------------------------- unicycle


def test_unicycle_forward_analytic():
    d = torch.float64
    z = torch.zeros((), dtype=d)
    # straight at constant speed
    xy, yaw, v = unicycle_forward(torch.zeros(2, dtype=d), z, torch.tensor(10.0, dtype=d), z, z)
    torch.testing.assert_close(xy, torch.tensor([1.0, 0.0], dtype=d))
    assert float(v) == 10.0 and float(yaw) == 0.0
    # constant curvature: 10 steps land exactly on the circle of radius 1/k
    state = (torch.zeros(2, dtype=d), z, torch.tensor(5.0, dtype=d))
    k = 0.1
    for _ in range(10):
        state = unicycle_forward(*state, torch.tensor(1.0, dtype=d), torch.tensor(k, dtype=d))
    s = 5.0 * 1.0 + 0.5 * 1.0 * 1.0**2  # arc length after 1 s at 1 m/s^2
    expected = torch.tensor([math.sin(k * s) / k, (1 - math.cos(k * s)) / k], dtype=d)
    torch.testing.assert_close(state[0], expected)
    torch.testing.assert_close(state[1], torch.tensor(k * s, dtype=d))
    torch.testing.assert_close(state[2], torch.tensor(6.0, dtype=d))
    # stop inside the step: distance v^2 / 2|a|, never negative, no reversing
    xy, _, v = unicycle_forward(torch.zeros(2, dtype=d), z, torch.tensor(0.5, dtype=d),
                                torch.tensor(-9.8, dtype=d), z)
    torch.testing.assert_close(xy, torch.tensor([0.25 / 19.6, 0.0], dtype=d))
    assert float(v) == 0.0
    xy, _, v = unicycle_forward(torch.zeros(2, dtype=d), z, z, torch.tensor(-5.0, dtype=d), z)
    assert float(xy.abs().max()) == 0.0 and float(v) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_unicycle_round_trip(shape):
    gen = torch.Generator().manual_seed(1)
    xy, yaw, v = _states(shape, gen)
    v = torch.where(torch.rand(shape, generator=gen, dtype=v.dtype) < 0.3, v * 0.02, v)  # some near rest
    accel, curv = _controls(shape, gen)
    s1 = unicycle_forward(xy, yaw, v, accel, curv)
    a2, k2 = unicycle_inverse(xy, yaw, v, *s1)
    moving = v + accel * 0.1 >= 0  # no stop inside the step: controls are recovered exactly
    torch.testing.assert_close(a2[moving], accel[moving], atol=1e-5, rtol=0)
    torch.testing.assert_close(k2[moving], curv[moving], atol=1e-5, rtol=0)
    # stopping cases: recovered controls reproduce the same next state
    _assert_same_state(unicycle_forward(xy, yaw, v, a2, k2), s1, 1e-6)


def test_unicycle_round_trip_float32():
    gen = torch.Generator().manual_seed(2)
    xy, yaw, v = _states((500,), gen, torch.float32)
    accel, curv = _controls((500,), gen, torch.float32)
    s1 = unicycle_forward(xy, yaw, v, accel, curv)
    assert s1[0].dtype == torch.float32
    a2, k2 = unicycle_inverse(xy, yaw, v, *s1, bounds=B)
    ok = (v + accel * 0.1 >= 0) & (v > 1.0)
    assert float((a2 - accel)[ok].abs().max()) < 1e-3
    assert float((k2 - curv)[ok].abs().max()) < 1e-3
    _assert_same_state(unicycle_forward(xy, yaw, v, a2, k2), s1, 1e-3)


def test_unicycle_inverse_at_rest_is_zero():
    z = torch.zeros(4)
    a, k = unicycle_inverse(torch.zeros(4, 2), z, z, torch.zeros(4, 2), z + 0.3, z)
    assert float(a.abs().max()) == 0.0 and float(k.abs().max()) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_rollout_matches_repeated_forward(shape):
    gen = torch.Generator().manual_seed(3)
    xy, yaw, v = _states(shape, gen)
    a, k = _controls((*shape, 12), gen)
    a = a * 1.5  # partly out of bounds: clipping must match too
    controls = torch.stack((a, k), dim=-1)
    rx, ry, rv = unicycle_rollout(xy, yaw, v, controls, bounds=B)
    assert rx.shape == (*shape, 12, 2) and ry.shape == (*shape, 12) and rv.shape == (*shape, 12)
    state = (xy, yaw, v)
    for t in range(12):
        state = unicycle_forward(*state, a[..., t], k[..., t], bounds=B)
        _assert_same_state(state, (rx[..., t, :], ry[..., t], rv[..., t]), 1e-9)
    px, py, pv = plan_from_controls(xy, yaw, v, controls, bounds=B)
    assert torch.equal(px, rx) and torch.equal(py, ry) and torch.equal(pv, rv)


@pytest.mark.parametrize("shape", [(), (1,), (64,), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rollout_is_bitwise_the_stepwise_integration(shape, dtype):
    """``unicycle_rollout`` steps only its recurrences in Python and integrates the rest over all
    steps at once: the result must be the same bits as 64 calls of the one-step model, including
    stops inside a step (hard braking from low speed), negative input speeds and tight turns."""
    gen = torch.Generator().manual_seed(11)
    xy, yaw, v = _states(shape, gen, dtype)
    v = v - 5.0  # some negative input speeds (treated as 0)
    a, k = _controls((*shape, 64), gen, dtype)
    a = a - 2.0  # mostly braking: many plans stop and stay stopped
    rx, ry, rv = unicycle_rollout(xy, yaw, v, torch.stack((a, k), dim=-1))
    state = (xy, yaw, v)
    for t in range(64):
        state = unicycle_forward(*state, a[..., t], k[..., t])
        assert torch.equal(state[0], rx[..., t, :]) and torch.equal(state[1], ry[..., t])
        assert torch.equal(state[2], rv[..., t])
    if math.prod(shape) >= 64:
        assert bool((rv == 0).any()) and bool((rv > 0).any())


def test_bounds_clipping():
    z = torch.zeros(3)
    xy, v = torch.zeros(3, 2), torch.full((3,), 10.0)
    accel = torch.tensor([50.0, -50.0, 1.0])
    curv = torch.tensor([1.0, -1.0, 0.05])
    clipped = unicycle_forward(xy, z, v, accel, curv, bounds=B)
    ref = unicycle_forward(xy, z, v, torch.tensor([9.8, -9.8, 1.0]), torch.tensor([0.2, -0.2, 0.05]))
    _assert_same_state(clipped, ref, 1e-6)
    unclipped = unicycle_forward(xy, z, v, accel, curv)
    assert float(unclipped[2][0]) == pytest.approx(15.0)
    steer = torch.tensor([1.0, -1.0, 0.1])
    clipped = bicycle_forward(xy, z, v, accel, steer, bounds=B)
    ref = bicycle_forward(xy, z, v, torch.tensor([9.8, -9.8, 1.0]), torch.tensor([0.6, -0.6, 0.1]), bounds=B)
    _assert_same_state(clipped, ref, 1e-6)


# --------------------------------------------------------------------------- errors


def test_nonfinite_controls_raise_with_index():
    xy, yaw, v = torch.zeros(3, 4, 2), torch.zeros(3, 4), torch.ones(3, 4)
    accel, curv = torch.zeros(3, 4), torch.zeros(3, 4)
    bad = accel.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ControlError, match=r"accel .*\(1, 2\)"):
        unicycle_forward(xy, yaw, v, bad, curv, bounds=B)  # bounds must not clamp NaN away
    bad = curv.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ControlError, match=r"curvature .*\(2, 0\)"):
        unicycle_forward(xy, yaw, v, accel, bad)
    seq = torch.zeros(3, 4, 6, 2)
    seq[0, 3, 5, 1] = -float("inf")
    with pytest.raises(ControlError, match=r"curvature .*\(0, 3, 5\)"):
        unicycle_rollout(xy, yaw, v, seq)
    seq[0, 3, 5, 1] = 0.0
    seq[2, 1, 0, 0] = float("nan")
    with pytest.raises(ControlError, match=r"accel .*\(2, 1, 0\)"):
        bicycle_rollout(xy, yaw, v, seq)
    with pytest.raises(ControlError, match=r"steer .*\(1, 2\)"):
        bicycle_forward(xy, yaw, v, accel, torch.where(torch.arange(12).view(3, 4) == 6, math.nan, 0.0))


def test_wrong_shapes_raise():
    xy, yaw, v = torch.zeros(3, 2), torch.zeros(3), torch.ones(3)
    with pytest.raises(ControlError, match=r"\(4,\)"):
        unicycle_forward(xy, yaw, v, torch.zeros(4), torch.zeros(4))
    with pytest.raises(ControlError, match=r"\(3,\)"):
        unicycle_forward(xy, yaw, v, torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ControlError, match="yaw"):
        unicycle_forward(xy, torch.zeros(2), v, torch.zeros(3), torch.zeros(3))
    with pytest.raises(ControlError, match=r"\(3, 5\)"):
        unicycle_rollout(xy, yaw, v, torch.zeros(3, 5))
    with pytest.raises(ControlError):
        unicycle_rollout(xy, yaw, v, torch.zeros(2, 5, 2))
    with pytest.raises(ControlError):
        unicycle_controls_from_poses(torch.zeros(3, 6, 2), torch.zeros(3, 5), v)
    with pytest.raises(ControlError):
        track_plan(xy, yaw, v, torch.zeros(3, 10, 3))
    with pytest.raises(ControlError):
        track_plan(xy, yaw, v, torch.zeros(3, 10, 2), torch.zeros(3, 9))
    with pytest.raises(ConfigError):
        unicycle_forward(xy, yaw, v, torch.zeros(3), torch.zeros(3), dt=0.0)


# --------------------------------------------------------------------------- bicycle


@pytest.mark.parametrize("shape", SHAPES)
def test_bicycle_round_trip(shape):
    gen = torch.Generator().manual_seed(4)
    xy, yaw, v = _states(shape, gen)
    accel, _ = _controls(shape, gen)
    steer = (torch.rand(shape, generator=gen, dtype=v.dtype) * 2 - 1) * B.steer_max
    s1 = bicycle_forward(xy, yaw, v, accel, steer, bounds=B)
    a2, st2 = bicycle_inverse(xy, yaw, v, *s1, bounds=B)
    moving = (v + accel * 0.1 >= 0) & (v > 0.1)
    torch.testing.assert_close(a2[moving], accel[moving], atol=1e-5, rtol=0)
    torch.testing.assert_close(st2[moving], steer[moving], atol=1e-5, rtol=0)
    _assert_same_state(bicycle_forward(xy, yaw, v, a2, st2, bounds=B), s1, 1e-6)
    # the bicycle is the unicycle with curvature tan(steer) / wheelbase
    _assert_same_state(unicycle_forward(xy, yaw, v, accel, torch.tan(steer) / 2.8), s1, 1e-12)


def test_bicycle_rollout_matches_forward():
    gen = torch.Generator().manual_seed(5)
    xy, yaw, v = _states((4,), gen)
    controls = torch.stack(((torch.rand(4, 8, generator=gen, dtype=v.dtype) - 0.5) * 4,
                            (torch.rand(4, 8, generator=gen, dtype=v.dtype) - 0.5)), dim=-1)
    rx, ry, rv = bicycle_rollout(xy, yaw, v, controls, bounds=B)
    state = (xy, yaw, v)
    for t in range(8):
        state = bicycle_forward(*state, controls[:, t, 0], controls[:, t, 1], bounds=B)
    _assert_same_state(state, (rx[:, -1], ry[:, -1], rv[:, -1]), 1e-9)


# --------------------------------------------------------------------------- controls from poses


def _smooth_controls(n, h, gen):
    t = torch.arange(h) * 0.1
    ph = torch.rand(n, 4, generator=gen) * 2 * math.pi
    amp = torch.rand(n, 2, generator=gen)
    accel = 2.0 * amp[:, :1] * torch.sin(0.8 * t + ph[:, :1]) + 0.5 * torch.sin(2.0 * t + ph[:, 1:2])
    curv = 0.05 * amp[:, 1:] * torch.sin(0.5 * t + ph[:, 2:3]) + 0.01 * torch.sin(1.5 * t + ph[:, 3:])
    return torch.stack((accel, curv), dim=-1)


def _poses_of(xy, yaw, v, controls):
    rx, ry, _ = unicycle_rollout(xy, yaw, v, controls)
    return torch.cat((xy.unsqueeze(-2), rx), dim=-2), torch.cat((yaw.unsqueeze(-1), ry), dim=-1)


def _pose_error(xy, yaw, v, controls, pxy):
    rx, _, _ = unicycle_rollout(xy, yaw, v, controls)
    return float(torch.linalg.vector_norm(rx - pxy[..., 1:, :], dim=-1).max())


def test_controls_from_poses_round_trip():
    gen = torch.Generator().manual_seed(6)
    n, h = 16, 64
    xy, yaw, _ = _states((n,), gen, torch.float32)
    v = 3.0 + torch.rand(n, generator=gen) * 20.0
    controls = _smooth_controls(n, h, gen)
    pxy, pyaw = _poses_of(xy, yaw, v, controls)
    fit = unicycle_controls_from_poses(pxy, pyaw, v)
    assert fit.shape == (n, h, 2) and fit.dtype == torch.float32
    assert _pose_error(xy, yaw, v, fit, pxy) < 0.05
    # labels match wherever the vehicle moves (at rest, any braking is equivalent)
    _, _, rv = unicycle_rollout(xy, yaw, v, controls)
    moving = torch.cat((v[:, None], rv[:, :-1]), dim=1) > 0.5
    assert float((fit - controls)[..., 0][moving].abs().max()) < 0.1  # accel
    assert float((fit - controls)[..., 1][moving].abs().max()) < 1e-3  # curvature
    # a wrong initial speed is absorbed within two steps
    fit = unicycle_controls_from_poses(pxy, pyaw, v + 1.0)
    assert _pose_error(xy, yaw, v + 1.0, fit, pxy) < 0.05
    assert float((fit - controls)[..., 0][:, 3:][moving[:, 3:]].abs().max()) < 0.1
    # batch shapes
    fit = unicycle_controls_from_poses(pxy.view(4, 4, h + 1, 2), pyaw.view(4, 4, h + 1), v.view(4, 4))
    assert fit.shape == (4, 4, h, 2)


def test_controls_from_poses_geometric_path():
    # a lane change sampled at constant speed, yaw from the tangent (not made by the model)
    t = torch.arange(65, dtype=torch.float32) * 0.1
    x = 15.0 * t
    y = 1.75 * (1 - torch.cos(math.pi * x / 96.0))
    yaw = torch.atan(1.75 * math.pi / 96.0 * torch.sin(math.pi * x / 96.0))
    pxy = torch.stack((x, y), dim=-1)
    fit = unicycle_controls_from_poses(pxy, yaw, torch.tensor(15.0), bounds=B)
    assert _pose_error(pxy[0], yaw[0], torch.tensor(15.0), fit, pxy) < 0.05


def test_controls_from_poses_stop():
    # brake to a stop mid-horizon and stand still
    h = 64
    controls = torch.zeros(2, h, 2)
    controls[0, :20, 0] = -4.0
    controls[1, :5, 0] = -9.8
    controls[:, :, 1] = 0.03
    xy, yaw, v = torch.tensor([[10.0, -5.0], [0.0, 0.0]]), torch.tensor([0.3, -2.0]), torch.tensor([6.0, 2.0])
    pxy, pyaw = _poses_of(xy, yaw, v, controls)
    fit = unicycle_controls_from_poses(pxy, pyaw, v, bounds=B)
    assert torch.isfinite(fit).all()
    assert _pose_error(xy, yaw, v, fit, pxy) < 0.05
    assert float(fit[:, 30:].abs().max()) < 0.05  # standing still: no control noise
    assert float(fit[..., 0].min()) >= B.accel_min - 1e-5
    assert float(fit[..., 1].abs().max()) <= B.curvature_max + 1e-6


# --------------------------------------------------------------------------- tracking controller


def _line_plan(xy, v_ref, h=64):
    """Plan along y = 0 from the projection of xy, at v_ref (B,)."""
    s = xy[:, :1] + v_ref[:, None] * 0.1 * torch.arange(1, h + 1)
    return torch.stack((s, torch.zeros_like(s)), dim=-1), v_ref[:, None].expand(-1, h)


def _circle_plan(xy, v_ref, r, h=64):
    """Plan along the CCW circle of radius r centred at (0, r), from the projection of xy."""
    ang = torch.atan2(xy[:, 0], r - xy[:, 1])
    a = ang[:, None] + v_ref[:, None] * 0.1 * torch.arange(1, h + 1) / r
    plan = torch.stack((r * torch.sin(a), r - r * torch.cos(a)), dim=-1)
    return plan, v_ref[:, None].expand(-1, h)


def _drive(xy, yaw, v, planner, steps, use_speed=True):
    for _ in range(steps):
        plan_xy, plan_v = planner(xy)
        u = track_plan(xy, yaw, v, plan_xy, plan_v if use_speed else None, bounds=B)
        assert torch.isfinite(u).all()
        assert float(u[:, 0].min()) >= B.accel_min - 1e-5
        assert float(u[:, 1].abs().max()) <= B.curvature_max + 1e-6
        xy, yaw, v = unicycle_forward(xy, yaw, v, u[:, 0], u[:, 1], bounds=B)
    return xy, yaw, v


@pytest.mark.parametrize("use_speed", [True, False])
def test_track_straight_line(use_speed):
    v_ref = torch.tensor([3.0, 10.0, 25.0])
    xy, yaw, v = torch.zeros(3, 2), torch.zeros(3), v_ref.clone()
    max_err = 0.0
    for _ in range(10):
        xy, yaw, v = _drive(xy, yaw, v, lambda p: _line_plan(p, v_ref), 10, use_speed)
        max_err = max(max_err, float(xy[:, 1].abs().max()))
    assert max_err < 0.2
    torch.testing.assert_close(v, v_ref, atol=0.05, rtol=0)


@pytest.mark.parametrize("use_speed", [True, False])
def test_track_circle(use_speed):
    r = 30.0
    v_ref = torch.tensor([5.0, 10.0])
    xy, yaw, v = torch.zeros(2, 2), torch.zeros(2), v_ref.clone()
    max_err = 0.0
    for _ in range(20):
        xy, yaw, v = _drive(xy, yaw, v, lambda p: _circle_plan(p, v_ref, r), 5, use_speed)
        radius = torch.linalg.vector_norm(xy - torch.tensor([0.0, r]), dim=-1)
        max_err = max(max_err, float((radius - r).abs().max()))
    assert max_err < 0.5


def test_track_converges_from_lateral_offset():
    v_ref = torch.tensor([5.0, 10.0, 20.0])
    xy, yaw, v = torch.tensor([[0.0, 1.5], [0.0, -1.5], [0.0, 1.5]]), torch.zeros(3), v_ref.clone()
    xy, yaw, v = _drive(xy, yaw, v, lambda p: _line_plan(p, v_ref), 50)
    assert float(xy[:, 1].abs().max()) < 0.3


@pytest.mark.parametrize("use_speed", [True, False])
def test_track_stop_plan(use_speed):
    xy, yaw, v = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 2.0]]), torch.tensor([0.5, 0.0, 2.0]), \
        torch.tensor([20.0, 3.0, 0.0])
    start = xy.clone()
    stop = lambda p: (p[:, None, :].expand(-1, 64, 2).clone(), torch.zeros(3, 64))
    xy, yaw, v = _drive(xy, yaw, v, stop, 40, use_speed)
    assert torch.isfinite(xy).all() and torch.isfinite(yaw).all()
    assert float(v.abs().max()) == 0.0
    assert float(torch.linalg.vector_norm(xy - start, dim=-1)[2]) == 0.0  # at rest: stays put
    assert float(torch.linalg.vector_norm(xy - start, dim=-1).max()) < 20.0**2 / (2 * 9.8) * 1.6
    u = track_plan(xy, yaw, v, *stop(xy), bounds=B)
    assert float(u.abs().max()) == 0.0


def test_track_short_plan_and_batch_shapes():
    xy, yaw, v = torch.zeros(2, 3, 2), torch.zeros(2, 3), torch.full((2, 3), 8.0)
    plan = torch.stack((torch.arange(1, 3) * 0.8, torch.arange(1, 3) * 0.1), dim=-1).expand(2, 3, 2, 2)
    u = track_plan(xy, yaw, v, plan)  # plan (0.2 s) shorter than the lookahead: aims at its end
    assert u.shape == (2, 3, 2) and torch.isfinite(u).all()
    assert float(u[..., 1].min()) > 0  # turns left toward the plan


def test_gradients_are_finite():
    # stops, straight motion, standing still and zero-length plans must not give NaN gradients
    xy, yaw, v = torch.zeros(4, 2), torch.zeros(4), torch.tensor([0.0, 0.5, 10.0, 3.0])
    controls = torch.zeros(4, 10, 2)
    controls[:, :, 0] = torch.tensor([-1.0, -9.8, 0.0, 2.0])[:, None]
    controls[1, :, 1] = 0.1
    controls.requires_grad_(True)
    rx, ry, rv = unicycle_rollout(xy, yaw, v, controls, bounds=B)
    (rx.sum() + ry.sum() + rv.sum()).backward()
    assert torch.isfinite(controls.grad).all()
    pxy = torch.cat((xy[:, None], rx.detach()), dim=1).requires_grad_(True)
    unicycle_controls_from_poses(pxy, torch.cat((yaw[:, None], ry.detach()), dim=1), v).sum().backward()
    assert torch.isfinite(pxy.grad).all()
    plan = torch.zeros(4, 64, 2, requires_grad=True)
    track_plan(xy, yaw, v, plan).sum().backward()
    assert torch.isfinite(plan.grad).all()
