"""The batched step: traffic models, ego controls, per-step checks, determinism, bad input."""

import numpy as np
import pytest
import torch

from roadloop.errors import ControlError
from roadloop.policies.route_idm import RouteIDM
from roadloop.rollout import RolloutConfig, rollout
from roadloop.sim.batching import collate
from roadloop.sim.checks import compute_checks
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import TrafficModel
from roadloop.sim.state import init_state
from roadloop.sim.step import step
from roadloop.testing import scenes
from roadloop.testing.policies import ConstantControls


def run_controls(sc, controls, steps, cfg):
    s = init_state(collate([sc]), cfg)
    states, checks = [s], []
    for _ in range(steps):
        n = step(s, controls, cfg)
        checks.append(compute_checks(s, n, cfg))
        states.append(n)
        s = n
    return states, checks


def test_idm_agent_stops_at_red_light():
    cfg = SimConfig()
    sc = scenes.red_light_scene()
    states, _ = run_controls(sc, torch.tensor([[-3.0, 0.0]]), 110, cfg)
    x = torch.stack([s.xy[0, 1, 0] for s in states])
    front = x + 0.5 * 4.6
    assert float(front.max()) <= 100.0 + 0.3, "IDM agent ran the red light"
    assert float(states[-1].speed[0, 1]) < 0.2, "IDM agent did not stop"


def test_idm_follows_slow_lead_without_collision():
    cfg = SimConfig()
    b, ids = scenes.straight_road(120)
    t = np.arange(120) * 0.1
    b.add_agent(np.stack((60 + 4 * t, 0 * t), 1), 0.0, 4.0, model=TrafficModel.LOG)  # slow lead, log replay
    b.add_agent([[35.0, 0.0]], 0.0, 12.0, model=TrafficModel.IDM, path_lanes=[ids[0]], desired_speed=14.0)
    sc = scenes.build(b)
    # ego drives away in the other lane: a sharp left swerve then straight keeps it out of the way
    states, checks = run_controls(sc, torch.tensor([[-4.0, 0.0]]), 110, cfg)
    gaps = torch.stack([s.xy[0, 1, 0] - s.xy[0, 2, 0] - 4.6 for s in states[1:]])
    assert float(gaps.min()) > 1.0
    assert abs(float(states[-1].speed[0, 2]) - 4.0) < 0.5, "follower should settle at the lead's speed"
    assert all(int(c.agent_collision[0]) == 0 for c in checks)


def test_idm_reacts_to_ego_braking():
    cfg = SimConfig()
    b, ids = scenes.straight_road(100, ego_speed=10.0, ego_x=40.0)
    b.add_agent([[10.0, 0.0]], 0.0, 10.0, model=TrafficModel.IDM, path_lanes=[ids[0]], desired_speed=12.0)
    sc = scenes.build(b)
    states, checks = run_controls(sc, torch.tensor([[-3.0, 0.0]]), 90, cfg)
    assert not any(bool(c.collision[0]) for c in checks), "IDM follower rear-ended a braking ego"


def test_log_replay_and_constant_velocity():
    cfg = SimConfig()
    b, ids = scenes.straight_road(50)
    t = np.arange(50) * 0.1
    b.add_agent(np.stack((100 + 3 * t, 3.5 + np.sin(t)), 1), 0.1, 3.0, model=TrafficModel.LOG)
    b.add_agent([[200.0, 3.5]], 0.0, 7.0, model=TrafficModel.CONST_VEL)
    sc = scenes.build(b)
    states, _ = run_controls(sc, torch.tensor([[0.0, 0.0]]), 40, cfg)
    for k, s in enumerate(states):
        assert torch.allclose(s.xy[0, 1], sc.agents.xy[1, k])
    assert abs(float(states[-1].xy[0, 2, 0]) - (200 + 7 * 4.0)) < 1e-3


