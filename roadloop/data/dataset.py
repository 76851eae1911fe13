"""``DemoDataset``: the demonstrations written by ``roadloop.data.collect`` as a torch Dataset.

On construction it reads ``manifest.json``, verifies every shard's sha256 against it and reads
each shard's ``scenario_id`` column (cheap: NPZ members load lazily).  Samples are then read
shard by shard on demand (the last ``cache_shards`` shards are kept in memory).

A sample is a dict: ``raster`` (4, 13, 64, 64) float32 (decoded, see ``decode_raster``),
``history`` (16, 5) float32, ``command`` () int64, ``speed`` () float32 m/s, ``waypoints``
(64, 2) float32 m ego frame, ``waypoints_yaw`` / ``waypoints_speed`` (64,), ``controls``
(64, 2) float32 (accel m/s^2, curvature 1/m), ``lon`` / ``lat`` () int64, ``step`` () int64 and
the strings ``text``, ``scenario_id``, ``family``, ``suite``, plus the ``facts_*`` arrays.

``load_demos(directory)`` reads a whole collection into memory as ``DemoTensors`` (raster kept
as uint8, 213 KB a sample; facts padded to the largest agent / stop-line count), which is what
the trainers and the open-loop metrics use.  ``load_demos(directory, rasters="stream")`` keeps
everything but the rasters in memory (a few KB a sample) and reads the rasters shard by shard
when a batch asks for them (``ShardRasters``); ``shard_epoch_order`` gives a sample order that
reads each shard once per epoch.  Loading in memory a collection whose rasters would not fit
in the memory available is refused with an error that says so.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from roadloop.data.collect import FACT_FIELDS, decode_raster, load_manifest, verify_shard
from roadloop.errors import RoadloopError
from roadloop.policies.vla.observe import RasterConfig
from roadloop.reasoning.labels import SceneFacts

STR_KEYS = ("text", "scenario_id", "family", "suite")
REQUIRED = ("raster", "history", "command", "speed", "waypoints", "waypoints_yaw", "waypoints_speed", "controls",
            "lon", "lat", "step") + STR_KEYS + tuple(f"facts_{k}" for k in FACT_FIELDS)
_AGENT_FACTS = ("kind", "valid", "dist", "x_ego", "y_ego", "y_route", "gap", "near_route", "in_corridor", "intrudes",
                "speed", "accel", "crossing")
_LINE_FACTS = ("light_gap", "light_state")
_FACT_PAD = {"valid": False, "near_route": False, "in_corridor": False, "intrudes": False, "crossing": False,
             "dist": 1e9, "gap": 1e9, "light_gap": 1e9}


RASTER_MODES = ("memory", "stream")
MEMORY_SHARE = 0.8  # rasters loaded in memory may take at most this share of the available memory


def _open(p: Path) -> np.lib.npyio.NpzFile:
    try:
        z = np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise RoadloopError(f"{p}: unreadable shard: {e}") from None
    missing = [k for k in REQUIRED if k not in z.files]
    if missing:
        z.close()
        raise RoadloopError(f"{p}: shard lacks the arrays {missing}")
    return z


def is_val(scenario_id: str, val_fraction: float) -> bool:
    """Deterministic split: the scenario is in val if the first 8 hex digits of sha256(id) fall below the fraction."""
    return int(hashlib.sha256(scenario_id.encode()).hexdigest()[:8], 16) < val_fraction * 2**32


def manifest_raster(manifest) -> dict[str, float | int]:
    """The raster geometry a collection was recorded with (``RasterConfig.geometry``; the default's fields
    where its manifest lacks them)."""
    got = manifest.config.get("raster") if isinstance(manifest.config, dict) else None
    return {**RasterConfig().geometry(), **(got if isinstance(got, dict) else {})}


class DemoDataset(Dataset):
    """Demonstration samples of a collection directory (see module docstring)."""

    def __init__(self, directory: str | Path, cache_shards: int = 2):
        self.dir = Path(directory).expanduser()
        self.manifest = load_manifest(self.dir)
        self.paths: list[Path] = []
        self.scenario_ids: list[str] = []
        self._shard_of: list[tuple[int, int]] = []
        for si, e in enumerate(self.manifest.shards):
            p = verify_shard(self.dir, e)
            with _open(p) as z:
                try:
                    ids = [str(x) for x in z["scenario_id"]]
                except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
                    raise RoadloopError(f"{p}: unreadable shard: {err}") from None
            if len(ids) != int(e["n"]) or len(ids) == 0:
                raise RoadloopError(f"{p}: shard holds {len(ids)} samples, the manifest says {e['n']}")
            self.paths.append(p)
            self.scenario_ids += ids
            self._shard_of += [(si, j) for j in range(len(ids))]
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.cache_shards = max(1, cache_shards)

    def __len__(self) -> int:
        return len(self._shard_of)

    def _shard(self, si: int) -> dict[str, np.ndarray]:
        if si in self._cache:
            self._cache.move_to_end(si)
            return self._cache[si]
        with _open(self.paths[si]) as z:
            try:
                d = {k: z[k] for k in REQUIRED}
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise RoadloopError(f"{self.paths[si]}: unreadable shard: {err}") from None
        self._cache[si] = d
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return d

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        si, j = self._shard_of[i]
        d = self._shard(si)
        out: dict = {k: str(d[k][j]) for k in STR_KEYS}
        out["raster"] = decode_raster(torch.from_numpy(d["raster"][j]))
        for k in REQUIRED:
            if k not in out:
                out[k] = torch.as_tensor(d[k][j])
        return out

    def split(self, val_fraction: float = 0.1) -> tuple[Subset, Subset]:
        """(train, val) subsets split by scenario id (all samples of a scenario on one side)."""
        val = [is_val(s, val_fraction) for s in self.scenario_ids]
        return (Subset(self, [i for i, v in enumerate(val) if not v]),
                Subset(self, [i for i, v in enumerate(val) if v]))


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples: tensors get a leading batch dim, strings become lists."""
    if not samples:
        raise RoadloopError("cannot collate an empty list of samples")
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], str):
            out[k] = vals
        elif k.startswith("facts_") and vals[0].dim() == 1:  # per-agent / per-stop-line facts: pad
            width = max(v.shape[0] for v in vals)
            pad = _FACT_PAD.get(k[len("facts_"):], 0)
            out[k] = torch.stack([torch.cat((v, torch.full((width - v.shape[0],), pad, dtype=v.dtype))) for v in vals])
        else:
            out[k] = torch.stack(vals)
    return out


