"""Batched planar geometry: angles, polylines, oriented boxes.

All functions accept arbitrary leading batch dimensions ``...`` and never loop in Python
over batch elements.
"""

from __future__ import annotations

import math

import torch


def wrap_angle(a: torch.Tensor) -> torch.Tensor:
    """Wrap angles (rad) to [-pi, pi)."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def rotate(xy: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Rotate points ``(..., 2)`` by ``yaw`` ``(...)`` radians counter-clockwise."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack((c * x - s * y, s * x + c * y), dim=-1)


def to_local(xy: torch.Tensor, origin: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Express world points ``(..., 2)`` in the frame at ``origin (..., 2)`` with heading ``yaw``."""
    return rotate(xy - origin, -yaw)


def box_corners(xy: torch.Tensor, yaw: torch.Tensor, length: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Corners of oriented boxes, counter-clockwise from front-left.

    xy (..., 2) m centre, yaw (...) rad, length/width (...) m  ->  (..., 4, 2) m.
    """
    c, s = torch.cos(yaw), torch.sin(yaw)
    hl, hw = 0.5 * length, 0.5 * width
    fx, fy = c * hl, s * hl  # half-length along heading
    lx, ly = -s * hw, c * hw  # half-width to the left
    cx, cy = xy[..., 0], xy[..., 1]
    xs = torch.stack((cx + fx + lx, cx - fx + lx, cx - fx - lx, cx + fx - lx), dim=-1)
    ys = torch.stack((cy + fy + ly, cy - fy + ly, cy - fy - ly, cy + fy - ly), dim=-1)
    return torch.stack((xs, ys), dim=-1)


def polyline_arclength(xy: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cumulative arc length (..., N) m of polylines (..., N, 2); invalid points repeat the last s."""
    seg = torch.linalg.vector_norm(xy[..., 1:, :] - xy[..., :-1, :], dim=-1)
    if valid is not None:
        seg = seg * (valid[..., 1:] & valid[..., :-1])
    return torch.cat((torch.zeros_like(seg[..., :1]), torch.cumsum(seg, dim=-1)), dim=-1)


def resample_polyline(xy: torch.Tensor, spacing: float, num: int | None = None) -> torch.Tensor:
    """Resample one polyline (N, 2) at a fixed arc-length spacing (m).

    Returns (M, 2) with M = floor(length / spacing) + 1, or exactly ``num`` points evenly
    spaced over the whole length if ``num`` is given.  Not batched: used when building maps.
    """
    xy = xy.to(torch.float64)
    s = polyline_arclength(xy)
    total = float(s[-1])
    if num is not None:
        q = torch.linspace(0.0, total, num, dtype=torch.float64)
    else:
        m = int(math.floor(total / spacing + 1e-9)) + 1
        q = torch.arange(m, dtype=torch.float64) * spacing
    return interp_polyline(xy, s, q)


def interp_polyline(xy: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Points at arc lengths ``q (..., M)`` on polylines ``xy (..., N, 2)`` with cumulative ``s (..., N)``.

    Clamps to the ends.  Leading dims of xy/s and q must match (q may have its own M).
    """
    n = s.shape[-1]
    idx = torch.searchsorted(s.contiguous(), q.contiguous(), right=True).clamp(1, n - 1)
    s0 = torch.gather(s, -1, idx - 1)
    s1 = torch.gather(s, -1, idx)
    w = ((q - s0) / (s1 - s0).clamp_min(1e-9)).clamp(0.0, 1.0)
    i0 = (idx - 1).unsqueeze(-1).expand(*idx.shape, 2)
    p0 = torch.gather(xy, -2, i0)
    p1 = torch.gather(xy, -2, i0 + 1)
    return p0 + w.unsqueeze(-1) * (p1 - p0)


def point_segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from points ``p`` to segments ``[a, b]`` (broadcast ``(..., 2)``).

    Returns (distance (...) m, t (...) in [0, 1], the projection parameter along the segment).
    """
    ab = b - a
    ap = p - a
    denom = (ab * ab).sum(-1).clamp_min(1e-12)
    t = ((ap * ab).sum(-1) / denom).clamp(0.0, 1.0)
    proj = a + t.unsqueeze(-1) * ab
    return torch.linalg.vector_norm(p - proj, dim=-1), t


def heading_of_polyline(xy: torch.Tensor) -> torch.Tensor:
    """Heading (..., N) rad of each polyline vertex (forward difference, last copies previous)."""
    d = xy[..., 1:, :] - xy[..., :-1, :]
    h = torch.atan2(d[..., 1], d[..., 0])
    return torch.cat((h, h[..., -1:]), dim=-1)
