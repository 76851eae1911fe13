"""Batched collision checks between oriented boxes (agents) and time to collision.

Conventions (see ``datatypes``): B scenarios, A agents, agent 0 is the ego; boxes are given by
their centre ``xy`` (m), heading ``yaw`` (rad), ``length`` along the heading and ``width`` (m).

Overlap is *strict*: boxes that only touch (shared edge or corner, within ``eps`` = 1e-6 m) do
not overlap; a box inside another does.  The narrow phase is the separating-axis test (SAT) in
centre / half-extent form and runs in float64 on relative positions, so the tolerance is
meaningful in scenario-local coordinates (float32 inputs themselves resolve ~1e-6 m only within
~10 m of the origin; exact touching far from it is decided by the inputs' rounding).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from roadloop.sim.datatypes import AgentType

TOUCH_EPS = 1e-6  # m, separations within this count as touching (no overlap)
STOPPED_SPEED = 0.05  # m/s, ego slower than this is stationary (never at fault, no TTC)
_F = torch.float64  # narrow-phase precision


def boxes_overlap(corners_a: torch.Tensor, corners_b: torch.Tensor, eps: float = TOUCH_EPS) -> torch.Tensor:
    """Separating-axis test for oriented rectangles given by corners.

    corners_a, corners_b (..., 4, 2) m, consecutive corners (as ``geometry.box_corners``),
    broadcastable  ->  (...) bool, True iff the interiors overlap by more than ``eps`` on every
    axis.  Touching boxes do not overlap; containment does.  Degenerate (zero-area) boxes never
    overlap anything.
    """
    ref = corners_a[..., :1, :].to(_F)
    ca = corners_a.to(_F) - ref  # work relative to a corner of a: keeps magnitudes small
    cb = corners_b.to(_F) - ref
    ca, cb = torch.broadcast_tensors(ca, cb)
    # candidate axes: the two edge directions of each rectangle (= its edge normals)
    axes = torch.stack((ca[..., 1, :] - ca[..., 0, :], ca[..., 2, :] - ca[..., 1, :],
                        cb[..., 1, :] - cb[..., 0, :], cb[..., 2, :] - cb[..., 1, :]), dim=-2)
    axes = axes / torch.linalg.vector_norm(axes, dim=-1, keepdim=True).clamp_min(1e-12)
    pa = ca @ axes.transpose(-1, -2)  # (..., 4 corners, 4 axes) projections
    pb = cb @ axes.transpose(-1, -2)
    over = (pa.amax(-2) - pb.amin(-2) > eps) & (pb.amax(-2) - pa.amin(-2) > eps)
    return over.all(-1)


def _pack(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Per-box rows (..., 5) in the input dtype: x, y m; yaw rad; length, width m."""
    return torch.cat((xy, yaw.unsqueeze(-1), length.unsqueeze(-1), width.unsqueeze(-1)), dim=-1)


