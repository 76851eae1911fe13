"""Deterministic replay: an evaluated rollout re-runs bit-identically from its record."""

import pytest

from roadloop.errors import RoadloopError
from roadloop.eval.evaluate import evaluate
from roadloop.eval.replay import replay
from roadloop.policies.route_idm import RouteIDM
from roadloop.scenarios.suites import load_suite


def test_replay_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    suite = load_suite("smoke")
    rep, _ = evaluate(RouteIDM(), suite.scenarios[:4], suite_name="smoke", suite_hash=suite.content_hash,
                      seed=3, batch_size=4, record=True)
    rid = rep.rollouts[2].rollout_id
    assert rid.endswith("#3@route-idm@1")
    res = replay(rid)
    assert res.identical, (res.recorded, res.replayed)


def test_unknown_rollout_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path))
    with pytest.raises(RoadloopError, match="no recorded rollout"):
        replay("nope/000000#0@expert@1")


def test_replay_rebuilds_a_checkpoint_policy_with_its_decoding(tmp_path, monkeypatch):
    """A learned policy's rollouts replay from its checkpoint folder with the decoding they were driven with;
    the decoding is part of the rollout's id, so a greedy and a sampled rollout of one checkpoint never mix."""
    import json

    import torch

    from roadloop.eval.replay import store_dir
    from roadloop.policies import get_policy
    from roadloop.policies.vla.model import VLAConfig, VLAModel, save_checkpoint

    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(VLAModel(VLAConfig(d_model=32, n_layers=1, n_heads=2, max_text_len=8, raster_size=32,
                                       patch=8)).eval(), ckpt)
    suite = load_suite("smoke")
    scs = suite.scenarios[:2]
    ids = {}
    for tag, settings in (("t0.6p0.98", {"temperature": 0.6, "top_p": 0.98}), ("t1p0.95", {}),
                          ("greedy", {"temperature": 0.0})):
        pol = get_policy(str(ckpt))
        pol.apply_settings(settings)
        assert pol.seed_independent == (tag == "greedy")
        rep, _ = evaluate(pol, scs, suite_name="smoke", suite_hash=suite.content_hash, seed=5, batch_size=2,
                          record=True)
        ids[tag] = rep.rollouts[1].rollout_id
        assert ids[tag].endswith(f"#5@vla@{pol.weights_version}+{tag}")
    assert len(set(ids.values())) == 3
    for rid in ids.values():
        res = replay(rid)
        assert res.identical, (rid, res.recorded, res.replayed)
    # a record without the policy's source (written before it was kept) cannot rebuild a checkpoint policy
    for p in store_dir().glob("*.json"):
        d = json.loads(p.read_text())
        d.pop("policy_source"), d.pop("policy_settings")
        p.write_text(json.dumps(d))
    with pytest.raises(RoadloopError, match="cannot rebuild the policy of .*unknown policy 'vla'"):
        replay(ids["greedy"])
