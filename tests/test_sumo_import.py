"""Import of SUMO networks: the four shipped real networks, generated ones, and error cases."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from roadloop.sim.batching import validate
from roadloop.sim.datatypes import ScenarioMeta
from roadloop.sumo.crop import crop_network, network_to_scenario_map
from roadloop.sumo.network import NetworkImportError, load_network
from roadloop.sumo.suite import SUMO_REAL_NETWORKS, get_network
from roadloop.sumo.traffic import sumo_binary


@pytest.fixture(scope="module")
def nets():
    return {k: get_network(s.path(s.net), k) for k, s in SUMO_REAL_NETWORKS.items()}


def _netconvert(tmp, nodes: str, edges: str, extra: list[str] = ()) -> str:
    (tmp / "n.nod.xml").write_text(f"<nodes>{nodes}</nodes>")
    (tmp / "e.edg.xml").write_text(f"<edges>{edges}</edges>")
    out = str(tmp / "x.net.xml")
    subprocess.run([sumo_binary("netconvert"), "-n", str(tmp / "n.nod.xml"), "-e", str(tmp / "e.edg.xml"),
                    "-o", out, "--no-warnings", *extra], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("name", list(SUMO_REAL_NETWORKS))
def test_real_network_lanes(nets, name):
    net = nets[name]
    L = net.num_lanes
    assert L > 50
    assert np.isfinite(net.lane_pts).all()
    assert (net.lane_width > 0).all() and (net.lane_speed > 0).all() and (net.lane_length > 0).all()
    # successors and predecessors are the same relation
    succ = {(a, int(b)) for a in range(L) for b in net.successors[a] if b >= 0}
    pred = {(int(p), b) for b in range(L) for p in net.predecessors[b] if p >= 0}
    assert succ == pred and len(succ) > L // 2
    # junction-internal lanes exist and connect lanes on both sides
    internal = np.nonzero(net.lane_internal)[0]
    assert len(internal) > 10
    has_pred = (net.predecessors[internal] >= 0).any(1)
    has_succ = (net.successors[internal] >= 0).any(1)
    assert (has_pred & has_succ).mean() > 0.97
    # consecutive lanes touch: a lane's end is near its successor's start
    a, b = zip(*sorted(succ), strict=True)
    ends = net.lane_pts[net.lane_ptr[1:][list(a)] - 1]
    starts = net.lane_pts[net.lane_ptr[:-1][list(b)]]
    assert np.median(np.linalg.norm(ends - starts, axis=1)) < 0.5
    # neighbours are symmetric-ish and within an edge
    for i in np.nonzero(net.lane_left >= 0)[0]:
        assert net.lane_edge[i] == net.lane_edge[net.lane_left[i]]
    assert net.report.lanes_imported == L
    assert net.meta["network_file"].endswith(os.path.basename(SUMO_REAL_NETWORKS[name].net))
    assert "projParameter" in net.meta and "netOffset" in net.meta


def test_real_network_features(nets):
    assert nets["bs3d"].report.skipped.get("rail", 0) > 0  # tram tracks
    assert nets["bs3d"].report.skipped.get("sidewalk", 0) > 0
    assert "+proj=utm" in nets["fkk_in"].meta["projParameter"]
    fokr = nets["fokr_bs_demo"]
    assert [t.id for t in fokr.traffic_lights] == ["38"]
    tl = fokr.traffic_lights[0]
    assert tl.num_links == 46 and len(tl.states) == len(tl.durations) > 3
    ctrl = fokr.conn_tls >= 0
    assert ctrl.sum() >= 20 and (fokr.conn_link[ctrl] < tl.num_links).all()
    assert not fokr.lane_internal[fokr.conn_from[ctrl]].any()  # stop lines sit on incoming lanes
    assert len(fokr.stop_line_lane) > 5 and np.isfinite(fokr.stop_line_xy).all()
    for name in ("fokr_bs_demo", "fkk_in"):
        cw = nets[name].crosswalk_xy
        assert len(cw) >= 8 and np.isfinite(cw).all()
        d1, d2 = cw[:, 2] - cw[:, 0], cw[:, 3] - cw[:, 1]
        area = 0.5 * np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
        assert (area > 1.0).all()
    assert len(nets["highway"].crosswalk_xy) == 0
    # fixed-time replay of a program: valid state chars
    st = tl.link_states(0.0, 900)
    assert st.shape == (900, 46) and set(np.unique(st).tobytes().decode()) <= set("GgyYrsuoO")


def test_grid_query_matches_brute_force(nets):
    net = nets["bs3d"]
    rng = np.random.default_rng(0)
    lo, hi = net.lane_pts.min(0), net.lane_pts.max(0)
    q = rng.uniform(lo, hi, size=(5, 2))
    lanes, s0, s1 = net.grid.query(q, 60.0)
    d = np.linalg.norm(net.grid.xy[:, None] - q[None], axis=-1).min(1)
    brute = np.unique(net.grid.lane[d <= 60.0])
    assert np.array_equal(lanes, brute)
    assert (s0 <= s1).all()


def test_crop_to_builder_validates(nets):
    net = nets["fokr_bs_demo"]
    centre = net.stop_line_xy[0, 0]
    b, lane_map = network_to_scenario_map(net, centre, radius=60.0, num_steps=50)
    kept = np.nonzero(lane_map >= 0)[0]
    assert len(kept) > 10 and len(b.lights) > 0 and len(b.crosswalks) > 0 and len(b.edges) > 0
    crop = crop_network(net, centre[None], 60.0)
    assert np.array_equal(crop.lanes, kept)
    lane = int(lane_map[kept[0]])
    b.set_route([lane])
    p = b.lanes[lane].xy
    b.add_agent(np.repeat(p[:1], 50, 0), float(np.arctan2(*(p[1] - p[0])[::-1])), 0.0)
    sc = b.build(ScenarioMeta("t/0", "t", 0, "sumo:fokr_bs_demo"))
    validate(sc)
    succ = sc.map.lane_successors.numpy()
    pred = sc.map.lane_predecessors.numpy()
    for a in range(len(succ)):
        for x in succ[a][succ[a] >= 0]:
            assert a in pred[x]


def test_netgenerate_network(tmp_path):
    out = str(tmp_path / "spider.net.xml.gz")
    subprocess.run([sumo_binary("netgenerate"), "--spider", "--spider.arm-number", "5",
                    "--spider.circle-number", "3", "--spider.space-radius", "60", "-L", "2",
                    "--tls.guess", "true", "-o", out, "--no-warnings"], check=True, capture_output=True)
    net = load_network(out)
    import sumolib

    ref = sumolib.net.readNet(out, withInternal=True)
    n_lanes = sum(len(e.getLanes()) for e in ref.getEdges())
    assert net.report.lanes_total == n_lanes
    assert net.report.lanes_imported == n_lanes  # all lanes allow cars
    assert net.lane_internal.sum() > 0 and net.report.traffic_lights > 0
    assert (net.conn_tls >= 0).any()
    assert (net.lane_left >= 0).sum() > 0  # 2-lane roads: lane changes allowed


def test_skipped_lanes_are_reported(tmp_path):
    nodes = ('<node id="a" x="0" y="0"/><node id="b" x="200" y="0"/><node id="c" x="0" y="50"/>'
             '<node id="d" x="200" y="50"/><node id="e" x="0" y="90"/><node id="f" x="200" y="90"/>')
    edges = ('<edge id="road" from="a" to="b" numLanes="2" speed="13.9" sidewalkWidth="2"/>'
             '<edge id="tram" from="c" to="d" numLanes="1" allow="tram"/>'
             '<edge id="bike" from="e" to="f" numLanes="1" allow="bicycle"/>')
    net = load_network(_netconvert(tmp_path, nodes, edges))
    sk = net.report.skipped
    assert sk.get("rail") == 1 and sk.get("bike") == 1 and sk.get("sidewalk") == 1
    assert net.num_lanes == 2 and net.lane_left[0] == 1 and net.lane_right[1] == 0
    assert net.lane_outer_right[0] and net.lane_outer_left[1]
    assert "skipped" in net.report.summary()


def test_errors(tmp_path):
    with pytest.raises(NetworkImportError, match="file not found"):
        load_network(tmp_path / "missing.net.xml")
    (tmp_path / "empty.net.xml").write_text("")
    with pytest.raises(NetworkImportError, match="empty"):
        load_network(tmp_path / "empty.net.xml")
    (tmp_path / "text.net.xml").write_text("this is not xml at all")
    with pytest.raises(NetworkImportError, match="not valid XML"):
        load_network(tmp_path / "text.net.xml")
    with gzip.open(tmp_path / "trunc.net.xml.gz", "wt") as f:
        f.write('<net version="1.20"><edge id="a" from="x" to="y"><lane id="a_0" index="0" speed="1" ')
    with pytest.raises(NetworkImportError, match="trunc.net.xml.gz"):
        load_network(tmp_path / "trunc.net.xml.gz")
    nodes = '<node id="a" x="0" y="0"/><node id="b" x="200" y="0"/>'
    rail = _netconvert(tmp_path, nodes, '<edge id="r" from="a" to="b" numLanes="1" allow="rail"/>')
    with pytest.raises(NetworkImportError, match="no drivable lanes.*rail=1"):
        load_network(rail)


def test_missing_sumolib_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "sumolib", None)
    from roadloop.sumo import network

    with pytest.raises(NetworkImportError, match="install eclipse-sumo"):
        network.import_sumolib()
