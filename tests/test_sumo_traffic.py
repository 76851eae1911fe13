"""SUMO traffic recording and the scenarios cut from it (the ``sumo-real`` suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from roadloop.sim.batching import collate, validate
from roadloop.sim.datatypes import AgentType, LightState
from roadloop.sumo import suite as sumo_suite
from roadloop.sumo.cutting import _boxes_overlap
from roadloop.sumo.suite import SUMO_REAL_NETWORKS, build_sumo_real, build_sumo_suite, get_network
from roadloop.sumo.traffic import (
    SumoTrafficError,
    check_routes_file,
    front_track_to_boxes,
    record_traffic,
    sumo_binary,
    sumo_to_roadloop,
)


@pytest.fixture(scope="module")
def real():
    scs = build_sumo_real()
    return {name: [s for s in scs if s.meta.family == f"sumo_{name}"] for name in SUMO_REAL_NETWORKS}


def _lane_distance(sc, pts: np.ndarray) -> np.ndarray:
    """Distance of points (N, 2) to the nearest lane area (<= 0: inside a lane)."""
    m = sc.map
    segs_a, segs_b, ws = [], [], []
    for i in range(m.lane_xy.shape[0]):
        p = m.lane_xy[i][m.lane_point_valid[i]].double().numpy()
        segs_a.append(p[:-1])
        segs_b.append(p[1:])
        ws.append(np.full(len(p) - 1, float(m.lane_width[i])))
    a, b, w = np.concatenate(segs_a), np.concatenate(segs_b), np.concatenate(ws)
    ab = b - a
    ap = pts[:, None] - a[None]
    t = np.clip((ap * ab).sum(-1) / (ab * ab).sum(-1).clip(1e-9), 0, 1)
    return (np.linalg.norm(ap - t[..., None] * ab, axis=-1) - w / 2).min(1)


def test_more_training_scenes_from_other_seeds(real):
    """sumo-real-train-xl's recipe: other SUMO runs (seeds) give new scenarios with their own ids, and
    the train-half egos never include a sumo-real-val ego."""
    more = build_sumo_real("train", per_network=8, seed=(1, 2), networks=["fokr_bs_demo"])
    ids = [s.meta.scenario_id for s in more]
    assert len(ids) == len(set(ids)) == 8
    assert {i.split("/")[0] for i in ids} == {"sumo-fokr_bs_demo-s1", "sumo-fokr_bs_demo-s2"}
    assert all(dict(s.meta.extra)["split"] == "train" for s in more)
    val_egos = {dict(s.meta.extra)["vehicle"] for s in real["fokr_bs_demo"] if dict(s.meta.extra)["split"] == "val"}
    assert val_egos and not val_egos & {dict(s.meta.extra)["vehicle"] for s in more}
    assert set(sumo_suite.SUMO_SUITES) >= {"sumo-real", "sumo-real-train", "sumo-real-val", "sumo-real-train-xl"}


def test_suite_shape(real):
    for name, scs in real.items():
        assert len(scs) == 12, name
        assert Counter(dict(s.meta.extra)["split"] for s in scs) == {"train": 6, "val": 6}
        for s in scs:
            validate(s)
            assert s.num_steps == 170 and s.meta.warmup_steps == 20
            assert s.meta.source == f"sumo:{name}" and s.meta.scenario_id.startswith(f"sumo-{name}/")
            ex = dict(s.meta.extra)
            assert "projParameter" in ex and ex["network_file"].endswith((".xml", ".gz"))
            assert s.agents.num_agents <= 32
    ids = [s.meta.scenario_id for scs in real.values() for s in scs]
    assert len(set(ids)) == len(ids)
    collate([s for scs in real.values() for s in scs])  # the whole suite batches


def test_ego_and_route(real):
    for scs in real.values():
        for s in scs:
            a = s.agents
            assert bool(a.valid[0].all()) and int(a.kind[0]) == AgentType.VEHICLE
            xy = a.xy[0].double()
            travelled = float((xy[1:] - xy[:-1]).norm(dim=-1).sum())
            assert travelled >= 40.0
            r = s.route.xy[s.route.valid]
            assert float((r[0] - a.xy[0, 0]).norm()) < 0.5  # the route starts at the ego
            assert float(s.route.length) >= travelled - 1.0
            lanes = s.route.lanes[s.route.lanes >= 0]
            assert len(lanes) >= 1 and bool((lanes < s.map.num_lanes).all())
            # the ego's log stays on the cropped lanes
            assert (_lane_distance(s, xy.numpy()[::5]) < 0.3).all()


def test_logs_consistent(real):
    for name, scs in real.items():
        errs, angs, off = [], [], []
        for s in scs:
            a = s.agents
            xy, v, sp, yaw = a.xy.double().numpy(), a.valid.numpy(), a.speed.numpy(), a.yaw.numpy()
            veh = (a.kind.numpy() == AgentType.VEHICLE)[:, None]
            both = v[:, 1:] & v[:, :-1] & veh
            d = np.diff(xy, axis=1)
            disp = np.linalg.norm(d, axis=-1) / 0.1
            errs.append(np.abs(disp - sp[:, 1:])[both])
            moving = both & (np.linalg.norm(d, axis=-1) > 0.3)
            head = np.arctan2(d[..., 1], d[..., 0])
            angs.append(np.abs((head - yaw[:, 1:] + np.pi) % (2 * np.pi) - np.pi)[moving])
            near = v & veh & (np.linalg.norm(xy - xy[:1], axis=-1) < 60)
            off.append(_lane_distance(s, xy[near][::8]))
        e, g, o = np.concatenate(errs), np.concatenate(angs), np.concatenate(off)
        assert np.median(e) < 0.05 and (e > 1.0).mean() < 0.02, name  # displacement / dt ~ speed
        assert np.percentile(g, 95) < 0.2, name  # yaw = direction of motion
        assert (o < 0.5).mean() > 0.99, name  # box centres on lanes


def test_no_overlap_at_first_step(real):
    for scs in real.values():
        for s in scs:
            a = s.agents
            v0 = a.valid[:, 0].numpy()
            ov = _boxes_overlap(a.xy[:, 0].double().numpy(), a.yaw[:, 0].double().numpy(),
                                a.length.double().numpy(), a.width.double().numpy())
            ov &= v0[:, None] & v0[None]
            np.fill_diagonal(ov, False)
            assert not ov.any(), s.meta.scenario_id


def test_lights_and_paths(real):
    fokr = real["fokr_bs_demo"]
    states = torch.cat([s.light_states.flatten() for s in fokr])
    assert {int(LightState.GREEN), int(LightState.RED)} <= set(states.tolist())
    assert all(bool((s.map.lane_light >= 0).any()) and bool(s.map.crosswalk_valid.any()) for s in fokr)
    assert any(bool((s.route.stop_light >= 0).any()) for s in fokr)
    assert any(bool((s.agents.kind == AgentType.PEDESTRIAN).any()) for s in fokr)
    for scs in real.values():
        for s in scs:
            a = s.agents
            for i in range(1, a.num_agents):
                if not bool(a.path_valid[i].any()):
                    continue
                first = int(a.valid[i].nonzero()[0, 0])
                p0 = a.path_xy[i, 0]
                assert float((p0 - a.xy[i, first]).norm()) < 0.5  # path starts where the log does
            assert bool((a.desired_speed[a.kind == AgentType.VEHICLE] > 0).all())


def test_deterministic():
    spec = SUMO_REAL_NETWORKS["fkk_in"]
    args = dict(n=3, seed=5, sim_seconds=60.0, warmup=40.0)
    a = build_sumo_suite(spec.path(spec.net), None, **args)
    sumo_suite._REC_CACHE.clear()
    sumo_suite._NET_CACHE.clear()
    from roadloop.sumo import traffic

    traffic._TRIPS_CACHE.clear()
    traffic._TMP_DIR.clear()  # random trips in another temporary folder, as in another process
    b = build_sumo_suite(spec.path(spec.net), None, **args)
    assert [s.meta for s in a] == [s.meta for s in b] and len(a) == 3
    # no machine- or process-specific path in the metadata: equal scenarios, equal content hashes
    ex = dict(a[0].meta.extra)
    assert ex["network_file"] == "$SUMO_HOME/tools/game/fkk_in/ingolstadt.net.xml.gz" and ex["routes"] == ""
    from roadloop.sumo.cosim import CosimSpec

    cs = CosimSpec.from_meta(a[0].meta)  # the co-simulation finds the files again
    assert os.path.isfile(cs.net) and len(cs.routes) == 1 and os.path.isfile(cs.routes[0])
    for x, y in zip(a, b, strict=True):
        for (n1, t1), (_, t2) in zip(x.tensor_items(), y.tensor_items(), strict=True):
            assert torch.equal(t1, t2), n1


def test_generated_grid_network(tmp_path):
    out = str(tmp_path / "grid.net.xml")
    subprocess.run([sumo_binary("netgenerate"), "--grid", "--grid.number", "4", "--grid.length", "120",
                    "-L", "2", "--tls.guess", "true", "-o", out, "--no-warnings"],
                   check=True, capture_output=True)
    scs = build_sumo_suite(out, None, n=2, seed=1, sim_seconds=60.0, warmup=40.0)
    assert len(scs) == 2
    for s in scs:
        validate(s)
        assert s.meta.source == "sumo:grid"


def test_frames():
    # SUMO angle 0 = north -> yaw pi/2; 90 = east -> 0; the centre is half a length behind the front
    front = np.array([[10.0, 10.0], [10.0, 10.0]])
    c, yaw = sumo_to_roadloop(front, np.array([0.0, 90.0]), np.array([4.0, 4.0]))
    assert np.allclose(yaw, [np.pi / 2, 0.0]) and np.allclose(c, [[10.0, 8.0], [8.0, 10.0]])
    # a car driving a 90-degree corner: centre midway between front and the rear on the path
    t = np.linspace(0, np.pi / 2, 40)
    front = np.stack((20 * np.sin(t), 20 - 20 * np.cos(t)), 1)
    ang = 90.0 - np.rad2deg(t)
    xy, yw = front_track_to_boxes(np.arange(40), np.array([0, 40]), front, ang, np.array([4.0]))
    assert np.allclose(yw[0], 0.0) and np.allclose(xy[0], [-2.0, 0.0])
    assert np.allclose(np.linalg.norm(front - xy, axis=1), 2.0, atol=0.05)


def test_trips_errors(tmp_path):
    spec = SUMO_REAL_NETWORKS["fokr_bs_demo"]
    net = get_network(spec.path(spec.net), "fokr_bs_demo")
    bad = tmp_path / "bad.trips.xml"
    bad.write_text('<routes><trip id="t0" depart="0" from="-3" to="no_such_edge"/></routes>')
    with pytest.raises(SumoTrafficError, match="bad.trips.xml.*t0.*'no_such_edge'"):
        check_routes_file(str(bad), net)
    with pytest.raises(SumoTrafficError, match="no_such_edge"):
        record_traffic(net, [str(bad)], duration=1.0, warmup=0.0)
    (tmp_path / "junk.xml").write_text("not xml <<<")
    with pytest.raises(SumoTrafficError, match="junk.xml.*not valid XML"):
        check_routes_file(str(tmp_path / "junk.xml"), net)
    with pytest.raises(SumoTrafficError, match="not found"):
        check_routes_file(str(tmp_path / "missing.xml"), net)


def test_missing_libsumo_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "libsumo", None)
    from roadloop.sumo import traffic

    with pytest.raises(SumoTrafficError, match="pip install eclipse-sumo"):
        traffic._libsumo()
