"""Self-contained HTML evaluation report: headline, per-family matrix, worst rollouts replayed.

``write_report(report, kept, out_dir)`` writes ``out_dir/index.html``: one file with inline
CSS/JS (``roadloop/eval/assets/``) and the data embedded as strict JSON, so it opens from
``file://`` with no network access.  The tables are rendered here in Python; the animated
top-down viewer (canvas, player, reasoning panel) is vanilla JS drawing the compact per-rollout
data built by ``rollout_view`` (also used by ``roadloop.eval.export`` for GIF/MP4 and by the
demo page, ``roadloop.eval.demo_report``): ``assets/scene.js`` draws a frame, ``assets/viewer.js``
is the player.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from roadloop.eval.evaluate import EvalReport, RolloutSummary, Stat
from roadloop.io import atomic_write_text, json_clean
from roadloop.rollout import Rollout
from roadloop.sim.datatypes import DT, Scenario

CROP_MARGIN = 60.0  # m around everything the ego and the agents visit
PLAN_STRIDE = 2  # keep every 2nd plan point (and the last)

# One visual language for the HTML viewer and the GIF/MP4 export.
PALETTE = {
    "ground": "#eef0ea", "lane": "#cfd3d8", "junction": "#c7ccd2", "centre": "#ffffff", "edge": "#5f6670",
    "crosswalk": "#f7f7f2", "route": "#3b82f6", "trail": "#db2777", "plan": "#16a34a", "ego": "#db2777",
    "ego_edge": "#831843", "vehicle": "#5b7fa6", "pedestrian": "#f08c2e", "cyclist": "#8b5cf6",
    "static": "#e3b505", "hit": "#dc2626",
    "light": {"0": "#9ca3af", "1": "#22c55e", "2": "#f59e0b", "3": "#ef4444"},
}
FLAG_BITS = {"collision": 1, "at_fault": 2, "offroad": 4, "red_light": 8, "wrong_way": 16}

# (metric key, label, kind): kind "score" = higher is better in [0, 1], "rate" = lower is better
MATRIX_COLUMNS = [
    ("score", "Score", "score"), ("nuplan_score", "nuPlan", "score"),
    ("collision_at_fault", "At-fault coll.", "rate"), ("collision_any", "Any coll.", "rate"),
    ("offroad", "Off-road", "rate"), ("red_light", "Red light", "rate"),
    ("route_completion", "Route compl.", "score"), ("comfort_violation", "Comfort viol.", "rate"),
    ("progress", "Progress", "score"),
]
HEADLINE_CARDS = [
    ("score", "Score", "score", "AlpaSim scene score"),
    ("nuplan_score", "nuPlan score", "score", "closed-loop score"),
    ("collision_at_fault", "At-fault collisions", "rate", "rollouts with one"),
    ("offroad", "Off-road", "rate", "rollouts leaving the road"),
    ("progress", "Progress", "score", "vs. the logged ego"),
    ("route_completion", "Route completion", "rate_good", "progress >= 95%"),
    ("comfort_violation", "Comfort violations", "rate", "nuPlan comfort bounds"),
]
VIEW_METRICS = ["score", "nuplan_score", "progress", "collision_at_fault", "offroad", "red_light",
                "route_completion", "comfort_violation"]


# --------------------------------------------------------------------------- data extraction
def _r(a: np.ndarray, nd: int = 2) -> list:
    """Round to ``nd`` decimals, flatten, non-finite -> None."""
    a = np.round(np.asarray(a, dtype=np.float64).reshape(-1), nd)
    return [float(v) if math.isfinite(v) else None for v in a.tolist()]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _clip_polyline(xy: np.ndarray, box: tuple[float, float, float, float], pad: float) -> list[np.ndarray]:
    """Runs of ``xy`` (N, 2) inside ``box`` grown by ``pad`` (one extra point at each end of a run)."""
    x0, y0, x1, y1 = box
    ins = (xy[:, 0] >= x0 - pad) & (xy[:, 0] <= x1 + pad) & (xy[:, 1] >= y0 - pad) & (xy[:, 1] <= y1 + pad)
    if ins.all():
        return [xy]
    if not ins.any():
        return []
    keep = ins.copy()
    keep[1:] |= ins[:-1]
    keep[:-1] |= ins[1:]
    out, start = [], None
    for i, k in enumerate(keep.tolist() + [False]):
        if k and start is None:
            start = i
        elif not k and start is not None:
            if i - start >= 2:
                out.append(xy[start:i])
            start = None
    return out


def rollout_view(ro: Rollout, scenario: Scenario, b: int, summary: RolloutSummary | None = None,
                 margin: float = CROP_MARGIN) -> dict:
    """Compact, JSON-ready drawing data of rollout ``b`` of ``ro`` on the batched ``scenario``.

    Frames are the rollout's T+1 states; per-step checks are attached to the frame they lead
    to.  Map geometry is cropped to what the ego and agents visit plus ``margin`` metres and
    only agents ever present are kept.  Coordinates are rounded to cm.
    """
    n = ro.xy.shape[0]
    xy = _np(ro.xy[:, b]).astype(np.float64)  # (n, A, 2)
    yaw = _np(ro.yaw[:, b]).astype(np.float64)
    present = _np(ro.present[:, b]).astype(bool)
    present[:, 0] = True
    ag = scenario.agents
    kinds, lens, wids = _np(ag.kind[b]), _np(ag.length[b]), _np(ag.width[b])
    ever = np.flatnonzero(present.any(0))
    pts = xy[:, ever][present[:, ever]]
    pts = pts[np.isfinite(pts).all(-1)]
    if pts.size == 0:
        pts = np.zeros((1, 2))
    box = (float(pts[:, 0].min() - margin), float(pts[:, 1].min() - margin),
           float(pts[:, 0].max() + margin), float(pts[:, 1].max() + margin))

    agents = []
    for a in ever.tolist():
        p = present[:, a]
        ax, ay, ah = xy[:, a, 0], xy[:, a, 1], yaw[:, a]
        rec = {"k": int(kinds[a]), "l": round(float(lens[a]), 2), "w": round(float(wids[a]), 2)}
        if p.all() and np.ptp(ax) < 0.005 and np.ptp(ay) < 0.005 and np.ptp(ah) < 0.005:
            rec.update(x=round(float(ax[0]), 2), y=round(float(ay[0]), 2), h=round(float(ah[0]), 3))
        else:
            rec.update(x=_r(np.where(p, ax, np.nan)), y=_r(np.where(p, ay, np.nan)),
                       h=_r(np.where(p, ah, np.nan), 3))
        agents.append(rec)

    m = scenario.map
    lanes = []
    lv, lpv, lxy, lw, lj = (_np(m.lane_valid[b]), _np(m.lane_point_valid[b]), _np(m.lane_xy[b]),
                            _np(m.lane_width[b]), _np(m.lane_is_junction[b]))
    pad = float(lw.max()) if lw.size else 0.0
    near = lv & (lpv & (lxy[..., 0] >= box[0] - pad) & (lxy[..., 0] <= box[2] + pad)
                 & (lxy[..., 1] >= box[1] - pad) & (lxy[..., 1] <= box[3] + pad)).any(-1)
    for i in np.flatnonzero(near).tolist():
        for run in _clip_polyline(lxy[i][lpv[i]].astype(np.float64), box, float(lw[i])):
            lanes.append({"w": round(float(lw[i]), 2), "j": int(bool(lj[i])), "xy": _r(run)})
    edges = []
    ev, exy = _np(m.road_edge_valid[b]), _np(m.road_edge_xy[b])
    for i in range(exy.shape[0]):
        if ev[i].sum() >= 2:
            edges += [_r(run) for run in _clip_polyline(exy[i][ev[i]].astype(np.float64), box, 0.0)]
    cws = []
    cv, cxy = _np(m.crosswalk_valid[b]), _np(m.crosswalk_xy[b])
    for i in np.flatnonzero(cv).tolist():
        if _clip_polyline(cxy[i].astype(np.float64), box, 5.0):
            cws.append(_r(cxy[i]))
    stops, used_lights = [], set()
    sv, sxy, sl = _np(m.stop_line_valid[b]), _np(m.stop_line_xy[b]), _np(m.stop_line_lane[b])
    lane_light = _np(m.lane_light[b])
    for i in np.flatnonzero(sv).tolist():
        if not _clip_polyline(sxy[i].astype(np.float64), box, 5.0):
            continue
        light = int(lane_light[sl[i]]) if sl[i] >= 0 else -1
        stops.append({"xy": _r(sxy[i]), "light": light})
        if light >= 0:
            used_lights.add(light)
    ls = _np(scenario.light_states[b])
    Ts = ls.shape[-1]
    fidx = np.minimum(np.arange(n), Ts - 1)
    lights = {str(k): "".join(str(int(v)) for v in ls[k, fidx])
              for k in sorted(used_lights) if k < ls.shape[0]}

    r = scenario.route
    rxy = _np(r.xy[b])[_np(r.valid[b])].astype(np.float64)
    route = _r(np.concatenate((rxy[::2], rxy[-1:])) if len(rxy) > 2 else rxy)

    c = ro.checks
    flags = np.zeros(n, np.int64)
    for name, key in (("collision", "collision"), ("at_fault", "collision_at_fault"), ("offroad", "offroad"),
                      ("red_light", "red_light"), ("wrong_way", "wrong_way")):
        flags[1:] |= _np(getattr(c, key)[:, b]).astype(np.int64) * FLAG_BITS[name]
    hit_raw = _np(c.collision_agent[:, b])
    pos = {int(a): j for j, a in enumerate(ever.tolist())}
    hits = {str(t + 1): pos[int(h)] for t, h in enumerate(hit_raw.tolist()) if h >= 0 and int(h) in pos}

    dsteps = _np(ro.decision_steps).astype(np.int64).tolist()
    pidx = list(range(0, ro.plan_xy.shape[2], PLAN_STRIDE))
    if pidx[-1] != ro.plan_xy.shape[2] - 1:
        pidx.append(ro.plan_xy.shape[2] - 1)
    plan_np = _np(ro.plan_xy[:, b][:, pidx]).astype(np.float64) if dsteps else np.zeros((0, len(pidx), 2))
    plans = [_r(p) if np.isfinite(p).all() else [] for p in plan_np]
    texts: list[str] = []
    tpos: dict[str, int] = {}
    ti = []
    for d in range(len(dsteps)):
        s = str(ro.reasoning[d][b]) if d < len(ro.reasoning) else ""
        if s not in tpos:
            tpos[s] = len(texts)
            texts.append(s)
        ti.append(tpos[s])

    scored = _np(ro.scored)
    sid = ro.scenario_ids[b]
    meta = scenario.meta[b] if isinstance(scenario.meta, tuple) else scenario.meta
    view = {
        "id": summary.rollout_id if summary else f"{sid}#{int(ro.seeds[b])}@{ro.policy}",
        "scenario_id": sid, "family": meta.family, "seed": int(ro.seeds[b]), "policy": ro.policy,
        "failed": bool(ro.failed[b]) or bool(summary and summary.failed),
        "reason": str(ro.fail_reason[b]) or (summary.fail_reason if summary else ""),
        "metrics": {k: summary.metrics.get(k) for k in VIEW_METRICS} if summary else {},
        "n": int(n), "dt": DT, "warmup": int(np.argmax(scored)) if scored.any() else int(n - 1),
        "bbox": [round(v, 2) for v in box],
        "lanes": lanes, "edges": edges, "crosswalks": cws, "stops": stops, "lights": lights, "route": route,
        "agents": agents, "ego": 0, "speed": _r(_np(ro.speed[:, b, 0])), "flags": flags.tolist(),
        "hits": hits,
        "dec": dsteps, "plans": plans, "texts": texts, "ti": ti,
    }
    return view


# --------------------------------------------------------------------------- HTML
def _sort_key(s: RolloutSummary) -> tuple:
    def v(k: str) -> float:
        x = s.metrics.get(k, math.nan)
        return x if x is not None and math.isfinite(x) else -math.inf

    fault = s.metrics.get("collision_at_fault") or 0.0
    return (0 if s.failed else 1, v("score"), v("nuplan_score"), -fault, s.scenario_id)


def _fmt(v: float | None, kind: str, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if kind.startswith("rate"):
        return f"{100 * v:.1f}%"
    return f"{v:.{digits}f}"


def _fmt_ci(st: Stat, kind: str) -> str:
    lo, hi = st.ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    if kind.startswith("rate"):
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]%"
    return f"[{lo:.3f}, {hi:.3f}]"


def _goodness(v: float | None, kind: str) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    if kind == "rate":
        return 1.0 - min(max(v, 0.0) / 0.3, 1.0)
    return min(max(v, 0.0), 1.0)


def _cell_style(v: float | None, kind: str) -> str:
    g = _goodness(v, kind)
    if g is None:
        return ""
    hue = int(round(4 + 128 * g))
    return f' style="background:hsl({hue} 70% 90%);color:hsl({hue} 60% 22%)"'


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _headline_html(rep: EvalReport) -> str:
    o = rep.overall
    cards = []
    for key, label, kind, hint in HEADLINE_CARDS:
        st = o.get(key)
        if st is None:
            continue
        k2 = "score" if kind == "rate_good" else kind
        cards.append(
            f'<div class="card" id="headline-{key.replace("_", "-")}">'
            f'<div class="card-label">{_e(label)}</div>'
            f'<div class="card-value"{_cell_style(st.mean, k2)}>{_fmt(st.mean, kind)}</div>'
            f'<div class="card-ci">95% CI {_fmt_ci(st, kind) or "–"}</div>'
            f'<div class="card-hint">{_e(hint)}</div></div>')
    kbi = rep.km_between_incidents
    kbi_s = "∞" if not math.isfinite(kbi) else (f"{kbi:.2f}" if kbi < 100 else f"{kbi:.0f}")
    km = sum((r.metrics.get("km") or 0.0) for r in rep.rollouts if r.metrics.get("km") is not None
             and math.isfinite(r.metrics["km"]))
    cards.append(f'<div class="card" id="headline-kbi"><div class="card-label">km between incidents</div>'
                 f'<div class="card-value">{kbi_s}</div><div class="card-ci">{km:.2f} km driven</div>'
                 f'<div class="card-hint">at-fault collisions + off-road</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _matrix_html(rep: EvalReport) -> str:
    head = "<th>Family</th><th>n</th>" + "".join(f"<th>{_e(lbl)}</th>" for _, lbl, _ in MATRIX_COLUMNS)
    rows = []
    items = list(rep.per_family.items()) + [("ALL", rep.overall)]
    for fam, stats in items:
        n = max((s.n for s in stats.values()), default=0)
        cells = []
        for key, _, kind in MATRIX_COLUMNS:
            st = stats.get(key)
            if st is None:
                cells.append("<td>–</td>")
                continue
            cells.append(f'<td class="num"{_cell_style(st.mean, kind)}>'
                         f'<div class="m">{_fmt(st.mean, kind)}</div>'
                         f'<div class="ci">{_fmt_ci(st, kind)}</div></td>')
        cls = ' class="total"' if fam == "ALL" else ""
        rows.append(f'<tr{cls} data-family="{_e(fam)}"><th class="fam">{_e(fam)}</th><td class="num">{n}</td>'
                    + "".join(cells) + "</tr>")
    return (f'<div class="table-wrap"><table id="family-table" class="matrix"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _status(s: RolloutSummary) -> str:
    if s.failed:
        return f'<span class="tag tag-fail" title="{_e(s.fail_reason)}">FAILED</span> {_e(s.fail_reason)}'
    m = s.metrics
    tags = []
    for key, lbl in (("collision_at_fault", "at-fault"), ("collision_any", "contact"),
                     ("offroad", "off-road"), ("red_light", "red light"), ("wrong_way", "wrong way"),
                     ("comfort_violation", "comfort")):
        v = m.get(key)
        if v is not None and math.isfinite(v) and v > 0:
            if key == "collision_any" and (m.get("collision_at_fault") or 0) > 0:
                continue
            tags.append(f'<span class="tag tag-{key.replace("_", "-")}">{lbl}</span>')
    return "".join(tags) or '<span class="tag tag-ok">ok</span>'


def _rollout_list_html(listed: list[tuple[RolloutSummary, int | None]], total: int) -> str:
    rows = []
    for rank, (s, vi) in enumerate(listed, 1):
        attrs = f' data-view="{vi}" tabindex="0"' if vi is not None else ' class="noview"'
        m = s.metrics
        rows.append(
            f"<tr{attrs}><td class='rank'>{rank}</td><td class='sid'><div>{_e(s.scenario_id)}</div>"
            f"<div class='fam-sm'>{_e(s.family)} · seed {s.seed}</div></td>"
            f"<td class='num'{_cell_style(m.get('score'), 'score')}>{_fmt(m.get('score'), 'score', 2)}</td>"
            f"<td class='num'>{_fmt(m.get('progress'), 'score', 2)}</td>"
            f"<td class='status'>{_status(s)}</td></tr>")
    note = f"{len(listed)} worst of {total} rollouts" if total > len(listed) else f"all {total} rollouts"
    return (f'<div class="list-note">{note}, worst first (failed, then lowest score)</div>'
            f'<div class="list-scroll"><table id="rollout-table" class="rollouts"><thead><tr><th>#</th>'
            f'<th>Scenario</th><th>Score</th><th>Prog.</th><th>Status</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _asset(name: str) -> str:
    return resources.files("roadloop.eval").joinpath("assets", name).read_text(encoding="utf-8")


def _json_for_script(data: object) -> str:
    s = json.dumps(json_clean(data), allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def build_html(report: EvalReport, kept: list[tuple[Rollout, Scenario]], max_rollouts: int = 40,
               title: str | None = None) -> str:
    """The report page as one HTML string (see ``write_report``)."""
    where: dict[tuple[str, int], tuple[int, int]] = {}
    for k, (ro, _) in enumerate(kept):
        for b, sid in enumerate(ro.scenario_ids):
            where.setdefault((sid, int(ro.seeds[b])), (k, b))
    ordered = sorted(report.rollouts, key=_sort_key)[:max(0, max_rollouts)]
    views, listed = [], []
    for s in ordered:
        loc = where.get((s.scenario_id, s.seed))
        if loc is None:
            listed.append((s, None))
            continue
        ro, sc = kept[loc[0]]
        views.append(rollout_view(ro, sc, loc[1], s))
        listed.append((s, len(views) - 1))
    title = title or f"{report.policy} on {report.suite or 'suite'}"
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    data = {"title": title, "palette": PALETTE, "flag_bits": FLAG_BITS, "views": views,
            "headline": report.headline()}
    meta = [f"policy <b>{_e(report.policy)}</b>", f"suite <b>{_e(report.suite or '–')}</b>"]
    if report.suite_hash:
        meta.append(f"hash <code>{_e(report.suite_hash[:12])}</code>")
    meta += [f"{len(report.rollouts)} rollouts", f"{report.n_failed} failed", f"seed {report.seed}",
             f"{report.seconds:.1f} s", f"generated {now}"]
    failed_banner = ""
    if report.n_failed:
        failed_banner = (f'<div class="banner">{report.n_failed} rollout(s) failed (the policy raised or '
                         'returned non-finite values); they are excluded from the means and listed '
                         'first.</div>')
    viewer = (_asset("viewer.html") if views else '<div class="empty">No rollouts were kept for replay '
              '(run the evaluation with keep_rollouts=True).</div>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · roadloop report</title>
<style>{_asset("report.css")}</style></head>
<body>
<header class="top"><div class="brand">roadloop <span>closed-loop evaluation</span></div>
<h1>{_e(title)}</h1><div class="meta">{" · ".join(meta)}</div></header>
<main>
{failed_banner}
<section id="headline"><h2>Headline <small>mean with 95% bootstrap CI over rollouts</small></h2>
{_headline_html(report)}</section>
<section id="families"><h2>Per-family matrix <small>mean and [95% CI]; green is good</small></h2>
{_matrix_html(report)}</section>
<section id="rollouts"><h2>Rollouts <small>click one to replay it</small></h2>
<div class="replay">
<div class="list">{_rollout_list_html(listed, len(report.rollouts))}</div>
{viewer}
</div></section>
</main>
<footer>roadloop · self-contained report, no network access needed</footer>
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{_asset("scene.js")}</script>
<script>{_asset("viewer.js")}</script>
</body></html>
"""


def write_report(report: EvalReport, kept: list[tuple[Rollout, Scenario]], out_dir: Path,
                 max_rollouts: int = 40, title: str | None = None) -> Path:
    """Write the self-contained report ``out_dir/index.html`` and return its path.

    ``kept`` holds the (rollout, batched scenario) pairs of ``evaluate(..., keep_rollouts=True)``;
    the ``max_rollouts`` worst rollouts (failed first, then lowest score) get an animated replay.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    atomic_write_text(path, build_html(report, kept, max_rollouts=max_rollouts, title=title))
    return path
