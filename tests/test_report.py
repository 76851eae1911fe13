"""HTML report (real headless Chromium via Playwright) and GIF export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import opened_page

from roadloop.bench import bench_scenario
from roadloop.eval.evaluate import evaluate
from roadloop.policies.base import Observation, PolicyOutput
from roadloop.policies.route_idm import RouteIDM
from roadloop.rollout import RolloutConfig
from roadloop.scenarios.builder import ScenarioBuilder, straight
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import AgentType, LightState, Scenario, ScenarioMeta, TrafficModel

STEPS = 40
REASONING = r"route ahead is clear|Slowing down from"


def crossing_scenario(seed: int = 0, num_steps: int = 60) -> Scenario:
    """A signalised 4-way crossing with crosswalks: ego eastbound, a lead car, oncoming and
    queued traffic, a pedestrian on the far crosswalk, a cyclist and a cone."""
    rng = np.random.default_rng(seed)
    T = num_steps
    b = ScenarioBuilder(T)
    h = 1.75
    eb = [b.add_lane(straight((-150, -h), (-9, -h))), b.add_lane(straight((-9, -h), (9, -h)), junction=True),
          b.add_lane(straight((9, -h), (150, -h)))]
    wb = [b.add_lane(straight((150, h), (9, h))), b.add_lane(straight((9, h), (-9, h)), junction=True),
          b.add_lane(straight((-9, h), (-150, h)))]
    nb = [b.add_lane(straight((h, -120), (h, -9))), b.add_lane(straight((h, -9), (h, 9)), junction=True),
          b.add_lane(straight((h, 9), (h, 120)))]
    sb = [b.add_lane(straight((-h, 120), (-h, 9))), b.add_lane(straight((-h, 9), (-h, -9)), junction=True),
          b.add_lane(straight((-h, -9), (-h, -120)))]
    for chain in (eb, wb, nb, sb):
        b.connect(chain[0], chain[1])
        b.connect(chain[1], chain[2])
    for a, c in ((eb, wb), (nb, sb)):
        for i in (0, 2):
            b.edge_of_lane(a[i], "right")
            b.edge_of_lane(c[i], "right")
    ew = np.full(T, int(LightState.GREEN))
    ew[T - 12:T - 6] = LightState.YELLOW
    ew[T - 6:] = LightState.RED
    b.add_light(ew, [eb[0], wb[0]])
    b.add_light(np.full(T, int(LightState.RED)), [nb[0], sb[0]])
    for cx in (-7.0, 7.0):
        b.add_crosswalk([(cx - 1.5, -4.2), (cx + 1.5, -4.2), (cx + 1.5, 4.2), (cx - 1.5, 4.2)])
    for cy in (-7.0, 7.0):
        b.add_crosswalk([(-4.2, cy - 1.5), (4.2, cy - 1.5), (4.2, cy + 1.5), (-4.2, cy + 1.5)])
    b.set_route(eb)
    t = np.arange(T) * 0.1
    v0 = 9.0
    b.add_agent(np.stack((-35 + v0 * t, np.full(T, -h)), -1), 0.0, v0)  # ego (its log)
    b.add_agent([[-18.0, -h]], 0.0, 8.0, model=TrafficModel.IDM, path_lanes=eb, desired_speed=9.0)
    for x0 in (30.0, 52.0):
        b.add_agent(np.stack((x0 - 8.5 * t, np.full(T, h)), -1), np.pi, 8.5)
    for y0 in (-14.0, -21.5, -29.0):
        b.add_agent([[h, y0]], np.pi / 2, 0.0, model=TrafficModel.IDM, path_lanes=nb, desired_speed=8.0)
    b.add_agent([[-h, 16.0]], -np.pi / 2, 0.0, model=TrafficModel.IDM, path_lanes=sb, desired_speed=8.0)
    ped_y = 6.5 - 1.2 * t
    b.add_agent(np.stack((np.full(T, 7.0 + rng.uniform(-0.5, 0.5)), ped_y), -1), -np.pi / 2, 1.2,
                length=0.6, width=0.6, kind=AgentType.PEDESTRIAN)
    b.add_agent(np.stack((20 + 4.5 * t, np.full(T, -3.0)), -1), 0.0, 4.5, length=1.8, width=0.7,
                kind=AgentType.CYCLIST)
    for x in (30.0, 33.0, 36.0):
        b.add_static([x, -4.3])
    return b.build(ScenarioMeta(f"crossing/{seed:06d}", "crossing", seed, "test", warmup_steps=5))


class TalkingIDM(RouteIDM):
    """RouteIDM that also explains itself (the report shows the text)."""

    name = "talking-idm"

    def act(self, obs: Observation) -> PolicyOutput:
        out = super().act(obs)
        v = obs.state.speed[:, 0]
        dv = out.plan_xy[:, 10] - out.plan_xy[:, 0]
        texts = []
        for b in range(obs.batch_size):
            vb = float(v[b])
            if float(dv[b].norm()) < vb - 0.5:
                texts.append(f"Slowing down from {vb:.1f} m/s: an obstacle or a light ahead on the route, "
                             "so I keep a safe gap and prepare to stop.")
            else:
                texts.append(f"The route ahead is clear; keep the lane and cruise at about {vb:.0f} m/s.")
        return PolicyOutput(plan_xy=out.plan_xy, plan_yaw=out.plan_yaw, plan_speed=out.plan_speed,
                            controls=out.controls, reasoning=texts, logp=out.logp)


class FlakyTalkingIDM(TalkingIDM):
    """Raises on single-scenario batches from step 5 on: fails that rollout (listed first)."""

    def act(self, obs: Observation) -> PolicyOutput:
        if obs.batch_size == 1 and obs.step >= 5:
            raise RuntimeError("boom")
        return super().act(obs)


def _sim_cfg() -> SimConfig:
    spatial = Path(__file__).resolve().parents[1] / "roadloop" / "sim" / "spatial.py"
    return SimConfig() if spatial.exists() else SimConfig(check_offroad=False)


def make_eval(max_steps: int = STEPS, scenarios: list[Scenario] | None = None):
    """(report, kept) of a small evaluation in batches of 2: crossing scenes 0-1, bench scenes 0-1
    and crossing scene 2 alone, whose rollout fails at step 5 (the policy raises)."""
    if scenarios is None:
        scenarios = [crossing_scenario(0), crossing_scenario(1)]
        scenarios += [bench_scenario(s, num_agents=12, num_steps=60) for s in (0, 1)]
        scenarios += [crossing_scenario(2)]
    cfg = RolloutConfig(sim=_sim_cfg(), max_steps=max_steps, warmup=0)
    return evaluate(FlakyTalkingIDM(), scenarios, suite_name="report-test", suite_hash="0123456789abcdef",
                    batch_size=2, cfg=cfg, keep_rollouts=True)


@pytest.fixture(scope="module")
def evaluated():
    torch.manual_seed(0)
    return make_eval()


@pytest.fixture(scope="module")
def report_path(evaluated, tmp_path_factory) -> Path:
    from roadloop.eval.html import write_report

    rep, kept = evaluated
    return write_report(rep, kept, tmp_path_factory.mktemp("report"), max_rollouts=10)


def _embedded(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert m, "embedded JSON block missing"

    def no_const(c: str):
        raise AssertionError(f"non-strict JSON constant {c}")

    return json.loads(m.group(1), parse_constant=no_const)


def test_report_is_self_contained(report_path: Path, evaluated):
    rep, kept = evaluated
    text = report_path.read_text(encoding="utf-8")
    assert report_path.name == "index.html"
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', text), "external resource referenced"
    assert "<link" not in text and "@import" not in text
    data = _embedded(report_path)
    assert len(data["views"]) == len(rep.rollouts) == 5
    # worst first: the failed rollout with its reason, then by increasing score
    first = data["views"][0]
    assert first["failed"] and first["scenario_id"] == "crossing/000002"
    assert "RuntimeError: boom" in first["reason"] and "boom" in text
    scores = [v["metrics"]["score"] for v in data["views"][1:]]
    assert None not in scores and scores == sorted(scores)
    assert first["plans"][-1] == [], "NaN plans of the failed rollout are dropped"
    v = data["views"][1]
    n = kept[0][0].num_steps + 1
    assert v["n"] == n and len(v["flags"]) == n and len(v["speed"]) == n
    assert all(t for t in v["texts"]), "reasoning texts embedded"
    assert {a["k"] for a in first["agents"]} == {0, 1, 2, 3}, "vehicles, pedestrian, cyclist, cones"
    # cropped map and compact numbers
    x0, y0, x1, y1 = v["bbox"]
    for ln in v["lanes"]:
        xs, ys = ln["xy"][0::2], ln["xy"][1::2]
        assert min(xs) > x0 - 10 and max(xs) < x1 + 10 and min(ys) > y0 - 10 and max(ys) < y1 + 10
    assert all(round(x, 2) == x for x in v["route"])


def test_report_max_rollouts(evaluated):
    from roadloop.eval.html import build_html

    rep, kept = evaluated
    page = build_html(rep, kept, max_rollouts=2, title="Two <worst>")
    assert page.count("data-view=") == 2
    assert "2 worst of 5 rollouts" in page and "Two &lt;worst&gt;" in page
    assert "No rollouts were kept" in build_html(rep, [])


def test_report_in_headless_chromium(report_path: Path, evaluated, tmp_path):
    rep, _ = evaluated
    with opened_page(report_path, "#scene", width=1440) as page:
        score = f"{rep.overall['score'].mean:.3f}"
        assert score in page.inner_text("#headline-score")
        fam_text = page.inner_text("#family-table")
        for fam in rep.per_family:
            assert fam in fam_text

        # the worst rollout (the failed one) is selected first and says why it failed
        assert "boom" in page.inner_text("#v-sub")
        selected = page.locator("#rollout-table tr.selected td.sid").inner_text()
        assert selected.startswith("crossing/000002")

        label = page.locator("#frame-label")
        assert label.inner_text().startswith("0 /")
        pix = lambda: page.evaluate("document.getElementById('scene').toDataURL()")
        before = pix()
        page.click("#btn-next")
        assert label.inner_text().startswith("1 /")
        assert pix() != before, "canvas did not change on next frame"
        page.keyboard.press("ArrowRight")
        assert label.inner_text().startswith("2 /")
        page.click("#btn-prev")
        assert label.inner_text().startswith("1 /")
        assert re.search(REASONING, page.inner_text("#reasoning")), "policy reasoning not shown"
        assert "step 1" in page.inner_text("#reasoning-meta")

        frame_now = "parseInt(document.getElementById('frame-label').textContent)"
        playing = "document.getElementById('btn-play').classList.contains('playing')"
        page.select_option("#speed-select", "4")
        page.click("#btn-play")
        page.wait_for_function(f"{frame_now} >= 8", timeout=5000)
        page.wait_for_function(f"!{playing}", timeout=10000)  # it stops by itself at the last frame
        last = int(label.inner_text().split("/")[0])
        assert last >= 8
        # the failed rollout's policy gave no text after it raised at step 5
        assert "no reasoning" in page.inner_text("#reasoning")
        # pause: at a quarter of real time the click lands seconds before the end, even on a slow machine
        page.select_option("#speed-select", "0.25")
        page.click("#btn-play")  # from the last frame, play starts again at the first
        page.wait_for_function(f"{frame_now} >= 1 && {frame_now} < {last}", timeout=5000)
        page.click("#btn-play")  # pause
        assert not page.evaluate(playing), "the button still shows playing"
        frame = int(label.inner_text().split("/")[0])
        page.wait_for_timeout(500)
        assert int(label.inner_text().split("/")[0]) == frame, "pause did not stop the player"

        # another rollout: whole-scene camera, zoom, reasoning again
        page.locator("#rollout-table tr[data-view='1']").click()
        assert label.inner_text().startswith("0 /")
        page.uncheck("#follow-toggle")
        before = pix()
        page.click("#btn-zoom-in")
        assert pix() != before, "zoom did not change the view"
        page.fill("#frame-slider", "20")
        assert label.inner_text().startswith("20 /")
        assert re.search(REASONING, page.inner_text("#reasoning"))
        assert page.inner_text("#speed-val") != "–"
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)


def test_export_gif(evaluated, tmp_path):
    from PIL import Image

    from roadloop.eval.export import export_rollout

    _, kept = evaluated
    ro, sc = kept[0]
    path = export_rollout(ro, sc, 1, tmp_path / "r.gif", fps=10)
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == ro.num_steps + 1
        assert im.size[0] > 100 and im.size[1] > 100


def test_export_mp4_needs_ffmpeg(evaluated, tmp_path):
    from roadloop.errors import RoadloopError
    from roadloop.eval.export import export_rollout

    _, kept = evaluated
    ro, sc = kept[0]
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(RoadloopError, match="imageio-ffmpeg"):
            export_rollout(ro, sc, 0, tmp_path / "r.mp4")
        return
    path = export_rollout(ro, sc, 0, tmp_path / "r.mp4")
    assert path.stat().st_size > 1000


def test_export_rejects_bad_suffix(evaluated, tmp_path):
    from roadloop.errors import RoadloopError
    from roadloop.eval.export import export_rollout

    _, kept = evaluated
    ro, sc = kept[0]
    with pytest.raises(RoadloopError, match=r"\.gif"):
        export_rollout(ro, sc, 0, tmp_path / "r.avi")
