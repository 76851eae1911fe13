"""The final HTML page of ``roadloop demo`` (roadloop.eval.demo_report), on real evaluations of two policies,
in headless Chromium as well."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from pathlib import Path

import pytest
from browser import opened_page

from roadloop.eval.demo_report import (
    DemoReportData,
    PairedRollout,
    build_demo_html,
    demo_verdict,
    gate_dict,
    outcome_text,
    paired_rollouts,
    write_demo_report,
)
from roadloop.eval.evaluate import EvalReport, RolloutSummary, Stat, evaluate
from roadloop.eval.html import rollout_view
from roadloop.policies import get_policy
from roadloop.registry.gates import GateResult, GateSummary
from roadloop.rollout import RolloutConfig
from roadloop.scenarios.suites import load_suite

STEPS = 80
FAKE_TEXT = "Fake <b>reason</b>: the pedestrian is close & slow, so I yield."


@pytest.fixture(scope="module")
def evals():
    """(report, kept) of route-idm ("imitation", writes no text) and expert ("post-trained", explains itself)
    on the 10 smoke scenarios, 80 closed-loop steps."""
    suite = load_suite("smoke")
    cfg = RolloutConfig(max_steps=STEPS)
    out = {}
    for label, name in (("imitation", "route-idm"), ("post-trained", "expert")):
        out[label] = evaluate(get_policy(name), suite.scenarios, suite_name="smoke", suite_hash=suite.content_hash,
                              batch_size=16, cfg=cfg, keep_rollouts=True)
    return out


def _pair(before, after, i: int) -> PairedRollout:
    (rb, kb), (ra, ka) = before, after
    sb, sa = rb.rollouts[i], ra.rollouts[i]
    assert (sb.scenario_id, sb.seed) == (sa.scenario_id, sa.seed)

    def view(kept, s):
        (ro, sc), = kept  # one batch of all 10 scenarios
        b = [(sid, int(ro.seeds[j])) for j, sid in enumerate(ro.scenario_ids)].index((s.scenario_id, s.seed))
        return rollout_view(ro, sc, b, s)

    vb, va = view(kb, sb), view(ka, sa)
    return PairedRollout(sb.scenario_id, sb.family, sb.seed, vb, va, outcome_text(sb, vb), outcome_text(sa, va))


def _gate() -> dict:
    summary = GateSummary(False, [
        GateResult("comparable", True, []),
        GateResult("collision_at_fault", True, ["0.000 <= champion's CI upper 0.100 + slack 0"]),
        GateResult("reasoning", False, ["reasoning consistency 0.271 < bound 0.5"]),
    ])
    return gate_dict(summary, "roadloop-vla@2", "roadloop-vla@1", promoted=False, note="kept the champion")


CURVES = {
    "imitation: train loss": [(0, 2.0), (100, 1.2), (200, 0.9)],
    "imitation: val loss": [(0, 2.1), (100, 1.4), (200, 1.1)],
    "GRPO: at-fault collision rate": [(0, 0.3), (10, 0.2), (20, 0.15)],
    "GRPO: eval score": [(0, 0.6), (10, math.nan), (20, 0.66)],
}


@pytest.fixture(scope="module")
def data(evals) -> DemoReportData:
    before, after = evals["imitation"], evals["post-trained"]
    pairs = [_pair(before, after, 2), _pair(before, after, 6)]
    pairs[1].before["texts"] = [FAKE_TEXT]
    pairs[1].before["ti"] = [0] * len(pairs[1].before["dec"])
    return DemoReportData(
        title="roadloop demo <test>",
        reports={"expert": after[0], "imitation": before[0], "post-trained": after[0]},
        baseline="imitation", candidate="post-trained", curves=CURVES, gate=_gate(), pairs=pairs,
        stages=[{"name": "scenario suites", "seconds": 1.5, "reused": True, "detail": "10 smoke scenarios"},
                {"name": "GRPO", "seconds": 12.0, "reused": False, "detail": "20 steps"}],
        next_commands=[("roadloop eval --policy champion --suite val", "evaluate the champion")],
        meta={"out": "/tmp/demo", "machine": "2 CPU cores"})


def _with(rep: EvalReport, **means: float) -> EvalReport:
    """``rep`` with some overall means replaced; its per-rollout records are dropped, so the verdict
    falls back to the rates' sum for the incident share."""
    overall = dict(rep.overall)
    for k, v in means.items():
        overall[k] = Stat(v, (max(v - 0.05, 0.0), v + 0.05), len(rep.rollouts))
    return dataclasses.replace(rep, overall=overall, rollouts=[])


