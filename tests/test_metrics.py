"""Scores against hand-computed cases."""

import math

import numpy as np
import torch

from roadloop.eval.evaluate import bootstrap_ci, evaluate
from roadloop.eval.metrics import METRICS, alpasim_score, compute_metrics
from roadloop.rollout import RolloutConfig, rollout
from roadloop.scenarios.builder import ScenarioBuilder, straight
from roadloop.sim.batching import collate
from roadloop.sim.datatypes import ScenarioMeta
from roadloop.testing import scenes
from roadloop.testing.policies import ConstantControls, NaNOnScenario, RouteSpeed


def test_alpasim_formula():
    p = torch.tensor([0.4, 0.8, 1.3, -0.2, 0.6, 0.6])
    f = torch.tensor([False, False, False, False, True, False])
    o = torch.tensor([False, False, False, False, False, True])
    assert alpasim_score(p, f, o).tolist() == [0.5, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_collision_at_known_step_scores_zero():
    b, _ = scenes.straight_road(80, ego_speed=10.0)
    b.add_static([40.0, 0.0], 0.0, 0.5, 0.5)
    sc = collate([scenes.build(b)])
    ro = rollout(ConstantControls(0.0, 0.0), sc)
    # ego front = 10 + 2.3 + 10 t reaches the cone's back face (39.75 m) between t=2.7 s and 2.8 s
    first = int(ro.checks.collision[:, 0].nonzero()[0])
    assert first == 27  # checks[27] is state 28 (t = 2.8 s)
    assert bool(ro.checks.collision_at_fault[first, 0])
    m = compute_metrics(ro, sc)
    assert float(m["score"][0]) == 0.0
    assert float(m["collision_at_fault"][0]) == 1.0
    assert float(m["nuplan_score"][0]) <= 0.5 + 1e-6  # static hit: x0.5 multiplier


def _slow_ego_scene(frac: float, T: int = 30):
    """The log covers 6 m over the horizon; the ego starts at frac x the log's speed."""
    v_log = 6.0 / ((T - 1) * 0.1)
    b = ScenarioBuilder(T)
    ln = b.add_lane(straight((0, 0), (300, 0)))
    b.set_route([ln])
    t = np.arange(T) * 0.1
    b.add_agent(np.stack((20 + v_log * t, 0 * t), 1), 0.0, np.full(T, frac * v_log))
    return b.build(ScenarioMeta("test/slow", "test", 0, "test", warmup_steps=0)), v_log


def test_forty_percent_progress_scores_half():
    sc, v_log = _slow_ego_scene(0.4)
    batch = collate([sc])
    ro = rollout(RouteSpeed(0.4 * v_log), batch)
    m = compute_metrics(ro, batch)
    assert abs(float(m["progress"][0]) - 0.4) < 2e-3
    assert abs(float(m["score"][0]) - 0.5) < 3e-3
    assert float(m["offroad"][0]) == 0.0 and float(m["collision_any"][0]) == 0.0


def test_distance_to_log_truncates_progress():
    # log covers 40 m; a stopped ego falls 4 m behind after 1 s: only the progress until then counts
    T = 60
    b = ScenarioBuilder(T)
    ln = b.add_lane(straight((0, 0), (300, 0)))
    b.set_route([ln])
    t = np.arange(T) * 0.1
    b.add_agent(np.stack((20 + 4.0 * t, 0 * t), 1), 0.0, 4.0)
    batch = collate([b.build(ScenarioMeta("test/trunc", "test", 0, "test", warmup_steps=0))])
    ro = rollout(RouteSpeed(0.0), batch)
    m = compute_metrics(ro, batch)
    assert float(m["progress"][0]) < 0.1
    assert float(m["score"][0]) < 0.15


def test_failed_rollout_is_marked_and_others_survive():
    s1 = scenes.build(scenes.straight_road(60, sid="test/a")[0])
    s2 = scenes.build(scenes.straight_road(60, sid="test/b")[0])
    rep, _ = evaluate(NaNOnScenario(bad=0, at=20), [s1, s2], batch_size=2)
    by_id = {r.scenario_id: r for r in rep.rollouts}
    assert by_id["test/a"].failed and "non-finite" in by_id["test/a"].fail_reason
    assert not by_id["test/b"].failed and math.isfinite(by_id["test/b"].metrics["score"])
    assert math.isnan(by_id["test/a"].metrics["score"])
    assert rep.n_failed == 1


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    x = rng.random(50)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi
    lo2, hi2 = bootstrap_ci(np.tile(x, 8))
    assert hi2 - lo2 < hi - lo
    assert bootstrap_ci(np.array([]))[0] != bootstrap_ci(np.array([]))[0]  # NaN


def test_every_metric_is_documented():
    text = open("docs/metrics.md").read()
    for name in METRICS:
        assert f"`{name}`" in text, f"metric {name} missing from docs/metrics.md"


def test_replan_rate_two_hz_runs():
    sc = collate([scenes.lead_vehicle_scene()])
    ro = rollout(RouteSpeed(8.0), sc, cfg=RolloutConfig(replan_every=5))
    assert ro.decision_steps.tolist()[:3] == [10, 15, 20]


def test_wrong_length_and_raising_policies_fail_rollouts_with_reasons():
    from roadloop.testing.policies import Raising, WrongLength

    s1 = scenes.build(scenes.straight_road(40, sid="test/a")[0])
    rep, _ = evaluate(WrongLength(8.0), [s1], batch_size=1)
    r = rep.rollouts[0]
    assert r.failed and "64 waypoints" in r.fail_reason
    rep, _ = evaluate(Raising(), [s1], batch_size=1)
    r = rep.rollouts[0]
    assert r.failed and "model exploded" in r.fail_reason and "RuntimeError" in r.fail_reason