def _raster_header(p: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a shard's ``raster`` array, read from its .npy header (nothing decompressed
    beyond the header)."""
    try:
        with zipfile.ZipFile(p) as zf, zf.open("raster.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise RoadloopError(f"{p}: unreadable raster array: {e}") from None
    return tuple(shape), dtype


class ShardRasters:
    """The rasters (N, F, C, H, W) uint8 of a collection, read from its shards on demand.

    ``rasters[idx]`` (idx: (B,) int64 sample indices, any order, repeats allowed) returns a
    (B, F, C, H, W) uint8 tensor, loading each shard it touches once (decompressing a 512-sample
    shard takes ~0.25 s) and keeping the ``cache_shards`` most recently used ones.  Sample orders
    that visit a few shards at a time (``shard_epoch_order``) read each shard once per epoch.
    """

    def __init__(self, paths: list[Path], sizes: list[int], cache_shards: int = 16):
        if not paths or len(paths) != len(sizes):
            raise RoadloopError("ShardRasters: need one size per shard and at least one shard")
        self.paths = list(paths)
        self.offsets = torch.tensor([0] + list(np.cumsum(sizes)), dtype=torch.int64)
        first, dtype = _raster_header(self.paths[0])
        if dtype != np.uint8 or len(first) != 5:
            raise RoadloopError(f"{self.paths[0]}: raster is {dtype} {first}, expected uint8 (N, F, C, H, W)")
        self.sample_shape = tuple(first[1:])
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.loads = 0  # shards decompressed so far

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.sample_shape))

    def shard_of(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) shard index of each sample index."""
        return torch.searchsorted(self.offsets[1:], idx, right=True)

    def read(self, si: int) -> np.ndarray:
        """Shard ``si``'s rasters (n, F, C, H, W) uint8, decompressed now (not cached) and checked."""
        p = self.paths[si]
        with _open(p) as z:
            try:
                arr = z["raster"]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise RoadloopError(f"{p}: unreadable shard: {err}") from None
        n = int(self.offsets[si + 1] - self.offsets[si])
        if arr.shape != (n, *self.sample_shape) or arr.dtype != np.uint8:
            raise RoadloopError(f"{p}: raster is {arr.dtype} {arr.shape}, expected uint8 {(n, *self.sample_shape)}")
        self.loads += 1
        return arr

    def _load(self, si: int) -> np.ndarray:
        if si in self._cache:
            self._cache.move_to_end(si)
            return self._cache[si]
        arr = self._cache[si] = self.read(si)
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arr

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"sample indices must be in [0, {n}), got {int(idx.min())} .. {int(idx.max())}")
        out = torch.empty((idx.numel(), *self.sample_shape), dtype=torch.uint8)
        shard = self.shard_of(idx)
        for si in shard.unique().tolist():
            m = shard == si
            rows = (idx[m] - self.offsets[si]).numpy()
            out[m] = torch.from_numpy(self._load(si)[rows])
        return out


