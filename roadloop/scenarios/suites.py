"""Named scenario suites and their on-disk format (see ``docs/scenario_format.md``).

Suites: ``smoke`` (1 scenario per family, seed 0), ``train`` (64 per family, seeds 1000+),
``train-xl`` (192 per family, seeds 1000+: ``train`` and 128 more per family, for imitation runs
that need more distinct scenes), ``train-xl2`` (192 more per family, seeds 1192+, disjoint from
``train-xl``: collected beside it, twice its scenes) and ``val`` (24 per family, seeds 900000+;
disjoint from every training suite, derived retry seeds included).

``load_suite(name)`` generates a named suite once and caches it under
``$ROADLOOP_CACHE/suites/<name>-<code_hash>`` (default cache ``~/.cache/roadloop``); the code hash
covers the sources of ``roadloop/scenarios`` and ``roadloop/sim`` so editing a generator or the
simulator invalidates the cache.  ``load_suite(directory)`` loads and verifies a saved suite.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from roadloop.errors import ConfigError, ScenarioError, UnknownNameError
from roadloop.io import atomic_write_bytes
from roadloop.scenarios.families import BUILTIN, FAMILIES
from roadloop.sim.batching import validate
from roadloop.sim.datatypes import SCHEMA_VERSION, Agents, Map, Route, Scenario, ScenarioMeta

FORMAT = "roadloop-suite"
INDEX = "suite.json"
META_KEY = "meta"

# first seed, scenarios per family
_SEEDS = {"smoke": (0, 1), "train": (1000, 64), "train-xl": (1000, 192), "train-xl2": (1192, 192),
          "val": (900000, 24)}
TRAINING_SUITES = ("train", "train-xl", "train-xl2")


def suite_pairs(name: str) -> list[tuple[str, int]]:
    """(family, seed) pairs of a named suite, family by family."""
    if name not in _SEEDS:
        raise UnknownNameError("suite", name, list_suites())
    first, n = _SEEDS[name]
    return [(f, first + i) for f in FAMILIES if f in BUILTIN for i in range(n)]  # fixed benchmarks: built-ins only


def list_suites() -> list[str]:
    return sorted(_SEEDS)


def _all_build_seeds(name: str) -> set[int]:
    from roadloop.scenarios.generate import MAX_ATTEMPTS, build_seed

    return {build_seed(s, a) for _, s in suite_pairs(name) for a in range(MAX_ATTEMPTS)}


def check_disjoint() -> None:
    """The training suites and val must not share a seed, nor a retry seed; nor may ``train-xl`` and
    ``train-xl2``, which are collected side by side."""
    for a, b in [(name, "val") for name in TRAINING_SUITES] + [("train-xl", "train-xl2")]:
        common = _all_build_seeds(a) & _all_build_seeds(b)
        if common:
            raise ConfigError(f"{a} and {b} suites share build seeds {sorted(common)[:5]}")


check_disjoint()


@dataclass(frozen=True, eq=False)
class Suite:
    name: str
    scenarios: list[Scenario]
    content_hash: str  # sha256 hex, see ``content_hash``

    @staticmethod
    def of(name: str, scenarios: list[Scenario]) -> Suite:
        return Suite(name, list(scenarios), content_hash(scenarios))


# --- hashing ------------------------------------------------------------------------------

def _tensors(s: Scenario) -> dict[str, torch.Tensor]:
    return dict(s.tensor_items())


def _meta_json(meta: ScenarioMeta) -> str:
    return json.dumps(meta.to_json(), sort_keys=True, separators=(",", ":"))


def _update(h, s: Scenario) -> None:
    for name, t in sorted(_tensors(s).items()):
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(_meta_json(s.meta).encode())


def content_hash(scenarios: list[Scenario]) -> str:
    """sha256 over every scenario in order: each tensor (sorted by dotted name: name, dtype,
    shape, raw bytes) and the scenario's meta as canonical JSON."""
    h = hashlib.sha256()
    for s in scenarios:
        _update(h, s)
    return h.hexdigest()


def code_hash() -> str:
    """Hash (16 hex) of the code that determines generated scenarios.

    roadloop/scenarios, roadloop/sim, roadloop/sumo and roadloop/policies (the expert drives the
    procedural logs; the learned policies under policies/vla do not take part) plus the rollout
    engine."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    h.update((root / "rollout.py").read_bytes())
    for sub in ("scenarios", "sim", "sumo", "policies"):
        for p in sorted((root / sub).rglob("*.py")):
            if "vla" in p.relative_to(root).parts:
                continue
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# --- scenario files ----------------------------------------------------------------------------

def scenario_bytes(s: Scenario) -> bytes:
    """The ``.npz`` file of one scenario: every tensor under its dotted name plus the meta JSON.

    Written with fixed zip timestamps, so equal scenarios give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        items = sorted(_tensors(s).items()) + [(META_KEY, None)]
        for name, t in items:
            arr = np.array(_meta_json(s.meta)) if t is None else t.detach().cpu().contiguous().numpy()
            b = io.BytesIO()
            np.lib.format.write_array(b, arr, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, b.getvalue())
    return buf.getvalue()


