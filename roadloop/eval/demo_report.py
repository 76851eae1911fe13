"""The final page of ``roadloop demo``: what closed-loop post-training changed, in one HTML file.

``write_demo_report(data, out_dir)`` writes ``out_dir/index.html``: inline CSS/JS
(``roadloop/eval/assets/``), curves as inline SVG and the drawing data as strict JSON in
``<script type="application/json" id="demo-data">``, so it opens from ``file://`` with no network.
Sections, in order:

1. header: title and the free ``meta`` key/values (out dir, machine, date, total time);
2. before/after table: one row per evaluated policy (AlpaSim score, at-fault collision, off-road and
   comfort-violation rates, reasoning consistency and grounding, progress; mean and 95% CI), a change row
   (candidate - baseline, green when better, red when worse) and a verdict sentence computed from the
   numbers (``demo_verdict``);
3. learning curves: matplotlib to inline SVG, one panel per series (train/val of one quantity share one);
4. per-family matrix: families x policies, mean score and at-fault collision rate per cell;
5. gate decision: passed/promoted badges, candidate and champion refs, every gate with its reason;
6. the held-out rollouts whose outcome post-training changed: per pair, "before" and "after" canvas players
   (``assets/scene.js``, the drawing code of the evaluation report's viewer) driven by one shared
   play/pause button and scrub slider (``assets/compare.js``), each with its policy's reasoning text;
7. stage timings and the commands to run next.

``paired_rollouts`` picks and builds the pairs from two ``evaluate(..., keep_rollouts=True)`` results,
``outcome_text`` words one rollout's outcome and ``gate_dict`` turns a ``GateSummary`` into ``gate``.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from roadloop.eval.compare import MIN_PAIRS, mean_and_halfwidth, metric_value, paired_diffs
from roadloop.eval.evaluate import EvalReport, RolloutSummary, Stat
from roadloop.eval.html import (
    FLAG_BITS,
    PALETTE,
    _asset,
    _cell_style,
    _e,
    _fmt,
    _fmt_ci,
    _json_for_script,
    rollout_view,
)
from roadloop.io import atomic_write_text
from roadloop.registry.gates import GateSummary
from roadloop.rollout import Rollout
from roadloop.sim.datatypes import Scenario


@dataclass
class PairedRollout:
    """One held-out (scenario, seed) driven by the imitation policy (before) and the post-trained one (after)."""
    scenario_id: str
    family: str
    seed: int
    before: dict   # rollout_view(...) of the imitation policy's rollout (has its reasoning texts)
    after: dict    # rollout_view(...) of the post-trained policy's rollout
    before_outcome: str  # short text, e.g. "at-fault collision at 6.3 s" / "off-road" / "completed, score 0.92"
    after_outcome: str


@dataclass
class DemoReportData:
    title: str
    reports: dict[str, EvalReport]          # ordered: {"expert": ..., "imitation": ..., "post-trained": ...}
    baseline: str                           # key of `reports` that is "before" (e.g. "imitation")
    candidate: str                          # key that is "after" (e.g. "post-trained")
    curves: dict[str, list[tuple[float, float]]]  # series name -> [(step, value)]; may be empty
    gate: dict                              # {"candidate", "champion", "passed", "promoted", "results", "note"}
    pairs: list[PairedRollout]              # may be empty
    stages: list[dict]                      # [{"name", "seconds", "reused", "detail"}]
    next_commands: list[tuple[str, str]]    # [(command, what it does)]
    meta: dict[str, str] = field(default_factory=dict)   # free key/values shown in the header


# (metric key, column label, kind): "rate" = lower is better (shown in %), "score" = higher is better
TABLE_COLUMNS = [
    ("score", "AlpaSim score", "score"),
    ("collision_at_fault", "At-fault collisions", "rate"),
    ("offroad", "Off-road", "rate"),
    ("comfort_violation", "Comfort violations", "rate"),
    ("reasoning_consistency", "Reasoning consistency", "score"),
    ("reasoning_grounding", "Grounding", "score"),
    ("progress", "Progress", "score"),
]
INCIDENTS = "the share of rollouts with an at-fault collision or off-road"
_SEVERITY = {"failed": 3, "at_fault": 2, "offroad": 2, "violation": 1, "ok": 0}
_ICON = {
    "prev": '<svg viewBox="0 0 24 24"><path d="M6 5h2v14H6zM20 5v14L9 12z"/></svg>',
    "play": ('<svg class="i-play" viewBox="0 0 24 24"><path d="M7 4v16l13-8z"/></svg>'
             '<svg class="i-pause" viewBox="0 0 24 24"><path d="M6 4h4v16H6zM14 4h4v16h-4z"/></svg>'),
    "next": '<svg viewBox="0 0 24 24"><path d="M16 5h2v14h-2zM4 5v14l11-7z"/></svg>',
}


# --------------------------------------------------------------------------- helpers for the caller
def _fin(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _on(m: dict[str, float], key: str) -> bool:
    v = m.get(key)
    return _fin(v) and v > 0


def _first_time(view: dict | None, bit: str) -> float | None:
    """Time (s) of the first scored frame of ``view`` with flag ``bit``; None if unknown."""
    if not view or "flags" not in view:
        return None
    flags, b = view["flags"], FLAG_BITS[bit]
    for f in range(int(view.get("warmup", 0)) + 1, len(flags)):
        if flags[f] & b:
            return f * float(view.get("dt", 0.1))
    return None


def outcome_text(summary: RolloutSummary, view: dict | None = None) -> str:
    """Short words for one rollout's outcome, e.g. "at-fault collision at 6.3 s", "off-road",
    "completed, score 0.92"; the time of an incident is given when its ``rollout_view`` is passed."""
    if summary.failed:
        why = (summary.fail_reason or "").strip().splitlines()
        return f"policy failed ({why[0][:80]})" if why else "policy failed"
    m = summary.metrics

    def at(bit: str) -> str:
        t = _first_time(view, bit)
        return f" at {t:.1f} s" if t is not None else ""

    if _on(m, "collision_at_fault"):
        return f"at-fault collision{at('at_fault')}"
    if _on(m, "offroad"):
        return f"off-road{at('offroad')}"
    score = m.get("score")
    sc = f"score {score:.2f}" if _fin(score) else "no score"
    extra = []
    if _on(m, "red_light"):
        extra.append(f"ran a red light{at('red_light')}")
    if _on(m, "wrong_way"):
        extra.append(f"drove the wrong way{at('wrong_way')}")
    if _on(m, "collision_any"):
        extra.append(f"was hit (not at fault){at('collision')}")
    if extra:
        return ", ".join(extra) + f", {sc}"
    if _on(m, "route_completion"):
        return f"completed, {sc}"
    prog = m.get("progress")
    return f"no incident, progress {100 * prog:.0f}%, {sc}" if _fin(prog) else f"no incident, {sc}"


def _outcome_class(failed: bool, m: dict) -> str:
    if failed:
        return "failed"
    if _on(m, "collision_at_fault"):
        return "at_fault"
    if _on(m, "offroad"):
        return "offroad"
    if _on(m, "red_light") or _on(m, "wrong_way"):
        return "violation"
    return "ok"


def _score0(failed: bool, m: dict) -> float:
    s = m.get("score")
    return 0.0 if failed or not _fin(s) else float(s)


def _locate(kept: list[tuple[Rollout, Scenario]]) -> dict[tuple[str, int], tuple[int, int]]:
    where: dict[tuple[str, int], tuple[int, int]] = {}
    for k, (ro, _) in enumerate(kept):
        for b, sid in enumerate(ro.scenario_ids):
            where.setdefault((sid, int(ro.seeds[b])), (k, b))
    return where


def paired_rollouts(before: tuple[EvalReport, list[tuple[Rollout, Scenario]]],
                    after: tuple[EvalReport, list[tuple[Rollout, Scenario]]], *, limit: int = 4,
                    min_score_change: float = 0.1) -> list[PairedRollout]:
    """Pairs of the (scenario, seed)s both evaluations ran whose outcome changed: a different outcome class
    (failed / at-fault collision / off-road / red light or wrong way / clean) or a score change of at least
    ``min_score_change``.  Largest changes first (class changes before score-only ones), improvements and
    regressions alike; at most ``limit``.  Both evaluations need ``keep_rollouts=True``."""
    (rb, kb), (ra, ka) = before, after
    wb, wa = _locate(kb), _locate(ka)
    sb = {(s.scenario_id, s.seed): s for s in rb.rollouts}
    found = []
    for s_a in ra.rollouts:
        key = (s_a.scenario_id, s_a.seed)
        s_b = sb.get(key)
        if s_b is None or key not in wb or key not in wa:
            continue
        cb, ca = _outcome_class(s_b.failed, s_b.metrics), _outcome_class(s_a.failed, s_a.metrics)
        delta = _score0(s_a.failed, s_a.metrics) - _score0(s_b.failed, s_b.metrics)
        if cb == ca and abs(delta) < min_score_change:
            continue
        found.append((-abs(_SEVERITY[cb] - _SEVERITY[ca]), -abs(delta), key, s_b, s_a))
    found.sort(key=lambda t: t[:3])
    pairs = []
    for _, _, key, s_b, s_a in found[:max(0, limit)]:
        (i, b), (j, a) = wb[key], wa[key]
        vb = rollout_view(kb[i][0], kb[i][1], b, s_b)
        va = rollout_view(ka[j][0], ka[j][1], a, s_a)
        pairs.append(PairedRollout(key[0], s_a.family, key[1], vb, va, outcome_text(s_b, vb), outcome_text(s_a, va)))
    return pairs


def gate_dict(summary: GateSummary, candidate: str, champion: str | None, promoted: bool, note: str = "") -> dict:
    """``DemoReportData.gate`` of a ``run_gates`` result."""
    return {"candidate": candidate, "champion": champion, "passed": bool(summary.passed), "promoted": bool(promoted),
            "results": [{"name": r.gate, "passed": bool(r.passed),
                         "reason": "; ".join(r.reasons) or ("ok" if r.passed else "failed")} for r in summary.results],
            "note": note}


# --------------------------------------------------------------------------- verdict
def _mean(rep: EvalReport, key: str) -> float:
    st = rep.overall.get(key)
    return float(st.mean) if st is not None and _fin(st.mean) else math.nan


def incident_rate(rep: EvalReport) -> float:
    """Share of the non-failed rollouts with an at-fault collision or an off-road excursion (either, counted
    once); from the rates' sum when the report has no per-rollout records."""
    rows = [r.metrics for r in rep.rollouts if not r.failed]
    if not rows:
        return _mean(rep, "collision_at_fault") + _mean(rep, "offroad")
    vals = [v for v in map(metric_value("incident"), rows) if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def paired_change(b: EvalReport, c: EvalReport, value: Callable[[dict[str, float]], float]
                  ) -> tuple[float, float, int] | None:
    """Paired change of a per-rollout ``value`` from ``b`` to ``c``: (mean of value(c) - value(b), 95% half-width
    of that mean (Student's t, clustered by scenario), number of pairs), over the (scenario, seed)
    rollouts that both evaluated without failure and with a finite value (``roadloop.eval.compare``); None with
    fewer than 10 pairs."""
    vb, vc, ids = paired_diffs([b], [c], value)
    if len(vb) < MIN_PAIRS or len(set(ids)) < 2:
        return None
    mean, hw = mean_and_halfwidth([x - y for x, y in zip(vc, vb, strict=True)], ids)
    return mean, hw, len(vb)


def demo_verdict(data: DemoReportData) -> tuple[str, str]:
    """(sentence, tone) comparing the candidate with the baseline; tone is good / bad / mixed / same / none.

    Looks at the at-fault collision + off-road share, the at-fault collisions when they move against it,
    and the mean AlpaSim score.  A change that vanishes at the displayed precision (0.1% / 0.001) counts
    as unchanged.  When both reports hold per-rollout records of the same (scenario, seed) pairs, each
    change comes with its paired 95% interval (``paired_change``), and a change whose interval holds 0 is
    called within noise and does not set the tone; then the at-fault collision and off-road rates, the
    reasoning consistency and the grounding are also named where their own paired interval excludes 0
    (safer on one kind of incident, or reasoning better or worse, even when the share of incidents moved
    within noise), and left unsaid otherwise.  Reasoning changes alone (the driving within noise) do not
    make the policy "better" or "worse": the head says the reasoning moved and the driving did not."""
    b, c = data.reports.get(data.baseline), data.reports.get(data.candidate)
    if b is None or c is None or data.baseline == data.candidate:
        return ("No before/after comparison: the baseline and the candidate must be two different evaluated "
                "policies.", "none")
    parts: list[tuple[int, str, bool]] = []  # (+1 better / -1 worse / 0 unchanged, text, about the reasoning)
    noise: list[str] = []

    def judge(label: str, kind: str, vb: float, vc: float, value: Callable, verbs: tuple[str, str],
              rel: bool = False, secondary: bool = False, about_reasoning: bool = False) -> None:
        if not (_fin(vb) and _fin(vc)):
            return
        fb, fc = _fmt(vb, kind), _fmt(vc, kind)
        if fb == fc:
            if not secondary:
                parts.append((0, f"left {label} unchanged at {fb}", about_reasoning))
            return
        pc = paired_change(b, c, value)
        if secondary and (pc is None or abs(pc[0]) <= pc[1]):
            return  # named only when beyond noise
        if pc is not None and abs(pc[0]) <= pc[1]:
            noise.append(f"{label} {fb} → {fc}")
            return
        better = (vc < vb) == (kind == "rate")
        notes = [f"{100 * (vc - vb) / vb:+.0f}% relative"] if rel and vb > 0 else []
        if pc is not None:
            k, dec, unit = (100.0, 1, " pp") if kind == "rate" else (1.0, 3, "")
            notes.append(f"paired change {k * pc[0]:+.{dec}f}{unit} ± {k * pc[1]:.{dec}f}{unit}, 95%, {pc[2]} pairs")
        verb = verbs[0] if (vc < vb) else verbs[1]
        text = f"{verb} {label} from {fb} to {fc}" + (f" ({'; '.join(notes)})" if notes else "")
        parts.append((1 if better else -1, text, about_reasoning))

    ib, ic = incident_rate(b), incident_rate(c)
    judge(INCIDENTS, "rate", ib, ic, metric_value("incident"), ("cut", "raised"), rel=True)
    cb, cc = _mean(b, "collision_at_fault"), _mean(c, "collision_at_fault")
    against = (_fin(ib) and _fin(ic) and _fin(cb) and _fin(cc) and (cc > cb) == (ic < ib)
               and _fmt(cb, "rate") != _fmt(cc, "rate"))  # at-fault collisions moved against the incident share
    judge("at-fault collisions", "rate", cb, cc, metric_value("collision_at_fault"), ("cut", "raised"),
          secondary=not against)
    judge("off-road", "rate", _mean(b, "offroad"), _mean(c, "offroad"), metric_value("offroad"), ("cut", "raised"),
          secondary=True)
    judge("the score", "score", _mean(b, "score"), _mean(c, "score"), metric_value("score"), ("lowered", "raised"))
    for key, label in (("reasoning_consistency", "reasoning consistency"), ("reasoning_grounding", "grounding")):
        judge(label, "score", _mean(b, key), _mean(c, key), metric_value(key), ("lowered", "raised"), secondary=True,
              about_reasoning=True)
    if not parts and not noise:
        return (f"No before/after comparison: {data.candidate} or {data.baseline} has no finite score or "
                "incident rate.", "none")
    signs = {sg for sg, _, _ in parts}
    reasoning_only = bool(signs - {0}) and all(r for sg, _, r in parts if sg)
    if reasoning_only and signs - {0} == {1}:  # the driving moved within noise: no "better" for reasoning alone
        head, tone = "Post-training improved the reasoning, not the driving beyond noise", "same"
    elif reasoning_only and signs - {0} == {-1}:
        head, tone = "Post-training made the reasoning worse, and the driving no better beyond noise", "bad"
    elif 1 in signs and -1 in signs:
        head, tone = "Post-training gave a mixed result", "mixed"
    elif -1 in signs:
        head, tone = "Post-training made the policy worse", "bad"
    elif 1 in signs:
        head, tone = "Post-training made the policy better", "good"
    elif noise:
        head, tone = "Post-training changed nothing beyond noise", "same"
    else:
        head, tone = "Post-training changed nothing measurable", "same"
    good = " and ".join(t for sg, t, _ in parts if sg == 1)
    bad = " and ".join(t for sg, t, _ in parts if sg == -1)
    same = " and ".join(t for sg, t, _ in parts if sg == 0)
    if tone == "mixed":
        body = f"{good} but {bad}" + (f", and {same}" if same else "")
    else:
        body = " and ".join(t for t in (good, bad, same) if t)
    nb, nc = len(b.rollouts), len(c.rollouts)
    counts = f"{nc} rollouts each" if nb == nc else f"{nb} and {nc} rollouts"
    said = [f"it {body}"] if body else []
    if noise:
        said.append(f"{'within' if body else 'every change is within'} noise (paired 95% interval holds 0): "
                    + ", ".join(noise))
    text = f"{head}: {'; '.join(said)} ({data.baseline} → {data.candidate}, {counts})."
    if c.n_failed > b.n_failed:
        text += f" {c.n_failed} {data.candidate} rollout(s) failed outright and are not in the means."
    return text, tone


# --------------------------------------------------------------------------- sections
def _header(data: DemoReportData) -> str:
    meta = "".join(f"<span>{_e(k)} <b>{_e(v)}</b></span>" for k, v in data.meta.items())
    return (f'<header class="top"><div class="brand">roadloop <span>closed-loop post-training demo</span></div>'
            f'<h1>{_e(data.title)}</h1><div class="meta">{meta}</div></header>')


def _stat_cell(st: Stat | None, key: str, kind: str) -> str:
    if st is None or not _fin(st.mean):
        return f'<td class="num" data-metric="{key}">–</td>'
    ci = _fmt_ci(st, kind)
    return (f'<td class="num" data-metric="{key}"{_cell_style(st.mean, kind)}><div class="m">{_fmt(st.mean, kind)}'
            f'</div><div class="ci">{ci}</div></td>')


def _delta_cell(b: Stat | None, c: Stat | None, key: str, kind: str) -> str:
    if b is None or c is None or not (_fin(b.mean) and _fin(c.mean)):
        return f'<td class="num delta" data-metric="{key}">–</td>'
    d = c.mean - b.mean
    text = f"{100 * d:+.1f} pp" if kind == "rate" else f"{d:+.3f}"
    if _fmt(b.mean, kind) == _fmt(c.mean, kind):
        tone, text = "same", "±0"
    else:
        tone = "good" if (d < 0) == (kind == "rate") else "bad"
    return f'<td class="num delta {tone}" data-metric="{key}" data-tone="{tone}">{text}</td>'


def _before_after(data: DemoReportData) -> str:
    sentence, tone = demo_verdict(data)
    head = "<th>Policy</th><th>n</th>" + "".join(f"<th>{_e(lbl)}</th>" for _, lbl, _ in TABLE_COLUMNS)
    rows = []
    for name, rep in data.reports.items():
        role = ('<span class="role before">before</span>' if name == data.baseline else
                '<span class="role after">after</span>' if name == data.candidate else "")
        failed = f", {rep.n_failed} failed" if rep.n_failed else ""
        cells = "".join(_stat_cell(rep.overall.get(k), k, kind) for k, _, kind in TABLE_COLUMNS)
        rows.append(f'<tr data-policy="{_e(name)}"><th class="fam pol">{_e(name)}{role}'
                    f'<div class="fam-sm">{_e(rep.policy)}</div></th><td class="num">{len(rep.rollouts)}{failed}</td>'
                    f'{cells}</tr>')
    b, c = data.reports.get(data.baseline), data.reports.get(data.candidate)
    if b is not None and c is not None and data.baseline != data.candidate:
        cells = "".join(_delta_cell(b.overall.get(k), c.overall.get(k), k, kind) for k, _, kind in TABLE_COLUMNS)
        rows.append(f'<tr class="change"><th class="fam pol">change<div class="fam-sm">{_e(data.candidate)} − '
                    f'{_e(data.baseline)}</div></th><td></td>{cells}</tr>')
    return (f'<p id="verdict" class="verdict {tone}">{_e(sentence)}</p>'
            f'<div class="table-wrap"><table id="before-after" class="matrix"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _group_curves(curves: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[str, list]]]:
    """Series -> panels: names equal but for a train/val word share one panel (titled without it)."""
    groups: dict[str, list[tuple[str, list]]] = {}
    for name, pts in curves.items():
        key = re.sub(r"\s+", " ", re.sub(r"\b(train|training|val|validation)\b", "", name)).strip()
        key = key.strip(" :") or name
        groups.setdefault(key, []).append((name, list(pts)))
    return {(k if len(v) > 1 else v[0][0]): v for k, v in groups.items()}


def _svg_panel(title: str, series: list[tuple[str, list]], salt: str) -> str:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    colors = ["#2563eb", "#db2777", "#16a34a", "#d97706"]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 8,
                                "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(3.4, 2.1), dpi=72)  # the SVG dpi: ticks laid out = ticks saved
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (name, pts) in enumerate(series):
            xy = [(float(x), float(y)) for x, y in pts if _fin(float(x)) and _fin(float(y))]
            if not xy:
                continue
            lbl = name.split(": ", 1)[-1]
            ax.plot([p[0] for p in xy], [p[1] for p in xy], color=colors[i % len(colors)], lw=1.5, label=lbl,
                    marker="o" if len(xy) <= 25 else None, ms=2.5)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, lw=0.6)
        for s in ("top", "right"):
            ax.spines[s].set_visible(False)
        if all("rate" in name for name, _ in series):
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if len(series) > 1:
            ax.legend(frameon=False, fontsize=7)
        for _ in range(2):  # the first pass can change the ticks (and so the label widths)
            fig.tight_layout(pad=0.5)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.S)  # its global `*{...}` would leak into the page