def _embedded(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="demo-data">(.*?)</script>', text, re.S)
    assert m, "embedded JSON block missing"

    def no_const(c: str):
        raise AssertionError(f"non-strict JSON constant {c}")

    return json.loads(m.group(1), parse_constant=no_const)


def _row(page: str, policy: str) -> str:
    m = re.search(rf'<tr data-policy="{re.escape(policy)}">(.*?)</tr>', page, re.S)
    assert m, policy
    return m.group(1)


def _cell(row: str, metric: str) -> str:
    m = re.search(rf'<td class="num[^"]*" data-metric="{metric}"[^>]*>(.*?)</td>', row, re.S)
    assert m, metric
    return re.sub(r"<[^>]+>", " ", m.group(1)).strip()


@pytest.fixture(scope="module")
def page_path(data, tmp_path_factory) -> Path:
    return write_demo_report(data, tmp_path_factory.mktemp("demo"))


def test_page_structure(page_path: Path, data: DemoReportData):
    text = page_path.read_text(encoding="utf-8")
    assert page_path.name == "index.html"
    # self-contained
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', text), "external resource referenced"
    assert "<link" not in text and "@import" not in text
    assert "roadloop demo &lt;test&gt;" in text and "2 CPU cores" in text
    # sections in order
    ids = ["before-after", "curves", "family-matrix", "gate", "pairs", "stages", "next"]
    pos = [text.index(f'id="{i}"') for i in ids]
    assert pos == sorted(pos)
    # one row per policy, plus the change row
    assert re.findall(r'<tr data-policy="([^"]+)"', text) == ["expert", "imitation", "post-trained"]
    assert text.count('<tr class="change">') == 1
    rep_b, rep_c = data.reports["imitation"], data.reports["post-trained"]
    row_b, row_c = _row(text, "imitation"), _row(text, "post-trained")
    assert _cell(row_c, "score").startswith(f"{rep_c.overall['score'].mean:.3f}")
    # route-idm writes no text, the expert a rule trace that is not graded as CoC: both "–"
    for rep, row in ((rep_b, row_b), (rep_c, row_c)):
        for k in ("reasoning_consistency", "reasoning_grounding"):
            assert math.isnan(rep.overall[k].mean) and _cell(row, k) == "–"
    assert "%" in _cell(row_c, "collision_at_fault")
    # the verdict is the one computed from these reports
    sentence, tone = demo_verdict(data)
    assert f'<p id="verdict" class="verdict {tone}">' in text
    d_score = rep_c.overall["score"].mean - rep_b.overall["score"].mean
    assert tone in {"good", "same"} and d_score >= 0, "the expert does not score below route-idm here"
    # curves: train/val loss share one panel, NaNs dropped
    assert text.count('<figure class="curve"') == 3 and text.count("<svg") >= 3
    assert 'data-series="imitation: train loss|imitation: val loss"' in text
    # per-family matrix: every family of the suite, one column per policy, and an ALL row
    for fam in rep_b.per_family:
        assert f'data-family="{fam}"' in text
    assert 'data-family="ALL"' in text
    # gate: decision and every reason
    assert "GATES FAILED" in text and "NOT PROMOTED" in text and "roadloop-vla@1" in text
    assert "reasoning consistency 0.271 &lt; bound 0.5" in text and 'data-gate="comparable"' in text
    # pairs, timings, next commands
    assert text.count('class="pair"') == 2 and 'data-side="before"' in text and 'data-side="after"' in text
    assert "13.5 s" in text and "roadloop eval --policy champion --suite val" in text
    payload = _embedded(text)
    assert len(payload["pairs"]) == 2 and payload["verdict"] == sentence
    assert payload["pairs"][1]["before"]["texts"] == [FAKE_TEXT]
    assert payload["pairs"][0]["after"]["policy"].startswith("expert")
    assert any(payload["pairs"][0]["after"]["texts"]), "the expert explains itself"


def test_incident_share_counts_each_rollout_once(data: DemoReportData):
    from roadloop.eval.demo_report import incident_rate

    base = data.reports["imitation"]
    rows = [dataclasses.replace(r, metrics={**r.metrics, "collision_at_fault": float(i < 2), "offroad": float(i < 3)})
            for i, r in enumerate(base.rollouts)]
    rep = dataclasses.replace(base, rollouts=rows)
    assert incident_rate(rep) == pytest.approx(3 / len(rows))  # 2 rollouts with both, 1 off-road only


def test_verdict_better_worse_mixed_same(data: DemoReportData):
    base = data.reports["imitation"]
    worse = _with(base, score=0.61, collision_at_fault=0.21, offroad=0.10)
    better = _with(base, score=0.66, collision_at_fault=0.12, offroad=0.06)

    def run(b: EvalReport, c: EvalReport) -> tuple[str, str, str]:
        d = dataclasses.replace(data, reports={"imitation": b, "post-trained": c})
        return (*demo_verdict(d), build_demo_html(d))

    s, tone, page = run(worse, better)
    assert tone == "good" and "better" in s
    assert "cut the share of rollouts with an at-fault collision or off-road from 31.0% to 18.0% " \
           "(-42% relative)" in s
    assert "raised the score from 0.610 to 0.660" in s
    assert re.search(r'data-metric="score" data-tone="good">\+0\.050<', page)
    assert re.search(r'data-metric="collision_at_fault" data-tone="good">-9\.0 pp<', page)

    s, tone, page = run(better, worse)
    assert tone == "bad" and "worse" in s
    assert "raised the share of rollouts with an at-fault collision or off-road from 18.0% to 31.0% " \
           "(+72% relative)" in s
    assert "lowered the score from 0.660 to 0.610" in s
    assert f'class="verdict bad">{html.escape(s)}<' in page
    assert re.search(r'data-metric="score" data-tone="bad">-0\.050<', page)
    assert re.search(r'data-metric="offroad" data-tone="bad">\+4\.0 pp<', page)

    s, tone, _ = run(worse, _with(worse, score=0.55, collision_at_fault=0.05))
    assert tone == "mixed" and " but lowered the score from 0.610 to 0.550" in s

    # fewer incidents overall but more collisions: said, and the tone is mixed
    s, tone, _ = run(_with(base, score=0.5, collision_at_fault=0.2, offroad=0.3),
                     _with(base, score=0.6, collision_at_fault=0.3, offroad=0.0))
    assert tone == "mixed" and s.startswith("Post-training gave a mixed result: it cut the share of rollouts")
    assert "and raised the score from 0.500 to 0.600 but raised at-fault collisions from 20.0% to 30.0%" in s

    s, tone, page = run(worse, worse)
    assert tone == "same" and "unchanged at 31.0%" in s and "unchanged at 0.610" in s
    assert 'data-tone="same">±0<' in page

    *_, page = run(base, _with(base, reasoning_grounding=0.8))
    assert _cell(_row(page, "post-trained"), "reasoning_grounding").startswith("0.800")
    assert _cell(_row(page, "imitation"), "reasoning_grounding") == "–"
    d = dataclasses.replace(data, reports={"imitation": base}, candidate="post-trained")
    assert demo_verdict(d)[1] == "none" and '<tr class="change">' not in build_demo_html(d)


def test_empty_sections(data: DemoReportData):
    page = build_demo_html(dataclasses.replace(data, curves={}, pairs=[], gate={}, stages=[], next_commands=[]))
    assert "No learning curves were recorded" in page and "<svg" not in page.split('id="pairs"')[0]
    assert "No held-out rollout changed outcome" in page
    assert "No gate decision was recorded" in page
    assert _embedded(page)["pairs"] == []


def test_outcome_text_and_pairs(evals):
    m = {"score": 0.0, "collision_at_fault": 1.0, "offroad": 0.0, "progress": 0.4}
    view = {"flags": [0, 2, 0, 0, 2 | 1, 0], "warmup": 2, "dt": 0.1}
    assert outcome_text(RolloutSummary("x", "x", "f", 0, False, "", m), view) == "at-fault collision at 0.4 s"
    assert outcome_text(RolloutSummary("x", "x", "f", 0, False, "", m)) == "at-fault collision"
    m2 = {"score": 0.0, "collision_at_fault": 0.0, "offroad": 1.0}
    assert outcome_text(RolloutSummary("x", "x", "f", 0, False, "", m2)) == "off-road"
    m3 = {"score": 0.921, "route_completion": 1.0, "progress": 1.0}
    assert outcome_text(RolloutSummary("x", "x", "f", 0, False, "", m3)) == "completed, score 0.92"
    m4 = {"score": 0.5, "route_completion": 0.0, "progress": 0.4}
    assert outcome_text(RolloutSummary("x", "x", "f", 0, False, "", m4)) == "no incident, progress 40%, score 0.50"
    failed = RolloutSummary("x", "x", "f", 0, True, "RuntimeError: boom\ntraceback", {})
    assert outcome_text(failed) == "policy failed (RuntimeError: boom)"

    before, after = evals["imitation"], evals["post-trained"]
    sb = {(s.scenario_id, s.seed): s for s in before[0].rollouts}
    changed = {(s.scenario_id, s.seed) for s in after[0].rollouts
               if abs(s.metrics["score"] - sb[(s.scenario_id, s.seed)].metrics["score"]) >= 0.05}
    pairs = paired_rollouts(before, after, limit=3, min_score_change=0.05)
    assert len(pairs) == min(3, len(changed))
    assert {(p.scenario_id, p.seed) for p in pairs} <= changed
    for p in pairs:
        assert p.before["scenario_id"] == p.after["scenario_id"] == p.scenario_id
        assert p.before["policy"].startswith("route-idm") and p.after["policy"].startswith("expert")
        assert p.before_outcome and p.after_outcome
    assert paired_rollouts(before, before, min_score_change=0.01) == []


def test_demo_page_in_headless_chromium(page_path: Path, data: DemoReportData, tmp_path):
    warm = max(data.pairs[0].before["warmup"], data.pairs[0].after["warmup"])
    with opened_page(page_path, "#pair-0 canvas.pscene", width=1400) as page:
        assert "post-trained" in page.inner_text("#before-after")

        card = "#pair-0"
        sides = [f'{card} .pside[data-side="{s}"]' for s in ("before", "after")]
        colours = """(sel) => { const c = document.querySelector(sel); if (!c.width || !c.height) return 0;
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data, seen = new Set();
            for (let i = 0; i < d.length; i += 4 * 53) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
            return seen.size; }"""
        for s in sides:
            assert page.evaluate(colours, f"{s} canvas.pscene") > 3, f"{s}: canvas is blank"
        pix = lambda s: page.evaluate("(sel) => document.querySelector(sel).toDataURL()", f"{s} canvas.pscene")
        frames = lambda: [int(page.get_attribute(s, "data-frame")) for s in sides]
        assert frames() == [0, 0]
        before_pix = [pix(s) for s in sides]

        # one slider drives both players
        page.fill(f"{card} .pair-slider", str(warm + 5))
        assert frames() == [warm + 5] * 2
        assert page.inner_text(f"{card} .pair-frame").startswith(f"{warm + 5} /")
        assert all(pix(s) != b for s, b in zip(sides, before_pix, strict=True)), "a player did not redraw"
        # route-idm gives no text (placeholder), the expert explains its decision
        assert "no reasoning text" in page.inner_text(f"{sides[0]} .reasoning")
        after_text = page.inner_text(f"{sides[1]} .reasoning")
        assert after_text and "no reasoning" not in after_text and "Warm-up" not in after_text
        assert after_text in data.pairs[0].after["texts"]
        assert "step" in page.inner_text(f"{sides[1]} .rmeta")

        # one play button drives both; pause stops both on the same frame
        page.select_option(f"{card} .pair-speed", "4")
        page.click(f"{card} .pair-play")
        page.wait_for_function(f"+document.querySelector('{card}').dataset.frame >= {warm + 15}", timeout=8000)
        page.click(f"{card} .pair-play")
        f = frames()
        assert f[0] == f[1] >= warm + 15
        page.wait_for_timeout(250)
        assert frames() == f, "pause did not stop the players"
        page.click(f"{card} .pair-next")
        assert frames() == [f[0] + 1] * 2

        # the second pair's injected text is rendered as text, in its own (independent) player
        page.fill("#pair-1 .pair-slider", str(warm + 3))
        assert page.inner_text('#pair-1 .pside[data-side="before"] .reasoning') == FAKE_TEXT
        assert frames() == [f[0] + 1] * 2
        # whole-scene camera for both
        page.uncheck(f"{card} .pair-follow")
        assert page.evaluate(colours, f"{sides[0]} canvas.pscene") > 3
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)


