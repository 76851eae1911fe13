"""Release discipline: pure safety gates, the reasoning-consistency metric, manifests, and the registry on a real
SQLite-backed MLflow store (register, gate, promote, refuse, rollback, audit; bad inputs and concurrency)."""

import copy
import dataclasses
import json
import math
import sqlite3
import threading
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from roadloop.cli import app
from roadloop.errors import ConfigError, RoadloopError
from roadloop.eval.evaluate import EvalReport, RolloutSummary, evaluate, report_from_json
from roadloop.eval.metrics import METRICS
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import PRESETS, VLAModel, save_checkpoint
from roadloop.registry import (
    ConcurrentChangeError,
    GateFailedError,
    IntegrityError,
    Registry,
    RegistryDatabaseError,
    RegistryError,
    RegistryLockedError,
    UnknownModelError,
    load_gate_config,
    parse_ref,
    register_candidate,
    run_gates,
)
from roadloop.registry.gates import PROCEDURAL_FAMILIES, GateSummary
from roadloop.registry.lineage import code_version, verify_manifest, write_manifest
from roadloop.registry.matrix import merge_reports
from roadloop.registry.store import GateRun
from roadloop.testing import scenes
from roadloop.testing.policies import RouteSpeed

runner = CliRunner()
SMOKE_GATES = ["matrix.suites=[smoke]", "matrix.seeds=[0]", "matrix.batch_size=16", "envelope.maps=[procedural]",
               f"envelope.families=[{','.join(PROCEDURAL_FAMILIES)}]", "envelope.min_rollouts=1",
               "thresholds.require_reasoning=false", "thresholds.reasoning_consistency_min=0.0",
               "thresholds.comfort_violation_max=1.0", "thresholds.family_score_drop=0.1"]


# ---------------------------------------------------------------------------------------------
# pure gates on constructed reports

def fake_report(rows: dict[str, list[dict]], maps: dict | None = None, key: str = "k", n_failed: int = 0):
    """An EvalReport over rollouts whose metrics are given per family (unlisted metrics 0, km 0.1)."""
    rollouts = []
    for fam, ms in rows.items():
        for i, m in enumerate(ms):
            full = {k: 0.0 for k in METRICS}
            full.update(km=0.1, **m)
            rollouts.append(RolloutSummary(f"{fam}/{i:06d}#0@p@1", f"{fam}/{i:06d}", fam, 0, i < n_failed, "", full))
    base = EvalReport("p@1", "matrix:t", "h", 0, {k: None for k in METRICS}, {}, rollouts, 0, 0.0)
    n = len(rollouts)
    return merge_reports([base], "matrix:t", "h", {"matrix": {"key": key}, "maps": maps or {"procedural": n}})