@cache
def _layout() -> dict[str, tuple[torch.dtype, int]]:
    """Expected dtype and number of dims of every tensor field of a single scenario."""
    from roadloop.scenarios.builder import ScenarioBuilder

    b = ScenarioBuilder(2)
    ln = b.add_lane([[0.0, 0.0], [10.0, 0.0]])
    b.set_route([ln])
    b.add_agent([[1.0, 0.0]], 0.0, 0.0)
    s = b.build(ScenarioMeta("layout/0", "layout", 0, "layout"))
    return {k: (t.dtype, t.dim()) for k, t in s.tensor_items()}


# groups of (field, dim) that must agree in size, and fixed trailing sizes
_SAME = [
    [("map.lane_xy", 0), ("map.lane_point_valid", 0), ("map.lane_width", 0), ("map.lane_speed_limit", 0),
     ("map.lane_valid", 0), ("map.lane_is_junction", 0), ("map.lane_successors", 0), ("map.lane_predecessors", 0),
     ("map.lane_left", 0), ("map.lane_right", 0), ("map.lane_light", 0)],
    [("map.lane_xy", 1), ("map.lane_point_valid", 1)],
    [("map.lane_successors", 1), ("map.lane_predecessors", 1)],
    [("map.road_edge_xy", 0), ("map.road_edge_valid", 0)], [("map.road_edge_xy", 1), ("map.road_edge_valid", 1)],
    [("map.crosswalk_xy", 0), ("map.crosswalk_valid", 0)],
    [("map.stop_line_xy", 0), ("map.stop_line_lane", 0), ("map.stop_line_valid", 0)],
    [(f"agents.{n}", 0) for n in ("xy", "yaw", "speed", "valid", "length", "width", "kind", "model", "path_xy",
                                  "path_valid", "path_stop_s", "path_stop_light", "desired_speed")],
    [("agents.xy", 1), ("agents.yaw", 1), ("agents.speed", 1), ("agents.valid", 1), ("light_states", 1)],
    [("agents.path_xy", 1), ("agents.path_valid", 1)], [("agents.path_stop_s", 1), ("agents.path_stop_light", 1)],
    [("route.xy", 0), ("route.valid", 0), ("route.lane_of_point", 0), ("route.speed_limit", 0)],
    [("route.stop_s", 0), ("route.stop_light", 0)],
    [("light_states", 0), ("light_xy", 0)],
]
_TRAILING = {"map.lane_xy": (2,), "map.road_edge_xy": (2,), "map.crosswalk_xy": (4, 2), "map.stop_line_xy": (2, 2),
             "agents.xy": (2,), "agents.path_xy": (2,), "route.xy": (2,), "light_xy": (2,)}


def scenario_from_arrays(arrays: dict[str, np.ndarray], where: str) -> Scenario:
    """Rebuild and check a scenario from its file's arrays; errors name ``where``, the id and the field."""
    if META_KEY not in arrays:
        raise ScenarioError(f"{where}: missing field '{META_KEY}'")
    try:
        meta = ScenarioMeta.from_json(json.loads(str(arrays[META_KEY][()])))
    except (ValueError, TypeError) as e:
        raise ScenarioError(f"{where}: unreadable meta: {e}") from None
    sid = f"scenario '{meta.scenario_id}' ({where})"
    layout = _layout()
    extra = sorted(set(arrays) - set(layout) - {META_KEY})
    if extra:
        raise ScenarioError(f"{sid}: unexpected field {extra[0]}")
    t: dict[str, torch.Tensor] = {}
    for name, (dtype, ndim) in layout.items():
        if name not in arrays:
            raise ScenarioError(f"{sid}: missing field {name}")
        a = arrays[name]
        if a.ndim != ndim:
            raise ScenarioError(f"{sid}: field {name} has shape {a.shape}, expected {ndim} dims")
        x = torch.from_numpy(np.array(a))
        if x.dtype != dtype:
            raise ScenarioError(f"{sid}: field {name} has dtype {x.dtype}, expected {dtype}")
        t[name] = x
    for group in _SAME:
        (n0, d0), want = group[0], t[group[0][0]].shape[group[0][1]]
        for n, d in group[1:]:
            if t[n].shape[d] != want:
                raise ScenarioError(f"{sid}: field {n} has shape {tuple(t[n].shape)}: dim {d} should be {want} "
                                    f"like dim {d0} of {n0}")
    for n, tail in _TRAILING.items():
        if tuple(t[n].shape[-len(tail):]) != tail:
            raise ScenarioError(f"{sid}: field {n} has shape {tuple(t[n].shape)}, expected trailing dims {tail}")
    pick = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    s = Scenario(map=Map(**pick("map.")), agents=Agents(**pick("agents.")), route=Route(**pick("route.")),
                 light_states=t["light_states"], light_xy=t["light_xy"], meta=meta)
    validate(s)
    return s