def _paired_report(base: EvalReport, coll: list[int], off: list[int], score: list[float]) -> EvalReport:
    """A report of len(coll) rollouts of as many scenarios (copies of the first one) with these outcomes."""
    t = base.rollouts[0]
    rows = [dataclasses.replace(t, scenario_id=f"{t.scenario_id}.{i}", rollout_id=f"{t.scenario_id}.{i}#{t.seed}",
                                failed=False,
                                metrics={**t.metrics, "collision_at_fault": float(c), "offroad": float(o), "score": s})
            for i, (c, o, s) in enumerate(zip(coll, off, score, strict=True))]
    n = len(rows)
    overall = {**base.overall, "collision_at_fault": Stat(sum(coll) / n, (0.0, 1.0), n),
               "offroad": Stat(sum(off) / n, (0.0, 1.0), n), "score": Stat(sum(score) / n, (0.0, 1.0), n)}
    # outcomes that differ per seed: a sampling policy's (a seed-independent one's seeds would be copies)
    return dataclasses.replace(base, rollouts=rows, overall=overall, n_failed=0,
                               extra={**base.extra, "seed_independent": False})


def test_verdict_uses_paired_intervals_when_rollouts_pair_up(data: DemoReportData):
    from roadloop.eval.demo_report import paired_change

    base, n = data.reports["imitation"], 100
    before = _paired_report(base, [1] * 30 + [0] * 70, [0] * 30 + [1] * 30 + [0] * 40, [0.0] * 60 + [0.8] * 40)
    # 25 off-road rollouts fixed, 3 more collisions, the 25 fixed ones score 0.8
    after = _paired_report(base, [1] * 33 + [0] * 67, [0] * 30 + [0] * 25 + [1] * 5 + [0] * 40,
                           [0.0] * 33 + [0.8] * 22 + [0.0] * 5 + [0.8] * 40)
    mean, half, pairs = paired_change(before, after, lambda m: m["offroad"])
    assert pairs == n and mean == pytest.approx(-0.25) and 0 < half < 0.25
    d = dataclasses.replace(data, reports={"imitation": before, "post-trained": after})
    s, tone = demo_verdict(d)
    # the incident share and the score moved beyond noise; the 3 extra collisions did not
    assert tone == "good" and s.startswith("Post-training made the policy better: it cut the share of rollouts")
    assert "from 60.0% to 38.0% (-37% relative; paired change -22.0 pp ± " in s
    assert "95%, 100 pairs)" in s and "raised the score from 0.320 to 0.496" in s
    assert "within noise (paired 95% interval holds 0): at-fault collisions 30.0% → 33.0%" in s
    # nothing beyond noise: said so, tone "same"
    small = _paired_report(base, [1] * 31 + [0] * 69, [0] * 30 + [1] * 30 + [0] * 40, [0.0] * 61 + [0.8] * 39)
    s, tone = demo_verdict(dataclasses.replace(data, reports={"imitation": before, "post-trained": small}))
    assert tone == "same" and s.startswith("Post-training changed nothing beyond noise: it left the share")
    assert "unchanged at 60.0%; within noise (paired 95% interval holds 0): the score 0.320 → 0.312 (" in s
    assert paired_change(before, _paired_report(base, [0] * 5, [0] * 5, [0.0] * 5), lambda m: m["score"]) is None