def rows(n=20, score=0.8, coll=1, off=1, comfort=2, reason=0.9, families=("a", "b")):
    """n rollouts per family: ``coll`` / ``off`` / ``comfort`` of them with the event."""
    return {f: [{"score": score, "collision_at_fault": float(i < coll), "offroad": float(n - 1 - i < off),
                 "comfort_violation": float(i % 10 < comfort * 10 // n), "reasoning_consistency": reason}
                for i in range(n)] for f in families}


@pytest.fixture(scope="module")
def gcfg():
    return load_gate_config(overrides=["envelope.families=[a,b]", "envelope.maps=[procedural]",
                                       "envelope.min_rollouts=10", "thresholds.comfort_violation_max=0.3"])


def test_gates_pass_equal_and_better_candidates(gcfg):
    champ = fake_report(rows())
    s = run_gates(fake_report(rows()), champ, gcfg)
    assert s.passed and s.failed == [], s.reasons()
    better = fake_report(rows(score=0.9, coll=0, off=0, comfort=1, reason=0.95))
    assert run_gates(better, champ, gcfg).passed
    # within the champion's CI on the safety rates: still passes
    assert run_gates(fake_report(rows(coll=2)), champ, gcfg).passed


@pytest.mark.parametrize("change, gate", [
    (dict(coll=8), "collision_at_fault"), (dict(off=8), "offroad"), (dict(score=0.7), "mean_score"),
    (dict(comfort=8), "comfort"), (dict(reason=0.6), "reasoning"),
])
def test_each_degradation_fails_its_gate(gcfg, change, gate):
    s = run_gates(fake_report(rows(**change)), fake_report(rows()), gcfg)
    assert not s.passed and gate in s.failed, s.reasons()
    assert all(r.startswith(tuple(s.failed)) for r in s.reasons())


def test_family_drop_envelope_failed_rollouts_and_matrix_mismatch(gcfg):
    champ = fake_report(rows())
    r = rows()
    r["b"] = [{**m, "score": 0.7} for m in r["b"]]  # one family 0.1 worse: mean drops 0.05 too
    s = run_gates(fake_report(r), champ, gcfg)
    assert "family_score" in s.failed and any("family 'b'" in x for x in s.reasons())
    s = run_gates(fake_report(rows(families=("a",))), champ, gcfg)  # family b never validated
    assert {"envelope", "family_score"} <= set(s.failed)
    assert any("family 'b' of the operating envelope was not validated" in x for x in s.reasons())
    s = run_gates(fake_report(rows(), maps={"procedural": 40, "bs3d": 0}), champ,
                  dataclasses.replace(gcfg, envelope=dataclasses.replace(gcfg.envelope, maps=["procedural", "bs3d"])))
    assert s.failed == ["envelope"] and "map 'bs3d'" in s.reasons()[0]
    s = run_gates(fake_report(rows(n=8)), fake_report(rows(n=8)), gcfg)
    assert s.failed == ["envelope"] and "8 rollouts (< 10)" in s.reasons()[0]
    assert run_gates(fake_report(rows(), n_failed=1), champ, gcfg).failed == ["failed_rollouts"]
    assert run_gates(fake_report(rows(), key="other"), champ, gcfg).failed == ["comparable"]


def test_first_release_and_missing_reasoning(gcfg):
    s = run_gates(fake_report(rows(score=0.1)), None, gcfg)  # no champion: relative gates pass with a note
    assert s.passed and "no champion" in s.results[0].reasons[0]
    s = run_gates(fake_report(rows(comfort=8)), None, gcfg)
    assert s.failed == ["comfort"]  # absolute bounds still apply
    nan = fake_report(rows(reason=math.nan))
    assert run_gates(nan, None, gcfg).failed == ["reasoning"]
    lax = dataclasses.replace(gcfg, thresholds=dataclasses.replace(gcfg.thresholds, require_reasoning=False))
    assert run_gates(nan, fake_report(rows()), lax).passed


def test_gate_config_yaml_and_validation():
    cfg = load_gate_config()  # the shipped roadloop/configs/gates.yaml
    assert cfg.matrix.suites == ["val", "sumo-real-val"] and "sumo_highway" in cfg.envelope.families
    assert "fokr_bs_demo" in cfg.envelope.maps and cfg.thresholds.safety_slack == 0.0
    assert load_gate_config(overrides=["thresholds.score_tolerance=0.01"]).sha256 != cfg.sha256
    with pytest.raises(ConfigError, match="family_score_drop"):
        load_gate_config(overrides=["thresholds.family_score_drop=-1"])
    with pytest.raises(ConfigError, match="nope"):
        load_gate_config(overrides=["thresholds.nope=1"])


def test_report_json_roundtrip_gives_the_same_verdict(gcfg):
    champ, cand = fake_report(rows()), fake_report(rows(off=8))
    back = [report_from_json(json.loads(json.dumps(r.to_json()))) for r in (cand, champ)]
    assert run_gates(*back, gcfg).to_json() == run_gates(cand, champ, gcfg).to_json()


def test_parse_ref():
    assert parse_ref("champion") == ("roadloop-vla", "champion")
    assert parse_ref("m@3") == ("m", 3) and parse_ref("m/v4") == ("m", 4) and parse_ref("7") == ("roadloop-vla", 7)
    assert parse_ref("m@Champion") == ("m", "champion")
    with pytest.raises(UnknownModelError, match="NAME@VERSION"):
        parse_ref("m@latest")


# ---------------------------------------------------------------------------------------------
# reasoning-consistency metric

class Narrating(RouteSpeed):
    """States its own plan's meta-actions (``lie``: a wrong turn) -- or nothing (``mute``)."""

    name = "narrating"
    writes_coc = True

    def __init__(self, speed, lie=False, mute=False):
        super().__init__(speed)
        self.lie, self.mute = lie, mute

    def act(self, obs):
        from roadloop.reasoning.meta_action import Lateral, Longitudinal, meta_actions

        out = super().act(obs)
        st = obs.state
        lon, lat = meta_actions(st.xy[:, 0], st.yaw[:, 0], st.speed[:, 0], out.plan_xy)
        texts = []
        for b in range(obs.batch_size):
            la = Lateral.TURN_LEFT if self.lie else Lateral(int(lat[b]))
            texts.append("" if self.mute else f"{Longitudinal(int(lon[b])).phrase} and {la.phrase}")
        return dataclasses.replace(out, reasoning=texts)


def test_reasoning_consistency_metric():
    sc = [scenes.build(scenes.straight_road(60, sid=f"test/{i}")[0]) for i in range(2)]
    honest, _ = evaluate(Narrating(10.0), sc, batch_size=2)
    liar, _ = evaluate(Narrating(10.0, lie=True), sc, batch_size=2)
    mute, _ = evaluate(Narrating(10.0, mute=True), sc, batch_size=2)
    assert honest.overall["reasoning_consistency"].mean == 1.0 and honest.overall["reasoning_consistency"].n == 2
    assert liar.overall["reasoning_consistency"].mean == 0.0
    assert math.isnan(mute.overall["reasoning_consistency"].mean) and mute.overall["reasoning_consistency"].n == 0
    g = honest.overall["reasoning_grounding"]
    assert g.n == 2 and 0.0 <= g.mean <= 1.0  # checked against the scene at each decision

    class Trace(Narrating):  # same texts, but a rule trace the policy does not offer as CoC: not graded
        writes_coc = False

    trace, _ = evaluate(Trace(10.0), sc, batch_size=2)
    for k in ("reasoning_consistency", "reasoning_grounding"):
        assert math.isnan(trace.overall[k].mean) and trace.overall[k].n == 0


# ---------------------------------------------------------------------------------------------
# manifests and code version

def test_manifest_detects_missing_truncated_modified_and_extra(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    (d / "config.json").write_text("{}")
    sha = write_manifest(d)
    verify_manifest(d, sha, "t")
    (d / "model.safetensors").write_bytes(b"x" * 60)
    with pytest.raises(IntegrityError, match=r"model.safetensors is truncated \(60 bytes, manifest says 100\)"):
        verify_manifest(d, sha, "t")
    (d / "model.safetensors").write_bytes(b"y" + b"x" * 99)
    with pytest.raises(IntegrityError, match="model.safetensors was modified"):
        verify_manifest(d, sha, "t")
    (d / "model.safetensors").write_bytes(b"x" * 100)
    (d / "evil.py").write_text("")
    with pytest.raises(IntegrityError, match="unexpected file"):
        verify_manifest(d, sha, "t")
    (d / "evil.py").unlink()
    (d / "model.safetensors").write_bytes(b"z" * 100)
    write_manifest(d)  # replaced weights with a re-written manifest: the manifest's recorded hash catches it
    with pytest.raises(IntegrityError, match="manifest.json was modified"):
        verify_manifest(d, sha, "t")
    (d / "config.json").unlink()
    with pytest.raises(IntegrityError, match="config.json is missing"):
        verify_manifest(d, None, "t")


def test_code_version_records_commit_and_dirty_flag():
    cv = code_version()
    assert len(cv["source_sha256"]) == 64
    if cv["git_commit"] is not None:
        assert len(cv["git_commit"]) == 40 and isinstance(cv["git_dirty"], bool)


# ---------------------------------------------------------------------------------------------
# the registry on a real SQLite-backed MLflow store

def _const_model(accel_bin=20, curv_bin=20):
    """Tiny VLA model that always says nothing and drives one (accel, curvature) bin.  Patch stem: the
    fixture's noisy variants were chosen for it (``champ`` worse than ``better`` on every smoke family)."""
    torch.manual_seed(0)
    m = VLAModel(dataclasses.replace(PRESETS["tiny"], stem="patch"))
    with torch.no_grad():
        for h in (m.text_head, m.accel_head, m.curv_head):
            h.weight.zero_()
            h.bias.fill_(-10.0)
        m.text_head.bias[tok.EOS_ID] = 10.0
        m.accel_head.bias[accel_bin] = 10.0
        m.curv_head.bias[curv_bin] = 10.0
    return m.eval()


def _noisy(m, std, seed):
    m2 = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return m2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow SQLite store (creating one costs seconds) + checkpoints: ``better`` (constant straight driving),
    ``champ`` (it with weight noise: worse everywhere on smoke), ``degraded`` (``champ`` + more noise)."""
    home = tmp_path_factory.mktemp("reghome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROADLOOP_HOME", str(home))
        mp.setenv("ROADLOOP_ACTOR", "tester@ci")
        for v in ("ROADLOOP_TRACKING_URI", "MLFLOW_TRACKING_URI", "ROADLOOP_REGISTRY_DB"):
            mp.delenv(v, raising=False)
        better = _const_model()
        champ = _noisy(better, 0.6, 1)
        cks = {}
        for name, m in [("champ", champ), ("degraded", _noisy(champ, 1.0, 2)), ("better", better),
                        ("other", _noisy(better, 0.01, 3)), ("other2", _noisy(better, 0.01, 4))]:
            cks[name] = save_checkpoint(m, home / "ck" / name, extra={"trainer": "test", "dataset": f"ds-{name}"})
        gates = home / "gates-smoke.yaml"
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.from_dotlist(SMOKE_GATES), gates)
        Registry().versions()  # create the state database
        yield {"home": home, "ck": cks, "gates": gates, "cfg": load_gate_config([gates])}


def _cli(*args):
    """Run the CLI; output with whitespace collapsed (rich wraps long lines)."""
    r = runner.invoke(app, [str(a) for a in args])
    return SimpleNamespace(exit_code=r.exit_code, output=" ".join(r.output.split()))


def _eval_champion(path):
    r = _cli("eval", "--policy", "champion", "--suite", "smoke", "--json", path, "--batch-size", "16")
    assert r.exit_code == 0, r.output
    d = json.loads(path.read_text())
    d.pop("seconds")
    return d


@pytest.mark.slow
def test_end_to_end_register_gate_refuse_promote_rollback(store, tmp_path):
    ck, gates = store["ck"], store["gates"]
    (tmp_path / "lin.json").write_text(json.dumps({"trainer": "grpo", "run_id": None, "suites": {"train": "abc"},
                                                   "config": {"lr": 1e-4}, "parent": str(ck["better"])}))
    r = _cli("registry", "register", ck["champ"], "--lineage", tmp_path / "lin.json", "--reason", "baseline")
    assert r.exit_code == 0 and "registered" in r.output, r.output
    reg = Registry()
    v1 = reg.versions()[-1]
    v2 = reg.register(ck["degraded"], {"parent": str(ck["champ"]), "parent_weights_sha256": v1.weights_sha256})
    v3 = reg.register(ck["better"], {"trainer": "road"})
    assert v1.lineage["trainer"] == "grpo" and v1.lineage["config"] == {"lr": 1e-4}
    assert v1.lineage["dataset_hash"] == "ds-champ" and v1.lineage["suites"] == {"train": "abc"}
    assert v1.lineage["code"]["source_sha256"] and "git_dirty" in v1.lineage["code"]
    assert v2.lineage["parent"]["registry"] == v1.ref  # lineage links the registered parent
    assert reg.register(ck["degraded"]).version == v2.version  # idempotent

    # first release: no champion, absolute gates only
    r = _cli("registry", "promote", v1.ref, "--config", gates, "--reason", "first release")
    assert r.exit_code == 0 and f"{v1.ref} is the champion" in r.output, r.output
    j1 = _eval_champion(tmp_path / "j1.json")

    # the champion with noise added to its weights: refused, failing gates named, champion unchanged
    r = _cli("gate", v2.ref, "--config", gates)
    assert r.exit_code == 1 and "FAILED" in r.output and "mean_score" in r.output, r.output
    r = _cli("registry", "promote", v2.ref, "--config", gates)
    assert r.exit_code == 1 and "refused" in r.output and "mean_score" in r.output, r.output
    assert reg.champion().version == v1.version

    # a genuinely better one (better on every family of smoke): gate report file -> promoted
    r = _cli("gate", v3.ref, "--config", gates, "--json", tmp_path / "g3.json")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    g3 = json.loads((tmp_path / "g3.json").read_text())
    a, b = g3["candidate_report"]["per_family"], g3["champion_report"]["per_family"]
    assert all(a[f]["score"]["mean"] >= b[f]["score"]["mean"] for f in b)
    assert g3["candidate_report"]["score"] > g3["champion_report"]["score"]
    r = _cli("registry", "promote", v3.ref, "--config", gates, "--gate-report", tmp_path / "g3.json")
    assert r.exit_code == 0 and f"{v3.ref} is the champion" in r.output, r.output
    assert reg.champion().version == v3.version
    assert str(reg._client().get_model_version_by_alias("roadloop-vla", "champion").version) == str(v3.version)

    # a forced promotion of the degraded one is possible, and recorded as such
    p = reg.promote(v2.ref, store["cfg"], force=True, reason="incident drill")
    assert p.change.forced and not p.gate_run.passed and p.gate_run.reused is False

    # rollback twice: v2 -> v3 -> v1, then the champion's report is reproduced exactly
    r = _cli("registry", "rollback", "--reason", "drill over")
    assert r.exit_code == 0 and f"{v3.ref} is the champion again" in r.output, r.output
    r = _cli("registry", "rollback", "--reason", "back to baseline")
    assert r.exit_code == 0 and f"{v1.ref} is the champion again" in r.output, r.output
    assert _eval_champion(tmp_path / "j2.json") == j1
    r = _cli("registry", "rollback")
    assert r.exit_code == 2 and "first champion" in r.output

    n1, n2, n3 = v1.version, v2.version, v3.version
    actions = [(a.action, a.version) for a in reg.audit()]
    assert actions == [("register", n1), ("register", n2), ("register", n3), ("gate-pass", n1), ("promote", n1),
                       ("gate-fail", n2), ("promote-refused", n2), ("gate-pass", n3), ("gate-pass", n3),
                       ("promote", n3), ("gate-fail", n2), ("promote-forced", n2), ("rollback", n3),
                       ("rollback", n1)], actions
    audit = reg.audit()
    assert all(a.actor == "tester@ci" for a in audit) and audit[-1].reason == "back to baseline"
    assert "mean_score" in audit[6].details["failed"] and audit[11].reason == "incident drill"
    assert audit[8].details["origin"] == "file" and audit[9].details["gate_origin"] == "file"
    assert reg.verify_audit() == []
    r = _cli("registry", "list")
    assert r.exit_code == 0 and f"roadloop-vla (champion: {n1})" in r.output, r.output
    r = _cli("registry", "show", v3.ref)
    assert r.exit_code == 0 and "artifacts" in r.output and "ok" in r.output, r.output
    r = _cli("registry", "audit", "--verify")
    assert r.exit_code == 0 and "promote-forced" in r.output and "intact" in r.output, r.output
    assert [c.version for c in reg.champion_history()] == [n1, n3, n2, n3, n1]
    assert reg.champion_history()[-1].envelope["families"] == PROCEDURAL_FAMILIES  # released envelope recorded


def test_tampered_or_truncated_artifacts_are_refused(store, tmp_path):
    reg = Registry(db=tmp_path / "r.db")
    mv = reg.register(store["ck"]["other"])
    d = reg.artifact_dir(mv)
    w = d / "model.safetensors"
    good = w.read_bytes()
    try:
        w.write_bytes(good[: len(good) // 2])
        with pytest.raises(IntegrityError, match=f"{mv.ref}: artifact model.safetensors is truncated"):
            reg.promote(mv.ref, store["cfg"])
        with pytest.raises(IntegrityError, match="truncated"):
            reg.load_policy(mv.ref)
        w.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        with pytest.raises(IntegrityError, match="was modified"):
            reg.promote(mv.ref, store["cfg"], force=True, reason="even forced")
    finally:
        w.write_bytes(good)
    assert reg.champion() is None and [a.action for a in reg.audit()] == ["register"]


def test_bad_names_corrupt_and_locked_databases(store, tmp_path):
    reg = Registry(db=tmp_path / "r.db", lock_timeout=0.2)
    with pytest.raises(UnknownModelError, match="no registered model 'nope'.*empty"):
        reg.promote("nope@1", store["cfg"])
    mv = reg.register(store["ck"]["other"], name="m1")
    with pytest.raises(UnknownModelError, match="no registered model 'nope'.*known: m1"):
        reg.promote("nope@1", store["cfg"])
    with pytest.raises(UnknownModelError, match="no version 9"):
        reg.promote("m1@9", store["cfg"])
    with pytest.raises(UnknownModelError, match="no champion yet"):
        reg.resolve("m1@champion")
    with pytest.raises(RegistryError, match="needs a --reason"):
        reg.promote(mv.ref, store["cfg"], force=True)
    with pytest.raises(RegistryError, match="model name"):
        reg.register(store["ck"]["other"], name="bad name!")
    r = _cli("registry", "promote", "nope@1", "--db", tmp_path / "r.db", "--config", store["gates"])
    assert r.exit_code == 2 and "no registered model 'nope'" in r.output and "Traceback" not in r.output

    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"not a database" * 300)
    with pytest.raises(RegistryDatabaseError, match="not a valid SQLite database"):
        Registry(db=bad).versions()
    r = _cli("registry", "list", "--db", bad)
    assert r.exit_code == 2 and "not a valid SQLite database" in r.output

    # a writer holding the lock: promotions / registrations fail cleanly after the timeout and change nothing
    _promote_with(reg, mv, passed=True)
    mv2 = reg.register(store["ck"]["other2"], name="m1")
    hold = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    hold.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(RegistryLockedError, match="locked by another process"):
            _promote_with(reg, mv2, passed=True)
        with pytest.raises(RegistryLockedError):
            reg.register(store["ck"]["degraded"], name="m1")
    finally:
        hold.execute("ROLLBACK")
        hold.close()
    assert reg.champion("m1").version == mv.version
    assert [v.version for v in reg.versions("m1")] == [mv.version, mv2.version]
    assert len(reg._client().search_model_versions("name='m1'")) == 2  # the half-registered one was removed

    # the tables are append-only
    c = sqlite3.connect(tmp_path / "r.db")
    for sql in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "DELETE FROM champions",
                "UPDATE model_versions SET weights_sha256 = 'x'"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            c.execute(sql)
    # ... and the audit log is hash-chained: a row edited behind the triggers' back is detected
    c.execute("DROP TRIGGER audit_log_no_update")
    c.execute("UPDATE audit_log SET reason = 'edited' WHERE id = 1")
    c.commit()
    c.close()
    assert any("modified" in p for p in reg.verify_audit())


def _passing_run(reg, mv, champ, cfg, passed=True):
    from roadloop.registry.gates import GateResult
    from roadloop.registry.matrix import eval_code_hash

    return GateRun(1e12, "t", reg._ident(mv), reg._ident(champ), cfg.to_dict(), cfg.sha256, "k", eval_code_hash(),
                   GateSummary(passed, [GateResult("stub", passed, [] if passed else ["stubbed failure"])]))


def _promote_with(reg, mv, passed=True, **kw):
    """Promote with a stubbed gate verdict (no evaluation)."""
    orig = reg._gate_for_promotion
    reg._gate_for_promotion = lambda mv_, champ, cfg, *a: _passing_run(reg, mv_, champ, cfg, passed)
    try:
        return reg.promote(mv.ref, load_gate_config(overrides=SMOKE_GATES), **kw)
    finally:
        reg._gate_for_promotion = orig


def test_concurrent_promotions_serialize(store, tmp_path):
    """Two promotions gated against the same champion: the second to commit fails cleanly."""
    reg_a, reg_b = Registry(db=tmp_path / "r.db"), Registry(db=tmp_path / "r.db")
    base = reg_a.register(store["ck"]["champ"], name="m2")
    a, b = reg_a.register(store["ck"]["other"], name="m2"), reg_a.register(store["ck"]["other2"], name="m2")
    _promote_with(reg_a, base)
    a_done, errors = threading.Event(), []

    def slow_gate(mv, champ, cfg, *args):  # B is gated against the old champion, then A commits
        assert champ.version == base.version
        a_done.wait(30)
        return _passing_run(reg_b, mv, champ, cfg)

    def promote_b():
        reg_b._gate_for_promotion = slow_gate
        try:
            reg_b.promote(b.ref, load_gate_config(overrides=SMOKE_GATES))
        except RoadloopError as e:
            errors.append(e)

    t = threading.Thread(target=promote_b)
    t.start()
    _promote_with(reg_a, a)
    a_done.set()
    t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentChangeError), errors
    assert f"changed from {base.version} to {a.version}" in str(errors[0])
    assert reg_a.champion("m2").version == a.version
    assert [c.version for c in reg_a.champion_history("m2")] == [base.version, a.version]
    assert reg_a.audit("m2")[-1].action == "promote-refused" and reg_a.verify_audit() == []
    # a refused (failed-gate) promotion changes nothing either
    with pytest.raises(GateFailedError, match="stub"):
        _promote_with(reg_a, b, passed=False)
    assert reg_a.champion("m2").version == a.version


def test_register_candidate_for_trainers(store, tmp_path):
    rep = tmp_path / "eval.json"
    rep.write_text(json.dumps(fake_report(rows()).to_json()))
    mv = register_candidate(store["ck"]["other2"], {"trainer": "grpo", "run_id": "no-such-run", "config": {"k": 1},
                                                    "suites": {"train": "h1"}, "extra_key": 5},
                            name="m3", reports=[rep], db=tmp_path / "r.db")
    assert mv.version >= 1 and mv.lineage["trainer"] == "grpo" and mv.lineage["extra"]["extra_key"] == 5
    assert mv.lineage["training_run"]["run_id"] == "no-such-run" and mv.lineage["evaluations"][0]["n"] == 40
    d = Registry(db=tmp_path / "r.db").artifact_dir(mv)
    assert (d / "lineage.json").is_file() and (d / mv.lineage["evaluations"][0]["file"]).is_file()
    assert json.loads((d / "manifest.json").read_text())["files"].keys() == {
        "config.json", "model.safetensors", "lineage.json", mv.lineage["evaluations"][0]["file"]}


def test_seed_independent_policy_is_driven_once_per_scenario(monkeypatch):
    """The expert draws nothing at random, so a matrix over two seeds drives each scenario once and the second
    seed's rollouts are the first's relabelled: the same report as driving both."""
    import dataclasses

    import roadloop.eval.evaluate as ev
    from roadloop.policies import get_policy
    from roadloop.registry.matrix import MatrixConfig, MatrixSuite, evaluate_matrix
    from roadloop.testing.scenes import lead_vehicle_scene, red_light_scene

    suite = MatrixSuite("tiny", "h", [lead_vehicle_scene(num_steps=40), red_light_scene(num_steps=40)])
    cfg = MatrixConfig(seeds=[0, 3])
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    expert = get_policy("expert")
    assert expert.seed_independent
    fast = evaluate_matrix(expert, cfg, [suite])
    assert calls == [0]
    expert.seed_independent = False  # the same policy driven for every seed
    slow = evaluate_matrix(expert, cfg, [suite])
    assert calls == [0, 0, 3]
    rows = lambda rep: [json.dumps(dataclasses.asdict(r), sort_keys=True) for r in rep.rollouts]  # NaN-equal
    assert rows(fast) == rows(slow)
    assert {r.seed for r in fast.rollouts} == {0, 3} and any("#3@expert" in r.rollout_id for r in fast.rollouts)
    assert fast.overall["score"] == slow.overall["score"]
    with pytest.raises(ConfigError, match="gates matrix.temperature applies to sampling policies; 'expert'"):
        evaluate_matrix(expert, MatrixConfig(seeds=[0], temperature=0.5), [suite])


def test_matrix_intervals_resample_scenarios_not_seeds():
    """A matrix over several seeds holds each scenario several times: its CIs resample scenarios, so copies of
    the same rollouts (a seed-independent policy) give the one-seed interval instead of a narrower one."""
    one = fake_report(rows(n=30, coll=6, off=3))
    base = EvalReport("p@1", "matrix:t", "h", 0, {k: None for k in METRICS}, {}, one.rollouts, 0, 0.0)
    copies = [dataclasses.replace(base, seed=s, rollouts=[dataclasses.replace(r, seed=s) for r in base.rollouts])
              for s in (0, 1, 2)]
    three = merge_reports(copies, "matrix:t", "h", {})
    for k in ("score", "collision_at_fault", "offroad"):
        assert three.overall[k].mean == pytest.approx(one.overall[k].mean)
        assert three.overall[k].ci == pytest.approx(one.overall[k].ci)
        assert three.overall[k].n == 3 * one.overall[k].n
    assert three.per_family["a"]["collision_at_fault"].ci == pytest.approx(one.per_family["a"]["collision_at_fault"].ci)
    lo, hi = one.overall["collision_at_fault"].ci
    assert lo < one.overall["collision_at_fault"].mean < hi
