"""VLA tokenizer, model, checkpoints and policy (tiny config, CPU)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from roadloop.errors import RoadloopError
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import PRESETS, STEMS, VLAConfig, VLAModel, load_checkpoint, save_checkpoint
from roadloop.policies.vla.observe import CHANNELS
from roadloop.policies.vla.policy import VLAPolicy
from roadloop.reasoning.labels import Component, render_text
from roadloop.reasoning.meta_action import Lateral, Longitudinal
from roadloop.sim import dynamics

TINY = PRESETS["tiny"]
STEM_CFGS = {stem: dataclasses.replace(TINY, stem=stem) for stem in STEMS}
STEM_CFGS["conv8"] = dataclasses.replace(TINY, stem="conv", patch=8)  # three convolutions: 8 x 8 vision tokens
VISION = sorted(STEM_CFGS)


def _obs(B: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"bev": torch.rand(B, 4, len(CHANNELS), 64, 64, generator=g), "history": torch.randn(B, 16, 5, generator=g),
            "command": torch.arange(B) % 7}


def _model(seed: int = 0, stem: str | None = None) -> VLAModel:
    torch.manual_seed(seed)
    return VLAModel(STEM_CFGS[stem] if stem else TINY).eval()


def _label_texts(n: int = 300) -> list[str]:
    out = []
    for s in range(n):
        r = random.Random(s)
        comps = []
        for _ in range(r.randint(0, 2)):
            k = r.choice(["vehicle", "pedestrian", "cyclist", "cone", "light", "stop sign", "intersection"])
            states = ["stopped", "moving", "crossing", "slowing", ""]
            st = r.choice(["red", "yellow", "green"]) if k == "light" else (
                "" if k in ("stop sign", "intersection") else r.choice(states))
            comps.append(Component(k, None, r.choice(["ahead", "left", "right"]), float(r.randint(0, 99)), st))
        out.append(render_text(comps, Longitudinal(r.randint(0, 3)), Lateral(r.randint(0, 6)), r))
    return out


def test_tokenizer_round_trip_label_texts():
    for t in _label_texts():
        ids = tok.encode(t, eos=True)
        assert tok.UNK_ID not in ids, t
        assert tok.decode(ids) == t
    assert tok.encode("Because a car is 35 m away.") == tok.encode("Because a car is 35 m away.")
    assert tok.UNK_ID in tok.encode("a zebra")
    batch = tok.encode_batch(["Stop.", "The lane ahead is clear; keep speed."], 12)
    assert batch.shape == (2, 12) and int(batch[0, 3]) == tok.EOS_ID and int(batch[0, 4]) == tok.PAD_ID
    assert tok.decode_batch(batch) == ["Stop.", "The lane ahead is clear; keep speed."]


def test_token_spans_and_decision_weights():
    """``token_spans`` is ``encode`` with character spans; ``span_weights`` with ``decision_spans`` weighs
    exactly the tokens of the (non-negated) decision phrases."""
    from roadloop.reasoning.checks import decision_spans, parse_coc

    for t in _label_texts(100) + ["Don't accelerate; the car ahead is stopped, so brake and stay in lane."]:
        spans = tok.token_spans(t)
        assert [i for i, _, _ in spans] + [tok.EOS_ID] == tok.encode(t, eos=True)
        for i, a, e in spans:  # each token stands for its own characters
            assert i in (tok.CAP_ID, tok.UNK_ID) or t[a:e].lower() == tok.VOCAB[i], (t, t[a:e], tok.VOCAB[i])
        w = tok.span_weights([t], [decision_spans(t)], 48, 3.0)[0]
        marked = " ".join(tok.VOCAB[i] for (i, _, _), x in zip(spans, w, strict=False) if x == 3.0)
        p = parse_coc(t)
        assert p is not None and set(w.tolist()) <= {1.0, 3.0}
        assert parse_coc(marked) is not None  # the weighted tokens alone state a decision
    t = "Don't accelerate; the car ahead is stopped, so brake and stay in lane."
    w = tok.span_weights([t], [decision_spans(t)], 20, 3.0)[0]
    words = [tok.VOCAB[i] for i in tok.encode(t, eos=True)]
    assert [words[j] for j in range(len(words)) if w[j] == 3.0] == ["brake", "stay", "in", "lane"]
    assert w[len(words):].eq(1.0).all()  # <eos> onwards and pads: 1


def test_action_quantization_round_trip():
    torch.manual_seed(0)
    B = 64
    t = torch.arange(64) * 0.1
    accel = (torch.randn(B, 1) * 1.0 + 0.8 * torch.sin(t * torch.rand(B, 1) * 2)).clamp(-9.8, 9.8)
    curv = (torch.randn(B, 1) * 0.03 + 0.02 * torch.sin(t * torch.rand(B, 1))).clamp(-0.2, 0.2)
    controls = torch.stack((accel, curv), -1)
    bins = tok.quantize_controls(controls)
    assert bins.shape == (B, 16, 2) and bins.dtype == torch.int64  # one token per 0.4 s chunk
    assert int(bins[..., 0].max()) < tok.ACCEL_BINS and int(bins[..., 1].max()) < tok.CURV_BINS
    xy0, yaw0, v0 = torch.zeros(B, 2), torch.zeros(B), torch.full((B,), 12.0)
    ref = dynamics.unicycle_rollout(xy0, yaw0, v0, controls)[0]
    got = dynamics.unicycle_rollout(xy0, yaw0, v0, tok.dequantize(bins))[0]
    err = torch.linalg.vector_norm(ref - got, dim=-1)
    assert float(err.mean()) < 0.3 and float(err[:, -1].mean()) < 0.5
    assert torch.equal(tok.quantize_controls(tok.dequantize(bins), feedback=False), bins)  # centres are fixed points


@pytest.mark.parametrize("stem", VISION)
def test_forward_shapes_and_log_prob_matches_sample(stem):
    m = _model(stem=stem)
    obs = _obs()
    text, acts, lpt, lpa = m.sample(obs, generator=torch.Generator().manual_seed(1))
    L = TINY.max_text_len
    assert text.shape == (3, L) and acts.shape == (3, TINY.n_action, 2) and lpt.shape == (3,) and lpa.shape == (3,)
    out = m({**obs, "text": text, "actions": acts})
    assert out["text"].shape == (3, L, TINY.text_vocab)
    N = TINY.n_action
    assert out["accel"].shape == (3, N, TINY.accel_bins) and out["curv"].shape == (3, N, TINY.curv_bins)
    with torch.no_grad():
        lt2, la2 = m.log_prob(obs, text, acts)
    torch.testing.assert_close(lt2, lpt, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(la2, lpa, atol=1e-4, rtol=1e-5)


def test_lower_states_give_the_full_pass_and_trainable_subsets():
    """``forward`` from ``lower_states`` after any number of blocks equals a full pass bit for bit, and
    ``trainable_parameters('top:K')`` freezes everything below the top K blocks and the heads."""
    m = _model()
    obs = _obs()
    text, acts, _, _ = m.sample(obs, generator=torch.Generator().manual_seed(1))
    batch = {**obs, "text": text, "actions": acts}
    with torch.no_grad():
        full = m(batch)
        for k in range(TINY.n_layers + 1):
            part = m({"text": text, "actions": acts, "lower": m.lower_states(batch, k)})
            assert all(torch.equal(full[key], part[key]) for key in full), k
    with pytest.raises(RoadloopError, match="layers must be in"):
        m.lower_states(batch, TINY.n_layers + 1)
    top = m.trainable_parameters("top:1")
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in top) == sum(p.numel() for n, p in m.named_parameters() if n in names)
    last = f"blocks.{TINY.n_layers - 1}."
    assert names == {n for n, _ in m.named_parameters() if n.startswith((last, "ln_f.", "text_head.", "accel_head.",
                                                                          "curv_head."))}
    assert m.frozen_blocks() == TINY.n_layers - 1
    assert m.trainable_parameters("top:0") and m.frozen_blocks() == TINY.n_layers
    assert len(m.trainable_parameters("all")) == len(list(m.parameters())) and m.frozen_blocks() == 0
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(RoadloopError, match="trainable must be 'all' or 'top:K'"):
        m.trainable_parameters("top")


def test_sampling_deterministic_greedy_and_batch_independent():
    m = _model()
    obs = _obs()
    a = m.sample(obs, generator=torch.Generator().manual_seed(5))
    b = m.sample(obs, generator=torch.Generator().manual_seed(5))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    # per-row generators: row 1 alone gives the same sample as inside the batch
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    full = m.sample(obs, generator=gens)
    one = m.sample({k: v[1:2] for k, v in obs.items()}, generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(full[0][1:2], one[0]) and torch.equal(full[1][1:2], one[1])
    # temperature 0 = greedy = argmax of the teacher-forced logits at every step
    text, acts, _, _ = m.sample(obs, temperature=0.0, greedy_actions="mode")
    with torch.no_grad():
        out = m({**obs, "text": text, "actions": acts})
    mask = text != tok.PAD_ID
    assert torch.equal(out["text"].argmax(-1)[mask], text[mask])
    assert torch.equal(out["accel"].argmax(-1), acts[..., 0]) and torch.equal(out["curv"].argmax(-1), acts[..., 1])
    # greedy_actions="mean" (the default): the same text, and each chunk's bin is the one nearest the mean
    # control of its teacher-forced distribution
    text2, acts2, _, lpa2 = m.sample(obs, temperature=0.0)
    assert torch.equal(text2, text) and not torch.equal(acts2, acts)
    with torch.no_grad():
        out = m({**obs, "text": text2, "actions": acts2})
        _, lpa_tf = m.log_prob(obs, text2, acts2)
    for i, centres in ((0, tok.ACCEL_CENTRES), (1, tok.CURV_CENTRES)):
        want = tok.nearest_bin(torch.softmax(out["accel" if i == 0 else "curv"], -1) @ centres, centres)
        assert torch.equal(want, acts2[..., i])
    torch.testing.assert_close(lpa2, lpa_tf, atol=1e-4, rtol=1e-5)
    with pytest.raises(RoadloopError, match="greedy_actions must be one of mean, mode"):
        m.sample(obs, temperature=0.0, greedy_actions="median")


@pytest.mark.parametrize("stem", VISION)
def test_training_lowers_loss_and_changes_every_parameter(stem):
    m = _model(stem=stem).train()
    obs = _obs(4)
    texts = ["The lane ahead is clear; keep speed.", "A vehicle ahead is stopped about 12 m away, so stop.",
             "Because a red light is about 30 m ahead, slow down.", "Turn left and keep speed."]
    ctrl = torch.stack((torch.linspace(-2, 2, 4)[:, None].expand(4, 64), torch.full((4, 64), 0.01)), -1)
    batch = {**obs, "text": tok.encode_batch(texts, TINY.max_text_len), "actions": tok.quantize_controls(ctrl)}
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = m.loss(batch)
        first = float(out["loss"].detach()) if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = float(m.loss(batch)["loss"].detach())
    assert last < 0.5 * first
    unchanged = [k for k, v in m.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    m = _model(3)
    save_checkpoint(m, tmp_path / "ck", {"dataset": "abc"})
    m2, meta = load_checkpoint(tmp_path / "ck")
    assert meta["extra"] == {"dataset": "abc"} and meta["config"]["d_model"] == TINY.d_model
    obs = _obs()
    a = m.sample(obs, generator=torch.Generator().manual_seed(2))
    b = m2.sample(obs, generator=torch.Generator().manual_seed(2))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    cfg_path = tmp_path / "ck" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["d_model"] = 96
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(RoadloopError, match="shape"):
        load_checkpoint(tmp_path / "ck")
    meta["config"]["d_model"] = TINY.d_model
    meta["config"]["raster_channels"] = 10  # a model of the older 10-channel raster
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(RoadloopError, match="raster_channels is 10 .*train it again"):
        load_checkpoint(tmp_path / "ck")
    meta["config"]["raster_channels"] = len(CHANNELS)
    meta["config"]["n_expert"] = 3
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(RoadloopError, match="n_expert"):
        load_checkpoint(tmp_path / "ck")
    cfg_path.write_text("{not json")
    with pytest.raises(RoadloopError, match="JSON"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(RoadloopError, match="missing model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_stem_config_checked_and_saved(tmp_path):
    with pytest.raises(RoadloopError, match="stem must be one of"):
        VLAModel(VLAConfig(stem="vit"))
    with pytest.raises(RoadloopError, match="needs patch 8, 16 or 32"):
        VLAConfig(stem="conv", patch=4).validate()
    assert TINY.n_patches == 16 and STEM_CFGS["conv8"].n_patches == 64
    assert STEM_CFGS["conv8"].seq_len == TINY.seq_len + 48
    save_checkpoint(_model(4, "conv8"), tmp_path / "ck8")  # the earlier models' 8 x 8 tokens load as such
    assert load_checkpoint(tmp_path / "ck8")[0].cfg.patch == 8
    meta = json.loads((tmp_path / "ck8" / "config.json").read_text())
    meta["config"]["patch"] = 16  # the weights hold three convolutions, the config says four
    (tmp_path / "ck8" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RoadloopError, match="tensors missing"):
        load_checkpoint(tmp_path / "ck8")
    m = _model(4, "conv")
    save_checkpoint(m, tmp_path / "ck")
    m2, meta = load_checkpoint(tmp_path / "ck")
    assert meta["config"]["stem"] == "conv" and m2.cfg == m.cfg
    obs = _obs()
    assert torch.equal(m.sample(obs, temperature=0.0)[1], m2.sample(obs, temperature=0.0)[1])
    cfg_path = tmp_path / "ck" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["stem"] = "patch"  # the weights hold a convolutional stem
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(RoadloopError, match="tensors missing"):
        load_checkpoint(tmp_path / "ck")
    # a checkpoint written before the key existed holds a patch stem
    save_checkpoint(_model(4, "patch"), tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["config"]["stem"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path / "old")[0].cfg.stem == "patch"


def test_checkpoint_corrupt_weights(tmp_path):
    save_checkpoint(_model(), tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(RoadloopError, match="hash"):
        load_checkpoint(tmp_path)


def test_policy_drives_a_rollout():
    from roadloop.rollout import RolloutConfig, rollout
    from roadloop.sim.batching import collate
    from roadloop.testing.scenes import lead_vehicle_scene

    batch = collate([lead_vehicle_scene(), lead_vehicle_scene(gap=20.0)])
    pol = VLAPolicy(_model(), temperature=1.0)
    res = rollout(pol, batch, torch.tensor([1, 2]), RolloutConfig(max_steps=14, replan_every=2))
    assert not bool(res.failed.any()), res.fail_reason
    assert len(res.reasoning) >= 1 and all(isinstance(t, str) for d in res.reasoning for t in d)
    assert torch.isfinite(res.logp).all()
    assert res.policy.startswith("vla@")
    with pytest.raises(RoadloopError, match="greedy_actions must be one of"):
        VLAPolicy(_model(), greedy_actions="argmax")


def test_policy_observation_is_the_stored_raster_laid_out_by_batch_size():
    """VLAPolicy's raster is quantize_raster(render_bev(...)) bit for bit, drawn channels-last from
    CHANNELS_LAST_MIN_BATCH scenes up (NCHW below), and what it records is that raster's uint8 levels; a
    recording rollout's decisions equal a non-recording one's."""
    from roadloop.policies.base import Observation
    from roadloop.policies.vla.observe import encode_raster, quantize_raster, render_bev
    from roadloop.policies.vla.policy import CHANNELS_LAST_MIN_BATCH
    from roadloop.rollout import RolloutConfig, rollout
    from roadloop.sim.batching import collate
    from roadloop.sim.state import init_state
    from roadloop.testing.scenes import lead_vehicle_scene

    pol = VLAPolicy(_model(), record=True)
    for B in (1, CHANNELS_LAST_MIN_BATCH):
        state = init_state(collate([lead_vehicle_scene(gap=10.0 + 5 * i) for i in range(B)]))
        obs = Observation(state, state.xy[:, 0:1].repeat(1, 16, 1), state.yaw[:, 0:1].repeat(1, 16),
                          state.speed[:, 0:1].repeat(1, 16), step=0, recent=(state,))
        inputs, q = pol.model_inputs(obs)
        raw = render_bev([state], pol.raster)
        assert torch.equal(inputs["bev"], quantize_raster(raw.clone())[0]) and torch.equal(q, encode_raster(raw))
        laid_out = inputs["bev"].permute(0, 3, 4, 1, 2).is_contiguous()
        assert laid_out == (B >= CHANNELS_LAST_MIN_BATCH) and inputs["bev"].is_contiguous() == (not laid_out)
    batch = collate([lead_vehicle_scene(gap=10.0 + 5 * i) for i in range(CHANNELS_LAST_MIN_BATCH)])
    seeds = torch.arange(CHANNELS_LAST_MIN_BATCH)
    cfg = RolloutConfig(max_steps=11, replan_every=5)
    a = rollout(VLAPolicy(_model(), record=True), batch, seeds, cfg)
    b = rollout(VLAPolicy(_model()), batch, seeds, cfg)
    assert torch.equal(a.logp, b.logp) and a.reasoning == b.reasoning


def test_sample_repeat_shares_the_prefix_and_gives_the_repeated_rows_samples():
    """sample(obs, repeat=K) (RoaD's K candidates of each row) gives the samples of the observations repeated K
    times with the same per-row generators: the same tokens, log-likelihoods to float rounding; bad counts refused."""
    m = _model()
    obs, K = _obs(B=3), 4
    seeds = range(100, 100 + 3 * K)
    rep = {k: v.repeat_interleave(K, 0) for k, v in obs.items()}
    for temperature in (1.0, 0.0):
        a = m.sample(obs, temperature, generator=[torch.Generator().manual_seed(s) for s in seeds], repeat=K)
        b = m.sample(rep, temperature, generator=[torch.Generator().manual_seed(s) for s in seeds])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.testing.assert_close(a[2], b[2])
        torch.testing.assert_close(a[3], b[3])
    sampled = m.sample(obs, 1.0, generator=[torch.Generator().manual_seed(s) for s in seeds], repeat=K)[0]
    assert len({tuple(t.tolist()) for t in sampled[:K]}) > 1  # the K samples of a row differ
    with pytest.raises(RoadloopError, match="generators for 12 sampled rows"):
        m.sample(obs, generator=[torch.Generator() for _ in range(3)], repeat=K)
    with pytest.raises(RoadloopError, match="repeat must be >= 1"):
        m.sample(obs, repeat=0)
