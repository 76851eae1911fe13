"""Training infrastructure: MLflow tracking (real SQLite store in a temp dir) and resumable checkpoints."""

import dataclasses
import random
import sqlite3
import warnings

import numpy as np
import pytest
import torch

from roadloop.errors import RoadloopError
from roadloop.policies.vla.model import VLAConfig, VLAModel
from roadloop.train import checkpointing as ck
from roadloop.train import tracking as tk

# ---------------------------------------------------------------------------------------------
# tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs 1-2 s), found through ROADLOOP_HOME."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROADLOOP_HOME", str(home))
        mp.delenv("ROADLOOP_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tk.default_tracking_uri()
        assert uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
        tk.Tracker("warmup").finish()
        yield home, uri


def test_default_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    monkeypatch.delenv("ROADLOOP_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tk.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tk.artifact_location_for(tk.default_tracking_uri()) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tk.default_tracking_uri() == "http://mlflow:5000"
    assert tk.artifact_location_for("http://mlflow:5000") is None
    monkeypatch.setenv("ROADLOOP_TRACKING_URI", "sqlite:////x/y.db")
    assert tk.default_tracking_uri() == "sqlite:////x/y.db"


def test_params_metrics_artifacts_roundtrip(store, tmp_path):
    home, uri = store
    tr = tk.Tracker("train-test", run_name="imitation", tags={"kind": "bc"})  # default URI: $ROADLOOP_HOME
    assert tr.uri == uri and tr.run_id and tr.experiment_id
    tr.log_params({"optim": {"lr": 1e-3, "betas": (0.9, 0.99)}, "model": VLAConfig.preset("tiny"),
                   "note": "x" * 7000, "seed": 3})
    p = tr.params()
    assert p["optim.lr"] == "0.001" and p["optim.betas"] == "(0.9, 0.99)" and p["seed"] == "3"
    assert p["model.d_model"] == "64" and len(p["note"]) == tk.MAX_PARAM_VALUE
    tr.log_params({"seed": 3})  # same value again: fine
    for step in range(4):
        tr.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": torch.tensor(0.5),
                        "bad": float("nan") if step % 2 else 1.0}, step=step)
    assert tr.nonfinite == {"bad": 2}
    f = tmp_path / "report.txt"
    f.write_text("hello")
    tr.log_artifact(f, "reports")
    with pytest.raises(RoadloopError, match="no such file"):
        tr.log_artifact(tmp_path / "missing.txt")
    tr.set_tags({"best": 0.25})
    tr.finish()
    tr.finish()  # idempotent
    assert tk.read_metrics(tr.run_id, "loss", uri) == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25)]
    assert tk.read_metrics(tr.run_id, "bad", uri) == [(0, 1.0), (2, 1.0)]
    assert tk.run_status(tr.run_id, uri) == "FINISHED"
    run = tk._client(uri).get_run(tr.run_id)
    assert run.data.tags["roadloop.nonfinite.bad"] == "2 (last step 3)"
    assert run.data.tags["kind"] == "bc" and run.data.tags["best"] == "0.25"
    assert run.info.run_name == "imitation"
    assert (home / "mlartifacts" / tr.run_id / "artifacts" / "reports" / "report.txt").read_text() == "hello"


def test_resume_by_id_and_param_conflict(store):
    _, uri = store
    tr = tk.Tracker("train-test", uri=uri)
    tr.log_params({"lr": 0.1, "steps": 10})
    tr.log_metrics({"loss": 2.0}, step=0)
    tr.finish("KILLED")
    re = tk.Tracker("train-test", run_id=tr.run_id, uri=uri)
    assert re.resumed and re.run_id == tr.run_id and tk.run_status(tr.run_id, uri) == "RUNNING"
    re.log_params({"lr": 0.1, "steps": 10, "new": 1})  # same config again + a new key: fine
    with pytest.raises(RoadloopError, match=r"lr: logged '0.1', now '0.2'"):
        re.log_params({"lr": 0.2})
    re.log_metrics({"loss": 1.0}, step=1)
    re.finish()
    assert tk.read_metrics(tr.run_id, "loss", uri) == [(0, 2.0), (1, 1.0)]
    with pytest.raises(RoadloopError, match="belongs to experiment 'train-test'"):
        tk.Tracker("other", run_id=tr.run_id, uri=uri)
    with pytest.raises(RoadloopError, match="no MLflow run with id"):
        tk.Tracker("train-test", run_id="0" * 32, uri=uri)


