"""CoC meta-actions, ground-truth labels and the grounding / consistency checks."""

from __future__ import annotations

import math

import pytest
import torch

from roadloop.policies.base import Observation
from roadloop.policies.expert import Expert
from roadloop.reasoning import (
    Lateral,
    Longitudinal,
    coc_labels,
    consistency,
    consistency_batch,
    grounding,
    grounding_batch,
    meta_actions,
    parse_coc,
)
from roadloop.rollout import _controls
from roadloop.scenarios.families import FAMILIES
from roadloop.sim.batching import collate
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import AgentType
from roadloop.sim.state import init_state
from roadloop.sim.step import step
from roadloop.testing.scenes import build, red_light_scene, straight_road

T = torch.arange(1, 65) * 0.1


def _ma(xy, speed=None, v0=10.0):
    lon, lat = meta_actions(torch.zeros(1, 2), torch.zeros(1), torch.tensor([v0]), xy[None],
                            None if speed is None else speed[None])
    return Longitudinal(int(lon[0])), Lateral(int(lat[0]))


def test_meta_actions_synthetic():
    x = 10 * T
    assert _ma(torch.stack((x, 0 * x), -1), 10 + 0 * T) == (Longitudinal.KEEP_SPEED, Lateral.KEEP_LANE)
    v = (10 - 4 * T).clamp_min(0)
    s = torch.cumsum(v * 0.1, 0)
    assert _ma(torch.stack((s, 0 * s), -1), v)[0] == Longitudinal.STOP
    assert _ma(torch.stack((s, 0 * s), -1))[0] == Longitudinal.STOP  # speed from positions
    v = 5 + T
    s = torch.cumsum(v * 0.1, 0)
    assert _ma(torch.stack((s, 0 * s), -1), v, 5.0)[0] == Longitudinal.ACCELERATE
    v = (10 - 0.6 * T)
    s = torch.cumsum(v * 0.1, 0)
    assert _ma(torch.stack((s, 0 * s), -1), v)[0] == Longitudinal.SLOW_DOWN
    th = (0.5 * T).clamp_max(math.pi / 2)  # 90 deg left arc, radius 10 m
    arc = torch.stack((10 * torch.sin(th), 10 * (1 - torch.cos(th))), -1)
    assert _ma(arc, 5 + 0 * T, 5.0)[1] == Lateral.TURN_LEFT
    assert _ma(arc * torch.tensor([1.0, -1.0]), 5 + 0 * T, 5.0)[1] == Lateral.TURN_RIGHT
    u = (T / 4).clamp_max(1)
    shift = 3.5 * u * u * (3 - 2 * u)
    assert _ma(torch.stack((x, shift), -1), 10 + 0 * T)[1] == Lateral.CHANGE_LANE_LEFT
    assert _ma(torch.stack((x, -shift), -1), 10 + 0 * T)[1] == Lateral.CHANGE_LANE_RIGHT
    bump = torch.exp(-(((T - 3) / 0.8) ** 2))
    assert _ma(torch.stack((x, bump), -1), 10 + 0 * T)[1] == Lateral.NUDGE_LEFT
    assert _ma(torch.stack((x, -1 + 0 * x), -1), 10 + 0 * T)[1] == Lateral.NUDGE_RIGHT
    assert _ma(torch.full((64, 2), float("nan"))) == (Longitudinal.KEEP_SPEED, Lateral.KEEP_LANE)
    # a highway bend: 1.2 deg of heading over 224 m at 35 m/s ends 2.3 m sideways, yet it is a curve, not a
    # lane change (the heading ends at its extreme); the same offset reached by an S (out and back) is one
    th = math.radians(1.2) * T / T[-1]
    bend = torch.stack((torch.cumsum(3.5 * torch.cos(th), 0), torch.cumsum(3.5 * torch.sin(th), 0)), -1)
    assert bend[-1, 1] > 2.0
    assert _ma(bend, 35 + 0 * T, 35.0)[1] == Lateral.KEEP_LANE
    assert _ma(bend * torch.tensor([1.0, -1.0]), 35 + 0 * T, 35.0)[1] == Lateral.KEEP_LANE
    assert _ma(torch.stack((35 * T, 2.3 * u * u * (3 - 2 * u)), -1), 35 + 0 * T, 35.0)[1] == Lateral.CHANGE_LANE_LEFT


def _drive_expert(sc, steps: int):
    sim = SimConfig()
    st = init_state(sc, sim)
    ex = Expert()
    B = sc.batch_size
    ex.reset(st, torch.zeros(B, dtype=torch.int64))
    for t in range(steps + 1):
        obs = Observation(st, st.xy[:, :1].expand(B, 16, 2), st.yaw[:, :1].expand(B, 16),
                          st.speed[:, :1].expand(B, 16), t)
        out = ex.act(obs)
        if t == steps:
            return st, out
        st = step(st, _controls(out, st, 0, sim), sim)


@pytest.fixture(scope="module")
def expert_labels():
    torch.set_num_threads(1)
    res = {}
    for fam in FAMILIES:
        st, out = _drive_expert(collate([FAMILIES[fam].build_raw(s) for s in range(3)]), 20)
        labels = coc_labels(st, out.plan_xy, out.plan_speed, rng_seed=1)
        lon, lat = meta_actions(st.xy[:, 0], st.yaw[:, 0], st.speed[:, 0], out.plan_xy, out.plan_speed)
        texts = [lb.text for lb in labels]
        res[fam] = (labels, grounding_batch(texts, st), consistency_batch(texts, lon, lat))
    return res


