"""Imitation trainer: learning, checkpoints + exact resume, tracking in MLflow (real SQLite store),
open-loop metrics, and closed-loop evaluation of the trained checkpoint through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from roadloop.data import collect
from roadloop.data.dataset import load_demos
from roadloop.errors import ConfigError, RoadloopError
from roadloop.eval.openloop import openloop_metrics, score_outputs
from roadloop.policies import get_policy
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import VLAConfig, VLAModel, load_checkpoint
from roadloop.policies.vla.policy import VLAPolicy
from roadloop.testing.checkpoints import assert_same_weights
from roadloop.train.il import (
    ILConfig,
    ModelSpec,
    ScheduleFit,
    TokenizedDemos,
    WeightAverage,
    cpu_has_native_bf16,
    fitted_total,
    resolve_precision,
    train_il,
)
from roadloop.train.tracking import read_metrics


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    d = tmp_path_factory.mktemp("il_demos")
    collect(["smoke"], d, every=5, max_scenarios=4, batch_size=4, max_steps=40)
    return d


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ROADLOOP_TRACKING_URI", raising=False)
    return tmp_path / "home"


def _cfg(demos, out, **kw) -> ILConfig:
    base = dict(data=str(demos), val_data=str(demos), out=str(out), model=ModelSpec(preset="tiny"), epochs=40.0,
                batch_size=8, lr=3e-3, warmup_steps=5, log_every=5, ckpt_every=10, eval_every=0, eval_samples=8,
                final_eval_samples=8, eval_k=2, time_limit_min=0.0)
    base.update(kw)
    return ILConfig(**base)


def test_training_learns_and_is_tracked(demos, home, tmp_path):
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in VLAModel(VLAConfig.preset("tiny")).state_dict().items()}
    res = train_il(_cfg(demos, tmp_path / "run"), log=lambda m: None)
    losses = [v for _, v in read_metrics(res.run_id, "loss")]
    assert len(losses) >= 5 and losses[-1] < 0.5 * losses[0]  # the loss moves
    model, meta = load_checkpoint(res.checkpoint)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, init[k])]
    assert set(changed) == set(init)  # every tensor was trained
    assert meta["extra"]["dataset"] == load_demos(demos).content_hash and meta["extra"]["trainer"] == "il"
    om = res.metrics
    for k in ("decision_acc", "grounding", "consistency"):
        assert 0.0 <= om[k] <= 1.0
    assert math.isfinite(om["min_ade"]) and math.isfinite(om["ade"])
    assert read_metrics(res.run_id, "val/min_ade")  # open-loop metrics reach the tracker
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["run_id"] == res.run_id


def _interrupt_at_step_15(demos, out, **kw) -> None:
    """Start a run in ``out`` and kill it (an exception from the progress callback) at step 15."""

    class Stop(Exception):
        pass

    def boom(step, total, m):
        if step >= 15:
            raise Stop

    with pytest.raises(Stop):
        train_il(_cfg(demos, out, **{**kw, "log_every": 1}), on_progress=boom, log=lambda m: None)


def test_interrupted_run_resumes_to_the_same_weights(demos, home, tmp_path):
    full = train_il(_cfg(demos, tmp_path / "full", epochs=6.0), log=lambda m: None)
    _interrupt_at_step_15(demos, tmp_path / "cut", epochs=6.0)
    assert not (tmp_path / "cut" / "final").exists()
    with pytest.raises(RoadloopError, match="--resume"):
        train_il(_cfg(demos, tmp_path / "cut", epochs=6.0), log=lambda m: None)
    msgs = []
    res = train_il(_cfg(demos, tmp_path / "cut", epochs=6.0), resume=True, log=msgs.append)
    assert any("resumed" in m and "step 10" in m for m in msgs)  # last checkpoint before the interruption
    assert_same_weights(full.checkpoint, res.checkpoint)  # as if never interrupted
    assert res.run_id == json.loads((tmp_path / "cut" / "run.json").read_text())["run_id"]


def test_streamed_rasters_train_and_resume(demos, home, tmp_path):
    """data_loading=stream (held-out samples split off the same collection): trains (the loss falls), and
    a cut run resumes to the weights of the uninterrupted one."""
    kw = dict(epochs=20.0, data_loading="stream", stream_window=1, val_data=None, val_fraction=0.3)
    msgs: list[str] = []
    full = train_il(_cfg(demos, tmp_path / "full", **kw), log=msgs.append)
    assert any("streaming rasters" in m for m in msgs)
    losses = [v for _, v in read_metrics(full.run_id, "loss")]
    assert losses[-1] < 0.7 * losses[0]
    _interrupt_at_step_15(demos, tmp_path / "cut", **kw)
    res = train_il(_cfg(demos, tmp_path / "cut", **kw), resume=True, log=lambda m: None)
    assert_same_weights(full.checkpoint, res.checkpoint)
    with pytest.raises(ConfigError, match="data_loading must be one of memory, stream"):
        train_il(_cfg(demos, tmp_path / "r0", data_loading="disk"), log=lambda m: None)


@pytest.mark.parametrize("stem,patch", [("patch", None), ("conv", 8)])
def test_bf16_training_and_the_vision_stems(demos, home, tmp_path, stem, patch):
    """precision=bf16 (autocast) learns and saves fp32 weights; model.stem / model.patch pick the vision tokens."""
    # 10 epochs: the loss ends at 0.36-0.37 of its start with either stem (0.22 after 20); bf16 is emulated
    # (slow) on a CPU without native bf16
    res = train_il(_cfg(demos, tmp_path / "bf16", epochs=10.0, precision="bf16",
                        model=ModelSpec("tiny", stem=stem, patch=patch)), log=lambda m: None)
    losses = [v for _, v in read_metrics(res.run_id, "loss")]
    assert losses[-1] < 0.6 * losses[0]
    model, meta = load_checkpoint(res.checkpoint)
    assert meta["extra"]["precision"] == "bf16"
    assert meta["config"]["stem"] == stem and meta["config"]["patch"] == (patch or 16)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(math.isfinite(res.metrics[k]) for k in ("min_ade", "decision_acc"))


def test_fitted_total_prices_the_steps_left_at_the_recent_step_time():
    assert fitted_total(50, 400, step_s=2.0, left_s=1000.0) == 400  # 500 more steps fit: the plan stands
    assert fitted_total(50, 400, step_s=2.0, left_s=101.0) == 100
    assert fitted_total(50, 400, step_s=2.0, left_s=-5.0) == 51  # out of time: end at the next step
    assert fitted_total(50, 400, step_s=float("nan"), left_s=10.0) == 400  # no timing yet: the plan stands
    t = [0.0]
    fit = ScheduleFit(planned=1000, limit_s=1000.0, clock=lambda: t[0], t0=0.0)
    totals = []
    for step in range(1, 201):  # 10 slow steps (allocation, first batches), then 1 s a step
        t[0] += 5.0 if step <= 10 else 1.0
        if step == 40:  # an evaluation of 20 s every 100 steps: priced at 0.2 s a step, not as one slow step
            t[0] += 20.0
            fit.paused(20.0, 100)
        totals.append(fit.update(step, 1000))
    assert totals[:24] == [1000] * 24  # fewer than FIT_MIN_STEPS timed steps (the first FIT_SKIP_STEPS untimed)
    assert totals[29] == 30 + int((970.0 - 70.0) / 1.8)  # 5 slow steps of 25 timed: 1.8 s a step
    # once the slow start has left the FIT_WINDOW, the 710 s left are priced at 1 s + the evaluation's 0.2 s
    assert totals[-1] == 200 + int((970.0 - 260.0) / 1.2) > totals[29]


class _StepClock:
    """A wall clock where every training step takes ``step_s`` seconds: it advances when the progress
    callback reports a step (``log_every=1``), optionally raising at ``stop_at`` (a kill)."""

    def __init__(self, step_s: float, stop_at: int | None = None):
        self.t, self.step_s, self.stop_at = 0.0, step_s, stop_at

    def __call__(self) -> float:
        return self.t

    def progress(self, step, total, m) -> None:
        self.t += self.step_s
        if self.stop_at is not None and step >= self.stop_at:
            raise KeyboardInterrupt


def test_schedule_is_fitted_to_the_time_limit_and_resumes_as_fitted(demos, home, tmp_path):
    """At 2 s a step a 1-minute limit holds ~30 of the 120 planned steps.  Fitted, the cosine schedule ends
    inside the limit at its floor learning rate; unfitted, the limit cuts it at a high one.  A run killed
    after the fit resumes with the fitted schedule, to the weights of the uninterrupted run."""
    kw = dict(time_limit_min=1.0, log_every=1, ckpt_every=1)
    clk = _StepClock(2.0)
    msgs: list[str] = []
    fitted = train_il(_cfg(demos, tmp_path / "fit", **kw), on_progress=clk.progress, log=msgs.append, clock=clk)
    assert fitted.planned_steps > 100 and not fitted.stopped_early
    # fitted after FIT_SKIP_STEPS + FIT_MIN_STEPS = 25 steps, when the clock has seen 24 of them (48 s):
    # the 12 s left buy int(0.97 * 12 / 2) = 5 more
    assert fitted.steps == 30 and any("fitted to 30 steps" in m for m in msgs)
    lrs = [v for _, v in read_metrics(fitted.run_id, "lr")]
    assert lrs[-1] < 0.1 * 3e-3  # decayed to ~min_lr_frac x lr
    assert read_metrics(fitted.run_id, "schedule_steps")[-1][1] == 30
    _, meta = load_checkpoint(fitted.checkpoint)
    assert meta["extra"]["steps"] == 30 and meta["extra"]["planned_steps"] == fitted.planned_steps

    clk = _StepClock(2.0)
    cut = train_il(_cfg(demos, tmp_path / "cut", fit_schedule=False, **kw), on_progress=clk.progress,
                   log=lambda m: None, clock=clk)
    assert cut.stopped_early and cut.steps == 31  # past 60 s after step 30
    assert [v for _, v in read_metrics(cut.run_id, "lr")][-1] > 0.5 * 3e-3
    assert not read_metrics(cut.run_id, "schedule_steps")

    clk = _StepClock(2.0, stop_at=27)
    with pytest.raises(KeyboardInterrupt):
        train_il(_cfg(demos, tmp_path / "kill", **kw), on_progress=clk.progress, log=lambda m: None, clock=clk)
    clk = _StepClock(2.0)
    msgs = []
    res = train_il(_cfg(demos, tmp_path / "kill", **kw), resume=True, on_progress=clk.progress,
                   log=msgs.append, clock=clk)
    assert res.steps == 30 and not res.stopped_early
    assert any(f"as fitted before the interruption: 30 of {fitted.planned_steps} planned" in m for m in msgs)
    assert_same_weights(fitted.checkpoint, res.checkpoint)


def test_weight_average_is_the_bias_corrected_ema_of_the_steps():
    """After t updates the average is sum_s d^(t-s) w_s / sum_s d^(t-s) over the weights after each step
    (the first update copies); it survives a state_dict round trip; bad decays are refused."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    d = 0.9
    avg = WeightAverage(net, d)
    seen = []
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        seen.append([p.detach().clone() for p in net.parameters()])
        avg.update()
    w = torch.tensor([d ** (len(seen) - 1 - s) for s in range(len(seen))], dtype=torch.float64)
    w = w / w.sum()
    for i, p in enumerate(avg.model.parameters()):
        want = sum(float(w[s]) * seen[s][i].double() for s in range(len(seen)))
        torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-6)
    assert avg.updates == 5
    other = WeightAverage(net, d)
    other.load_state_dict(avg.state_dict())
    for a, b in zip(avg.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage(net, bad)


def test_weight_averaged_run_evaluates_and_resumes_with_the_average(demos, home, tmp_path):
    """``ema_decay``: ``final`` holds the average (not the last weights), the trainer checkpoint both; a cut
    run resumes to the uninterrupted run's average bit for bit; changing the decay on resume is refused."""
    kw = dict(epochs=6.0, ema_decay=0.9)
    full = train_il(_cfg(demos, tmp_path / "full", **kw), log=lambda m: None)
    avg, meta = load_checkpoint(full.checkpoint)
    assert meta["extra"]["weights"].startswith("ema 0.9 over ")
    raw, _ = load_checkpoint(sorted((tmp_path / "full").glob("ckpt-*"))[-1])
    assert any(not torch.equal(v, raw.state_dict()[k]) for k, v in avg.state_dict().items())
    _interrupt_at_step_15(demos, tmp_path / "cut", **kw)
    with pytest.raises(ConfigError, match="ema_decay=0.9, this config has 0.5"):
        train_il(_cfg(demos, tmp_path / "cut", epochs=6.0, ema_decay=0.5), resume=True, log=lambda m: None)
    res = train_il(_cfg(demos, tmp_path / "cut", **kw), resume=True, log=lambda m: None)
    assert_same_weights(full.checkpoint, res.checkpoint)
    with pytest.raises(ConfigError, match="ema_decay must be in"):
        _cfg(demos, tmp_path / "r", ema_decay=1.0).validate()


def test_no_final_evaluation_still_writes_the_final_checkpoint(demos, home, tmp_path):
    res = train_il(_cfg(demos, tmp_path / "r", epochs=1.0, final_eval_samples=0), log=lambda m: None)
    assert res.metrics == {} and (res.checkpoint / "config.json").is_file()
    with pytest.raises(ConfigError, match="final_eval_samples must be >= 0"):
        _cfg(demos, tmp_path / "r", final_eval_samples=-1).validate()


def test_bad_inputs(demos, home, tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        train_il(_cfg(demos, tmp_path / "r0", precision="fp16"), log=lambda m: None)
    with pytest.raises(ConfigError, match="stem must be one of conv, patch"):
        train_il(_cfg(demos, tmp_path / "r0", model=ModelSpec("tiny", stem="vit")), log=lambda m: None)
    with pytest.raises(ConfigError, match="il.model: .*needs patch 8, 16 or 32, got patch=4"):
        train_il(_cfg(demos, tmp_path / "r0", model=ModelSpec("tiny", patch=4)), log=lambda m: None)
    with pytest.raises(RoadloopError, match="no demonstration manifest"):
        train_il(_cfg(tmp_path / "nowhere", tmp_path / "r1"), log=lambda m: None)
    with pytest.raises(RoadloopError, match="unknown VLA preset"):
        train_il(_cfg(demos, tmp_path / "r2", model=ModelSpec(preset="huge")), log=lambda m: None)
    # a shard that no longer matches its manifest
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in demos.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    shard = sorted(bad.glob("shard-*.npz"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(RoadloopError, match="hash does not match"):
        train_il(_cfg(bad, tmp_path / "r3"), log=lambda m: None)


def test_decision_weight_weighs_the_decision_tokens_of_the_text_loss(demos, home, tmp_path):
    """``il.decision_weight``: 1 leaves the loss as it was (bit for bit); otherwise the text loss is the
    weighted mean over the tokens, with the decision phrases' tokens weighted; a run trains with it."""
    with pytest.raises(ConfigError, match="decision_weight must be > 0"):
        train_il(_cfg(demos, tmp_path / "r0", decision_weight=0.0), log=lambda m: None)
    d = load_demos(demos)
    cfg = VLAConfig.preset("tiny")
    plain, weighted = TokenizedDemos.build(d, cfg), TokenizedDemos.build(d, cfg, decision_weight=4.0)
    assert plain.text_weight is None and torch.equal(plain.text, weighted.text)
    w = weighted.text_weight
    assert w.shape == plain.text.shape and set(w.unique().tolist()) == {1.0, 4.0}
    assert (w == 4.0).any(1).float().mean() > 0.9  # (almost) every label states its decision
    torch.manual_seed(0)
    model = VLAModel(cfg).eval()
    idx = torch.arange(8)
    b = plain.batch(idx)
    ones = model.loss({**b, "text_weight": torch.ones_like(w[idx])})
    assert torch.equal(model.loss(b)["text_loss"], ones["text_loss"])
    lt, _, mask = model.token_logps(b)
    ww = w[idx] * mask
    expect = -(lt * ww).sum() / ww.sum()
    assert torch.allclose(model.loss(weighted.batch(idx))["text_loss"], expect)
    res = train_il(_cfg(demos, tmp_path / "run", decision_weight=4.0, epochs=2.0), log=lambda m: None)
    assert math.isfinite(res.metrics["decision_acc"])


def test_openloop_scores_of_the_labels_themselves(demos):
    """The metric code judges the expert's own output (label text + quantised controls) as right:
    decision accuracy 1, grounded, consistent, and a plan within the quantisation error."""
    d = load_demos(demos)
    cfg = VLAConfig.preset("tiny")
    td = TokenizedDemos.build(d, cfg)
    idx = torch.arange(len(d))
    sc = score_outputs(d, idx, td.text, td.actions, cfg.action_chunk)
    assert float(sc["decision_acc"].mean()) == 1.0 and float(sc["grounding"].mean()) >= 0.95
    assert float(sc["consistency"].mean()) >= 0.9 and float(sc["ade"].mean()) < 0.3
    # a hallucinated pedestrian is not grounded, garbage is neither grounded nor consistent
    lie = tok.encode_batch(["A pedestrian is crossing about 3 m away, so stop."] * len(d), cfg.max_text_len)
    sc = score_outputs(d, idx, lie, td.actions, cfg.action_chunk)
    assert float(sc["grounding"].mean()) < 0.5
    junk = torch.full((len(d), cfg.max_text_len), tok.UNK_ID)
    sc = score_outputs(d, idx, junk, td.actions, cfg.action_chunk)
    assert float(sc["grounding"].sum()) == 0 and float(sc["consistency"].sum()) == 0
    om = openloop_metrics(VLAModel(cfg), d, k=2)  # an untrained model: runs, scores in range
    assert 0 <= om["decision_acc"] <= 1 and math.isfinite(om["min_ade"])


def test_scenario_clustered_confidence_intervals():
    """Decisions of one drive are not independent: ten copies of each scenario's value must not
    narrow the interval the way ten independent draws would."""
    from roadloop.eval.evaluate import bootstrap_ci

    per_scenario = np.random.default_rng(0).normal(size=40)
    x, groups = np.repeat(per_scenario, 10), np.repeat(np.arange(40), 10)
    lo, hi = bootstrap_ci(x, groups=groups)
    glo, ghi = bootstrap_ci(per_scenario)
    nlo, nhi = bootstrap_ci(x)
    assert lo < x.mean() < hi and abs((hi - lo) - (ghi - glo)) < 0.15 * (ghi - glo)
    assert (nhi - nlo) < 0.5 * (hi - lo)  # the naive interval is ~sqrt(10) times too narrow
    assert bootstrap_ci(np.array([np.nan, 1.0]), groups=np.array([0, 1])) == (1.0, 1.0)


def test_cli_train_then_closed_loop_eval(demos, home, tmp_path):
    from typer.testing import CliRunner

    from roadloop.cli import app

    out = tmp_path / "cli_run"
    r = CliRunner().invoke(app, ["--threads", "1", "train", "il", "model.preset=tiny", "epochs=2", "batch_size=8",
                                 "eval_every=0", "final_eval_samples=8", "eval_k=2", "--data", str(demos),
                                 "--val-data", str(demos), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "decision_acc" in r.output and str(out / "final") in "".join(r.output.split())  # rich wraps long paths
    pol = get_policy(str(out / "final"))
    assert isinstance(pol, VLAPolicy) and pol.replan_every == 5
    rj = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["--threads", "1", "eval", "--policy", str(out / "final"), "--suite", "smoke",
                                 "--json", str(rj)])
    assert r.exit_code == 0, r.output
    rep = json.loads(rj.read_text())
    assert rep["policy"].startswith("vla@") and rep["overall"]["score"]["n"] == 10
    # open loop on every held-out decision, with scenario-clustered CIs, equal to the trainer's metric code
    oj = tmp_path / "openloop.json"
    r = CliRunner().invoke(app, ["--threads", "1", "eval-openloop", "--policy", str(out / "final"),
                                 "--data", str(demos), "--k", "2", "--json", str(oj)])
    assert r.exit_code == 0, r.output
    doc = json.loads(oj.read_text())
    d = load_demos(demos)
    assert doc["n_samples"] == len(d) and doc["n_scenarios"] == len(set(d.scenario_id))
    assert set(doc["per_family"]) == set(d.family) and doc["content_hash"] == d.content_hash
    model, _ = load_checkpoint(out / "final")
    om = openloop_metrics(model, d, k=2)
    for key in ("min_ade", "ade", "decision_acc", "grounding", "consistency"):
        st = doc["overall"][key]
        assert st["mean"] == pytest.approx(om[key], rel=1e-5, abs=1e-6) and st["ci"][0] <= st["mean"] <= st["ci"][1]
    r = CliRunner().invoke(app, ["eval-openloop", "--policy", str(out / "final"), "--data", str(demos), "--top-p", "0"])
    assert r.exit_code == 2 and "--top-p" in r.output
    r = CliRunner().invoke(app, ["train", "il", "lr=abc", "--data", str(demos), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "lr" in r.output
    r = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "nope"), "--suite", "smoke"])
    assert r.exit_code == 2 and "unknown policy" in r.output


def test_precision_auto_is_bf16_only_on_cpus_with_native_bf16():
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", "cuda") == "fp32"  # measured slower on an H100 for this model size
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cuda:0") == "bf16"


def test_cli_bench_il_times_each_vision_size_and_precision(demos, tmp_path):
    from typer.testing import CliRunner

    from roadloop.cli import app

    out = tmp_path / "bench_il.json"
    r = CliRunner().invoke(app, ["--threads", "1", "bench", "il", "--data", str(demos), "--preset", "tiny",
                                 "--patches", "8,16", "--precisions", "fp32,auto", "--steps", "1", "--repeats", "1",
                                 "--batch-size", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"]
    assert [(x["patch"], x["vision_tokens"]) for x in res] == [(8, 64), (8, 64), (16, 16), (16, 16)]
    assert [x["precision"] for x in res[:2]] == ["fp32", resolve_precision("auto", "cpu")]
    assert res[0]["seq_len"] == res[2]["seq_len"] + 48 and res[2]["params"] > res[0]["params"]  # a 4th convolution
    assert all(x["samples_per_s"] > 0 for x in res)
    r = CliRunner().invoke(app, ["bench", "il", "--data", str(demos), "--preset", "tiny", "--patches", "12"])
    assert r.exit_code != 0 and "divisible by patch" in r.output
    r = CliRunner().invoke(app, ["bench", "il", "--data", str(demos), "--precisions", " , "])
    assert r.exit_code != 0 and "at least one" in r.output
    r = CliRunner().invoke(app, ["--threads", "1", "bench", "il", "--data", str(demos), "--preset", "tiny",
                                 "--patches", "16", "--precisions", "fp32", "--layouts", "channels_last,nchw",
                                 "--steps", "1", "--repeats", "1", "--batch-size", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"]
    assert [x["layout"] for x in res] == ["channels_last", "nchw"] and all(x["samples_per_s"] > 0 for x in res)
    r = CliRunner().invoke(app, ["bench", "il", "--data", str(demos), "--layouts", "nhwc"])
    assert r.exit_code != 0 and "layout must be one of channels_last, nchw" in r.output


def test_the_stem_layout_changes_no_output_beyond_rounding(demos):
    """The trainers' channels-last rasters (DemoTensors.bev) and the (B, F, C, H, W) layout give the same
    losses and gradients up to float rounding (the vision stem runs in its input's layout)."""
    from roadloop.policies.vla.observe import decode_raster
    from roadloop.train.il import TokenizedDemos

    d = load_demos(str(demos))
    torch.manual_seed(0)
    model = VLAModel(VLAConfig(d_model=32, n_layers=1, n_heads=2))
    batch = TokenizedDemos.build(d, model.cfg).batch(torch.arange(4))
    assert batch["bev"].reshape(4, -1, 64, 64).is_contiguous(memory_format=torch.channels_last)
    outs = []
    for bev in (batch["bev"], decode_raster(d.raster[torch.arange(4)])):
        model.zero_grad()
        loss = model.loss({**batch, "bev": bev})["loss"]
        loss.backward()
        outs.append((loss.detach(), model.conv[0].weight.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)


def test_imitation_learns_the_view_its_demonstrations_hold(demos, home, tmp_path):
    """Demonstrations recorded with a longer view train a model that reads (and drives with) that view;
    data recorded with another view is refused wherever a model meets it."""
    from roadloop.policies.vla.observe import RasterConfig
    from roadloop.train.il import check_demo_raster, load_expert_demos

    far = RasterConfig(resolution=1.0, ego_offset=0.1)
    far_dir = tmp_path / "far"
    collect(["smoke"], far_dir, every=5, max_scenarios=4, batch_size=4, max_steps=40, raster=far)
    res = train_il(_cfg(far_dir, tmp_path / "run", epochs=1.0, final_eval_samples=0), log=lambda m: None)
    model, _ = load_checkpoint(res.checkpoint)
    assert (model.cfg.raster_resolution, model.cfg.raster_ego_offset) == (1.0, 0.1)
    assert model.cfg.raster_config() == far and VLAPolicy(model).raster == far  # it drives with the view it learned
    check_demo_raster(load_demos(far_dir), model.cfg, "far")
    with pytest.raises(RoadloopError, match=r"recorded at 0.75 m/px .* the model reads 1.0 m/px"):
        load_expert_demos(str(demos), model.cfg, "road.expert_data")
    with pytest.raises(RoadloopError, match=r"il.val_data .*recorded at 0.75 m/px"):
        train_il(_cfg(far_dir, tmp_path / "r2", val_data=str(demos), epochs=1.0), log=lambda m: None)
    with pytest.raises(RoadloopError, match=r"VLAConfig.raster_\*: RasterConfig: ego_offset .* must be in"):
        VLAConfig(raster_ego_offset=1.5).validate()
