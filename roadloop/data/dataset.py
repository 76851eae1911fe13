"""``DemoDataset``: the demonstrations written by ``roadloop.data.collect`` as a torch Dataset.

On construction it reads ``manifest.json``, verifies every shard's sha256 against it and reads
each shard's ``scenario_id`` column (cheap: NPZ members load lazily).  Samples are then read
shard by shard on demand (the last ``cache_shards`` shards are kept in memory).

A sample is a dict: ``raster`` (4, 10, 64, 64) float32 (decoded, see ``decode_raster``),
``history`` (16, 5) float32, ``command`` () int64, ``speed`` () float32 m/s, ``waypoints``
(64, 2) float32 m ego frame, ``waypoints_yaw`` / ``waypoints_speed`` (64,), ``controls``
(64, 2) float32 (accel m/s^2, curvature 1/m), ``lon`` / ``lat`` () int64, ``step`` () int64 and
the strings ``text``, ``scenario_id``, ``family``, ``suite``.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from roadloop.data.collect import decode_raster, load_manifest, verify_shard
from roadloop.errors import RoadloopError

STR_KEYS = ("text", "scenario_id", "family", "suite")
REQUIRED = ("raster", "history", "command", "speed", "waypoints", "waypoints_yaw", "waypoints_speed", "controls",
            "lon", "lat", "step") + STR_KEYS


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
    return {k: ([s[k] for s in samples] if isinstance(samples[0][k], str) else torch.stack([s[k] for s in samples]))
            for k in samples[0]}


__all__ = ["DemoDataset", "collate_samples", "is_val"]