def _sat(ga: torch.Tensor, gb: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre-form SAT between boxes given as rows (..., 5) (see ``_pack``; broadcast), in float64.

    Returns (overlap (...) bool, (..., 2) float64 centre of b in a's frame: x forward, y left).
    Each box's half extents are compared with the other's projected radius on a's two axes
    and b's two axes; relative positions and rotations use complex numbers (fewer ops).
    """
    ga, gb = ga.to(_F), gb.to(_F)
    ga, gb = torch.broadcast_tensors(ga, gb)
    d = torch.view_as_complex((gb[..., :2] - ga[..., :2]).contiguous())  # b - a
    e = torch.polar(torch.ones_like(ga[..., 2:4]), torch.stack((ga[..., 2], gb[..., 2]), -1))  # (..., 2)
    proj = torch.view_as_real(d.unsqueeze(-1) * e.conj())  # (..., 2, 2): [[x, y], [u, v]]
    cs = torch.view_as_real(e[..., 1] * e[..., 0].conj()).abs()  # |cos|, |sin| of yaw_b - yaw_a
    h = 0.5 * torch.cat((ga[..., 3:5], gb[..., 3:5]), -1)  # hla, hwa, hlb, hwb
    h_sw = h.roll(2, -1)  # hlb, hwb, hla, hwa   (times |cos|)
    h_sw2 = h_sw.flip(-1).roll(2, -1)  # hwb, hlb, hwa, hla   (times |sin|)
    rad = torch.addcmul(torch.addcmul(h, h_sw, cs[..., :1]), h_sw2, cs[..., 1:])
    over = (proj.flatten(-2).abs() < rad - eps).all(-1)
    return over, proj[..., 0, :]


_TRIU: dict[tuple[int, torch.device], torch.Tensor] = {}


def _triu(A: int, device: torch.device) -> torch.Tensor:
    key = (A, device)
    if key not in _TRIU:
        _TRIU[key] = torch.ones(A, A, dtype=torch.bool, device=device).triu(1)
    return _TRIU[key]


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of True entries of a contiguous bool tensor (sparse masks: two-level search)."""
    flat = mask.view(-1)
    n = flat.numel()
    if n % 8 or n < 4096 or flat.device.type != "cpu":
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64)  # 8 flags per word: scan 8x fewer elements
    w = (words != 0).nonzero().squeeze(1)
    sub = flat.view(-1, 8).index_select(0, w).view(-1).nonzero().squeeze(1)
    return w.index_select(0, sub // 8) * 8 + sub % 8


def pairwise_contacts(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor,
                      present: torch.Tensor, eps: float = TOUCH_EPS) -> torch.Tensor:
    """All agent-agent contacts: xy (B, A, 2) m, yaw/length/width (B, A), present (B, A) bool.

    Returns contact (B, A, A) bool: symmetric, False on the diagonal and for absent agents.

    Broad phase: bounding circles (radius = half diagonal), all pairs at once as one batched
    matmul of augmented vectors, d_ij^2 - (r_i + r_j)^2 = q_i + q_j - 2 (p_i.p_j + r_i r_j) with
    q = |p|^2 - r^2 (positions relative to agent 0, a relative margin absorbs rounding, absent
    agents get q = +1e12).  Narrow phase: SAT (``_sat``) on the candidate pairs i < j only,
    gathered with a flat nonzero and scattered back to (i, j) and (j, i).
    """
    B, A = yaw.shape
    out = torch.zeros(B * A * A, dtype=torch.bool, device=xy.device)
    p = xy - xy[:, :1]
    r = torch.sqrt(length * length + width * width) * 0.5
    p2r2 = (p * p).sum(-1) + r * r
    q = torch.where(present, p2r2 - 2 * r * r, 1e12)
    one = torch.ones_like(q)
    u = torch.stack((p[..., 0], p[..., 1], r, q, one), -1)
    w = torch.stack((-2 * p[..., 0], -2 * p[..., 1], -2 * r, one, q), -1)
    thr = 1e-5 * torch.where(present, p2r2, 0.0).amax(1).view(B, 1, 1) + 1e-6
    cand = (torch.bmm(u, w.transpose(1, 2)) < thr) & _triu(A, xy.device)
    k = _flat_nonzero(cand)  # flat b * A * A + i * A + j, i < j
    if k.numel():
        rows = _pack(xy, yaw, length, width).view(B * A, 5)
        b = k // (A * A)
        i = (k - b * A * A) // A
        j = k - (b * A + i) * A
        hit = _sat(rows.index_select(0, b * A + i), rows.index_select(0, b * A + j), eps)[0]
        kh = k[hit]
        out[torch.cat((kh, (b * A + j)[hit] * A + i[hit]))] = True
    return out.view(B, A, A)


class EgoCollision(NamedTuple):
    """Per-scenario collision result for the ego (agent 0); every field (B,)."""

    collision: torch.Tensor  # bool, ego overlaps a present agent
    at_fault: torch.Tensor  # bool, at least one of the ego's contacts is at fault (rule: ego_collision)
    agent: torch.Tensor  # int64, lowest index of the agents hit, -1 none
    kind: torch.Tensor  # int64 AgentType of that agent, -1 none


def _rear_sector(x: torch.Tensor, y: torch.Tensor, hl_ego: torch.Tensor) -> torch.Tensor:
    """Other centre (x, y) in the ego frame lies behind the ego's rear edge within 45 deg of -x."""
    return (x < -hl_ego) & (y.abs() <= -x)


def ego_collision(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor,
                  present: torch.Tensor, kind: torch.Tensor, ego_speed: torch.Tensor,
                  eps: float = TOUCH_EPS) -> EgoCollision:
    """Collisions of the ego (agent 0) with the other agents.

    xy (B, A, 2) m, yaw/length/width (B, A), present (B, A) bool, kind (B, A) int64 AgentType,
    ego_speed (B,) m/s (signed).

    At-fault rule (per contact, nuPlan-like; ``at_fault`` is the OR over the ego's contacts):

    * ego stationary (|speed| < 0.05 m/s): never at fault;
    * the other agent is STATIC (cone, barrier, parked car): at fault;
    * rear-ended: the other agent's centre, in the ego frame (x forward, y left, origin at the
      ego centre), lies behind the ego's rear edge (x < -length/2) and inside the 90-degree rear
      sector |y| <= -x: not at fault;
    * everything else (front hits, side swipes, T-bones): at fault.
    """
    B, A = yaw.shape
    dev = xy.device
    k = _ego_candidates(xy, length, width, present)  # flat b * A + j, j >= 1
    collision = torch.zeros(B, dtype=torch.bool, device=dev)
    at_fault = torch.zeros(B, dtype=torch.bool, device=dev)
    first = torch.full((B,), A, dtype=torch.int64, device=dev)
    if k.numel():
        rows = _pack(xy, yaw, length, width).view(B * A, 5)
        b = k // A
        over, rel = _sat(rows.index_select(0, b * A), rows.index_select(0, k), eps)
        rear = _rear_sector(rel[:, 0], rel[:, 1], 0.5 * length[:, 0].index_select(0, b))
        rear = rear & (kind.view(-1).index_select(0, k) != int(AgentType.STATIC))
        bh = b[over]
        collision[bh] = True
        at_fault[b[over & ~rear]] = True
        first.scatter_reduce_(0, bh, k[over] - bh * A, reduce="amin")
    at_fault &= ego_speed.abs() >= STOPPED_SPEED
    agent = torch.where(collision, first, -1)
    hit_kind = kind.gather(1, first.clamp_max(A - 1).unsqueeze(1)).squeeze(1)
    return EgoCollision(collision, at_fault, agent, torch.where(collision, hit_kind, -1))


def _ego_candidates(xy: torch.Tensor, length: torch.Tensor, width: torch.Tensor, present: torch.Tensor,
                    reach: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Broad phase ego vs agents: flat indices b * A + j (j >= 1, both present) whose bounding
    circles are closer than ``reach`` (B, A) m.  Conservative (relative slack 1e-5 + 1e-3 m)."""
    p = xy - xy[:, :1]
    px, py = p[..., 0], p[..., 1]
    r = torch.sqrt(length * length + width * width) * 0.5
    rr = r + r[:, :1] + reach
    cand = torch.addcmul(px * px, py, py) < rr * rr * (1.0 + 1e-5) + 1e-3
    cand &= present & present[:, :1]
    cand[:, 0] = False
    return cand.view(-1).nonzero().squeeze(1)


def time_to_collision(xy: torch.Tensor, yaw: torch.Tensor, speed: torch.Tensor, length: torch.Tensor,
                      width: torch.Tensor, present: torch.Tensor, horizon: float = 3.0,
                      dt: float | None = 0.1, exclude_rear: bool = True,
                      eps: float = TOUCH_EPS) -> torch.Tensor:
    """Ego time to collision (B,) s under constant-velocity projection (nuPlan style).

    xy (B, A, 2) m, yaw (B, A) rad, speed (B, A) m/s signed along the heading, length/width
    (B, A) m, present (B, A) bool.  Ego and agents keep their current velocity and heading; the
    TTC is the first time ``k * dt`` (k = 0, 1, ..., horizon / dt) at which the ego box overlaps a
    present agent's box, +inf if none within ``horizon``.  ``dt=None`` gives the exact
    continuous first-contact time instead.  As in nuPlan, a stationary ego (|v| < 0.05 m/s) has
    TTC +inf, and (``exclude_rear``) agents now in the ego's rear sector (see ``ego_collision``)
    are ignored.  A current overlap gives 0.

    Exact and fully tensorised (no loop over agents or time steps): headings are constant, so
    the SAT axes and radii are constant and each axis' projected separation is linear in t; the
    overlap times are the intersection of four open intervals, in closed form.  A broad phase
    first keeps only agents whose bounding circles can meet within the horizon (distance <
    r_ego + r_agent + |relative velocity| * horizon); the narrow phase runs on those (float64).
    """
    B, A = yaw.shape
    dev = xy.device
    ttc = torch.full((B,), math.inf, device=dev)
    # broad phase: bounding circles that can meet within the horizon, ego moving, not rear
    c, s = torch.cos(yaw), torch.sin(yaw)
    vx, vy = speed * c, speed * s
    dvx, dvy = vx - vx[:, :1], vy - vy[:, :1]
    reach = torch.sqrt(torch.addcmul(dvx * dvx, dvy, dvy)) * horizon
    ok = present & (speed[:, :1].abs() >= STOPPED_SPEED)
    if exclude_rear:
        dx, dy = xy[..., 0] - xy[:, :1, 0], xy[..., 1] - xy[:, :1, 1]
        x = dx * c[:, :1] + dy * s[:, :1]
        y = dy * c[:, :1] - dx * s[:, :1]
        ok &= ~_rear_sector(x, y, 0.5 * length[:, :1])
    k = _ego_candidates(xy, length, width, ok, reach)
    if not k.numel():
        return ttc
    # narrow phase on the candidates (float64): SAT axes and radii are constant in time and each
    # axis' projected separation is linear in t -> overlap for t in (lo, hi)
    rows = torch.cat((_pack(xy, yaw, length, width), speed.unsqueeze(-1)), -1).view(B * A, 6).to(_F)
    b = k // A
    ge, gj = rows.index_select(0, b * A), rows.index_select(0, k)
    e = torch.polar(torch.ones_like(ge[:, :2]), torch.stack((ge[:, 2], gj[:, 2]), -1))  # (K, 2) headings
    d0 = torch.view_as_complex((gj[:, :2] - ge[:, :2]).contiguous())  # (K,) position rel. to ego
    dv = gj[:, 5] * e[:, 1] - ge[:, 5] * e[:, 0]  # (K,) velocity rel. to ego
    axes = e.conj()
    p0 = torch.view_as_real(d0.unsqueeze(-1) * axes).flatten(-2)  # (K, 4) projections at t = 0
    pv = torch.view_as_real(dv.unsqueeze(-1) * axes).flatten(-2)  # their rates, m/s
    cs = torch.view_as_real(e[:, 1] * e[:, 0].conj()).abs()  # (K, 2) |cos|, |sin| of relative yaw
    h = 0.5 * torch.cat((ge[:, 3:5], gj[:, 3:5]), -1)
    h_sw = h.roll(2, -1)
    h_sw2 = h_sw.flip(-1).roll(2, -1)
    rad = torch.addcmul(torch.addcmul(h, h_sw, cs[:, :1]), h_sw2, cs[:, 1:]) - eps  # (K, 4)
    pv = torch.where(pv.abs() < 1e-12, 1e-12, pv)  # no relative motion: all t or none
    t1, t2 = (-rad - p0) / pv, (rad - p0) / pv
    lo = torch.minimum(t1, t2).amax(-1)  # boxes overlap for lo < t < hi
    hi = torch.maximum(t1, t2).amin(-1)
    if dt is None or dt <= 0:
        t = lo.clamp_min(0.0)
        hit = (t < hi) & (t <= horizon)
    else:
        n = math.floor(horizon / dt + 1e-6)
        kk = torch.where(lo < 0, 0.0, torch.floor(lo / dt) + 1.0)  # first step strictly after lo
        t = kk * dt
        hit = (t < hi) & (kk <= n)
    return ttc.scatter_reduce_(0, b[hit], t[hit].to(ttc.dtype), reduce="amin")


__all__ = ["TOUCH_EPS", "boxes_overlap", "pairwise_contacts", "EgoCollision", "ego_collision",
           "time_to_collision"]
