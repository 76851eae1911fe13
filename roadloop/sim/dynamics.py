"""Vehicle dynamics: kinematic unicycle and bicycle models, control fitting, plan tracking.

Frame and units: x east, y north in metres; yaw in radians counter-clockwise from +x;
time in seconds, speed in m/s, acceleration in m/s^2, curvature in 1/m, steering in rad.
Every function is batched over arbitrary leading dimensions ``...`` (shapes in docstrings),
pure torch, dtype-agnostic (float32 at runtime, float64 works for precision checks).

Models
------
*Unicycle* (the Alpamayo-R1 action space): state (xy, yaw, speed), controls
(acceleration, curvature), held constant over one step of ``dt`` (0.1 s).  The vehicle
never reverses: ``speed' = max(speed + a*dt, 0)``; the distance travelled is integrated
exactly (trapezoid, or ``v^2 / 2|a|`` when the vehicle stops inside the step), the heading
turns by ``curvature * distance`` and the position moves along the exact circular arc.
Negative input speeds are treated as 0.

*Kinematic bicycle*: the same with the reference point on the rear axle and controls
(acceleration, steering angle); ``curvature = tan(steer) / wheelbase``.

``unicycle_controls_from_poses`` fits (acceleration, curvature) labels to a pose sequence
(planned trajectory or logged track), and ``track_plan`` turns a planned trajectory into
the next control (P speed control + pure pursuit) so that any plan-emitting policy can
drive the simulator.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from roadloop.errors import ConfigError, ControlError
from roadloop.sim.geometry import wrap_angle

__all__ = [
    "ActionBounds",
    "bicycle_forward",
    "bicycle_inverse",
    "bicycle_rollout",
    "plan_from_controls",
    "track_plan",
    "unicycle_controls_from_poses",
    "unicycle_forward",
    "unicycle_inverse",
    "unicycle_rollout",
]

DEFAULT_DT = 0.1  # s


@dataclass(frozen=True)
class ActionBounds:
    """Physical limits of the ego's controls (validated on construction)."""

    accel_min: float = -9.8  # m/s^2, strongest braking (<= 0)
    accel_max: float = 9.8  # m/s^2, strongest acceleration (>= 0)
    curvature_max: float = 0.2  # 1/m, |curvature| limit of the unicycle (5 m turning radius)
    steer_max: float = 0.6  # rad, |steering angle| limit of the bicycle (< pi/2)
    wheelbase: float = 2.8  # m, bicycle wheelbase (rear axle to front axle)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` on NaN, inverted or non-positive limits."""
        for name in ("accel_min", "accel_max", "curvature_max", "steer_max", "wheelbase"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or math.isnan(v):
                raise ConfigError(f"ActionBounds.{name} must be a number, got {v!r}")
        if not self.accel_min < self.accel_max:
            raise ConfigError(
                f"ActionBounds.accel_min ({self.accel_min}) must be < accel_max ({self.accel_max})"
            )
        if self.accel_min > 0 or self.accel_max < 0:
            raise ConfigError(
                f"ActionBounds accel range [{self.accel_min}, {self.accel_max}] m/s^2 must contain 0"
            )
        for name in ("curvature_max", "steer_max", "wheelbase"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ActionBounds.{name} must be > 0, got {getattr(self, name)}")
        if not self.steer_max < math.pi / 2:
            raise ConfigError(f"ActionBounds.steer_max must be < pi/2 rad, got {self.steer_max}")
        if not math.isfinite(self.wheelbase):
            raise ConfigError(f"ActionBounds.wheelbase must be finite, got {self.wheelbase}")


_DEFAULT_BOUNDS = ActionBounds()


# --------------------------------------------------------------------------- checks


def _check_dt(dt: float) -> None:
    if not (isinstance(dt, int | float) and math.isfinite(dt) and dt > 0):
        raise ConfigError(f"dt must be a positive finite number of seconds, got {dt!r}")


def _check_finite(name: str, t: torch.Tensor, what: str = "batch index") -> None:
    """Raise ``ControlError`` naming ``name`` and the index of its first non-finite element."""
    if not bool(torch.isfinite(t.sum())):  # fast path: a finite sum means all are finite
        if bool(torch.isfinite(t).all()):
            return  # the sum overflowed
        bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
        val = t[tuple(bad)].item()
        raise ControlError(
            f"{name} is not finite at {what} {tuple(bad)} (value {val}); it must hold finite numbers"
        )


def _check_state(xy: torch.Tensor, yaw: torch.Tensor, speed: torch.Tensor) -> tuple[int, ...]:
    if xy.dim() < 1 or xy.shape[-1] != 2:
        raise ControlError(f"xy must have shape (..., 2), got {tuple(xy.shape)}")
    batch = tuple(xy.shape[:-1])
    if tuple(yaw.shape) != batch or tuple(speed.shape) != batch:
        raise ControlError(
            f"state shapes disagree: xy {tuple(xy.shape)} needs yaw and speed of shape {batch}, "
            f"got yaw {tuple(yaw.shape)}, speed {tuple(speed.shape)}"
        )
    return batch


def _check_controls(batch: tuple[int, ...], **controls: torch.Tensor) -> None:
    for c in controls.values():
        if tuple(c.shape) != batch:
            shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in controls.items())
            raise ControlError(f"control shapes must equal the state batch shape {batch}, got {shapes}")
    for name, c in controls.items():
        _check_finite(name, c)


def _check_sequence(batch: tuple[int, ...], controls: torch.Tensor, names: tuple[str, str]) -> None:
    if controls.dim() < 2 or controls.shape[-1] != 2 or tuple(controls.shape[:-2]) != batch:
        raise ControlError(
            f"controls must have shape (*{batch}, H, 2) [({names[0]}, {names[1]})], "
            f"got {tuple(controls.shape)}"
        )
    for i, name in enumerate(names):
        _check_finite(name, controls[..., i], "(batch..., step) index")


# --------------------------------------------------------------------------- unicycle


def _step_arc(
    v0: torch.Tensor, accel: torch.Tensor, curv: torch.Tensor, dt: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise part of a unicycle step from start speed v0 >= 0: (end speed, half the heading
    change, chord of the arc travelled), any shape (one step, or all steps of a rollout at once)."""
    v_end = v0 + accel * dt
    v1 = v_end.clamp_min(0.0)
    # stop inside the step: distance v0^2 / 2|a| (the denominator is > 0 in that branch)
    dist = torch.where(v_end >= 0, 0.5 * (v0 + v1) * dt, v0 * v0 / (-2.0 * accel).clamp_min(1e-12))
    half = 0.5 * curv * dist  # half the heading change
    chord = dist * torch.sinc(half / math.pi)  # exact arc chord: 2 sin(half) / curv
    return v1, half, chord


def _unicycle_step(
    xy: torch.Tensor, yaw: torch.Tensor, speed: torch.Tensor, accel: torch.Tensor, curv: torch.Tensor,
    dt: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unchecked, unclipped unicycle step (see module docstring)."""
    v1, half, chord = _step_arc(speed.clamp_min(0.0), accel, curv, dt)
    mid = yaw + half
    new_xy = xy + torch.stack((chord * torch.cos(mid), chord * torch.sin(mid)), dim=-1)
    return new_xy, wrap_angle(yaw + 2.0 * half), v1


def _clip_unicycle(
    accel: torch.Tensor, curv: torch.Tensor, bounds: ActionBounds | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if bounds is None:
        return accel, curv
    return (
        accel.clamp(bounds.accel_min, bounds.accel_max),
        curv.clamp(-bounds.curvature_max, bounds.curvature_max),
    )


def unicycle_forward(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed: torch.Tensor,
    accel: torch.Tensor,
    curvature: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unicycle step.

    xy (..., 2) m, yaw (...) rad, speed (...) m/s, accel (...) m/s^2, curvature (...) 1/m
    -> (xy (..., 2), yaw (...) wrapped to [-pi, pi), speed (...) >= 0).  Controls are
    clipped to ``bounds`` if given; NaN/inf controls or mismatched shapes raise ControlError.
    """
    _check_dt(dt)
    batch = _check_state(xy, yaw, speed)
    _check_controls(batch, accel=accel, curvature=curvature)
    accel, curvature = _clip_unicycle(accel, curvature, bounds)
    return _unicycle_step(xy, yaw, speed, accel, curvature, dt)


def _norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Length of (x, y) with a finite gradient at 0 (the 1e-12 m floor is below float resolution)."""
    return torch.sqrt((x * x + y * y).clamp_min(1e-24))


def _arc_length(chord_xy: torch.Tensor, dyaw: torch.Tensor) -> torch.Tensor:
    """Arc length (...) m of the circular arc with chord ``(..., 2)`` and heading change ``dyaw``."""
    return _norm(chord_xy[..., 0], chord_xy[..., 1]) / torch.sinc(0.5 * dyaw / math.pi)


def _dist_eps(t: torch.Tensor) -> float:
    """Distances (m) below this are treated as no motion (depends on float precision)."""
    return 100.0 * torch.finfo(t.dtype).eps


def _stop_accel(v0: torch.Tensor, v1: torch.Tensor, dist: torch.Tensor, dt: float) -> torch.Tensor:
    """Acceleration (...) m/s^2 from v0 to v1 over one step, inferring in-step stops from ``dist``."""
    accel = (v1 - v0) / dt
    # ended at rest: the distance tells how hard it braked (v0^2 / 2|a| <= v0 dt / 2); the
    # floor caps it at 100x the gentlest stop, -100 v0 / dt (exact for |a| <= 10 m/s^2 if v0 > 0.01)
    floor = torch.maximum(0.005 * dt * v0, torch.full_like(v0, _dist_eps(dist)))
    hard = -v0 * v0 / (2.0 * torch.maximum(dist, floor))
    return torch.where((v1 <= 0) & (v0 > 0), torch.minimum(accel, hard), accel)


def unicycle_inverse(
    xy0: torch.Tensor,
    yaw0: torch.Tensor,
    speed0: torch.Tensor,
    xy1: torch.Tensor,
    yaw1: torch.Tensor,
    speed1: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Controls taking state 0 to state 1 in one step (exact for states made by the forward).

    States as in ``unicycle_forward`` -> (accel (...) m/s^2, curvature (...) 1/m).  A stop
    inside the step (speed1 == 0) is recovered from the distance travelled; with no motion
    the curvature is 0.  Heading changes must be below pi per step.  Clipped to ``bounds``.
    """
    _check_dt(dt)
    batch = _check_state(xy0, yaw0, speed0)
    if _check_state(xy1, yaw1, speed1) != batch:
        raise ControlError(f"state 0 has batch shape {batch} but state 1 has {tuple(xy1.shape[:-1])}")
    v0, v1 = speed0.clamp_min(0.0), speed1.clamp_min(0.0)
    dyaw = wrap_angle(yaw1 - yaw0)
    dist = _arc_length(xy1 - xy0, dyaw)
    moved = dist > _dist_eps(dist)
    curv = torch.where(moved, dyaw / dist.clamp_min(_dist_eps(dist)), torch.zeros_like(dyaw))
    return _clip_unicycle(_stop_accel(v0, v1, dist, dt), curv, bounds)


def unicycle_rollout(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed: torch.Tensor,
    controls: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integrate H unicycle steps.

    xy (..., 2), yaw (...), speed (...), controls (..., H, 2) [accel m/s^2, curvature 1/m]
    -> states after each step: xy (..., H, 2) m, yaw (..., H) rad, speed (..., H) m/s.
    """
    _check_dt(dt)
    batch = _check_state(xy, yaw, speed)
    _check_sequence(batch, controls, ("accel", "curvature"))
    accel, curv = _clip_unicycle(controls[..., 0], controls[..., 1], bounds)
    h = controls.shape[-2]
    if h == 0:
        return xy.new_zeros((*batch, 0, 2)), yaw.new_zeros((*batch, 0)), speed.new_zeros((*batch, 0))
    # The same arithmetic as H calls of ``_unicycle_step``, bit for bit, with only the three
    # recurrences (speed, wrapped heading, position) stepped in Python and ``_step_arc`` evaluated
    # once over all H steps: elementwise kernels give the same bits on one element as on many.
    adt = accel * dt
    v = [speed.clamp_min(0.0)]
    for a_t in adt.unbind(-1):
        v.append((v[-1] + a_t).clamp_min(0.0))
    v1, half, chord = _step_arc(torch.stack(v[:-1], dim=-1), accel, curv, dt)  # (..., H) each
    turn = 2.0 * half
    yaws = [yaw]
    for turn_t in turn.unbind(-1):
        yaws.append(wrap_angle(yaws[-1] + turn_t))
    mid = torch.stack(yaws[:-1], dim=-1) + half
    step = torch.stack((chord * torch.cos(mid), chord * torch.sin(mid)), dim=-1)  # (..., H, 2)
    xs = [xy]
    for step_t in step.unbind(-2):
        xs.append(xs[-1] + step_t)
    return torch.stack(xs[1:], dim=-2), torch.stack(yaws[1:], dim=-1), v1


def unicycle_controls_from_poses(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed0: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> torch.Tensor:
    """Fit (accel, curvature) controls whose rollout reproduces a pose sequence.

    xy (..., H+1, 2) m, yaw (..., H+1) rad (index 0 = the current pose), speed0 (...) m/s
    -> controls (..., H, 2) [accel m/s^2, curvature 1/m].

    Nominal controls come from the poses (curvature = heading change / arc length, speeds
    = central differences of the arc lengths); the fit then integrates the model step by
    step and adds a small feedback (2-step deadbeat along track, damped across track) on
    the rolled-out state's error to the poses, so errors never accumulate.  Exact for
    unicycle-generated poses with the true ``speed0``; a wrong ``speed0`` is absorbed in
    two steps.  Motion the model cannot make (reversing) is approximated.
    """
    _check_dt(dt)
    if xy.dim() < 2 or xy.shape[-1] != 2 or xy.shape[-2] < 1:
        raise ControlError(f"poses xy must have shape (..., H+1, 2) with H >= 0, got {tuple(xy.shape)}")
    batch = tuple(xy.shape[:-2])
    if tuple(yaw.shape) != tuple(xy.shape[:-1]) or tuple(speed0.shape) != batch:
        raise ControlError(
            f"pose shapes disagree: xy {tuple(xy.shape)} needs yaw {tuple(xy.shape[:-1])} and "
            f"speed0 {batch}, got yaw {tuple(yaw.shape)}, speed0 {tuple(speed0.shape)}"
        )
    for name, t in (("poses xy", xy), ("poses yaw", yaw), ("speed0", speed0)):
        _check_finite(name, t, "index")
    h = xy.shape[-2] - 1
    if h == 0:
        return xy.new_zeros((*batch, 0, 2))
    eps = _dist_eps(xy)
    dyaw = wrap_angle(yaw[..., 1:] - yaw[..., :-1])  # (..., H)
    dist = _arc_length(xy[..., 1:, :] - xy[..., :-1, :], dyaw)  # (..., H) m per step
    curv_nom = torch.where(dist > eps, dyaw / dist.clamp_min(eps), torch.zeros_like(dist))
    # reference speeds at poses 1..H: central differences, linear extrapolation at the end
    seg_v = dist / dt
    if h >= 2:
        v_end = (1.5 * seg_v[..., -1] - 0.5 * seg_v[..., -2]).unsqueeze(-1)
        v_ref = torch.cat((0.5 * (seg_v[..., 1:] + seg_v[..., :-1]), v_end), dim=-1)
    else:
        v_ref = 2.0 * seg_v - speed0.clamp_min(0.0).unsqueeze(-1)
    v_ref = v_ref.clamp_min(0.0)

    p, th, v = xy[..., 0, :], yaw[..., 0], speed0.clamp_min(0.0)
    out = []
    for i in range(h):
        c, s = torch.cos(yaw[..., i]), torch.sin(yaw[..., i])
        r = p - xy[..., i, :]
        along = r[..., 0] * c + r[..., 1] * s
        lat = r[..., 1] * c - r[..., 0] * s
        head = wrap_angle(th - yaw[..., i])
        # longitudinal: halve the gap to the end speed that would hit the next pose exactly
        need = (dist[..., i] - along).clamp_min(0.0)  # m to travel this step
        v1 = 0.5 * (v_ref[..., i] + 2.0 * need / dt - v)
        accel = _stop_accel(v, v1.clamp_min(0.0), need, dt)  # v1 < 0: stop after ``need`` m
        # lateral: state feedback with both closed-loop poles at 0.5 (per step of length L)
        step_len = dist[..., i].clamp_min(0.1)
        corr = -(0.25 * lat / step_len + 0.875 * head).clamp(-0.3, 0.3) / step_len
        curv = curv_nom[..., i] + corr
        accel, curv = _clip_unicycle(accel, curv, bounds)
        p, th, v = _unicycle_step(p, th, v, accel, curv, dt)
        out.append(torch.stack((accel, curv), dim=-1))
    return torch.stack(out, dim=-2)


# --------------------------------------------------------------------------- bicycle


def _wheelbase(bounds: ActionBounds | None) -> float:
    return (bounds or _DEFAULT_BOUNDS).wheelbase


def _clip_bicycle(
    accel: torch.Tensor, steer: torch.Tensor, bounds: ActionBounds | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if bounds is None:
        return accel, steer
    return accel.clamp(bounds.accel_min, bounds.accel_max), steer.clamp(-bounds.steer_max, bounds.steer_max)


def bicycle_forward(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed: torch.Tensor,
    accel: torch.Tensor,
    steer: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One kinematic-bicycle step (rear-axle reference): curvature = tan(steer) / wheelbase.

    xy (..., 2) m, yaw (...) rad, speed (...) m/s, accel (...) m/s^2, steer (...) rad
    -> (xy, yaw, speed).  ``bounds`` clips accel and steer (not curvature); its wheelbase is
    used either way (default 2.8 m when ``bounds`` is None, then nothing is clipped).
    """
    _check_dt(dt)
    batch = _check_state(xy, yaw, speed)
    _check_controls(batch, accel=accel, steer=steer)
    accel, steer = _clip_bicycle(accel, steer, bounds)
    return _unicycle_step(xy, yaw, speed, accel, torch.tan(steer) / _wheelbase(bounds), dt)


def bicycle_inverse(
    xy0: torch.Tensor,
    yaw0: torch.Tensor,
    speed0: torch.Tensor,
    xy1: torch.Tensor,
    yaw1: torch.Tensor,
    speed1: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Controls (accel (...) m/s^2, steer (...) rad) taking state 0 to state 1 in one step."""
    accel, curv = unicycle_inverse(xy0, yaw0, speed0, xy1, yaw1, speed1, dt)
    return _clip_bicycle(accel, torch.atan(curv * _wheelbase(bounds)), bounds)


def bicycle_rollout(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed: torch.Tensor,
    controls: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integrate H bicycle steps; controls (..., H, 2) [accel m/s^2, steer rad] -> as unicycle_rollout."""
    _check_dt(dt)
    batch = _check_state(xy, yaw, speed)
    _check_sequence(batch, controls, ("accel", "steer"))
    accel, steer = _clip_bicycle(controls[..., 0], controls[..., 1], bounds)
    uni = torch.stack((accel, torch.tan(steer) / _wheelbase(bounds)), dim=-1)
    return unicycle_rollout(xy, yaw, speed, uni, dt)


# --------------------------------------------------------------------------- plan tracking


def track_plan(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed: torch.Tensor,
    plan_xy: torch.Tensor,
    plan_speed: torch.Tensor | None = None,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds = _DEFAULT_BOUNDS,
    lookahead_time: float = 1.0,
    lookahead_min: float = 3.0,
    lookahead_max: float = 15.0,
    speed_time: float = 0.4,
    stop_speed: float = 0.5,
) -> torch.Tensor:
    """Next unicycle control that follows a planned trajectory.

    xy (..., 2) m, yaw (...) rad, speed (...) m/s: the current state; plan_xy (..., H, 2) m:
    planned positions at ``dt`` spacing, the first ``dt`` ahead of now, same frame;
    plan_speed (..., H) m/s or None (then speeds come from the plan's displacements)
    -> controls (..., 2) [accel m/s^2, curvature 1/m], clipped to ``bounds``.

    Speed: accel = (v_plan(speed_time) - v) / speed_time, i.e. the mean acceleration that
    reaches the planned speed ``speed_time`` s ahead; when both are below ``stop_speed`` it
    brakes to exactly 0 this step.  Steering: pure pursuit on the point at arc length
    clamp(lookahead_time * v, lookahead_min, lookahead_max) m along current position ->
    plan (the plan's end if it is shorter); a zero-length ("stop") plan gives curvature 0.
    """
    batch = _check_state(xy, yaw, speed)
    ps = tuple(plan_xy.shape)
    if len(ps) < 2 or ps[-1] != 2 or ps[:-2] != batch or ps[-2] < 1:
        raise ControlError(f"plan_xy must have shape (*{batch}, H>=1, 2), got {tuple(plan_xy.shape)}")
    h = plan_xy.shape[-2]
    if plan_speed is not None and tuple(plan_speed.shape) != tuple(plan_xy.shape[:-1]):
        raise ControlError(
            f"plan_speed must have shape {tuple(plan_xy.shape[:-1])} to match plan_xy, "
            f"got {tuple(plan_speed.shape)}"
        )
    _check_finite("plan_xy", plan_xy, "index")
    if plan_speed is not None:
        _check_finite("plan_speed", plan_speed, "index")

    # x / y kept apart: reductions over a size-2 last dim are slow on CPU
    x, y = xy[..., 0], xy[..., 1]
    px, py = plan_xy[..., 0], plan_xy[..., 1]  # (..., H)
    dx = torch.diff(px, dim=-1, prepend=x.unsqueeze(-1))  # (..., H) segments from now through the plan
    dy = torch.diff(py, dim=-1, prepend=y.unsqueeze(-1))
    seg = _norm(dx, dy)  # (..., H) m
    # speed target at speed_time (plan index k - 1), from the plan or central differences
    k = min(max(round(speed_time / dt), 1), h)
    if plan_speed is not None:
        v_tgt = plan_speed[..., k - 1].clamp_min(0.0)
    else:
        lo, hi = max(k - 1, 0), min(k + 1, h)
        v_tgt = seg[..., lo:hi].sum(-1) / ((hi - lo) * dt)
    accel = (v_tgt - speed) / speed_time
    # hold still only if the plan stays slow for the next second (a plan that starts from
    # standstill with a gentle, jerk-limited acceleration must still get going)
    k1 = min(max(round(1.0 / dt), 1), h)
    v_later = plan_speed[..., k1 - 1] if plan_speed is not None else s_later(seg, k1, dt)
    hold = (v_tgt < stop_speed) & (speed < stop_speed) & (v_later < stop_speed)
    accel = torch.where(hold, -speed / dt, accel)

    # pure pursuit: first plan point whose arc length reaches the lookahead, interpolated back
    # along its segment (or the plan's end if the plan is shorter)
    s = torch.cumsum(seg, dim=-1)  # (..., H) arc length to each plan point
    look = (lookahead_time * speed).clamp(lookahead_min, lookahead_max).unsqueeze(-1)  # (..., 1)
    idx = torch.searchsorted(s, look).clamp_max(h - 1)  # (..., 1) first s >= look

    def at(t: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, idx).squeeze(-1)

    back = ((at(s) - look.squeeze(-1)) / at(seg).clamp_min(1e-6)).clamp(0.0, 1.0)  # fraction
    rx = at(px) - back * at(dx) - x  # (...) m, world offset from the vehicle to the target
    ry = at(py) - back * at(dy) - y
    c, sn = torch.cos(yaw), torch.sin(yaw)
    curv = 2.0 * (ry * c - rx * sn) / (rx * rx + ry * ry).clamp_min(1.0)
    accel, curv = _clip_unicycle(accel, curv, bounds)
    return torch.stack((accel, curv), dim=-1)


def s_later(seg: torch.Tensor, k: int, dt: float) -> torch.Tensor:
    """Mean speed (...) m/s over the first ``k`` plan segments ``seg`` (..., H) m."""
    return seg[..., :k].sum(-1) / (k * dt)


def plan_from_controls(
    xy: torch.Tensor,
    yaw: torch.Tensor,
    speed: torch.Tensor,
    controls: torch.Tensor,
    dt: float = DEFAULT_DT,
    bounds: ActionBounds | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan (plan_xy (..., H, 2) m, plan_yaw (..., H) rad, plan_speed (..., H) m/s) from unicycle
    controls (..., H, 2); same as ``unicycle_rollout``, for feeding ``track_plan``."""
    return unicycle_rollout(xy, yaw, speed, controls, dt, bounds)
