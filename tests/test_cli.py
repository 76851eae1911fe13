"""A smoke run of every CLI command, and the clear errors for bad names."""

import json

from typer.testing import CliRunner

from roadloop.cli import app

runner = CliRunner()


def test_bench_sim_writes_json(tmp_path):
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", "sim", "--batch", "1,4", "--steps", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert set(d["agent_steps_per_s"]) == {"1", "4"} and d["agent_steps_per_s"]["4"] > 0


def test_eval_smoke_json_report_and_replay(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "home"))
    js, rep = tmp_path / "e.json", tmp_path / "report"
    r = runner.invoke(app, ["eval", "--policy", "route-idm", "--suite", "smoke", "--json", str(js),
                            "--report", str(rep), "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    for key in ("score", "score_ci", "collision_at_fault_rate", "offroad_rate", "progress", "nuplan_score",
                "per_family"):
        assert key in d
    assert len(d["per_family"]) >= 9
    assert (rep / "index.html").exists()
    full = json.loads(js.read_text())
    rid = full["rollouts"][0]["rollout_id"]
    r = runner.invoke(app, ["replay", rid, "--gif", str(tmp_path / "r.gif")])
    assert r.exit_code == 0, r.output
    assert "identical" in r.output and (tmp_path / "r.gif").exists()


def test_unknown_policy_and_suite_are_clear_errors():
    r = runner.invoke(app, ["eval", "--policy", "nope", "--suite", "smoke"])
    assert r.exit_code == 2 and "unknown policy 'nope'" in r.output and "route-idm" in r.output
    r = runner.invoke(app, ["eval", "--policy", "route-idm", "--suite", "no-such-suite"])
    assert r.exit_code == 2 and "no-such-suite" in r.output


def test_scenarios_list():
    r = runner.invoke(app, ["scenarios", "list"])
    assert r.exit_code == 0 and "cut_in" in r.output and "smoke" in r.output
