"""Scenario suites from SUMO: ``build_sumo_suite`` for any network, ``build_sumo_real`` for the
four real networks shipped in the eclipse-sumo wheel (``SUMO_REAL_NETWORKS``).

Pipeline: import the network (sumolib) -> trips (shipped or ``randomTrips.py``) -> simulate and
record with libsumo -> cut one scenario per ego vehicle.  Deterministic for fixed inputs and
seed.  Recordings are cached in-process, so the train and val halves share one simulation.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np

from roadloop.errors import ConfigError
from roadloop.sim.datatypes import Scenario
from roadloop.sumo.cutting import cut_scenarios
from roadloop.sumo.network import RoadNetwork, load_network
from roadloop.sumo.traffic import Recording, random_trips, record_traffic, sumo_home


@dataclass(frozen=True)
class SumoNetSpec:
    """A network shipped under ``sumo/tools/game`` and how to make traffic on it."""

    net: str  # path relative to SUMO_HOME/tools/game
    routes: tuple[str, ...] = ()  # shipped trip/route files; () -> randomTrips.py
    additional: tuple[str, ...] = ()  # vehicle types / signal plans the routes need
    begin: float = 0.0  # s, SUMO time the simulation starts
    warmup: float = 90.0  # s simulated before recording starts
    sim_seconds: float = 180.0  # s recorded
    description: str = ""

    def path(self, rel: str) -> str:
        return os.path.join(sumo_home(), "tools", "game", rel)


SUMO_REAL_NETWORKS: dict[str, SumoNetSpec] = {
    "bs3d": SumoNetSpec("bs3d/bs.net.xml", description="Braunschweig city centre (OSM), random trips"),
    "fkk_in": SumoNetSpec("fkk_in/ingolstadt.net.xml.gz",
                          description="Ingolstadt junctions (OSM), random trips"),
    "highway": SumoNetSpec("highway/highway.net.xml", routes=("highway/highway.rou.xml",), warmup=60.0,
                           description="motorway near Bremen with an on-ramp, shipped flows (7,500 veh/h)"),
    "fokr_bs_demo": SumoNetSpec(
        "fokr_bs_demo/fokr_bs.net.xml.gz",
        routes=("fokr_bs_demo/15_16_veh.trips.xml.gz", "fokr_bs_demo/15_16_ped.trips.xml"),
        additional=("fokr_bs_demo/vtypes_default.add.xml", "fokr_bs_demo/signalPlan.add.xml"),
        begin=53990.0, warmup=60.0,
        description="Braunschweig research intersection, 2,325 recorded vehicle trips 15:00-16:00 "
                    "+ pedestrian flows, real signal plan"),
}

_NET_CACHE: dict[tuple, RoadNetwork] = {}
_REC_CACHE: dict[tuple, Recording] = {}
TIMINGS: dict[str, dict[str, float]] = {}  # network name -> seconds per stage of the last build


def get_network(path: str, name: str | None = None) -> RoadNetwork:
    """``load_network`` cached per (path, mtime, name)."""
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else 0, name)
    if key not in _NET_CACHE:
        _NET_CACHE[key] = load_network(path, name=name)
    return _NET_CACHE[key]


def auto_period(net: RoadNetwork) -> float:
    """Seconds between random-trip departures: ~0.8 departures per second per 10 km of lane."""
    km = float(net.lane_length[~net.lane_internal].sum()) / 1000.0
    return float(np.clip(12.0 / max(km, 1e-3), 0.5, 1.5))


def record_network(net: RoadNetwork, trips: list[str] | None = None, additional: list[str] = (), *,
                   seed: int = 0, begin: float = 0.0, warmup: float = 90.0, sim_seconds: float = 180.0
                   ) -> Recording:
    """Record SUMO traffic on ``net`` (random trips when ``trips`` is None); cached in-process."""
    key = (net.path, tuple(trips or ()), tuple(additional), seed, begin, warmup, sim_seconds)
    if key in _REC_CACHE:
        return _REC_CACHE[key]
    rt = None
    if not trips:
        diag = float(np.linalg.norm(np.ptp(net.lane_pts, axis=0)))
        rt = {"seed": seed, "end": begin + warmup + sim_seconds, "period": auto_period(net),
              "min_distance": float(np.clip(0.3 * diag, 100.0, 500.0))}
        trips = [random_trips(net.path, **rt)]
    rec = record_traffic(net, list(trips), list(additional), begin=begin, warmup=warmup,
                         duration=sim_seconds, seed=seed)
    if rt is not None:  # the co-simulation regenerates the same trips (roadloop.sumo.cosim)
        rec.info["random_trips"] = json.dumps(rt)
    _REC_CACHE[key] = rec
    return rec


def split_of(vehicle_id: str) -> str:
    """Deterministic train/val split of a vehicle id."""
    return "train" if zlib.crc32(vehicle_id.encode()) % 2 == 0 else "val"


def build_sumo_suite(net_path: str, trips: list[str] | str | None = None, n: int = 12, seed: int = 0,
                     sim_seconds: float = 180.0, *, warmup: float = 90.0, begin: float = 0.0,
                     additional: list[str] = (), name: str | None = None, split: str | None = None,
                     radius: float = 80.0, max_agents: int = 32,
                     rejected: list[tuple[str, str]] | None = None) -> list[Scenario]:
    """Up to ``n`` scenarios from SUMO traffic on any network (``.net.xml[.gz]``).

    ``trips``: trip/route file(s) (checked for unknown edges), or None for seeded random trips.
    ``split``: None (any ego), "train" or "val" (egos whose id hashes to that half).
    ``rejected`` collects (scenario id, reason) of egos whose log fails roadloop's checks.
    """
    if split not in (None, "train", "val"):
        raise ConfigError(f"split must be None, 'train' or 'val', got {split!r}")
    t = time.perf_counter()
    net = get_network(os.fspath(net_path), name)
    t_net = time.perf_counter() - t
    if isinstance(trips, (str, os.PathLike)):
        trips = [os.fspath(trips)]
    t = time.perf_counter()
    rec = record_network(net, trips, additional, seed=seed, begin=begin, warmup=warmup,
                         sim_seconds=sim_seconds)
    t_rec = time.perf_counter() - t
    t = time.perf_counter()
    egos = None if split is None else [i for i in rec.ids if split_of(i) == split]
    scs = cut_scenarios(rec, net, n, seed=seed, radius=radius, max_agents=max_agents, egos=egos,
                        extra_fn=lambda vid: {"split": split_of(vid)}, rejected=rejected)
    tm = TIMINGS.setdefault(net.name, {"import_s": 0.0, "record_s": 0.0, "cut_s": 0.0, "scenarios": 0.0})
    for k, v in (("import_s", t_net), ("record_s", t_rec), ("cut_s", time.perf_counter() - t),
                 ("scenarios", float(len(scs)))):
        tm[k] += v
    return scs


def build_sumo_real(split: str | None = None, per_network: int = 12, seed: int | tuple[int, ...] = 0,
                    networks: list[str] | None = None) -> list[Scenario]:
    """The ``sumo-real`` suites: ``per_network`` scenarios from each of ``SUMO_REAL_NETWORKS`` per seed.

    Each network's scenarios are half train, half val (split by ego vehicle id); ``split``
    selects one half (``per_network // 2`` per network) or both (None).  Several seeds: one SUMO
    run per seed (new random trips, or SUMO's own randomness for shipped routes); the ego split
    by vehicle id holds across seeds.  Scenario ids carry the seed when it is not 0.
    """
    out: list[Scenario] = []
    halves = ["train", "val"] if split is None else [split]
    for s in (seed,) if isinstance(seed, int) else tuple(seed):
        for name in networks or list(SUMO_REAL_NETWORKS):
            spec = SUMO_REAL_NETWORKS[name]
            for h in halves:
                out += build_sumo_suite(spec.path(spec.net), [spec.path(r) for r in spec.routes] or None,
                                        n=per_network // 2, seed=s, sim_seconds=spec.sim_seconds,
                                        warmup=spec.warmup, begin=spec.begin,
                                        additional=[spec.path(a) for a in spec.additional], name=name, split=h)
    return out


# --- the named suites (``roadloop eval --suite sumo-real``) ----------------------------------

@dataclass(frozen=True)
class SumoSuiteSpec:
    """A named SUMO suite: ``build_sumo_real(split, per_network, seeds)``."""

    split: str | None
    per_network: int = 12
    seeds: tuple[int, ...] = (0,)


SUMO_SUITES: dict[str, SumoSuiteSpec] = {
    "sumo-real": SumoSuiteSpec(None), "sumo-real-train": SumoSuiteSpec("train"), "sumo-real-val": SumoSuiteSpec("val"),
    # more training scenes on the same four networks: train-half egos only (no sumo-real-val ego), from
    # three other SUMO runs (seeds 1-3: new random trips; the shipped demand of highway / fokr_bs reseeded)
    "sumo-real-train-xl": SumoSuiteSpec("train", per_network=128, seeds=(1, 2, 3)),
}


def sumo_code_hash() -> str:
    """Hash (16 hex) of what the SUMO suites depend on: roadloop's scenario, simulator and SUMO
    sources and the SUMO version."""
    import hashlib
    from pathlib import Path

    from roadloop.scenarios.suites import code_hash
    from roadloop.sumo.traffic import sumo_version

    h = hashlib.sha256(code_hash().encode())
    for p in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(sumo_version().encode())
    return h.hexdigest()[:16]


def load_sumo_suite(name: str):
    """A named SUMO suite (``SUMO_SUITES``) as a ``roadloop.scenarios.suites.Suite``: built on
    first use (~15 s), then read from ``$ROADLOOP_CACHE/suites/<name>-<hash>`` (verified
    against its content hash).  The hash covers the sources and the SUMO version."""
    from pathlib import Path

    from roadloop.errors import ScenarioError, UnknownNameError
    from roadloop.scenarios.suites import INDEX, Suite, cache_root, load_suite, save_suite

    if name not in SUMO_SUITES:
        raise UnknownNameError("SUMO suite", name, list(SUMO_SUITES))
    d = Path(cache_root()) / "suites" / f"{name}-{sumo_code_hash()}"
    if (d / INDEX).is_file():
        try:
            return load_suite(d)
        except ScenarioError:
            pass  # damaged cache: rebuild
    spec = SUMO_SUITES[name]
    suite = Suite.of(name, build_sumo_real(spec.split, per_network=spec.per_network, seed=spec.seeds))
    save_suite(suite, d)
    return suite
