"""Expert demonstrations: collection, shards + manifest, resume, dataset loading, CLI."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from roadloop.data import DemoDataset, collate_samples, collect, load_manifest
from roadloop.errors import RoadloopError
from roadloop.policies.vla.observe import CHANNELS
from roadloop.reasoning.meta_action import Lateral, Longitudinal
from roadloop.sim.dynamics import ActionBounds, unicycle_rollout

collect_mod = importlib.import_module("roadloop.data.collect")  # the module (the package exports the function)

KW = dict(every=5, max_scenarios=2, batch_size=1, max_steps=40, shard_size=8)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    d = tmp_path_factory.mktemp("demos")
    return d, collect(["smoke"], d, **KW)


def test_collect_writes_shards_and_manifest(fresh):
    d, man = fresh
    assert man.complete and man.n_scenarios == 2 and man.n_samples > 0
    assert len(man.shards) >= 2  # two chunks, several shards of <= 8 samples
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk["format"] == "roadloop-demos" and on_disk["version"] == 5
    assert on_disk["content_hash"] == man.content_hash and on_disk["n_samples"] == man.n_samples
    assert set(on_disk["suites"]) == {"smoke"}
    for s in man.shards:
        assert (d / s["file"]).is_file() and 0 < s["n"] <= 8


def test_dataset_shapes_labels_and_geometry(fresh):
    d, man = fresh
    ds = DemoDataset(d)
    assert len(ds) == man.n_samples
    x = ds[0]
    assert x["raster"].shape == (4, len(CHANNELS), 64, 64) and x["raster"].dtype == torch.float32
    assert float(x["raster"].min()) >= -1.0 and float(x["raster"].max()) <= 1.0
    assert x["history"].shape == (16, 5) and x["waypoints"].shape == (64, 2) and x["controls"].shape == (64, 2)
    b = collate_samples([ds[i] for i in range(len(ds))])
    assert b["waypoints"].shape == (len(ds), 64, 2) and len(b["text"]) == len(ds)
    assert all(t.strip() for t in b["text"])
    assert b["lon"].dtype == torch.int64 and b["lat"].dtype == torch.int64
    assert int(b["lon"].min()) >= 0 and int(b["lon"].max()) < len(Longitudinal)
    assert int(b["lat"].min()) >= 0 and int(b["lat"].max()) < len(Lateral)
    assert (b["step"] % 5 == 0).all()
    # ego frame: the first waypoint is just ahead of the origin, heading +x
    w0 = b["waypoints"][:, 0]
    v = b["speed"]
    assert (w0[:, 0] >= -0.05).all() and (w0[:, 1].abs() < 0.3).all()
    assert ((w0.norm(dim=-1) - 0.1 * v).abs() < 0.5).all()
    assert (b["history"][:, -1, :2].abs() < 1e-4).all()  # history ends at the current pose
    # the controls replayed from the current speed reproduce the waypoints (6.4 s)
    n = len(ds)
    xy, _, _ = unicycle_rollout(torch.zeros(n, 2), torch.zeros(n), v, b["controls"], bounds=ActionBounds())
    err = (xy - b["waypoints"]).norm(dim=-1)
    assert float(err[:, -1].max()) < 0.5, float(err[:, -1].max())
    # deterministic split by scenario id
    tr, va = ds.split(0.5)
    assert len(tr) + len(va) == len(ds)
    ids_tr = {ds.scenario_ids[i] for i in tr.indices}
    assert ids_tr.isdisjoint({ds.scenario_ids[i] for i in va.indices})
    assert ds.split(0.5)[1].indices == va.indices


def test_resume_after_interruption_gives_the_same_hash(fresh, tmp_path, monkeypatch):
    _, man = fresh
    real = collect_mod.atomic_write_text
    calls = {"n": 0}

    def crash_after_first_chunk(path, text):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("simulated interruption")
        real(path, text)

    monkeypatch.setattr(collect_mod, "atomic_write_text", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        collect(["smoke"], tmp_path, **KW)
    monkeypatch.setattr(collect_mod, "atomic_write_text", real)
    part = load_manifest(tmp_path)
    assert len(part.chunks) == 1 and not part.complete
    (tmp_path / ".shard-00099.npz.123.tmp").write_bytes(b"half written")  # ignored
    seen = []
    done = collect(["smoke"], tmp_path, on_progress=lambda a, b: seen.append((a, b)), **KW)
    assert seen[0] == (1, 2) and seen[-1] == (2, 2)
    assert done.complete and done.content_hash == man.content_hash
    assert load_manifest(tmp_path).content_hash == man.content_hash
    # other settings in the same directory: refuse to mix them
    with pytest.raises(RoadloopError, match="no-resume"):
        collect(["smoke"], tmp_path, **{**KW, "every": 10})


def test_tampered_or_corrupt_shard_is_a_clear_error(fresh, tmp_path):
    import shutil

    d, man = fresh
    shutil.copytree(d, tmp_path / "c")
    f = tmp_path / "c" / man.shards[1]["file"]
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RoadloopError, match=f"{man.shards[1]['file']}.*hash does not match its manifest"):
        DemoDataset(tmp_path / "c")
    f.write_bytes(b"")
    with pytest.raises(RoadloopError, match="empty"):
        DemoDataset(tmp_path / "c")
    # a corrupt file whose hash was (wrongly) recorded is still caught when read
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    f.write_bytes(b"not a zip")
    from roadloop.io import sha256_file

    m["shards"][1]["sha256"] = sha256_file(f)
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RoadloopError, match="unreadable shard"):
        DemoDataset(tmp_path / "c")
    with pytest.raises(RoadloopError, match="no demonstration manifest"):
        DemoDataset(tmp_path / "nothing")
    m["version"] = 3  # demonstrations labelled by the previous meta-action rule
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RoadloopError, match="v3 manifest, but this code reads v5.*collect the demonstrations again"):
        DemoDataset(tmp_path / "c")


def test_streamed_rasters_equal_the_loaded_ones(fresh, monkeypatch):
    """rasters="stream" reads the same bytes shard by shard; the shard-windowed order is a permutation
    that visits the shards a window at a time; a collection too large for memory is refused clearly."""
    from roadloop.data import dataset as ds_mod
    from roadloop.data.dataset import ShardRasters, load_demos, shard_epoch_order

    d, man = fresh
    mem, st = load_demos(d), load_demos(d, rasters="stream", cache_shards=2)
    assert isinstance(st.raster, ShardRasters) and st.raster.shape == mem.raster.shape
    assert st.text == mem.text and torch.equal(st.controls, mem.controls) and st.content_hash == mem.content_hash
    idx = torch.tensor([len(mem) - 1, 0, 3, 3, len(mem) // 2, 1])  # any order, repeats
    assert torch.equal(st.raster[idx], mem.raster[idx]) and torch.equal(st.bev(idx), mem.bev(idx))
    assert len(st.raster._cache) <= 2
    with pytest.raises(IndexError, match="must be in"):
        st.raster[torch.tensor([len(mem)])]
    shard = st.raster.shard_of(torch.arange(len(st)))
    assert shard.tolist() == sorted(shard.tolist()) and int(shard.max()) == len(man.shards) - 1
    order = shard_epoch_order(shard, seed=3, epoch=1, window=1)
    assert torch.equal(order.sort().values, torch.arange(len(st)))
    assert torch.equal(order, shard_epoch_order(shard, seed=3, epoch=1, window=1))  # a pure function
    assert not torch.equal(order, shard_epoch_order(shard, seed=3, epoch=2, window=1))
    visited = shard[order].tolist()
    first = list(dict.fromkeys(visited))  # shards in order of first visit
    windows = [first.index(s) for s in visited]  # window = 1: each shard's samples in one block
    assert windows == sorted(windows) and len(first) == len(man.shards) >= 2
    assert int((torch.diff(shard[shard_epoch_order(shard, 3, 1, window=2)]) != 0).sum()) > 1  # a window mixes
    # strata (one family per shard, as the collector writes): every window of 3 shards holds the 3 families
    syn_shard = torch.arange(6).repeat_interleave(5)
    syn_family = (torch.arange(6) % 3).repeat_interleave(5)
    for epoch in range(5):
        o = shard_epoch_order(syn_shard, 0, epoch, window=3, strata=syn_family)
        assert torch.equal(o.sort().values, torch.arange(30))
        assert all(sorted(set(syn_family[o[w:w + 15]].tolist())) == [0, 1, 2] for w in (0, 15))
    monkeypatch.setattr(ds_mod, "available_memory", lambda: 1024)
    with pytest.raises(RoadloopError, match=r"need .* GiB in memory.*data_loading=stream"):
        load_demos(d)
    assert len(load_demos(d, rasters="stream")) == len(mem)  # streaming needs no such memory


def test_several_collections_load_as_one(fresh, tmp_path):
    """load_demos("a,b") concatenates collections (its own content hash); shared scenarios are refused."""
    from roadloop.data.dataset import load_demos

    d, man = fresh
    other = tmp_path / "other"
    collect(["smoke"], other, **{**KW, "max_scenarios": 3})  # the same two scenarios and one more
    with pytest.raises(RoadloopError, match=r"both hold scenario \S+ \(2 shared in all\)"):
        load_demos(f"{d},{other}")
    third = tmp_path / "third"
    collect([str(_one_scenario_suite(tmp_path))], third, **KW)
    a, b = load_demos(d), load_demos(third)
    for mode in ("memory", "stream"):
        both = load_demos(f"{d}, {third}", rasters=mode)
        assert len(both) == len(a) + len(b) and both.scenario_id == a.scenario_id + b.scenario_id
        assert torch.equal(both.raster[torch.arange(len(both))], torch.cat((a.raster, b.raster)))
        assert both.content_hash not in (a.content_hash, b.content_hash)
        assert both.content_hash == load_demos([d, third]).content_hash
    with pytest.raises(RoadloopError, match="no demonstration directory"):
        load_demos(" , ")


def test_content_hash_does_not_depend_on_where_the_suite_lies(tmp_path):
    """The same suite saved in two folders gives demonstrations with the same content hash."""
    import shutil

    from roadloop.data.dataset import load_demos

    a = _one_scenario_suite(tmp_path)
    b = shutil.copytree(a, tmp_path / "elsewhere" / "copy")
    ma, mb = collect([str(a)], tmp_path / "da", **KW), collect([str(b)], tmp_path / "db", **KW)
    assert ma.content_hash == mb.content_hash and ma.suites != mb.suites  # the manifests say where they came from
    assert set(load_demos(tmp_path / "da").suite) == {"extra"}


def test_cli_bench_data(fresh, tmp_path):
    from typer.testing import CliRunner

    from roadloop.cli import app

    d, man = fresh
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "data", "--data", str(d), "--batches", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = {x["mode"]: x for x in json.loads(out.read_text())["results"]}
    assert set(res) == {"stream", "memory"}
    assert res["stream"]["samples"] == res["memory"]["samples"] == man.n_samples
    assert res["stream"]["shard_loads"] >= 1 and res["memory"]["shard_loads"] == 0
    assert all(x["samples_per_s"] > 0 for x in res.values())


def _one_scenario_suite(tmp_path):
    """A saved suite of one scenario that ``smoke``'s first two do not hold."""
    from roadloop.scenarios.generate import generate
    from roadloop.scenarios.suites import Suite, save_suite

    return save_suite(Suite.of("extra", [generate("merge", 77)]), tmp_path / "extra_suite")


