"""Live SUMO co-simulation (``roadloop.sumo.cosim``): same rollout engine, agents moved by SUMO,
reactive traffic, determinism; and the agent-model switch of ``roadloop eval --agents``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from roadloop.policies.base import Policy, PolicyOutput
from roadloop.rollout import RolloutConfig, rollout
from roadloop.sim.backend import TrafficBackend, with_agent_model
from roadloop.sim.batching import collate
from roadloop.sim.datatypes import AgentType, TrafficModel
from roadloop.sumo.cosim import CosimSpec, SumoCosim, _Track
from roadloop.sumo.suite import SUMO_REAL_NETWORKS, build_sumo_suite
from roadloop.sumo.traffic import front_track_to_boxes


class HardBrake(Policy):
    """Brakes at -6 m/s^2 from the moment it engages (controls given directly)."""

    name = "hard-brake"

    def act(self, obs):
        s = obs.state
        B = s.batch_size
        c = torch.zeros(B, 64, 2)
        c[..., 0] = -6.0
        return PolicyOutput(plan_xy=s.xy[:, :1].expand(B, 64, 2).clone(), controls=c)


class LogFollower(Policy):
    """Plans the logged ego trajectory (the tracker follows it)."""

    name = "log-follower"

    def act(self, obs):
        s = obs.state
        a = s.static.scenario.agents
        idx = (torch.arange(1, 65) + int(s.t)).clamp_max(a.num_steps - 1)
        return PolicyOutput(plan_xy=a.xy[:, 0, idx], plan_yaw=a.yaw[:, 0, idx], plan_speed=a.speed[:, 0, idx])


def _follower(sc, t: int = 20) -> int | None:
    """The nearest vehicle behind the ego in its lane at step ``t`` (present for 5 s), or None."""
    a = sc.agents
    e = a.xy[0, t].double()
    h = torch.stack((torch.cos(a.yaw[0, t]), torch.sin(a.yaw[0, t]))).double()
    best = None
    for i in range(1, a.num_agents):
        if not bool(a.valid[i, t:t + 50].all()) or int(a.kind[i]) != AgentType.VEHICLE:
            continue
        r = a.xy[i, t].double() - e
        x, y = float(r @ h), float(-r[0] * h[1] + r[1] * h[0])
        if -80 < x < -4 and abs(y) < 1.2 and math.cos(float(a.yaw[i, t] - a.yaw[0, t])) > 0.9:
            if best is None or x > best[1]:
                best = (i, x)
    return None if best is None else best[0]


@pytest.fixture(scope="module")
def highway():
    spec = SUMO_REAL_NETWORKS["highway"]
    scs = build_sumo_suite(spec.path(spec.net), [spec.path(r) for r in spec.routes], n=6, seed=0,
                           sim_seconds=40.0, warmup=60.0, name="highway")
    for sc in scs:
        i = _follower(sc)
        if i is not None:
            return sc, i
    pytest.fail("no highway scenario with a vehicle following the ego")


def test_meta_describes_the_sumo_run(highway):
    sc, _ = highway
    spec = CosimSpec.from_meta(sc.meta)
    assert spec.ego == dict(sc.meta.extra)["vehicle"] and spec.net.endswith("highway.net.xml")
    assert len(spec.agents) == sc.agents.num_agents - 1 and spec.seed == 0
    assert isinstance(SumoCosim(), TrafficBackend)


def test_cosim_reproduces_the_log_when_the_ego_follows_it(highway):
    sc, _ = highway
    batch = collate([sc])
    with torch.inference_mode():
        ro = rollout(LogFollower(), batch, cfg=RolloutConfig(max_steps=60), traffic=SumoCosim())
    a = batch.agents
    T = ro.num_steps
    both = a.valid[0, :, :T + 1] & ro.present[:, 0].T
    d = (ro.xy[:, 0].transpose(0, 1) - a.xy[0, :, :T + 1]).norm(dim=-1)
    d = torch.where(both, d, torch.zeros_like(d))
    assert float(d[1:, :21].max()) < 0.2  # the warm-up: SUMO replays the recording
    assert float(d[1:].max()) < 1.0
    assert bool((ro.present[:, 0, 1:] == a.valid[0, 1:, :T + 1].T).float().mean() > 0.99)
    # the same engine: checks and metrics as for any rollout
    assert ro.checks.collision.shape == (T, 1) and not bool(ro.checks.collision.any())


def test_cosim_is_reactive_and_log_replay_is_not(highway):
    sc, i = highway
    batch = collate([sc])
    with torch.inference_mode():
        log = rollout(HardBrake(), batch, cfg=RolloutConfig(max_steps=80))
        co = rollout(HardBrake(), batch, cfg=RolloutConfig(max_steps=80), traffic=SumoCosim())
        co2 = rollout(HardBrake(), batch, cfg=RolloutConfig(max_steps=80), traffic=SumoCosim())
    v_log = sc.agents.speed[i, 20:81]
    assert float(co.speed[30:, 0, 0].min()) < 20.0  # the ego brakes hard...
    # ... the follower keeps its logged speed in log replay, and brakes behind the ego in SUMO
    assert torch.allclose(log.speed[20:81, 0, i], v_log)
    assert float(co.speed[20:81, 0, i].min()) < float(v_log.min()) - 10.0
    assert bool(log.checks.collision[20:].any()) and not bool(co.checks.collision_at_fault.any())
    # deterministic: a second co-simulation is identical
    for name, t in co.tensor_items():
        assert torch.equal(torch.nan_to_num(t, 7.0), torch.nan_to_num(dict(co2.tensor_items())[name], 7.0)), name


def test_front_track_matches_the_recording():
    # a car driving a curve at varying speed: the incremental tracks equal front_track_to_boxes
    t = np.linspace(0, 1.2, 60) ** 1.5
    front = np.stack((30 * np.sin(t), 30 - 30 * np.cos(t)), 1)
    ang = 90.0 - np.rad2deg(t)
    L = 4.6
    xy, yaw = front_track_to_boxes(np.arange(60), np.array([0, 60]), front, ang, np.array([L]))
    tr = _Track()
    for k in range(60):
        c, y = tr.push(front[k], float(ang[k]), L)
        assert np.allclose(c, xy[k], atol=1e-6) and abs(math.remainder(y - yaw[k], 2 * math.pi)) < 1e-6


def test_cosim_needs_a_sumo_scenario():
    from roadloop.errors import ScenarioError
    from roadloop.testing.scenes import lead_vehicle_scene

    with pytest.raises(ScenarioError, match="not a SUMO recording"):
        CosimSpec.from_meta(lead_vehicle_scene().meta)


def test_agents_idm_switch(highway):
    sc, _ = highway
    idm = with_agent_model(sc, "idm")
    moving = (sc.agents.kind != AgentType.PEDESTRIAN) & (sc.agents.path_valid.sum(-1) >= 2)
    moving[0] = False
    assert bool((idm.agents.model[moving] == TrafficModel.IDM).all())
    assert int(idm.agents.model[0]) == int(sc.agents.model[0])
    assert with_agent_model(sc, "log") is sc
    from roadloop.errors import ConfigError

    with pytest.raises(ConfigError, match="agent mode"):
        with_agent_model(sc, "nope")
