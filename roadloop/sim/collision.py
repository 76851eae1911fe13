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


def _columns(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor,
             *extra: torch.Tensor) -> torch.Tensor:
    """Per-box columns (5 + len(extra), B * A): x, y m; yaw rad; half length, half width m; extra."""
    cols = (xy[..., 0], xy[..., 1], yaw, 0.5 * length, 0.5 * width, *extra)
    return torch.stack(cols).flatten(1)


class _Rel(NamedTuple):
    """Relative geometry of box pairs, float64, each (K,)."""

    x: torch.Tensor  # m, centre of b in a's frame (forward)
    y: torch.Tensor  # m, (left)
    u: torch.Tensor  # m, centre of b minus centre of a, on b's forward axis
    v: torch.Tensor  # m, on b's left axis
    ca: torch.Tensor  # cos / sin of both headings
    sa: torch.Tensor
    cb: torch.Tensor
    sb: torch.Tensor
    rad: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # overlap radii on the 4 axes


def _relative(ga: torch.Tensor, gb: torch.Tensor, eps: float) -> _Rel:
    """Centre-form SAT quantities for box pairs given as gathered columns (5+, K) (``_columns``).

    On each of the 4 axes (a forward, a left, b forward, b left) the boxes overlap iff the
    projected centre distance is below ``rad - eps`` (the sum of the projected half extents).
    """
    xa, ya, yawa, hla, hwa = ga[:5].to(_F)
    xb, yb, yawb, hlb, hwb = gb[:5].to(_F)
    ca, sa, cb, sb = torch.cos(yawa), torch.sin(yawa), torch.cos(yawb), torch.sin(yawb)
    dx, dy = xb - xa, yb - ya
    c = torch.addcmul(ca * cb, sa, sb).abs_()  # |cos(yaw_b - yaw_a)|
    s = torch.addcmul(ca * sb, -sa, cb).abs_()  # |sin(yaw_b - yaw_a)|
    x, y = torch.addcmul(dx * ca, dy, sa), torch.addcmul(dy * ca, -dx, sa)
    u, v = torch.addcmul(dx * cb, dy, sb), torch.addcmul(dy * cb, -dx, sb)
    rad = (torch.addcmul(torch.addcmul(hla - eps, hlb, c), hwb, s),
           torch.addcmul(torch.addcmul(hwa - eps, hlb, s), hwb, c),
           torch.addcmul(torch.addcmul(hlb - eps, hla, c), hwa, s),
           torch.addcmul(torch.addcmul(hwb - eps, hla, s), hwa, c))
    return _Rel(x, y, u, v, ca, sa, cb, sb, rad)


def _overlap(r: _Rel) -> torch.Tensor:
    return ((r.x.abs() < r.rad[0]) & (r.y.abs() < r.rad[1]) & (r.u.abs() < r.rad[2])
            & (r.v.abs() < r.rad[3]))


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
    q = |p|^2 - r^2 (positions relative to agent 0; a relative margin absorbs rounding; absent
    agents get q = +1e12).  Narrow phase: SAT (float64) on the candidate pairs i < j only,
    gathered with a flat nonzero and scattered back to (i, j) and (j, i).
    """
    B, A = yaw.shape
    out = torch.zeros(B * A * A, dtype=torch.bool, device=xy.device)
    px, py = xy[..., 0] - xy[:, :1, 0], xy[..., 1] - xy[:, :1, 1]
    r = torch.sqrt(torch.addcmul(length * length, width, width)) * 0.5
    p2r2 = torch.addcmul(torch.addcmul(px * px, py, py), r, r)
    thr = 1e-5 * torch.where(present, p2r2, 0.0).amax() + 1e-6  # float32 rounding margin
    q = torch.where(present, p2r2 - 2 * r * r - 0.5 * thr, 1e12)
    one = torch.ones_like(q)
    u = torch.stack((px, py, r, q, one), 1)  # (B, 5, A)
    w = torch.stack((-2 * px, -2 * py, -2 * r, one, q), 1)
    cand = (torch.bmm(u.transpose(1, 2), w) < 0) & _triu(A, xy.device)
    k = _flat_nonzero(cand)  # flat b * A * A + i * A + j, i < j
    if k.numel():
        cols = _columns(xy, yaw, length, width)
        ia = k // A  # b * A + i
        ib = (k // (A * A)) * A + k % A  # b * A + j
        hit = _overlap(_relative(cols.index_select(1, ia), cols.index_select(1, ib), eps))
        kh = k[hit]
        out[torch.cat((kh, ib[hit] * A + ia[hit] % A))] = True
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
        cols = _columns(xy, yaw, length, width)
        b = k // A
        ge = cols.index_select(1, b * A)
        rel = _relative(ge, cols.index_select(1, k), eps)
        over = _overlap(rel)
        rear = _rear_sector(rel.x, rel.y, ge[3].to(_F))
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
    cols = _columns(xy, yaw, length, width, speed)
    b = k // A
    ge, gj = cols.index_select(1, b * A), cols.index_select(1, k)
    r = _relative(ge, gj, eps)
    ve, vj = ge[5].to(_F), gj[5].to(_F)
    dvx, dvy = vj * r.cb - ve * r.ca, vj * r.sb - ve * r.sa  # (K,) velocity relative to the ego
    p0 = torch.stack((r.x, r.y, r.u, r.v))  # (4, K) projected centre offsets at t = 0
    pv = torch.stack((torch.addcmul(dvx * r.ca, dvy, r.sa), torch.addcmul(dvy * r.ca, -dvx, r.sa),
                      torch.addcmul(dvx * r.cb, dvy, r.sb), torch.addcmul(dvy * r.cb, -dvx, r.sb)))
    rad = torch.stack(r.rad)  # (4, K)
    pv = torch.where(pv.abs() < 1e-12, 1e-12, pv)  # no relative motion: all t or none
    t1, t2 = (-rad - p0) / pv, (rad - p0) / pv
    lo = torch.minimum(t1, t2).amax(0)  # boxes overlap for lo < t < hi
    hi = torch.maximum(t1, t2).amin(0)
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
