"""``roadloop demo``: the whole loop at toy size (``--quick``), its re-run reuse, its stage bookkeeping
and its config errors.  Real components throughout: scenario generation, expert, IL, RoaD and GRPO
training, MLflow on SQLite, the registry and its gates, the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roadloop.cli import app
from roadloop.demo import _fresh, _mark, changed_outcomes, load_demo_config
from roadloop.errors import ConfigError
from roadloop.eval.evaluate import EvalReport, RolloutSummary

# --quick runs both post-training methods (post: [road, grpo]); the full demo RoaD only
STAGES = ["scenario suites", "expert demonstrations", "imitation pre-training", "RoaD (rollouts as demonstrations)",
          "closed-loop GRPO", "evaluation on held-out scenarios", "gates and promotion", "report"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Run ``roadloop demo --quick`` twice into one folder; (out, first summary, second summary)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    runner = CliRunner()
    args = ["--threads", "1", "demo", "--quick", "--out", str(out)]
    r1 = runner.invoke(app, args)
    assert r1.exit_code == 0, r1.output + repr(r1.exception)
    first = json.loads((out / "summary.json").read_text())
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0, r2.output + repr(r2.exception)
    second = json.loads((out / "summary.json").read_text())
    assert "report:" in r2.output and "held-out scenarios" in r2.output
    return out, first, second


def test_demo_quick_runs_every_stage(quick_demo):
    out, first, _ = quick_demo
    assert [s["name"] for s in first["stages"]] == STAGES
    assert not any(s["reused"] for s in first["stages"])
    assert set(first["policies"]) == {"expert", "imitation", "post-trained"}
    n = {k: p["n"] for k, p in first["policies"].items()}
    assert len(set(n.values())) == 1 and n["expert"] > 0  # the same held-out matrix for all three
    assert first["policies"]["expert"]["collision_at_fault_rate"] == 0.0
    # everything lives under --out
    for p in ("suites/demo-train/suite.json", "suites/demo-val/suite.json", "data/train/manifest.json",
              "runs/il/final/model.safetensors", "runs/road/final/model.safetensors",
              "runs/grpo/final/model.safetensors", "home/mlflow.db",
              "home/registry.db", "report/index.html"):
        assert (out / p).is_file(), p
    html = (out / "report" / "index.html").read_text()
    assert "imitation" in html and "post-trained" in html and "expert" in html


def test_demo_report_opens_in_headless_chromium(quick_demo):
    from browser import opened_page

    out, first, _ = quick_demo
    with opened_page(out / "report" / "index.html", "#before-after") as page:
        table = page.inner_text("#before-after")
        for label in ("expert", "imitation", "post-trained"):
            assert label in table
        assert ("NOT PROMOTED" in page.inner_text("#gate")) != first["gate"]["promoted"]


def test_demo_registry_and_gates(quick_demo, monkeypatch):
    from roadloop.registry import Registry

    out, first, _ = quick_demo
    monkeypatch.setenv("ROADLOOP_HOME", str(out / "home"))
    reg = Registry()
    versions = reg.versions("roadloop-vla")
    assert len(versions) == 2  # imitation + post-trained, not re-registered by the second run
    champ = reg.champion("roadloop-vla")
    gate = first["gate"]
    assert gate["candidate"] == "roadloop-vla@2" and gate["results"]
    assert champ.version == (2 if gate["promoted"] else 1)
    assert gate["promoted"] == all(r["passed"] for r in gate["results"])
    actions = [a.action for a in reg.audit("roadloop-vla")]
    assert "register" in actions and any(a.startswith("promote") for a in actions)
    assert reg.verify_audit() == []


def test_demo_rerun_reuses_everything(quick_demo):
    _, first, second = quick_demo
    reused = {s["name"]: s["reused"] for s in second["stages"]}
    for name in STAGES[:6]:
        assert reused[name], f"stage '{name}' was rebuilt on a re-run"
    if not first["gate"]["promoted"]:  # the recorded refusal stands: not gated (nor audited) again
        assert reused["gates and promotion"] and second["gate"]["results"] == first["gate"]["results"]
    assert second["total_seconds"] < first["total_seconds"]
    # same inputs, same outcome: bit-identical evaluation numbers
    for k in ("expert", "imitation", "post-trained"):
        assert second["policies"][k]["score"] == first["policies"][k]["score"]


def test_demo_copied_folder_reuses_its_training_stages(quick_demo, tmp_path):
    """Stage keys hold content hashes, not paths: a copy of the folder reuses suites, data and runs."""
    import shutil

    out, _, _ = quick_demo
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    r = CliRunner().invoke(app, ["--threads", "1", "demo", "--quick", "--out", str(copy)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    reused = {s["name"]: s["reused"] for s in json.loads((copy / "summary.json").read_text())["stages"]}
    assert all(reused[n] for n in STAGES[:5]), reused


def test_demo_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train_per_family"):
        load_demo_config(["train_per_family=0"])
    with pytest.raises(ConfigError, match="nope"):
        load_demo_config(["nope=1"])
    for post in ("[]", "[ppo]", "[road,road]"):
        with pytest.raises(ConfigError, match="demo.post"):
            load_demo_config([f"post={post}"])
    assert load_demo_config().post == ["road"] and load_demo_config(quick=True).post == ["road", "grpo"]
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "x"), "eval_seeds=[]"])
    assert r.exit_code != 0 and "eval_seeds" in r.output
    assert not (tmp_path / "x" / "suites").exists()  # refused before any work


def test_stage_keys(tmp_path):
    d = tmp_path / "stage"
    assert not _fresh(d, "a")
    d.mkdir()
    (d / "partial.bin").write_bytes(b"x")
    _mark(d, "a", done=False)
    assert not _fresh(d, "a") and (d / "partial.bin").exists()  # interrupted, same key: kept to resume
    _mark(d, "a", done=True)
    assert _fresh(d, "a")
    assert not _fresh(d, "b") and not d.exists()  # other inputs: cleared


def test_demonstrations_stage_is_collected_again_for_a_new_format(monkeypatch):
    """A demo folder whose demonstrations an older format wrote gets a stale key (collected again, not
    read and refused by ``load_manifest``)."""
    import importlib

    from roadloop.demo import demos_stage_key

    collect = importlib.import_module("roadloop.data.collect")  # the package exports the function of that name
    now = demos_stage_key("abc", 80)
    assert demos_stage_key("abc", 80) == now and demos_stage_key("abd", 80) != now != demos_stage_key("abc", 40)
    monkeypatch.setattr(collect, "VERSION", collect.VERSION - 1)
    assert demos_stage_key("abc", 80) != now


def _rep(rows: list[tuple[str, float, float, float]]) -> EvalReport:
    rs = [RolloutSummary(f"{sid}#0@p", sid, "fam", 0, False, "", {"score": s, "collision_at_fault": c, "offroad": o})
          for sid, s, c, o in rows]
    return EvalReport("p", "s", "", 0, {}, {}, rs, 0, 0.0)


def test_changed_outcomes_orders_fixed_then_regressed():
    before = _rep([("a", 0.0, 1.0, 0.0), ("b", 0.0, 0.0, 1.0), ("c", 0.9, 0.0, 0.0), ("d", 0.5, 0.0, 0.0)])
    after = _rep([("a", 0.7, 0.0, 0.0), ("b", 0.9, 0.0, 0.0), ("c", 0.0, 1.0, 0.0), ("d", 0.6, 0.0, 0.0)])
    assert changed_outcomes(before, after, 4) == [("b", 0, "fixed"), ("a", 0, "fixed"), ("c", 0, "regressed")]
    assert changed_outcomes(before, after, 1) == [("b", 0, "fixed")]
    assert changed_outcomes(after, before, 4) == [("c", 0, "fixed"), ("b", 0, "regressed"), ("a", 0, "regressed")]
    assert changed_outcomes(before, before, 4) == []
