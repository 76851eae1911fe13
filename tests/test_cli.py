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


def test_compare_pairs_seed_independent_policies_once_per_scenario():
    """Two greedy (or rule-based) evaluations under seeds 0 and 1 hold each rollout twice: compare pairs each
    scenario once; where one side samples, every (scenario, seed) pair is its own draw and stays."""
    from roadloop.eval.compare import compare_reports
    from roadloop.eval.evaluate import EvalReport, RolloutSummary

    def report(policy: str, seed: int, scores: list[float], det: bool) -> EvalReport:
        rollouts = [RolloutSummary(f"f/{i}#{seed}@{policy}", f"f/{i}", "f", seed, False, "",
                                   {"score": v, "collision_at_fault": 0.0, "offroad": 0.0})
                    for i, v in enumerate(scores)]
        return EvalReport(policy, "s", "h", seed, {}, {}, rollouts, 0, float("nan"), extra={"seed_independent": det})

    a = [0.1 * i for i in range(12)]
    b = [0.1 * i + (0.2 if i % 2 else 0.0) for i in range(12)]
    greedy_a = [report("a", s, a, True) for s in (0, 1)]
    greedy_b = [report("b", s, b, True) for s in (0, 1)]
    row = compare_reports(greedy_a, greedy_b)[0]
    assert row.metric == "score" and row.n == 12 and row.change == pytest.approx(0.1)
    assert row.halfwidth == pytest.approx(compare_reports(greedy_a[:1], greedy_b[:1])[0].halfwidth)
    sampled_b = [report("b", s, b, False) for s in (0, 1)]
    row2 = compare_reports(greedy_a, sampled_b)[0]
    assert row2.n == 24 and row2.scenarios == 12
    # the two seeds' differences are the same here: clustered by scenario, the copies add no evidence
    assert row2.halfwidth == pytest.approx(row.halfwidth)


def test_paired_interval_is_clustered_by_scenario():
    """Differences of one scenario under several seeds are one unit of evidence: the cluster-robust half-width
    is the plain one when every value is its own cluster, is unchanged by copying every cluster, and widens
    when a scenario's seeds move together."""
    import math

    from roadloop.errors import RoadloopError
    from roadloop.eval.compare import mean_and_halfwidth

    d = [0.3, -0.1, 0.5, 0.2, 0.0, 0.4]
    m, hw = mean_and_halfwidth(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 5)
    assert hw == pytest.approx(2.5706 * sd / math.sqrt(6), rel=1e-4)  # t_{0.975, 5}
    assert mean_and_halfwidth(d, list("abcdef")) == (m, hw)
    assert mean_and_halfwidth(d + d, list("abcdef") * 2) == pytest.approx((m, hw))
    assert mean_and_halfwidth(d + d)[1] < hw  # unclustered, the copies would look like twice the evidence
    # hand-computed CR1 variance: clusters {a: 0.3, -0.1}, {b: 0.5, 0.2}, {c: 0.0, 0.4}
    sums = [0.3 - m - 0.1 - m, 0.5 - m + 0.2 - m, 0.0 - m + 0.4 - m]
    cr1 = 4.3027 * math.sqrt(1.5 * sum(s * s for s in sums) / 36)  # t_{0.975, 2}: 3 clusters
    assert mean_and_halfwidth(d, list("aabbcc"))[1] == pytest.approx(cr1, rel=1e-4)
    assert math.isnan(mean_and_halfwidth(d, ["a"] * 6)[1])  # one scenario: no interval
    with pytest.raises(RoadloopError, match="cluster keys"):
        mean_and_halfwidth(d, ["a", "b"])
    with pytest.raises(RoadloopError, match="6 values but 7 cluster keys"):
        mean_and_halfwidth(d, list("abcdefg"))


def test_eval_decoding_options_name_the_decoding(tmp_path, monkeypatch):
    """`roadloop eval --temperature/--top-p` set a learned policy's decoding, which is part of its version (and
    of every rollout id); a deterministic policy and out-of-range values are clear errors."""
    import torch

    from roadloop.policies.vla.model import VLAConfig, VLAModel, save_checkpoint

    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(VLAModel(VLAConfig(d_model=32, n_layers=1, n_heads=2, max_text_len=8, raster_size=32,
                                       patch=8)).eval(), ckpt)
    js = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--policy", str(ckpt), "--suite", "smoke", "--temperature", "0.6",
                            "--top-p", "0.98", "--json", str(js)])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["policy"].endswith("+t0.6p0.98") and d["rollouts"][0]["rollout_id"].endswith("+t0.6p0.98")
    assert d["extra"]["policy_settings"] == {"temperature": 0.6, "top_p": 0.98, "greedy_actions": "mean"}
    assert d["extra"]["seed_independent"] is False
    r = runner.invoke(app, ["eval", "--policy", "expert", "--suite", "smoke", "--top-p", "0.9"])
    assert r.exit_code == 2 and "--top-p applies to sampling policies" in " ".join(r.output.split())
    r = runner.invoke(app, ["eval", "--policy", str(ckpt), "--suite", "smoke", "--top-p", "1.5"])
    assert r.exit_code == 2 and "top_p must be in (0, 1]" in " ".join(r.output.split())