def _caption(series: list[tuple[str, list]]) -> str:
    out = []
    for name, pts in series:
        fin = [(x, y) for x, y in pts if _fin(float(x)) and _fin(float(y))]
        if fin:
            x, y = fin[-1]
            out.append(f"{name}: last {float(y):.4g} at step {float(x):g} ({len(fin)} points)")
        else:
            out.append(f"{name}: no finite values")
    return "; ".join(out)


def _curves(curves: dict[str, list[tuple[float, float]]]) -> str:
    if not curves:
        return '<p class="note">No learning curves were recorded in this run (training was reused or skipped).</p>'
    figs = []
    for i, (title, series) in enumerate(_group_curves(curves).items()):
        names = "|".join(n for n, _ in series)
        figs.append(f'<figure class="curve" data-series="{_e(names)}">{_svg_panel(title, series, f"rl-curve-{i}")}'
                    f'<figcaption>{_e(_caption(series))}</figcaption></figure>')
    return f'<div class="curves">{"".join(figs)}</div>'


def _family_matrix(reports: dict[str, EvalReport]) -> str:
    fams: list[str] = []
    for rep in reports.values():
        fams += [f for f in rep.per_family if f not in fams]
    head = "<th>Family</th>" + "".join(f"<th>{_e(n)}</th>" for n in reports)
    rows = []
    for fam in sorted(fams) + ["ALL"]:
        cells = []
        for rep in reports.values():
            stats = rep.overall if fam == "ALL" else rep.per_family.get(fam)
            sc = stats.get("score") if stats else None
            if sc is None or not _fin(sc.mean):
                cells.append("<td class='num'>–</td>")
                continue
            coll = stats.get("collision_at_fault")
            sub = f"coll. {_fmt(coll.mean, 'rate')}" if coll is not None else ""
            cells.append(f'<td class="num"{_cell_style(sc.mean, "score")}><div class="m">{_fmt(sc.mean, "score")}'
                         f'</div><div class="ci">{sub} · n={sc.n}</div></td>')
        cls = ' class="total"' if fam == "ALL" else ""
        rows.append(f'<tr{cls} data-family="{_e(fam)}"><th class="fam">{_e(fam)}</th>{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table id="family-matrix" class="matrix"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _gate(gate: dict) -> str:
    if not gate:
        return '<p class="note">No gate decision was recorded in this run.</p>'
    passed, promoted = bool(gate.get("passed")), bool(gate.get("promoted"))
    champ = gate.get("champion")
    refs = (f'candidate <code>{_e(gate.get("candidate") or "–")}</code> vs champion '
            + (f"<code>{_e(champ)}</code>" if champ else "<b>none</b> (first release: relative gates pass)"))
    rows = []
    for r in gate.get("results") or []:
        ok, name = bool(r.get("passed")), _e(r.get("name", ""))
        tag = '<span class="tag tag-pass">pass</span>' if ok else '<span class="tag tag-fail">fail</span>'
        rows.append(f'<tr class="{"pass" if ok else "fail"}" data-gate="{name}"><td>{name}</td><td>{tag}</td>'
                    f'<td class="reason">{_e(r.get("reason", ""))}</td></tr>')
    table = (f'<div class="table-wrap"><table id="gate-table" class="gates"><thead><tr><th>Gate</th><th>Result</th>'
             f'<th>Reason</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>' if rows else "")
    note = f'<p class="note" id="gate-note">{_e(gate["note"])}</p>' if gate.get("note") else ""
    return (f'<div class="gate-head"><span class="badge {"pass" if passed else "fail"}" id="gate-badge">'
            f'{"GATES PASSED" if passed else "GATES FAILED"}</span><span class="badge '
            f'{"promoted" if promoted else "kept"}" id="promote-badge">'
            f'{"PROMOTED TO CHAMPION" if promoted else "NOT PROMOTED"}</span>'
            f'<span class="gate-refs">{refs}</span></div>{table}{note}')


def _change_kind(p: PairedRollout) -> str:
    mb, ma = p.before.get("metrics") or {}, p.after.get("metrics") or {}
    sb = _SEVERITY[_outcome_class(bool(p.before.get("failed")), mb)]
    sa = _SEVERITY[_outcome_class(bool(p.after.get("failed")), ma)]
    if sa != sb:
        return "improved" if sa < sb else "regressed"
    d = _score0(bool(p.after.get("failed")), ma) - _score0(bool(p.before.get("failed")), mb)
    return "improved" if d > 0 else "regressed" if d < 0 else "changed"


def _side(side: str, label: str, outcome: str, view: dict) -> str:
    bad = _outcome_class(bool(view.get("failed")), view.get("metrics") or {}) != "ok"
    return (f'<div class="pside" data-side="{side}" data-frame="0"><div class="pside-head">'
            f'<span class="role {side}">{side}</span><b>{_e(label)}</b>'
            f'<span class="outcome {"bad" if bad else "good"}">{_e(outcome)}</span></div>'
            f'<div class="canvas-wrap pcanvas-wrap"><canvas class="pscene" aria-label="{side}: top-down view">'
            f'</canvas><div class="overlay-flags"></div><div class="overlay-time"></div></div>'
            f'<canvas class="ptimeline" title="incidents along the rollout; click to seek"></canvas>'
            f'<div class="preasoning"><h3>Policy reasoning <span class="muted rmeta"></span></h3>'
            f'<div class="reasoning none"></div></div></div>')


def _pairs(data: DemoReportData) -> str:
    if not data.pairs:
        return ('<p class="note" id="no-pairs">No held-out rollout changed outcome between '
                f'{_e(data.baseline)} and {_e(data.candidate)} among those re-driven side by side.</p>')
    cards = []
    for i, p in enumerate(data.pairs):
        kind = _change_kind(p)
        n = max(int(p.before.get("n", 1)), int(p.after.get("n", 1)))
        cards.append(
            f'<article class="pair" id="pair-{i}" data-frame="0"><div class="pair-title">{_e(p.scenario_id)}'
            f'<span class="fam-sm">{_e(p.family)} · seed {p.seed}</span><span class="tag tag-{kind}">{kind}</span>'
            f'</div><div class="pair-grid">{_side("before", data.baseline, p.before_outcome, p.before)}'
            f'{_side("after", data.candidate, p.after_outcome, p.after)}</div>'
            f'<input type="range" class="pair-slider" min="0" max="{n - 1}" value="0" step="1" aria-label="frame">'
            f'<div class="controls"><button class="icon pair-prev" title="Previous frame" aria-label="previous frame">'
            f'{_ICON["prev"]}</button><button class="icon primary pair-play" title="Play / pause both" '
            f'aria-label="play">{_ICON["play"]}</button><button class="icon pair-next" title="Next frame" '
            f'aria-label="next frame">{_ICON["next"]}</button><span class="frame-box"><span class="pair-frame">'
            f'0 / {n - 1}</span><span class="pair-time">t = 0.0 s</span></span><span class="spacer"></span>'
            f'<label class="ctl">Speed <select class="pair-speed"><option value="0.5">0.5&times;</option>'
            f'<option value="1" selected>1&times;</option><option value="2">2&times;</option>'
            f'<option value="4">4&times;</option></select></label><label class="ctl toggle"><input type="checkbox" '
            f'class="pair-follow" checked> Follow ego</label><span class="zoom-btns"><button class="pair-zoom-in" '
            f'title="Zoom in">+</button> <button class="pair-zoom-out" title="Zoom out">&minus;</button></span>'
            f'</div></article>')
    return "".join(cards)


def _stages(stages: list[dict]) -> str:
    if not stages:
        return '<p class="note">No stage timings were recorded.</p>'
    rows, total = [], 0.0
    for s in stages:
        sec = s.get("seconds")
        ok = isinstance(sec, int | float) and _fin(float(sec))
        total += float(sec) if ok else 0.0
        rows.append(f'<tr><td>{_e(s.get("name", ""))}</td><td class="num">{f"{float(sec):.1f} s" if ok else "–"}</td>'
                    f'<td>{"yes" if s.get("reused") else "no"}</td><td>{_e(s.get("detail", ""))}</td></tr>')
    rows.append(f'<tr class="total"><td>total</td><td class="num">{total:.1f} s</td><td></td><td></td></tr>')
    return (f'<div class="table-wrap"><table id="stages" class="stages"><thead><tr><th>Stage</th><th>Time</th>'
            f'<th>Reused</th><th>Detail</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _next(cmds: list[tuple[str, str]]) -> str:
    if not cmds:
        return ""
    items = "".join(f'<li><code>{_e(c)}</code><span class="what">{_e(w)}</span></li>' for c, w in cmds)
    return f'<h2>What to run next</h2><ul id="next" class="next">{items}</ul>'


# --------------------------------------------------------------------------- page
def build_demo_html(data: DemoReportData) -> str:
    """The demo's final page as one self-contained HTML string (see the module docstring)."""
    sentence, _ = demo_verdict(data)
    payload = {
        "title": data.title, "palette": PALETTE, "flag_bits": FLAG_BITS,
        "baseline": data.baseline, "candidate": data.candidate, "verdict": sentence,
        "overall": {name: {k: {"mean": st.mean, "ci": list(st.ci), "n": st.n} for k, _, _ in TABLE_COLUMNS
                           if (st := rep.overall.get(k)) is not None} for name, rep in data.reports.items()},
        "gate": data.gate,
        "pairs": [{"scenario_id": p.scenario_id, "family": p.family, "seed": p.seed, "before": p.before,
                   "after": p.after, "before_outcome": p.before_outcome, "after_outcome": p.after_outcome}
                  for p in data.pairs],
    }
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(data.title)} · roadloop demo</title>
<style>{_asset("report.css")}
{_asset("demo.css")}</style></head>
<body>
{_header(data)}
<main>
<section id="before-after-section"><h2>Before / after <small>mean with [95% bootstrap CI] over held-out rollouts;
rates in %</small></h2>
{_before_after(data)}</section>
<section id="curves"><h2>Learning curves</h2>
{_curves(data.curves)}</section>
<section id="families"><h2>Per-family matrix <small>mean AlpaSim score (at-fault collision rate); green is
good</small></h2>
{_family_matrix(data.reports)}</section>
<section id="gate"><h2>Release gate</h2>
{_gate(data.gate)}</section>
<section id="pairs"><h2>Rollouts where post-training changed the outcome <small>{_e(data.baseline)} (before)
and {_e(data.candidate)} (after) on the same held-out scenario and seed, re-driven in a smaller batch than the
evaluation's (float rounding, which sampling amplifies, can make a rollout differ from the evaluated one); one play
button drives both</small></h2>
{_pairs(data)}</section>
<section id="timings"><h2>Stage timings</h2>
{_stages(data.stages)}</section>
<section id="next-steps">{_next(data.next_commands)}</section>
</main>
<footer>roadloop · generated {now} · self-contained report, no network access needed</footer>
<script type="application/json" id="demo-data">{_json_for_script(payload)}</script>
<script>{_asset("scene.js")}</script>
<script>{_asset("compare.js")}</script>
</body></html>
"""


def write_demo_report(data: DemoReportData, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    atomic_write_text(path, build_demo_html(data))
    return path
