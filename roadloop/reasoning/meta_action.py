"""Closed-set meta-actions (longitudinal + lateral) of a planned trajectory.

A plan is mapped to one ``Longitudinal`` and one ``Lateral`` meta-action from its geometry and
speed profile alone (batched, no loops over the batch).  Thresholds (module constants):

Longitudinal, from the speed ``v3`` at ``LON_HORIZON_S`` (3 s) vs the current speed ``v0``:
  * stop:        ``v3 < STOP_SPEED`` (0.5 m/s): the plan stops within 3 s or stays stopped;
  * slow down:   ``v3 < v0 - DV`` (DV = 1.0 m/s);
  * accelerate:  ``v3 > v0 + DV``;
  * keep speed:  otherwise.

Lateral, in the ego frame at the start (x forward, y left), heading change ``dpsi`` = heading
of the plan's last moving segment minus the initial yaw, ``psi_max`` its largest |heading|:
  * turn left / right:           ``|dpsi| > TURN_DEG`` (30 deg), by the sign of ``dpsi``;
  * change lanes left / right:   final lateral offset ``|y_end| > LANE_CHANGE_M`` (2.0 m) and
    the heading is back (``|dpsi| < BACK_FRAC * psi_max``, BACK_FRAC = 0.5: the plan turned out
    and came at least half way back);
  * nudge left / right:          largest offset ``NUDGE_MIN_M`` (0.4 m) <= ``|y|max`` <= 2.0 m
    (returns or holds), same "heading is back" test, sign of the largest offset;
  * keep lane: otherwise (including following a curving road).
The "heading is back" test separates a shift of the path (heading returns) from a road curve
(heading keeps its final value).  It is relative only: a plan whose heading drifts one way and
ends at its extreme is a curve however small the drift.  (Until demonstrations format 4 a drift
under 1.5 deg also counted as "back", so at highway speed a road curving by 1 deg over the plan's
200-280 m, which moves its end more than 2 m sideways, was labelled a lane change, and smaller
drifts nudges: 3.4% of the held-out labels, now "keep the lane"; docs/LOG.md.)
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

DT = 0.1  # s per plan step
LON_HORIZON_S = 3.0  # s
STOP_SPEED = 0.5  # m/s
DV = 1.0  # m/s
TURN_DEG = 30.0
BACK_FRAC = 0.5  # the heading is back when |final heading change| < BACK_FRAC x its largest |heading|
LANE_CHANGE_M = 2.0
NUDGE_MIN_M = 0.4
MOVE_EPS = 0.02  # m, a plan segment shorter than this does not define a heading


class Longitudinal(IntEnum):
    ACCELERATE = 0
    KEEP_SPEED = 1
    SLOW_DOWN = 2
    STOP = 3

    @property
    def phrase(self) -> str:
        return LON_PHRASES[self]


class Lateral(IntEnum):
    KEEP_LANE = 0
    NUDGE_LEFT = 1
    NUDGE_RIGHT = 2
    CHANGE_LANE_LEFT = 3
    CHANGE_LANE_RIGHT = 4
    TURN_LEFT = 5
    TURN_RIGHT = 6

    @property
    def phrase(self) -> str:
        return LAT_PHRASES[self]


# canonical phrases written in text (the parser accepts these and the synonyms in checks.py)
LON_PHRASES = {Longitudinal.ACCELERATE: "accelerate", Longitudinal.KEEP_SPEED: "keep speed",
               Longitudinal.SLOW_DOWN: "slow down", Longitudinal.STOP: "stop"}
LAT_PHRASES = {Lateral.KEEP_LANE: "keep the lane", Lateral.NUDGE_LEFT: "nudge left",
               Lateral.NUDGE_RIGHT: "nudge right", Lateral.CHANGE_LANE_LEFT: "change lanes to the left",
               Lateral.CHANGE_LANE_RIGHT: "change lanes to the right", Lateral.TURN_LEFT: "turn left",
               Lateral.TURN_RIGHT: "turn right"}


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def meta_actions(xy0: torch.Tensor, yaw0: torch.Tensor, speed0: torch.Tensor, plan_xy: torch.Tensor,
                 plan_speed: torch.Tensor | None = None, dt: float = DT) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta-actions of B plans.

    xy0 (B, 2) m, yaw0 (B,) rad, speed0 (B,) m/s: the ego now; plan_xy (B, H, 2) m in the same
    frame (first waypoint one step ahead); plan_speed (B, H) m/s or None (then the speed is the
    finite difference of the positions).  Returns (longitudinal (B,), lateral (B,)) int64 holding
    ``Longitudinal`` / ``Lateral`` values.  Non-finite plans give (keep speed, keep lane).
    """
    xy0, yaw0, speed0, plan_xy = (t.float() for t in (xy0, yaw0, speed0, plan_xy))
    B, H, _ = plan_xy.shape
    finite = torch.isfinite(plan_xy).all(-1).all(-1) & torch.isfinite(xy0).all(-1) & torch.isfinite(yaw0)
    pxy = torch.where(finite.view(B, 1, 1), plan_xy, xy0.unsqueeze(1).expand(B, H, 2).nan_to_num(0.0))
    pts = torch.cat((xy0.nan_to_num(0.0).unsqueeze(1), pxy), 1)  # (B, H+1, 2)
    seg = pts[:, 1:] - pts[:, :-1]
    seg_len = torch.linalg.vector_norm(seg, dim=-1)  # (B, H)
    if plan_speed is None:
        v = seg_len / dt
    else:
        v = plan_speed.float().nan_to_num(0.0)
    v0 = speed0.nan_to_num(0.0)
    k = min(H, max(1, int(round(LON_HORIZON_S / dt)))) - 1
    v3 = v[:, k]
    lon = torch.full((B,), int(Longitudinal.KEEP_SPEED), dtype=torch.int64)
    lon = torch.where(v3 > v0 + DV, torch.full_like(lon, int(Longitudinal.ACCELERATE)), lon)
    lon = torch.where(v3 < v0 - DV, torch.full_like(lon, int(Longitudinal.SLOW_DOWN)), lon)
    lon = torch.where(v3 < STOP_SPEED, torch.full_like(lon, int(Longitudinal.STOP)), lon)

    # ego frame at the start: x forward, y left
    c, s = torch.cos(yaw0).nan_to_num(1.0).unsqueeze(-1), torch.sin(yaw0).nan_to_num(0.0).unsqueeze(-1)
    rel = pxy - pts[:, :1]
    y = -rel[..., 0] * s + rel[..., 1] * c  # (B, H) m
    # heading of each moving segment relative to yaw0 (unwrapped along the plan); still segments hold
    moving = seg_len > MOVE_EPS
    h = torch.atan2(seg[..., 1], seg[..., 0]) - yaw0.nan_to_num(0.0).unsqueeze(-1)
    h = torch.where(moving, _wrap(h), torch.zeros_like(h))
    # carry the last moving heading forward over still segments
    idx = torch.where(moving, torch.arange(H).expand(B, H), torch.full((B, H), -1)).cummax(-1).values
    h = torch.where(idx >= 0, h.gather(1, idx.clamp_min(0)), torch.zeros_like(h))
    dh = _wrap(torch.diff(h, dim=-1, prepend=torch.zeros(B, 1)))
    psi = dh.cumsum(-1)  # unwrapped heading change (B, H)
    dpsi = psi[:, -1]
    psi_max = psi.abs().amax(-1)
    back = dpsi.abs() < BACK_FRAC * psi_max
    y_end = y[:, -1]
    ya = y.abs()
    jmax = ya.argmax(-1, keepdim=True)
    y_peak = y.gather(1, jmax).squeeze(-1)

    lat = torch.full((B,), int(Lateral.KEEP_LANE), dtype=torch.int64)
    nudge = back & (ya.amax(-1) >= NUDGE_MIN_M) & (ya.amax(-1) <= LANE_CHANGE_M)
    lat = torch.where(nudge & (y_peak > 0), torch.full_like(lat, int(Lateral.NUDGE_LEFT)), lat)
    lat = torch.where(nudge & (y_peak < 0), torch.full_like(lat, int(Lateral.NUDGE_RIGHT)), lat)
    change = back & (y_end.abs() > LANE_CHANGE_M)
    lat = torch.where(change & (y_end > 0), torch.full_like(lat, int(Lateral.CHANGE_LANE_LEFT)), lat)
    lat = torch.where(change & (y_end < 0), torch.full_like(lat, int(Lateral.CHANGE_LANE_RIGHT)), lat)
    turn = dpsi.abs() > math.radians(TURN_DEG)
    lat = torch.where(turn & (dpsi > 0), torch.full_like(lat, int(Lateral.TURN_LEFT)), lat)
    lat = torch.where(turn & (dpsi < 0), torch.full_like(lat, int(Lateral.TURN_RIGHT)), lat)
    lon = torch.where(finite, lon, torch.full_like(lon, int(Longitudinal.KEEP_SPEED)))
    lat = torch.where(finite, lat, torch.full_like(lat, int(Lateral.KEEP_LANE)))
    return lon, lat


__all__ = ["Longitudinal", "Lateral", "LON_PHRASES", "LAT_PHRASES", "meta_actions"]