def test_cli_data_collect_and_info(tmp_path):
    from typer.testing import CliRunner

    from roadloop.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["data", "collect", "--suites", "smoke", "--out", str(out), "--every", "5",
                                 "--max-scenarios", "1", "--max-steps", "30"])
    assert r.exit_code == 0, r.output
    assert "samples" in r.output and (out / "manifest.json").is_file()
    r = CliRunner().invoke(app, ["data", "info", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "content hash" in r.output and "match" in r.output
    r = CliRunner().invoke(app, ["data", "info", str(tmp_path / "none")])
    assert r.exit_code == 2


def test_raster_geometry_is_recorded_and_collections_must_share_it(fresh, tmp_path):
    """``collect(raster=...)``: the manifest records the view, the rasters hold it, and collections recorded
    with different views are not combined."""
    from roadloop.data.dataset import load_demos
    from roadloop.policies.vla.observe import RasterConfig

    d, _ = fresh
    far = RasterConfig(resolution=1.0, ego_offset=0.1)  # 57.6 m ahead instead of 40.8
    assert far.ahead == pytest.approx(57.6) and RasterConfig().ahead == pytest.approx(40.8)
    man = collect(["smoke"], tmp_path / "far", **KW, raster=far)
    assert man.config["raster"] == {"size": 64, "resolution": 1.0, "ego_offset": 0.1, "frames": 4}
    near_demos, far_demos = load_demos(d), load_demos(tmp_path / "far")
    assert near_demos.raster_geometry == RasterConfig().geometry() and far_demos.raster_geometry == far.geometry()
    assert near_demos.scenario_id == far_demos.scenario_id and near_demos.text == far_demos.text  # same drives
    assert not torch.equal(near_demos.raster, far_demos.raster)  # seen through another view
    with pytest.raises(RoadloopError, match="different rasters cannot be combined"):
        load_demos(f"{d},{tmp_path / 'far'}")
    for bad in (dict(resolution=0.0), dict(resolution=float("nan")), dict(ego_offset=1.0), dict(ego_offset=-0.1)):
        with pytest.raises(ValueError, match="RasterConfig"):
            RasterConfig(**bad)
