"""A smoke run of every CLI command, and the clear errors for bad names."""

import json

import pytest
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


def _strict(name: str):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_compare_pairs_two_evaluations(tmp_path):
    """`roadloop compare`: the paired change of every metric, checked against the two JSONs by hand, and
    clear errors for evaluations that cannot be paired and for a file that is not an evaluation."""
    paths = {}
    for pol, seed in (("route-idm", 0), ("expert", 0), ("expert", 1)):
        paths[pol, seed] = tmp_path / f"{pol}{seed}.json"
        r = runner.invoke(app, ["eval", "--policy", pol, "--suite", "smoke", "--seed", str(seed),
                                "--json", str(paths[pol, seed]), "--batch-size", "16"])
        assert r.exit_code == 0, r.output
    out = tmp_path / "cmp.json"
    r = runner.invoke(app, ["compare", str(paths["route-idm", 0]), str(paths["expert", 0]), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert all(w in r.output for w in ("route-idm@1", "expert@1", "10 paired", "score", "incident"))
    rows = {row["metric"]: row for row in json.loads(out.read_text(), parse_constant=_strict)["rows"]}
    assert rows["offroad"]["relative"] is None  # 0 -> 0: no relative change, written as null (strict JSON)
    ref = json.loads(paths["route-idm", 0].read_text())["rollouts"]
    before = {(x["scenario_id"], x["seed"]): x["metrics"] for x in ref}
    after = json.loads(paths["expert", 0].read_text())["rollouts"]
    diffs = [x["metrics"]["score"] - before[x["scenario_id"], x["seed"]]["score"] for x in after]
    assert rows["score"]["n"] == len(diffs) >= 10
    assert abs(rows["score"]["change"] - sum(diffs) / len(diffs)) < 1e-9
    assert rows["score"]["change"] > 0  # the expert records the smoke logs: it scores 1.0, route-idm does not
    inc = [float(bool(x["metrics"]["collision_at_fault"] or x["metrics"]["offroad"])) for x in after]
    assert abs(rows["incident"]["after"] - sum(inc) / len(inc)) < 1e-9
    for row in rows.values():
        noise = abs(row["change"]) <= row["halfwidth"]
        assert (row["verdict"] in ("within noise", "unchanged")) == noise
    assert rows["offroad"]["verdict"] == "unchanged"  # neither policy leaves the road on smoke
    # other seeds: nothing to pair
    r = runner.invoke(app, ["compare", str(paths["route-idm", 0]), str(paths["expert", 1])])
    assert r.exit_code != 0 and "same --seed" in " ".join(r.output.split())
    bad = tmp_path / "bad.json"
    bad.write_text('{"policy": "x"}')
    r = runner.invoke(app, ["compare", str(bad), str(paths["expert", 0])])
    assert r.exit_code != 0 and "not a roadloop eval --json file" in " ".join(r.output.split())
    r = runner.invoke(app, ["compare", str(tmp_path / "missing.json"), str(paths["expert", 0])])
    assert r.exit_code != 0 and "no such evaluation JSON" in " ".join(r.output.split())
    # --by-family: smoke holds one scenario per family, too few pairs for a family's interval
    r = runner.invoke(app, ["compare", str(paths["route-idm", 0]), str(paths["expert", 0]), "--by-family",
                            "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "fewer than 5 pairs, left out" in " ".join(r.output.split()) and "cut_in(1)" in "".join(r.output.split())
    assert json.loads(out.read_text(), parse_constant=_strict)["families"] == {}


def test_compare_by_family_pairs_within_each_family():
    from roadloop.eval.compare import compare_by_family
    from roadloop.eval.evaluate import EvalReport, RolloutSummary

    def report(policy: str, scores: dict[str, list[float]], offroad: dict[str, list[int]]) -> EvalReport:
        rollouts = [RolloutSummary(f"{f}/{i}#0@{policy}", f"{f}/{i}", f, 0, False, "",
                                   {"score": v, "collision_at_fault": 0.0, "offroad": float(offroad[f][i])})
                    for f, vs in scores.items() for i, v in enumerate(vs)]
        return EvalReport(policy, "s", "h", 0, {}, {}, rollouts, 0, float("nan"))

    before = report("a", {"merge": [0.2, 0.4, 0.5, 0.1, 0.3, 0.6], "cut_in": [0.5] * 6, "roundabout": [0.1] * 3},
                    {"merge": [1, 1, 0, 1, 0, 0], "cut_in": [0] * 6, "roundabout": [1] * 3})
    after = report("b", {"merge": [0.6, 0.5, 0.9, 0.4, 0.3, 0.8], "cut_in": [0.4, 0.5, 0.3, 0.5, 0.2, 0.5],
                         "roundabout": [0.9] * 3},
                   {"merge": [0, 0, 0, 1, 0, 0], "cut_in": [0, 1, 1, 0, 1, 0], "roundabout": [0] * 3})
    rows, few = compare_by_family([before], [after])
    assert few == {"roundabout": 3} and sorted(rows) == ["cut_in", "merge"]
    merge = {r.metric: r for r in rows["merge"]}
    assert merge["score"].n == 6 and merge["score"].change == pytest.approx((0.4 + 0.1 + 0.4 + 0.3 + 0 + 0.2) / 6)
    assert merge["score"].verdict == "better" and merge["incident"].change == pytest.approx(-2 / 6)
    cut = {r.metric: r for r in rows["cut_in"]}
    assert cut["incident"].before == 0.0 and cut["incident"].after == pytest.approx(0.5)
    assert cut["score"].change == pytest.approx(-0.6 / 6) and cut["score"].verdict == "within noise"