def test_nan_and_shape_controls_raise_clear_errors():
    cfg = SimConfig()
    s = init_state(collate([scenes.lead_vehicle_scene()]), cfg)
    with pytest.raises(ControlError, match=r"test/straight.*acceleration"):
        step(s, torch.tensor([[float("nan"), 0.0]]), cfg)
    with pytest.raises(ControlError, match=r"curvature"):
        step(s, torch.tensor([[0.0, float("inf")]]), cfg)
    with pytest.raises(ControlError, match=r"shape \(1, 2\)"):
        step(s, torch.zeros(2, 2), cfg)


def test_red_light_violation_and_speeding_checks():
    cfg = SimConfig()
    sc = scenes.red_light_scene()
    # ego accelerates through the red light at x=100 (the IDM agent ahead would stop: remove it by
    # driving in a batch of its own and looking only at the ego's checks)
    states, checks = run_controls(sc, torch.tensor([[1.0, 0.0]]), 100, cfg)
    red = torch.stack([c.red_light[0] for c in checks])
    assert bool(red.any()), "crossing a red stop line must be flagged"
    k = int(red.nonzero()[0])
    front_prev = float(states[k].xy[0, 0, 0]) + 2.3
    front_now = float(states[k + 1].xy[0, 0, 0]) + 2.3
    assert front_prev < 100.0 <= front_now + 0.05
    assert int(red.sum()) == 1
    sp = torch.stack([c.speeding[0] for c in checks])
    assert float(sp[-1]) > 0 and abs(float(sp[-1]) - (float(states[-1].speed[0, 0]) - 13.9)) < 1e-4


def test_collision_with_static_object_is_at_fault():
    cfg = SimConfig()
    b, ids = scenes.straight_road(60)
    b.add_static([40.0, 0.0], 0.0, 0.5, 0.5)
    sc = scenes.build(b)
    _, checks = run_controls(sc, torch.tensor([[0.0, 0.0]]), 50, cfg)
    coll = torch.stack([c.collision[0] for c in checks])
    fault = torch.stack([c.collision_at_fault[0] for c in checks])
    assert bool(coll.any()) and bool(fault[coll].all())
    assert int(checks[int(coll.nonzero()[0])].collision_agent[0]) == 1


def test_offroad_and_wrong_way():
    cfg = SimConfig()
    sc = scenes.build(scenes.straight_road(60, lanes=1)[0])
    # curve left hard: leaves the single lane
    _, checks = run_controls(sc, torch.tensor([[0.0, 0.1]]), 30, cfg)
    assert bool(torch.stack([c.offroad[0] for c in checks]).any())
    assert not bool(checks[0].offroad[0])


def test_step_is_deterministic():
    sc = collate([scenes.lead_vehicle_scene(), scenes.red_light_scene(num_steps=80)])
    cfg = RolloutConfig(max_steps=60)
    a = rollout(RouteIDM(), sc, cfg=cfg)
    b = rollout(RouteIDM(), sc, cfg=cfg)
    for (n, x), (_, y) in zip(a.tensor_items(), b.tensor_items(), strict=True):
        assert torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0)), n


def test_batch_of_one_equals_row_of_batch():
    """A scenario's rollout does not depend on what else is in the batch."""
    s1, s2 = scenes.lead_vehicle_scene(), scenes.red_light_scene(num_steps=80)
    cfg = RolloutConfig(max_steps=60)
    both = rollout(RouteIDM(), collate([s1, s2]), cfg=cfg)
    one = rollout(RouteIDM(), collate([s1]), cfg=cfg)
    A = s1.agents.num_agents
    assert torch.allclose(both.xy[:, 0, :A], one.xy[:, 0, :A], atol=1e-5)


def test_constant_controls_policy_drives_straight():
    sc = collate([scenes.build(scenes.straight_road(40)[0])])
    ro = rollout(ConstantControls(0.0, 0.0), sc, cfg=RolloutConfig())
    assert torch.allclose(ro.xy[-1, 0, 0, 1], torch.tensor(0.0), atol=1e-4)
