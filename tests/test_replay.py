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
