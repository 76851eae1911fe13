"""Render a scenario with matplotlib: ``python -m roadloop.scenarios.preview FAMILY SEED out.png``.

Draws lanes (junction lanes dashed), road edges, crosswalks, stop lines coloured by their
light at step 0, the ego route, agents as boxes at step 0 (ego red, vehicles blue,
pedestrians orange, cones and barriers dark orange, parked vehicles grey), the logged tracks
of scripted agents and the paths of IDM agents.
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from roadloop.sim.datatypes import AgentType, LightState, Scenario, TrafficModel  # noqa: E402
from roadloop.sim.geometry import box_corners  # noqa: E402

_LIGHT_COLOUR = {LightState.GREEN: "tab:green", LightState.YELLOW: "gold", LightState.RED: "tab:red",
                 LightState.UNKNOWN: "grey"}
_KIND_COLOUR = {AgentType.VEHICLE: "tab:blue", AgentType.PEDESTRIAN: "tab:orange", AgentType.CYCLIST: "tab:purple",
                AgentType.STATIC: "darkorange"}


def render(s: Scenario, ax, t: int = 0, tracks: bool = True) -> None:
    """Draw single scenario ``s`` at step ``t`` on matplotlib axes ``ax``."""
    m, a = s.map, s.agents
    for i in range(m.lane_xy.shape[0]):
        if not bool(m.lane_valid[i]):
            continue
        xy = m.lane_xy[i][m.lane_point_valid[i]].numpy()
        w = float(m.lane_width[i])
        dx, dy = np.gradient(xy, axis=0).T
        n = np.stack((-dy, dx), 1) / np.maximum(np.hypot(dx, dy), 1e-9)[:, None]
        poly = np.concatenate((xy + n * w / 2, (xy - n * w / 2)[::-1]))
        ax.fill(poly[:, 0], poly[:, 1], color="0.88", lw=0, zorder=0)
        junction = bool(m.lane_is_junction[i])
        ax.plot(xy[:, 0], xy[:, 1], ls="--" if junction else "-", lw=0.5, color="0.55", zorder=1)
        mid = len(xy) // 2
        if len(xy) > 2:
            ax.annotate("", xy=xy[mid + 1], xytext=xy[mid], zorder=1,
                        arrowprops=dict(arrowstyle="->", color="0.5", lw=0.6))
    for e in range(m.road_edge_xy.shape[0]):
        xy = m.road_edge_xy[e][m.road_edge_valid[e]].numpy()
        if len(xy):
            ax.plot(xy[:, 0], xy[:, 1], color="k", lw=1.0, zorder=2)
    for cw in m.crosswalk_xy[m.crosswalk_valid].numpy():
        ax.fill(cw[:, 0], cw[:, 1], facecolor="none", edgecolor="0.3", hatch="////", lw=0.5, zorder=2)
    for k in range(m.stop_line_xy.shape[0]):
        if not bool(m.stop_line_valid[k]):
            continue
        ln = int(m.stop_line_lane[k])
        light = int(m.lane_light[ln]) if ln >= 0 else -1
        st = LightState(int(s.light_states[light, t])) if light >= 0 else None
        seg = m.stop_line_xy[k].numpy()
        ax.plot(seg[:, 0], seg[:, 1], color=_LIGHT_COLOUR[st] if st is not None else "k", lw=2.0, zorder=3)
    r = s.route.xy[s.route.valid].numpy()
    ax.plot(r[:, 0], r[:, 1], color="tab:red", lw=1.0, alpha=0.6, zorder=4)
    for i in range(a.xy.shape[0]):
        if tracks and int(a.model[i]) == TrafficModel.LOG and i > 0 and int(a.valid[i].sum()) > 1:
            tr = a.xy[i][a.valid[i]].numpy()
            ax.plot(tr[:, 0], tr[:, 1], color="tab:purple", lw=0.8, ls=":", zorder=4)
        if tracks and int(a.model[i]) == TrafficModel.IDM:
            p = a.path_xy[i][a.path_valid[i]].numpy()
            ax.plot(p[:, 0], p[:, 1], color=_KIND_COLOUR[AgentType(int(a.kind[i]))], lw=0.4, alpha=0.4, zorder=4)
        if not bool(a.valid[i, t]):
            continue
        cr = box_corners(a.xy[i, t], a.yaw[i, t], a.length[i], a.width[i]).numpy()
        colour = "tab:red" if i == 0 else _KIND_COLOUR[AgentType(int(a.kind[i]))]
        if i > 0 and int(a.model[i]) == TrafficModel.STATIC and int(a.kind[i]) == AgentType.VEHICLE:
            colour = "slategrey"  # parked / stopped vehicle
        ax.fill(cr[:, 0], cr[:, 1], color=colour, alpha=0.85, zorder=5)
        front = 0.5 * (cr[0] + cr[3])
        ax.plot([float(a.xy[i, t, 0]), front[0]], [float(a.xy[i, t, 1]), front[1]], color="w", lw=0.6, zorder=6)
    ax.set_aspect("equal")
    meta = s.meta
    ax.set_title(f"{meta.scenario_id}  " + " ".join(f"{k}={v}" for k, v in meta.extra), fontsize=8)


def save_png(s: Scenario, path: str, t: int = 0, zoom: float | None = None) -> None:
    """Render ``s`` to a PNG: a square of half-size ``zoom`` m (default 60) ahead of the ego."""
    fig, ax = plt.subplots(figsize=(11, 11))
    render(s, ax, t)
    e = s.agents.xy[0, t].numpy()
    yaw = float(s.agents.yaw[0, t])
    h = 60.0 if zoom is None else zoom
    c = e + 0.5 * h * np.array([np.cos(yaw), np.sin(yaw)])  # look ahead of the ego
    ax.set_xlim(c[0] - h, c[0] + h)
    ax.set_ylim(c[1] - h, c[1] + h)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from roadloop.scenarios.families import get_family

    p = argparse.ArgumentParser(prog="python -m roadloop.scenarios.preview", description=__doc__.splitlines()[0])
    p.add_argument("family")
    p.add_argument("seed", type=int)
    p.add_argument("out")
    p.add_argument("--t", type=int, default=0, help="step to draw the agents at")
    p.add_argument("--zoom", type=float, default=None, help="half-size (m) of the window ahead of the ego (default 60)")
    args = p.parse_args(argv)
    with torch.no_grad():
        s = get_family(args.family).build_raw(args.seed)
    save_png(s, args.out, args.t, args.zoom)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