def _with_reasoning(rep: EvalReport, consistency: list[float], grounding: list[float]) -> EvalReport:
    rows = [dataclasses.replace(r, metrics={**r.metrics, "reasoning_consistency": c, "reasoning_grounding": g})
            for r, c, g in zip(rep.rollouts, consistency, grounding, strict=True)]
    n = len(rows)
    overall = {**rep.overall, "reasoning_consistency": Stat(sum(consistency) / n, (0.0, 1.0), n),
               "reasoning_grounding": Stat(sum(grounding) / n, (0.0, 1.0), n)}
    return dataclasses.replace(rep, rollouts=rows, overall=overall)


def test_verdict_names_a_rate_or_the_reasoning_only_beyond_noise(data: DemoReportData):
    """Off-road, at-fault collisions, consistency and grounding are named where their own paired interval excludes 0,
    also when the incident share moved within noise; within noise they are left unsaid."""
    base = data.reports["imitation"]
    # 20 rollouts that collided and left the road now only collide: the incident share and the collisions level
    before = _paired_report(base, [1] * 20 + [0] * 80, [1] * 30 + [0] * 70, [0.0] * 30 + [0.7] * 70)
    after = _paired_report(base, [1] * 20 + [0] * 80, [0] * 20 + [1] * 10 + [0] * 70, [0.0] * 30 + [0.7] * 70)
    before = _with_reasoning(before, [0.6] * 100, [0.7] * 100)
    after = _with_reasoning(after, [0.6] * 40 + [0.9] * 60, [0.7] * 99 + [0.6])
    s, tone = demo_verdict(dataclasses.replace(data, reports={"imitation": before, "post-trained": after}))
    assert tone == "good" and "cut off-road from 30.0% to 10.0% (paired change -20.0 pp ± " in s
    assert "raised reasoning consistency from 0.600 to 0.780 (paired change +0.180 ± " in s
    assert "left the share of rollouts with an at-fault collision or off-road unchanged at 30.0%" in s
    assert "grounding from" not in s and "at-fault collisions" not in s  # within noise / unchanged: unsaid
    # the reasoning got worse beyond noise while the driving got better: mixed
    worse = _with_reasoning(after, [0.6] * 100, [0.3] * 60 + [0.7] * 40)
    s, tone = demo_verdict(dataclasses.replace(data, reports={"imitation": before, "post-trained": worse}))
    assert tone == "mixed" and " but lowered grounding from 0.700 to 0.460 (paired change -0.240 ± " in s
    # only the reasoning moved beyond noise: not called a better (or worse) policy
    level = _with_reasoning(before, [0.6] * 40 + [0.9] * 60, [0.7] * 100)
    s, tone = demo_verdict(dataclasses.replace(data, reports={"imitation": before, "post-trained": level}))
    assert tone == "same" and s.startswith("Post-training improved the reasoning, not the driving beyond noise: ")
    assert "raised reasoning consistency from 0.600 to 0.780" in s and "better" not in s
    s, tone = demo_verdict(dataclasses.replace(data, reports={"imitation": level, "post-trained": before}))
    assert tone == "bad" and s.startswith("Post-training made the reasoning worse, and the driving no better")