def test_expert_labels_grounded_and_consistent(expert_labels):
    g = torch.cat([v[1] for v in expert_labels.values()]).float().mean()
    c = torch.cat([v[2] for v in expert_labels.values()]).float().mean()
    assert g >= 0.95 and c >= 0.95, {k: (v[1].tolist(), v[2].tolist()) for k, v in expert_labels.items()}
    for labels, _, _ in expert_labels.values():
        for lb in labels:
            p = parse_coc(lb.text)
            assert p is not None and (p.lon, p.lat) == lb.decision
            for comp in lb.components:
                assert f"about {int(comp.distance_m)} m" in lb.text


def test_varied_wording(expert_labels):
    texts = {lb.text for v in expert_labels.values() for lb in v[0]}
    starts = {t.split(" ")[0] for t in texts}
    assert len(starts) > 1 and len(texts) > 5


def _cone_scene():
    b, _ = straight_road(num_steps=40)
    b.add_static((35.0, -1.3), 0.0, length=0.5, width=0.5, kind=AgentType.STATIC)
    return init_state(collate([build(b)]))


def test_grounding_cones_sides_and_hallucination():
    st = _cone_scene()
    ok = "Cones narrow the right side of the lane about 25 m ahead, so nudge left and slow down."
    assert grounding(ok, st)
    assert not grounding("Cones narrow the left side of the lane about 25 m ahead, so nudge right.", st)
    assert not grounding("Cones are on the right about 60 m ahead, so nudge left.", st)  # wrong distance
    assert not grounding("A pedestrian is crossing about 12 m ahead, so stop and let them pass.", st)
    assert not grounding("The lane ahead is clear, so keep the lane and keep speed.", st)  # cone in the corridor
    labels = coc_labels(st, torch.stack((10 + 10 * T, 0 * T), -1)[None], (10 + 0 * T)[None])
    assert grounding(labels[0].text, st)


def test_grounding_light_colour():
    st = init_state(collate([red_light_scene(stop_x=40.0)]))
    assert grounding("The light ahead is red about 28 m away, so slow down and stop at the line.", st)
    assert not grounding("The light ahead is green about 28 m away, so keep speed.", st)
    assert not grounding("A stop sign is about 28 m ahead, so stop.", st)


def test_consistency_and_garbage():
    st = _cone_scene()
    lon, lat = torch.tensor([int(Longitudinal.KEEP_SPEED)]), torch.tensor([int(Lateral.KEEP_LANE)])
    assert consistency("The lane ahead is clear, so keep the lane and keep speed.", lon[0], lat[0])
    assert not consistency("The lane ahead is clear, so turn left and keep speed.", lon[0], lat[0])
    assert not consistency("Do not turn left; keep speed.", lon[0], int(Lateral.TURN_LEFT))
    for junk in ["", "   ", "asdf qwer 123 m", "\x00\xff" * 50, None, 42, "left right ahead 5 m"]:
        assert not grounding(junk, st)
        assert not consistency(junk, lon[0], lat[0])
        assert parse_coc(junk) is None
    assert grounding_batch(["???"], st).tolist() == [False]
    assert consistency_batch(["???"], lon, lat).tolist() == [False]


def test_label_side_is_read_in_the_frame_grounding_accepts():
    """An agent far from the route (an oncoming car beyond the corner of a left turn: right of the route's
    line, left of the ego) is labelled by its side of the ego; one near the route by its side of the route.
    Either label is grounded in the facts it was written from (until format 5 the first was 'on the right')."""
    import random

    from roadloop.reasoning.checks import _grounded
    from roadloop.reasoning.labels import SceneFacts, render_text, scene_components
    from roadloop.reasoning.meta_action import Lateral, Longitudinal

    def facts(near: bool) -> SceneFacts:
        z = torch.zeros(1, 2)
        return SceneFacts(kind=torch.tensor([[0, int(AgentType.VEHICLE)]]), valid=torch.tensor([[False, True]]),
                          dist=torch.tensor([[0.0, 20.0]]), x_ego=torch.tensor([[0.0, 19.5]]),
                          y_ego=torch.tensor([[0.0, 4.0]]), y_route=torch.tensor([[0.0, -9.0]]),
                          gap=torch.tensor([[0.0, 18.0]]), near_route=torch.tensor([[False, near]]),
                          in_corridor=torch.tensor([[False, True]]), intrudes=z.bool(), speed=torch.tensor([[0, 8.0]]),
                          accel=z, crossing=z.bool(), light_gap=torch.full((1, 1), 1e9),
                          light_state=torch.full((1, 1), -1), junction_gap=torch.full((1,), 1e9))

    for near, side in ((False, "left"), (True, "right")):
        f = facts(near)
        comps = scene_components(f, 0)
        assert comps["leader"].side == side
        text = render_text(list(comps.values()), Longitudinal.SLOW_DOWN, Lateral.TURN_LEFT, random.Random(0))
        assert f"on the {side}" in text and _grounded(parse_coc(text), f, 0), text