def shard_epoch_order(shard: torch.Tensor, seed: int, epoch: int, window: int,
                      strata: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation of ``range(len(shard))`` that reads the shards ``window`` at a time.

    ``shard`` (N,) is the shard of each sample.  The shards are shuffled, cut into groups of
    ``window``, and each group's samples are shuffled among themselves, group after group.  With
    ``strata`` (N,) int64 (e.g. the family of each sample; a shard counts as its first sample's
    stratum) the shuffled shards of each stratum are spread evenly over the epoch (stratified,
    like systematic sampling), so each group holds the strata in about their overall proportions:
    the collector writes one family per shard, and plain shuffling would let a group miss most
    families.  A pure function of (seed, epoch), like ``roadloop.train.il.epoch_order``, so a
    resumed run replays it.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    ids, inv = torch.unique(shard, return_inverse=True)
    n_shards, n = ids.numel(), shard.numel()
    if strata is None:
        s_of = torch.zeros(n_shards, dtype=torch.int64)
    else:
        first = torch.full((n_shards,), n, dtype=torch.int64).scatter_reduce(0, inv, torch.arange(n), "amin")
        s_of = strata[first]
    key = torch.empty(n_shards, dtype=torch.float64)
    for st in s_of.unique().tolist():  # a few strata, once per epoch
        members = (s_of == st).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        offset = torch.rand(1, generator=g, dtype=torch.float64)
        key[members] = (torch.arange(members.numel(), dtype=torch.float64) + offset) / members.numel()
    rank = torch.empty(n_shards, dtype=torch.int64)
    rank[torch.argsort(key, stable=True)] = torch.arange(n_shards)
    group = (rank[inv] // window).double()
    return torch.argsort(group + torch.rand(n, generator=g, dtype=torch.float64))


def stream_epoch_order(demos: DemoTensors, idx: torch.Tensor, seed: int, epoch: int, window: int) -> torch.Tensor:
    """``shard_epoch_order`` of the samples ``idx`` (B,) of a streamed collection, stratified by family:
    a permutation of ``range(B)``."""
    if not isinstance(demos.raster, ShardRasters):
        raise ValueError("stream_epoch_order needs a collection loaded with rasters='stream'")
    fam = {f: i for i, f in enumerate(sorted(set(demos.family)))}
    strata = torch.tensor([fam[demos.family[i]] for i in idx.tolist()], dtype=torch.int64)
    return shard_epoch_order(demos.raster.shard_of(idx), seed, epoch, window, strata)


@dataclass
class DemoTensors:
    """A demonstration collection in memory (N samples); field meanings as in ``roadloop.data.collect``."""

    raster: torch.Tensor | ShardRasters  # (N, F, C, H, W) uint8, ``decode_raster`` to use
    history: torch.Tensor  # (N, 16, 5) float32
    command: torch.Tensor  # (N,) int64
    speed: torch.Tensor  # (N,) float32 m/s
    waypoints: torch.Tensor  # (N, 64, 2) float32 m, ego frame
    waypoints_speed: torch.Tensor  # (N, 64) float32 m/s
    controls: torch.Tensor  # (N, 64, 2) float32
    lon: torch.Tensor  # (N,) int64
    lat: torch.Tensor  # (N,) int64
    step: torch.Tensor  # (N,) int64
    facts: dict[str, torch.Tensor]  # SceneFacts fields, padded to (N, A) / (N, K) / (N,)
    text: list[str]
    scenario_id: list[str]
    family: list[str]
    suite: list[str]
    content_hash: str = ""
    # the raster's size, resolution (m / px), ego_offset and frames (``RasterConfig.geometry``)
    raster_geometry: dict = field(default_factory=lambda: RasterConfig().geometry())

    def __len__(self) -> int:
        return int(self.command.shape[0])

    def scene_facts(self, idx: torch.Tensor) -> SceneFacts:
        """``SceneFacts`` of the samples ``idx`` (B,), for ``roadloop.reasoning.checks.grounding``."""
        return SceneFacts(**{k: v[idx] for k, v in self.facts.items()})

    def bev(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) float32 decoded rasters of samples ``idx``, laid out channels-last in memory
        (``decode_raster(..., channels_last=True)``: what the VLA model's vision stem reads fastest)."""
        return decode_raster(self.raster[idx], channels_last=True)

    def split(self, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) sample indices, split by scenario id (``is_val``)."""
        v = torch.tensor([is_val(s, val_fraction) for s in self.scenario_id], dtype=torch.bool)
        return (~v).nonzero().flatten(), v.nonzero().flatten()


def _pad_cat(parts: list[np.ndarray], pad) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        t = torch.from_numpy(np.ascontiguousarray(p))
        if t.shape[1] < width:
            fill = torch.full((t.shape[0], width - t.shape[1]), pad, dtype=t.dtype)
            t = torch.cat((t, fill), 1)
        out.append(t)
    return torch.cat(out)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_demos(directory: str | Path | list[str | Path], rasters: str = "memory", cache_shards: int = 16
               ) -> DemoTensors:
    """Read one collection, or several (a list, or directories joined by commas), into ``DemoTensors``;
    every shard's hash is verified.

    Several collections are concatenated in the order given; their content hash is the sha256 of
    their hashes joined by commas (one collection keeps its own).
    ``rasters="memory"``: every array in memory (the rasters take 213 KB a sample; refused with a
    ``RoadloopError`` if they would take more than ``MEMORY_SHARE`` of the available memory).
    ``rasters="stream"``: every array but the rasters; ``raster`` is a ``ShardRasters`` that keeps
    ``cache_shards`` shards in memory.
    """
    if rasters not in RASTER_MODES:
        raise ValueError(f"rasters must be one of {RASTER_MODES}, got {rasters!r}")
    dirs = directory if isinstance(directory, list) else (
        [directory] if isinstance(directory, Path) else [d.strip() for d in str(directory).split(",") if d.strip()])
    if not dirs:
        raise RoadloopError(f"no demonstration directory given ({directory!r})")
    sets = [DemoDataset(d) for d in dirs]
    paths: list[Path] = []
    sizes: list[int] = []
    shape = None
    for ds in sets:
        if len(ds) == 0:
            raise RoadloopError(f"{ds.dir}: the collection holds no samples")
        first, _ = _raster_header(ds.paths[0])
        if shape is not None and tuple(first[1:]) != shape:
            raise RoadloopError(f"{ds.dir}: rasters are {tuple(first[1:])}, those of {sets[0].dir} {shape}; "
                                f"collections recorded with different rasters cannot be combined")
        shape = tuple(first[1:])
        geo = manifest_raster(ds.manifest)
        if geo != manifest_raster(sets[0].manifest):
            raise RoadloopError(f"{ds.dir}: rasters recorded with {geo}, those of {sets[0].dir} with "
                                f"{manifest_raster(sets[0].manifest)}; collections recorded with different rasters "
                                f"cannot be combined")
        paths += ds.paths
        sizes += [int(e["n"]) for e in ds.manifest.shards]
    seen: dict[str, Path] = {}
    for ds in sets:
        ids = set(ds.scenario_ids)
        dup = sorted(i for i in ids if i in seen)
        if dup:
            raise RoadloopError(f"{ds.dir} and {seen[dup[0]]} both hold scenario {dup[0]} ({len(dup)} shared in "
                                f"all): combine collections of disjoint suites (e.g. train-xl and train-xl2)")
        seen.update(dict.fromkeys(ids, ds.dir))
    hashes = [ds.manifest.content_hash for ds in sets]
    content_hash = hashes[0] if len(sets) == 1 else hashlib.sha256(",".join(hashes).encode()).hexdigest()
    where = ", ".join(str(ds.dir) for ds in sets)
    stream = ShardRasters(paths, sizes, cache_shards)
    if rasters == "memory":
        need = len(stream) * math.prod(stream.sample_shape)
        avail = available_memory()
        if avail is not None and need > MEMORY_SHARE * avail:
            raise RoadloopError(f"{where}: the rasters of the {len(stream):,} samples need {need / 2**30:.1f} GiB in "
                                f"memory, and {avail / 2**30:.1f} GiB are available; stream them from the shards "
                                f"instead (load_demos(..., rasters='stream'); roadloop train il data_loading=stream)")
    shards = []
    for p in paths:
        with _open(p) as z:
            try:
                shards.append({k: z[k] for k in REQUIRED if k != "raster"})
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise RoadloopError(f"{p}: unreadable shard: {err}") from None
    raster: torch.Tensor | ShardRasters = stream
    if rasters == "memory":  # shard by shard into one tensor: the peak is the rasters plus one shard
        raster = torch.empty(stream.shape, dtype=torch.uint8)
        for si in range(len(paths)):
            raster[int(stream.offsets[si]):int(stream.offsets[si + 1])] = torch.from_numpy(stream.read(si))
    cat = lambda k: torch.from_numpy(np.concatenate([d[k] for d in shards]))  # noqa: E731
    strs = lambda k: [str(x) for d in shards for x in d[k]]  # noqa: E731
    facts = {}
    for k in FACT_FIELDS:
        parts = [d[f"facts_{k}"] for d in shards]
        if k in _AGENT_FACTS or k in _LINE_FACTS:
            facts[k] = _pad_cat(parts, _FACT_PAD.get(k, 0))
        else:
            facts[k] = torch.from_numpy(np.concatenate(parts))
    return DemoTensors(raster=raster, history=cat("history").float(), command=cat("command").long(),
                       speed=cat("speed").float(), waypoints=cat("waypoints").float(),
                       waypoints_speed=cat("waypoints_speed").float(), controls=cat("controls").float(),
                       lon=cat("lon").long(), lat=cat("lat").long(), step=cat("step").long(), facts=facts,
                       text=strs("text"), scenario_id=strs("scenario_id"), family=strs("family"),
                       suite=strs("suite"), content_hash=content_hash,
                       raster_geometry=manifest_raster(sets[0].manifest))


__all__ = ["DemoDataset", "DemoTensors", "RASTER_MODES", "ShardRasters", "available_memory", "collate_samples",
           "is_val", "load_demos", "manifest_raster", "shard_epoch_order", "stream_epoch_order"]
