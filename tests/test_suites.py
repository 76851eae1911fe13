"""Scenario generation (retries) and suites: seeds, on-disk format, verification, cache."""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from roadloop.errors import ScenarioError, UnknownNameError
from roadloop.scenarios import generate as gen
from roadloop.scenarios import suites
from roadloop.scenarios.families import FAMILIES
from roadloop.scenarios.suites import Suite, content_hash, load_suite, save_suite, suite_pairs
from roadloop.sim.datatypes import SCHEMA_VERSION


@dataclass(frozen=True)
class FakeReport:
    collision: bool
    offroad: bool
    completed: bool
    reason: str


def _fake_recorder(fail_attempts: int):
    """A recorder that calls attempts < ``fail_attempts`` a collision and keeps the raw scenario."""
    calls = []

    def record(raws):
        calls.append([r.meta.scenario_id for r in raws])
        out = []
        for r in raws:
            attempt = int(dict(r.meta.extra).get("attempt", "0"))
            bad = attempt < fail_attempts
            out.append((r, FakeReport(bad, False, True, "careful ego collided with agent 3" if bad else "")))
        return out

    return record, calls


@pytest.fixture(scope="module")
def small_suite() -> Suite:
    return Suite.of("tiny", [FAMILIES[f].build_raw(s) for f, s in
                             [("cut_in", 1), ("intersection_protected", 2), ("pedestrian_crossing", 3)]])


# --- generate ----------------------------------------------------------------------------------

def test_generate_retries_with_derived_seed(monkeypatch):
    record, calls = _fake_recorder(fail_attempts=2)
    monkeypatch.setattr(gen, "_record_logs", record)
    a, b = gen.generate_many([("cut_in", 5), ("merge", 6)])
    assert len(calls) == 3  # 3 attempts, each one batch
    for s, fam, seed in ((a, "cut_in", 5), (b, "merge", 6)):
        assert s.meta.scenario_id == f"{fam}/{seed:06d}" and s.meta.seed == seed
        extra = dict(s.meta.extra)
        assert extra["attempt"] == "2" and extra["build_seed"] == str(seed * 1000 + 2)
        ref = FAMILIES[fam].build_raw(seed * 1000 + 2)
        assert torch.equal(s.agents.xy, ref.agents.xy)


def test_generate_first_attempt_keeps_raw_meta(monkeypatch):
    record, _ = _fake_recorder(fail_attempts=0)
    monkeypatch.setattr(gen, "_record_logs", record)
    s = gen.generate("roundabout", 3)
    assert s.meta == FAMILIES["roundabout"].build_raw(3).meta


def test_generate_gives_up_naming_family_seed_reason(monkeypatch):
    record, calls = _fake_recorder(fail_attempts=99)
    monkeypatch.setattr(gen, "_record_logs", record)
    with pytest.raises(ScenarioError, match=r"family 'lead_braking' seed 4: no valid scenario after 5 attempts.*"
                                            r"careful ego collided with agent 3"):
        gen.generate("lead_braking", 4)
    assert len(calls) == 5


def test_generate_unknown_family():
    with pytest.raises(UnknownNameError, match="unknown scenario family 'nope'"):
        gen.generate("nope", 0)


# --- suites: names and seeds ----------------------------------------------------------------------

def test_named_suites_and_seeds():
    assert suites.list_suites() == ["smoke", "train", "train-xl", "train-xl2", "val"]
    smoke = suite_pairs("smoke")
    assert sorted(f for f, _ in smoke) == sorted(FAMILIES)
    train, val = suite_pairs("train"), suite_pairs("val")
    assert len(train) == 64 * len(FAMILIES) and len(val) == 24 * len(FAMILIES)
    assert min(s for _, s in train) >= 1000 and min(s for _, s in val) >= 900000
    assert not {s for _, s in train} & {s for _, s in val}
    xl = suite_pairs("train-xl")
    assert len(xl) == 192 * len(FAMILIES) and set(train) < set(xl) and not {s for _, s in xl} & {s for _, s in val}
    xl2 = suite_pairs("train-xl2")
    assert len(xl2) == 192 * len(FAMILIES) and not set(xl2) & set(xl) and not {s for _, s in xl2} & {s for _, s in val}
    assert max(s for _, s in xl) + 1 == min(s for _, s in xl2)
    suites.check_disjoint()  # retry seeds too
    with pytest.raises(UnknownNameError, match="unknown suite 'bogus'; known: smoke, train, train-xl, train-xl2, val"):
        load_suite("bogus")


# --- on-disk format ------------------------------------------------------------------------------

