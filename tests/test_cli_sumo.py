"""``roadloop scenarios import-sumo`` and ``roadloop eval`` on the imported suite, with clear errors."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from roadloop.cli import app
from roadloop.sumo.traffic import sumo_binary

runner = CliRunner()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("sumo-cli")
    net = d / "grid.net.xml"
    subprocess.run([sumo_binary("netgenerate"), "--grid", "--grid.number", "3", "--grid.length", "150", "-L", "2",
                    "--tls.guess", "true", "-o", str(net), "--no-warnings"], check=True, capture_output=True)
    out = d / "suite"
    r = runner.invoke(app, ["scenarios", "import-sumo", str(net), "--n", "3", "--out", str(out), "--seconds", "60",
                            "--warmup", "40", "--seed", "1"])
    assert r.exit_code == 0, r.output
    return net, out, r.output


def test_import_report_and_suite(grid):
    _, out, text = grid
    assert "lanes imported" in text and "skipped" in text and "sumo-grid" in text
    idx = json.loads((out / "suite.json").read_text())
    assert idx["name"] == "sumo-grid" and 1 <= len(idx["scenarios"]) <= 3


def test_eval_imported_suite_both_traffic_modes(grid, tmp_path):
    _, out, _ = grid
    js = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--suite", str(out), "--policy", "route-idm", "--json", str(js)])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["suite"] == "sumo-grid" and d["n"] >= 1 and 0.0 <= d["score"] <= 1.0
    r = runner.invoke(app, ["eval", "--suite", str(out), "--policy", "route-idm", "--traffic", "sumo"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "--suite", str(out), "--policy", "route-idm", "--agents", "idm"])
    assert r.exit_code == 0, r.output


def _flat(text: str) -> str:
    """CLI output without whitespace: rich wraps long paths at the console width, anywhere in them."""
    return "".join(text.split())


def test_bad_inputs_exit_2_naming_the_problem(grid, tmp_path):
    net, out, _ = grid
    bad = tmp_path / "broken.net.xml"
    bad.write_text("<net><edge")
    r = runner.invoke(app, ["scenarios", "import-sumo", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "broken.net.xml" in _flat(r.output)
    r = runner.invoke(app, ["scenarios", "import-sumo", str(tmp_path / "missing.net.xml")])
    assert r.exit_code == 2 and "not found" in r.output
    (tmp_path / "n.nod.xml").write_text('<nodes><node id="a" x="0" y="0"/><node id="b" x="100" y="0"/></nodes>')
    (tmp_path / "e.edg.xml").write_text('<edges><edge id="r" from="a" to="b" numLanes="1" allow="rail"/></edges>')
    rail = tmp_path / "rail.net.xml"
    subprocess.run([sumo_binary("netconvert"), "-n", str(tmp_path / "n.nod.xml"), "-e", str(tmp_path / "e.edg.xml"),
                    "-o", str(rail), "--no-warnings"], check=True, capture_output=True)
    r = runner.invoke(app, ["scenarios", "import-sumo", str(rail), "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "rail.net.xml" in _flat(r.output) and "nodrivablelanes" in _flat(r.output)
    trips = tmp_path / "bad.trips.xml"
    trips.write_text('<routes><trip id="t0" depart="0" from="A0B0" to="no_such_edge"/></routes>')
    r = runner.invoke(app, ["scenarios", "import-sumo", str(net), "--trips", str(trips), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "no_such_edge" in r.output
    r = runner.invoke(app, ["eval", "--suite", str(out), "--policy", "route-idm", "--traffic", "carla"])
    assert r.exit_code == 2 and "--traffic" in r.output
    r = runner.invoke(app, ["eval", "--suite", str(out), "--policy", "route-idm", "--traffic", "sumo",
                            "--agents", "idm"])
    assert r.exit_code == 2 and "--agents" in r.output


def test_named_sumo_suite_is_built_once_then_cached(grid, tmp_path, monkeypatch):
    from roadloop.scenarios.suites import load_suite
    from roadloop.sumo import suite as sumo_suite

    monkeypatch.setenv("ROADLOOP_CACHE", str(tmp_path))
    scs = load_suite(grid[1]).scenarios  # the imported grid scenarios stand in for the real ones
    calls = []
    monkeypatch.setattr(sumo_suite, "build_sumo_real", lambda split=None, **kw: calls.append(split) or scs)
    a = load_suite("sumo-real-train")
    b = load_suite("sumo-real-train")
    assert calls == ["train"] and a.name == "sumo-real-train" and a.content_hash == b.content_hash
    assert len(list((tmp_path / "suites").glob("sumo-real-train-*"))) == 1
    r = runner.invoke(app, ["eval", "--suite", "sumo-real-train", "--policy", "route-idm"])
    assert r.exit_code == 0 and "sumo-real-train" in r.output and calls == ["train"], r.output
