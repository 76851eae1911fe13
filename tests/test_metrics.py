"""Scores against hand-computed cases."""

import math

import numpy as np
import torch

from roadloop.eval.evaluate import bootstrap_ci, evaluate
from roadloop.eval.metrics import METRICS, alpasim_score, compute_metrics
from roadloop.rollout import RolloutConfig, decision_schedule, rollout
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


def _log_scene(log_xy: np.ndarray, sid: str):
    """A straight 300 m route along y = 0; the logged ego drives ``log_xy`` (T, 2) (no warm-up)."""
    T = len(log_xy)
    b = ScenarioBuilder(T)
    ln = b.add_lane(straight((0, 0), (300, 0)))
    b.set_route([ln])
    v = np.linalg.norm(np.diff(log_xy, axis=0), axis=-1) / 0.1
    yaw = float(np.arctan2(*(log_xy[1] - log_xy[0])[::-1]))
    b.add_agent(log_xy, yaw, np.append(v, v[-1]))
    return collate([b.build(ScenarioMeta(sid, "test", 0, "test", warmup_steps=0))])


def test_falling_behind_on_the_logged_path_does_not_truncate():
    # AlpaSim closes the score window on the distance to the logged *path* (dist_to_gt_trajectory), not to
    # where the log was at that time: at half the log's speed the ego ends 15 m behind it, on its path
    T = 61
    t = np.arange(T) * 0.1
    batch = _log_scene(np.stack((20 + 5.0 * t, 0 * t), 1), "test/behind")
    ro = rollout(RouteSpeed(2.5), batch)
    m = compute_metrics(ro, batch)
    assert float(m["dist_to_log_path"][0]) < 0.05
    assert float(ro.checks.dist_to_log[-1, 0]) > 14.0  # the time-matched gap
    assert abs(float(m["progress"][0]) - 0.5) < 0.02  # the whole horizon counts
    assert abs(float(m["score"][0]) - 0.625) < 0.03


def test_leaving_the_logged_path_sideways_truncates_progress():
    # the log drives 1 s along the route at 5 m/s, then veers off at 3 m per 4 m forward (5 m/s along it); the
    # ego keeps to the route at 5 m/s and is 3 m/s x (t - 1 s) from the log's path: 4 m at t = 2.33 s, and only
    # the progress until then counts
    T = 61
    t = np.arange(T) * 0.1
    u = np.clip(t - 1.0, 0.0, None)
    batch = _log_scene(np.stack((20 + 5.0 * np.minimum(t, 1.0) + 4.0 * u, 3.0 * u), 1), "test/aside")
    ro = rollout(RouteSpeed(5.0), batch)
    m = compute_metrics(ro, batch)
    assert float(m["offroad"][0]) == 0.0
    assert float(m["dist_to_log_path"][0]) >= 4.0
    log_travel = 5.0 + 4.0 * 5.0  # the log's progress along the route over the horizon
    assert abs(float(m["progress"][0]) - 5.0 * 2.4 / log_travel) < 0.03  # kept until state 24 (t = 2.4 s)
    assert float(m["score"][0]) < 0.65


def test_distance_to_path_by_hand():
    from roadloop.eval.metrics import distance_to_path

    path = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [99.0, 99.0]]])
    valid = torch.tensor([[True, True, True, False]])  # the last vertex is not part of the path
    pts = torch.tensor([[[5.0, 3.0]], [[12.0, 5.0]], [[-3.0, -4.0]], [[60.0, 60.0]]])
    d = distance_to_path(pts, path, valid, chunk=3)
    assert torch.allclose(d[:, 0], torch.tensor([3.0, 2.0, 5.0, (50.0 ** 2 + 50.0 ** 2) ** 0.5]))
    lone = distance_to_path(pts[:1], path, torch.tensor([[False, True, False, False]]))
    assert torch.allclose(lone, torch.tensor([[(25.0 + 9.0) ** 0.5]]))
    assert torch.isnan(distance_to_path(pts[:1], path, torch.zeros(1, 4, dtype=torch.bool))).all()
    one = distance_to_path(pts[:1], path[:, :1], valid[:, :1])  # a one-vertex path
    assert torch.allclose(one, torch.tensor([[34.0 ** 0.5]]))


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
    assert ro.decision_steps.tolist() == list(decision_schedule(10, ro.num_steps, 5))  # what GRPO counts on


def test_wrong_length_and_raising_policies_fail_rollouts_with_reasons():
    from roadloop.testing.policies import Raising, WrongLength

    s1 = scenes.build(scenes.straight_road(40, sid="test/a")[0])
    rep, _ = evaluate(WrongLength(8.0), [s1], batch_size=1)
    r = rep.rollouts[0]
    assert r.failed and "64 waypoints" in r.fail_reason
    rep, _ = evaluate(Raising(), [s1], batch_size=1)
    r = rep.rollouts[0]
    assert r.failed and "model exploded" in r.fail_reason and "RuntimeError" in r.fail_reason