def test_round_trip_preserves_hash(small_suite, tmp_path):
    d = save_suite(small_suite, tmp_path / "s")
    index = json.loads((d / "suite.json").read_text())
    assert index["format"] == "roadloop-suite" and index["schema_version"] == SCHEMA_VERSION
    assert [e["id"] for e in index["scenarios"]] == [s.meta.scenario_id for s in small_suite.scenarios]
    with np.load(d / index["scenarios"][0]["file"], allow_pickle=False) as z:
        assert {"map.lane_xy", "agents.xy", "route.xy", "light_states", "meta"} <= set(z.files)
    loaded = load_suite(d)
    assert loaded.name == "tiny" and loaded.content_hash == small_suite.content_hash
    assert content_hash(loaded.scenarios) == small_suite.content_hash
    for a, b in zip(loaded.scenarios, small_suite.scenarios, strict=True):
        ta, tb = dict(a.tensor_items()), dict(b.tensor_items())
        assert all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in tb)
        assert a.meta == b.meta
    # saving again gives the same bytes (fixed zip timestamps)
    d2 = save_suite(loaded, tmp_path / "s2")
    assert (d2 / "suite.json").read_text() == (d / "suite.json").read_text()


def test_content_hash_sees_every_change(small_suite):
    s = small_suite.scenarios[0]
    moved = s.replace(agents=s.agents.replace(xy=s.agents.xy + 1e-3))
    renamed = s.replace(meta=s.meta.__class__(**{**s.meta.__dict__, "warmup_steps": 11}))
    h = small_suite.content_hash
    assert content_hash([moved] + small_suite.scenarios[1:]) != h
    assert content_hash([renamed] + small_suite.scenarios[1:]) != h
    assert content_hash(small_suite.scenarios[::-1]) != h


def _first_file(d):
    return d / json.loads((d / "suite.json").read_text())["scenarios"][0]["file"]


def test_tampered_file(small_suite, tmp_path):
    d = save_suite(small_suite, tmp_path)
    f = _first_file(d)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ScenarioError, match=rf"{f.name}: scenario file is corrupt or truncated \(sha256"):
        load_suite(d)


def test_truncated_file(small_suite, tmp_path):
    d = save_suite(small_suite, tmp_path)
    f = _first_file(d)
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ScenarioError, match=rf"{f.name}: scenario file is corrupt or truncated"):
        load_suite(d)


def test_wrong_schema_version(small_suite, tmp_path):
    d = save_suite(small_suite, tmp_path)
    idx = json.loads((d / "suite.json").read_text())
    idx["schema_version"] = 999
    (d / "suite.json").write_text(json.dumps(idx))
    with pytest.raises(ScenarioError, match=rf"suite.json: wrong version: file has schema_version 999, "
                                            rf"this roadloop reads version {SCHEMA_VERSION}"):
        load_suite(d)


def _rewrite(d, mutate) -> str:
    """Apply ``mutate(arrays)`` to the first scenario file and fix its sha256 in suite.json."""
    import hashlib

    f = _first_file(d)
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    mutate(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    f.write_bytes(buf.getvalue())
    idx = json.loads((d / "suite.json").read_text())
    idx["scenarios"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (d / "suite.json").write_text(json.dumps(idx))
    return idx["scenarios"][0]["id"]


def test_missing_field_and_wrong_shape(small_suite, tmp_path):
    d = save_suite(small_suite, tmp_path / "a")
    sid = _rewrite(d, lambda a: a.pop("agents.xy"))
    with pytest.raises(ScenarioError, match=rf"scenario '{sid}' .*missing field agents.xy"):
        load_suite(d)
    d = save_suite(small_suite, tmp_path / "b")
    sid = _rewrite(d, lambda a: a.__setitem__("map.lane_width", a["map.lane_width"][:, None]))
    with pytest.raises(ScenarioError, match=rf"scenario '{sid}' .*field map.lane_width has shape .*expected 1 dims"):
        load_suite(d)
    d = save_suite(small_suite, tmp_path / "c")
    sid = _rewrite(d, lambda a: a.__setitem__("agents.yaw", a["agents.yaw"][:, :-1]))
    with pytest.raises(ScenarioError, match=rf"scenario '{sid}' .*field agents.yaw has shape"):
        load_suite(d)


def test_not_a_suite_directory(tmp_path):
    with pytest.raises(ScenarioError, match="not a suite directory"):
        load_suite(tmp_path)


def test_saved_files_are_plain_npz(small_suite, tmp_path):
    d = save_suite(small_suite, tmp_path)
    with zipfile.ZipFile(_first_file(d)) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    assert not list(d.glob(".tmp-*"))


# --- the smoke suite (generated with the careful driver, then cached) --------------------------------

@pytest.mark.slow
def test_smoke_suite_generates_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADLOOP_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    s1 = load_suite("smoke")
    t1 = time.perf_counter()
    assert [sc.meta.family for sc in s1.scenarios] == list(FAMILIES)
    for sc in s1.scenarios:
        assert bool(sc.agents.valid[0].all()), f"{sc.meta.scenario_id}: ego log not filled in"
    d = suites.cached_suite_dir("smoke")
    assert d.parent == tmp_path / "suites" and (d / "suite.json").is_file()
    s2 = load_suite("smoke")
    assert s2.content_hash == s1.content_hash
    assert time.perf_counter() - t1 < 0.5 * (t1 - t0)  # read from the cache
    assert load_suite(d).content_hash == s1.content_hash
