"""Quick matplotlib previews of a (SUMO) scenario: lanes, edges, crosswalks, lights, agents, route."""

from __future__ import annotations

import numpy as np

from roadloop.sim.datatypes import AgentType, LightState, Scenario

_LIGHT_COLOURS = {int(LightState.GREEN): "tab:green", int(LightState.YELLOW): "gold",
                  int(LightState.RED): "tab:red", int(LightState.UNKNOWN): "grey"}
_KIND_COLOURS = {int(AgentType.VEHICLE): "tab:blue", int(AgentType.PEDESTRIAN): "tab:purple",
                 int(AgentType.CYCLIST): "tab:orange", int(AgentType.STATIC): "black"}


def _box(xy, yaw, length, width) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    f, lft = np.array([c, s]) * length / 2, np.array([-s, c]) * width / 2
    return np.stack((xy + f + lft, xy + f - lft, xy - f - lft, xy - f + lft))


def render_scenario(sc: Scenario, path: str, step: int | None = None, title: str | None = None,
                    dpi: int = 110, paths: bool = False) -> None:
    """Draw scenario ``sc`` (single) at ``step`` (default: the warm-up end) to a PNG file.

    ``paths``: also draw the agents' IDM paths (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    t = sc.meta.warmup_steps if step is None else step
    m, a = sc.map, sc.agents
    fig, ax = plt.subplots(figsize=(9, 9))
    lane_xy, pv = m.lane_xy.numpy(), m.lane_point_valid.numpy()
    for i in range(lane_xy.shape[0]):
        p = lane_xy[i][pv[i]]
        w = float(m.lane_width[i])
        if len(p) < 2:
            continue
        d = np.gradient(p, axis=0)
        n = np.stack((-d[:, 1], d[:, 0]), 1) / np.linalg.norm(d, axis=1, keepdims=True).clip(1e-9)
        poly = np.concatenate((p + n * w / 2, (p - n * w / 2)[::-1]))
        ax.add_patch(Polygon(poly, closed=True, fc="#e4e4e4" if not m.lane_is_junction[i] else "#d6d6ea",
                             ec="none", zorder=0))
        ax.plot(p[:, 0], p[:, 1], color="#9a9a9a", lw=0.5, zorder=1)
        ax.annotate("", xy=p[-1], xytext=p[-2], arrowprops=dict(arrowstyle="->", color="#9a9a9a", lw=0.5))
    ev = m.road_edge_valid.numpy()
    for e, v in zip(m.road_edge_xy.numpy(), ev, strict=True):
        if v.any():
            ax.plot(e[v, 0], e[v, 1], color="black", lw=1.0, zorder=2)
    for c, v in zip(m.crosswalk_xy.numpy(), m.crosswalk_valid.numpy(), strict=True):
        if v:
            ax.add_patch(Polygon(c, closed=True, fc="white", ec="black", hatch="///", lw=0.6, zorder=2))
    ls = sc.light_states[:, min(t, sc.num_steps - 1)].numpy()
    for k in range(m.stop_line_xy.shape[0]):
        if not m.stop_line_valid[k]:
            continue
        lane = int(m.stop_line_lane[k])
        li = int(m.lane_light[lane]) if lane >= 0 else -1
        col = _LIGHT_COLOURS[int(ls[li])] if li >= 0 else "black"
        sl = m.stop_line_xy[k].numpy()
        ax.plot(sl[:, 0], sl[:, 1], color=col, lw=2.5, zorder=3)
    r = sc.route.xy[sc.route.valid].numpy()
    ax.plot(r[:, 0], r[:, 1], "--", color="tab:red", lw=1.2, zorder=4, label="ego route")
    xy, yaw, val = a.xy.numpy(), a.yaw.numpy(), a.valid.numpy()
    if paths:
        for i in range(1, xy.shape[0]):
            pv = a.path_valid[i].numpy()
            if pv.any():
                pp = a.path_xy[i].numpy()[pv]
                ax.plot(pp[:, 0], pp[:, 1], color="tab:cyan", lw=0.6, zorder=4)
    ax.plot(xy[0, val[0], 0], xy[0, val[0], 1], color="darkred", lw=0.8, zorder=4)
    for i in range(xy.shape[0]):
        if not val[i, t]:
            continue
        col = "tab:red" if i == 0 else _KIND_COLOURS.get(int(a.kind[i]), "tab:blue")
        ax.add_patch(Polygon(_box(xy[i, t], yaw[i, t], float(a.length[i]), float(a.width[i])), closed=True,
                             fc=col, ec="black", lw=0.5, alpha=0.85, zorder=5))
        h = xy[i, t] + 0.5 * float(a.length[i]) * np.array([np.cos(yaw[i, t]), np.sin(yaw[i, t])])
        ax.plot(*h, marker=".", color="white", ms=2, zorder=6)
    c = xy[0, t]
    ax.set_xlim(c[0] - 85, c[0] + 85)
    ax.set_ylim(c[1] - 85, c[1] + 85)
    ax.set_aspect("equal")
    ax.set_title(title or f"{sc.meta.scenario_id}  (step {t})", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