def _file_name(s: Scenario) -> str:
    return s.meta.scenario_id.replace("/", "__") + ".npz"


def save_suite(suite: Suite, directory: str | Path) -> Path:
    """Write ``suite`` to ``directory`` atomically: scenario files first, ``suite.json`` last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / INDEX).unlink(missing_ok=True)  # a half-rewritten directory must not look valid
    entries, seen = [], set()
    for s in suite.scenarios:
        name = _file_name(s)
        if name in seen:
            raise ScenarioError(f"suite '{suite.name}': duplicate scenario id '{s.meta.scenario_id}'")
        seen.add(name)
        data = scenario_bytes(s)
        atomic_write_bytes(d / name, data)
        entries.append({"id": s.meta.scenario_id, "file": name, "sha256": hashlib.sha256(data).hexdigest()})
    index = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "name": suite.name,
             "content_hash": suite.content_hash, "scenarios": entries}
    atomic_write_bytes(d / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return d


def _load_dir(d: Path) -> Suite:
    idx_path = d / INDEX
    if not idx_path.is_file():
        raise ScenarioError(f"{d}: not a suite directory (no {INDEX})")
    try:
        index = json.loads(idx_path.read_text())
    except (ValueError, OSError) as e:
        raise ScenarioError(f"{idx_path}: unreadable suite index: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ScenarioError(f"{idx_path}: not a {FORMAT} index (format={index.get('format')!r})"
                            if isinstance(index, dict) else f"{idx_path}: not a {FORMAT} index")
    if index.get("schema_version") != SCHEMA_VERSION:
        raise ScenarioError(f"{idx_path}: wrong version: file has schema_version {index.get('schema_version')!r}, "
                            f"this roadloop reads version {SCHEMA_VERSION}; regenerate the suite")
    for key in ("name", "content_hash", "scenarios"):
        if key not in index:
            raise ScenarioError(f"{idx_path}: missing key '{key}'")
    scenarios = []
    for e in index["scenarios"]:
        path = d / str(e.get("file", ""))
        if not path.is_file():
            raise ScenarioError(f"{path}: scenario file listed in {INDEX} is missing")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != e.get("sha256"):
            raise ScenarioError(f"{path}: scenario file is corrupt or truncated (sha256 {digest[:12]}..., "
                                f"{INDEX} expects {str(e.get('sha256'))[:12]}...)")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
            raise ScenarioError(f"{path}: unreadable scenario file: {err}") from None
        s = scenario_from_arrays(arrays, str(path))
        if s.meta.scenario_id != e.get("id"):
            raise ScenarioError(f"{path}: holds scenario '{s.meta.scenario_id}', {INDEX} says '{e.get('id')}'")
        scenarios.append(s)
    h = content_hash(scenarios)
    if h != index["content_hash"]:
        raise ScenarioError(f"{idx_path}: content hash mismatch ({h[:12]}... != {str(index['content_hash'])[:12]}...)")
    return Suite(str(index["name"]), scenarios, h)


def cache_root() -> Path:
    return Path(os.environ.get("ROADLOOP_CACHE") or Path.home() / ".cache" / "roadloop")


def cached_suite_dir(name: str) -> Path:
    return cache_root() / "suites" / f"{name}-{code_hash()}"


def load_suite(name_or_dir: str | Path) -> Suite:
    """A suite from a directory, or a named suite (generated once, then read from the cache)."""
    p = Path(name_or_dir)
    if p.is_dir():
        return _load_dir(p)
    name = str(name_or_dir)
    if name not in _SEEDS:
        from roadloop.sumo.suite import SUMO_SUITES, load_sumo_suite  # sumo-real, -train, -val

        if name in SUMO_SUITES:
            return load_sumo_suite(name)
        raise UnknownNameError("suite", name, list_suites())
    pairs = suite_pairs(name)
    d = cached_suite_dir(name)
    if (d / INDEX).is_file():
        try:
            suite = _load_dir(d)
            if [s.meta.scenario_id for s in suite.scenarios] == [f"{f}/{s:06d}" for f, s in pairs]:
                return suite
        except ScenarioError:
            pass  # stale or damaged cache: regenerate
    from roadloop.scenarios.generate import generate_many

    suite = Suite.of(name, generate_many(pairs))
    save_suite(suite, d)
    return suite


__all__ = ["Suite", "FORMAT", "suite_pairs", "list_suites", "check_disjoint", "content_hash", "code_hash",
           "scenario_bytes", "scenario_from_arrays", "save_suite", "load_suite", "cache_root", "cached_suite_dir"]