def test_context_manager_status(store):
    _, uri = store
    with tk.Tracker("train-test", uri=uri) as ok:
        ok.log_metrics({"a": 1}, step=0)
    assert tk.run_status(ok.run_id, uri) == "FINISHED"
    with pytest.raises(ValueError), tk.Tracker("train-test", uri=uri) as bad:
        raise ValueError("boom")
    assert tk.run_status(bad.run_id, uri) == "FAILED"
    with pytest.raises(RoadloopError, match="status"):
        ok.finish("DONE")


def test_null_tracker():
    with tk.Tracker.disabled() as t:
        t.log_params({"a": {"b": 1}})
        t.log_metrics({"x": float("nan")}, step=0)
        t.set_tags({"k": "v"})
        t.log_artifact("/nonexistent")
        assert t.run_id is None and not t.enabled
    assert t.finished


def test_corrupt_and_locked_store_errors(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(np.random.default_rng(0).bytes(8192))
    uri = f"sqlite:///{db}"
    with pytest.raises(RoadloopError, match="not a valid SQLite database") as ei:
        tk.Tracker("x", uri=uri)
    assert uri in str(ei.value) and "\n" not in str(ei.value)
    # a locked database only fails after MLflow's 20 s busy timeout: check the message on its own
    msg = tk._describe(uri, "logging metrics", sqlite3.OperationalError("database is locked"))
    assert uri in msg and "another process holds a lock" in msg


def _open_new_store(uri: str, barrier, out) -> None:
    """In a child process: wait for the others, then open the store and log a run (``out``: 'ok' or the error)."""
    from roadloop.train import tracking

    tracking._import_mlflow()  # the slow import before the barrier, so that the openings meet
    barrier.wait(timeout=120)
    try:
        t = tracking.Tracker("race", uri=uri)
        t.log_metrics({"x": 1.0}, 0)
        t.finish()
        out.put("ok")
    except Exception as e:  # noqa: BLE001 - the parent asserts on the message
        out.put(f"{type(e).__name__}: {e}")


def test_runs_started_side_by_side_on_a_new_store_both_open_it(tmp_path):
    """Four processes that open the same new SQLite store at once all succeed (the first creates its tables
    while the others wait on ``<db>.lock``); without the lock some fail ('table ... already exists',
    'duplicate column name', a migration that finds no row)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_new_store, args=(uri, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert results == ["ok"] * n, results
    # a lock file that cannot be created (a directory is in its place): a one-line error naming it
    (tmp_path / "other" / "mlflow.db.lock").mkdir(parents=True)
    with pytest.raises(RoadloopError, match=r"cannot create the lock file .*mlflow\.db\.lock") as ei:
        tk.Tracker("x", uri=f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    assert "\n" not in str(ei.value)
    assert len(tk._client(uri).search_runs([tk._client(uri).get_experiment_by_name("race").experiment_id])) == n


# ---------------------------------------------------------------------------------------------
# checkpoints


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return VLAModel(dataclasses.replace(VLAConfig.preset("tiny"), **kw))


def _train_step(model, opt, sched=None):
    loss = sum((p.float() ** 2).sum() for p in model.parameters()) * 1e-3
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_checkpoint_roundtrip_weights_optimizer_rng(tmp_path):
    model = _tiny(0)
    opt = _opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        _train_step(model, opt, sched)
    assert ck.load_train_state(tmp_path / "run", model) is None
    path = ck.save_train_state(tmp_path / "run", 2, model, opt, extra={"epoch": 1, "best": torch.tensor(0.5),
                                                                         "run_id": "abc"}, scheduler=sched)
    assert path.name == "ckpt-00000002" and ck.latest_checkpoint(tmp_path / "run") == path
    assert (tmp_path / "run" / "latest").read_text().strip() == path.name
    draws = torch.rand(4), np.random.rand(2), random.random()
    want_sd = {k: v.clone() for k, v in model.state_dict().items()}
    want_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]

    model2 = _tiny(1)
    opt2 = _opt(model2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    out = ck.load_train_state(tmp_path / "run", model2, opt2, scheduler=sched2)
    assert out["step"] == 2 and out["path"] == path and out["fallback"] is None
    assert out["extra"]["epoch"] == 1 and out["extra"]["run_id"] == "abc" and float(out["extra"]["best"]) == 0.5
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want_sd[k]), k
    for p, a in zip(model2.parameters(), want_avg, strict=True):
        assert torch.equal(opt2.state[p]["exp_avg"], a)
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert torch.equal(torch.rand(4), draws[0])
    assert np.array_equal(np.random.rand(2), draws[1]) and random.random() == draws[2]
    # training continues identically from the restored state
    _train_step(model, opt, sched)
    _train_step(model2, opt2, sched2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_generic_model_and_resave_same_step(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train_step(model, opt)
    ck.save_train_state(tmp_path, 5, model, opt)
    _train_step(model, opt)
    ck.save_train_state(tmp_path, 5, model, opt)  # same step again replaces it
    want = [p.clone() for p in model.parameters()]
    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    out = ck.load_train_state(tmp_path, model2, restore_rng=False)
    assert out["step"] == 5 and all(torch.equal(a, b) for a, b in zip(model2.parameters(), want, strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000005", "latest"]
    with pytest.raises(RoadloopError, match="does not fit"):
        ck.load_train_state(tmp_path, torch.nn.Linear(3, 1))


def test_keep_pruning_fallback_and_stray_tmp(tmp_path):
    model = _tiny(0)
    opt = _opt(model)
    for step in range(1, 6):
        _train_step(model, opt)
        ck.save_train_state(tmp_path, step * 10, model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000040", "ckpt-00000050"]
    # a crashed save leaves a temp dir: never read
    stray = tmp_path / ".tmp-ckpt-00000099-abcd"
    stray.mkdir()
    (stray / "trainer.pt").write_bytes(b"garbage")
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-00000050"
    assert ck.load_train_state(tmp_path, _tiny(1))["step"] == 50
    # `latest` names a deleted checkpoint: fall back to the newest complete one, and say so
    import shutil

    shutil.rmtree(tmp_path / "ckpt-00000050")
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-00000040"
    with pytest.warns(UserWarning, match="ckpt-00000050: missing"):
        out = ck.load_train_state(tmp_path, _tiny(1))
    assert out["step"] == 40 and "resumed from ckpt-00000040" in out["fallback"]
    # a corrupt checkpoint (truncated weights) is skipped the same way
    ck.save_train_state(tmp_path, 60, model, opt, keep=2)
    w = tmp_path / "ckpt-00000060" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ckpt-00000060"):
        assert ck.load_train_state(tmp_path, _tiny(1))["step"] == 40
    # nothing readable at all
    (tmp_path / "ckpt-00000040" / "trainer.pt").write_bytes(b"junk")
    with warnings.catch_warnings(), pytest.raises(RoadloopError, match="no readable checkpoint"):
        warnings.simplefilter("ignore")
        ck.load_train_state(tmp_path, _tiny(1))


def test_config_mismatch_is_an_error(tmp_path):
    model = _tiny(0)
    ck.save_train_state(tmp_path, 1, model, None)
    with pytest.raises(RoadloopError, match=r"different VLAConfig: dropout: checkpoint 0.0, model 0.1"):
        ck.load_train_state(tmp_path, _tiny(0, dropout=0.1))


def test_refuse_non_finite_checkpoint(tmp_path):
    model = _tiny(0)
    opt = _opt(model)
    _train_step(model, opt)
    ck.save_train_state(tmp_path, 1, model, opt)
    with torch.no_grad():
        model.blocks[1].qkv.weight[0, 0] = float("nan")
    with pytest.raises(ck.NonFiniteError, match="blocks.1.qkv.weight"):
        ck.save_train_state(tmp_path, 2, model, opt)
    with torch.no_grad():
        model.blocks[1].qkv.weight[0, 0] = 0.0
        opt.state[model.ln_f.bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(ck.NonFiniteError, match="exp_avg_sq.*ln_f.bias"):
        ck.save_train_state(tmp_path, 2, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "latest"]


def test_check_finite_and_good_state():
    model = _tiny(0)
    opt = _opt(model)
    _train_step(model, opt)
    good = ck.GoodState(model, opt)
    good.snapshot(step=1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_avg = opt.state[model.pos_emb]["exp_avg"].clone()

    loss = (model.pos_emb ** 2).sum()
    loss.backward()
    ck.check_finite(loss, model)  # all finite: no error
    with pytest.raises(ck.NonFiniteError, match="non-finite loss") as ei:
        ck.check_finite(loss * float("nan"), model)
    assert ei.value.what == "loss"
    model.text_head.weight.grad = torch.full_like(model.text_head.weight, float("inf"))
    with pytest.raises(ck.NonFiniteError, match="'text_head.weight'"):
        ck.check_finite(loss, model)

    for _ in range(2):  # a bad step poisons weights and moments; restore works more than once
        opt.step()
        with torch.no_grad():
            model.pos_emb.fill_(float("nan"))
        assert good.restore() == 1
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[k]), k
        assert torch.equal(opt.state[model.pos_emb]["exp_avg"], want_avg)
        assert all(p.grad is None for p in model.parameters())
    assert good.restores == 2
    with pytest.raises(RoadloopError, match="before any snapshot"):
        ck.GoodState(model).restore()
