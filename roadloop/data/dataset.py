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
as uint8, ~160 KB a sample; facts padded to the largest agent / stop-line count), which is what
the trainers and the open-loop metrics use.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from roadloop.data.collect import FACT_FIELDS, decode_raster, load_manifest, verify_shard
from roadloop.errors import RoadloopError
from roadloop.reasoning.labels import SceneFacts

STR_KEYS = ("text", "scenario_id", "family", "suite")
REQUIRED = ("raster", "history", "command", "speed", "waypoints", "waypoints_yaw", "waypoints_speed", "controls",
            "lon", "lat", "step") + STR_KEYS + tuple(f"facts_{k}" for k in FACT_FIELDS)
_AGENT_FACTS = ("kind", "valid", "dist", "x_ego", "y_ego", "y_route", "gap", "near_route", "in_corridor", "intrudes",
                "speed", "accel", "crossing")
_LINE_FACTS = ("light_gap", "light_state")
_FACT_PAD = {"valid": False, "near_route": False, "in_corridor": False, "intrudes": False, "crossing": False,
             "dist": 1e9, "gap": 1e9, "light_gap": 1e9}


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


@dataclass
class DemoTensors:
    """A demonstration collection in memory (N samples); field meanings as in ``roadloop.data.collect``."""

    raster: torch.Tensor  # (N, F, C, H, W) uint8, ``decode_raster`` to use
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

    def __len__(self) -> int:
        return int(self.command.shape[0])

    def scene_facts(self, idx: torch.Tensor) -> SceneFacts:
        """``SceneFacts`` of the samples ``idx`` (B,), for ``roadloop.reasoning.checks.grounding``."""
        return SceneFacts(**{k: v[idx] for k, v in self.facts.items()})

    def bev(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) float32 decoded rasters of samples ``idx``."""
        return decode_raster(self.raster[idx])

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


def load_demos(directory: str | Path) -> DemoTensors:
    """Read every shard of a collection (hashes verified) into ``DemoTensors``."""
    ds = DemoDataset(directory)
    if len(ds) == 0:
        raise RoadloopError(f"{ds.dir}: the collection holds no samples")
    shards = [ds._shard(i) for i in range(len(ds.paths))]
    ds._cache.clear()
    cat = lambda k: torch.from_numpy(np.concatenate([d[k] for d in shards]))  # noqa: E731
    strs = lambda k: [str(x) for d in shards for x in d[k]]  # noqa: E731
    facts = {}
    for k in FACT_FIELDS:
        parts = [d[f"facts_{k}"] for d in shards]
        if k in _AGENT_FACTS or k in _LINE_FACTS:
            facts[k] = _pad_cat(parts, _FACT_PAD.get(k, 0))
        else:
            facts[k] = torch.from_numpy(np.concatenate(parts))
    return DemoTensors(raster=cat("raster"), history=cat("history").float(), command=cat("command").long(),
                       speed=cat("speed").float(), waypoints=cat("waypoints").float(),
                       waypoints_speed=cat("waypoints_speed").float(), controls=cat("controls").float(),
                       lon=cat("lon").long(), lat=cat("lat").long(), step=cat("step").long(), facts=facts,
                       text=strs("text"), scenario_id=strs("scenario_id"), family=strs("family"),
                       suite=strs("suite"), content_hash=ds.manifest.content_hash)


__all__ = ["DemoDataset", "DemoTensors", "collate_samples", "is_val", "load_demos"]
