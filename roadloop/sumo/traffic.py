"""Simulate traffic with SUMO (libsumo, in-process) and record every vehicle at 10 Hz.

``record_traffic`` runs SUMO with ``--step-length 0.1`` and a fixed ``--seed`` (deterministic),
skips a warm-up, then records each vehicle's box centre, yaw, speed and lane, and each traffic
light's link states.  Trips come from shipped files or from SUMO's ``randomTrips.py``
(``random_trips``).  ``roadloop.sumo.cutting`` turns a ``Recording`` into scenarios.

Frames: SUMO positions are the *front bumper centre* and angles are degrees clockwise from
north; the recording stores roadloop's box centre (front - length/2 along the heading) and
yaw in radians counter-clockwise from +x.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from roadloop.errors import ScenarioError
from roadloop.sim.datatypes import DT, AgentType
from roadloop.sumo.network import RoadNetwork

INVALID_POS = -1e8  # SUMO reports INVALID_DOUBLE_VALUE (-2^30) for vehicles off the network
CYCLIST_CLASSES = {"bicycle", "scooter"}
PED_CLASSES = {"pedestrian", "wheelchair"}


class SumoTrafficError(ScenarioError):
    """SUMO could not be run on the given network / trips (names the file and the problem)."""


def sumo_home() -> str:
    """The SUMO installation of the eclipse-sumo wheel (``SUMO_HOME``)."""
    try:
        import sumo
    except ImportError as e:  # pragma: no cover
        raise SumoTrafficError("SUMO is not installed: pip install eclipse-sumo libsumo sumolib") from e
    return sumo.SUMO_HOME


SUMO_HOME_TAG = "$SUMO_HOME/"


def portable_path(path: str) -> str:
    """``path`` as scenario metadata stores it: a file of the SUMO installation as
    ``$SUMO_HOME/...`` (the same on every machine, so scenario content hashes are too), any other
    file as given.  ``resolve_portable_path`` is its inverse."""
    if not path:
        return path
    home = os.path.abspath(sumo_home())
    full = os.path.abspath(path)
    return SUMO_HOME_TAG + os.path.relpath(full, home).replace(os.sep, "/") if full.startswith(home + os.sep) else path


def resolve_portable_path(path: str) -> str:
    """A SUMO file path from a scenario's metadata on this machine: ``$SUMO_HOME/...``
    (``portable_path``) under this machine's SUMO installation; an absolute path into an older
    eclipse-sumo wheel (``.../tools/game/...``, written before paths were portable) found again
    under this machine's; any other path as given."""
    if path.startswith(SUMO_HOME_TAG):
        return os.path.join(sumo_home(), *path[len(SUMO_HOME_TAG):].split("/"))
    if not path or os.path.exists(path):
        return path
    key = os.sep + "tools" + os.sep + "game" + os.sep
    if key in path:
        cand = os.path.join(sumo_home(), "tools", "game", path.split(key, 1)[1])
        if os.path.exists(cand):
            return cand
    return path


def _libsumo():
    try:
        import libsumo
    except ImportError as e:  # pragma: no cover
        raise SumoTrafficError("libsumo is not importable: pip install eclipse-sumo libsumo sumolib") from e
    return libsumo


def sumo_binary(name: str = "sumo") -> str:
    exe = os.path.join(sumo_home(), "bin", name)
    if not os.path.isfile(exe):  # pragma: no cover
        raise SumoTrafficError(f"SUMO binary '{name}' not found under {sumo_home()}/bin: "
                               "reinstall eclipse-sumo")
    return exe


def sumo_version() -> str:
    try:
        import sumolib

        v = str(getattr(sumolib, "__version__", ""))
    except ImportError:  # pragma: no cover
        v = ""
    return v if v and v != "0.0.0" else _bin_version()


def _bin_version() -> str:
    try:
        out = subprocess.run([sumo_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].split()[-1] if out else ""
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        return ""


# --- trips ------------------------------------------------------------------------------

def _open(path: str):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path) if gz else open(path, "rb")


def check_routes_file(path: str, net: RoadNetwork) -> int:
    """Check that every edge a trips/routes file references exists in ``net``; returns #trips.

    Raises ``SumoTrafficError`` naming the file, the element and the unknown edge.
    """
    if not os.path.isfile(path):
        raise SumoTrafficError(f"trips file '{path}': file not found")
    known = net.all_edge_ids
    n = 0
    try:
        with _open(path) as f:
            for _, el in ET.iterparse(f, events=("end",)):
                tag = el.tag
                refs: list[str] = []
                if tag in ("trip", "flow", "personTrip", "walk", "ride"):
                    refs = [el.get(k) for k in ("from", "to") if el.get(k)] + (el.get("via") or "").split()
                    n += tag in ("trip", "flow")
                elif tag == "route":
                    refs = (el.get("edges") or "").split()
                elif tag == "vehicle":
                    n += 1
                for e in refs:
                    if e not in known:
                        raise SumoTrafficError(
                            f"trips file '{path}': {tag} '{el.get('id', '?')}' references edge '{e}' "
                            f"which is not in network '{net.name}' ({net.path})")
                if tag in ("trip", "flow", "vehicle", "person", "personFlow", "route"):
                    el.clear()
    except ET.ParseError as e:
        raise SumoTrafficError(f"trips file '{path}' is not valid XML: {e}") from e
    return n


_TRIPS_CACHE: dict[tuple, str] = {}
_TMP_DIR: list[str] = []


def _tmp_dir() -> str:
    if not _TMP_DIR:
        d = tempfile.mkdtemp(prefix="roadloop-sumo-")
        import atexit

        atexit.register(shutil.rmtree, d, True)
        _TMP_DIR.append(d)
    return _TMP_DIR[0]


def random_trips(net_path: str, seed: int = 0, end: float = 400.0, period: float = 1.0,
                 min_distance: float = 150.0, fringe_factor: float = 5.0, out_dir: str | None = None) -> str:
    """Routed random passenger-car trips with SUMO's ``randomTrips.py`` (+ duarouter); cached.

    ``period`` s between departures over [0, end) s.  Returns the path of a ``.rou.xml``.
    """
    key = (os.path.abspath(net_path), seed, end, period, min_distance, fringe_factor)
    if out_dir is None and key in _TRIPS_CACHE and os.path.isfile(_TRIPS_CACHE[key]):
        return _TRIPS_CACHE[key]
    d = out_dir or _tmp_dir()
    tag = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
    trips, routes = os.path.join(d, f"rt_{tag}.trips.xml"), os.path.join(d, f"rt_{tag}.rou.xml")
    script = os.path.join(sumo_home(), "tools", "randomTrips.py")
    cmd = [sys.executable, script, "-n", net_path, "-o", trips, "-r", routes, "--seed", str(seed),
           "-b", "0", "-e", str(end), "-p", str(period), "--vehicle-class", "passenger",
           "--vclass", "passenger", "--min-distance", str(min_distance),
           "--fringe-factor", str(fringe_factor),
           "--validate", "--remove-loops", "--trip-attributes", 'departLane="best" departSpeed="max"']
    env = dict(os.environ, SUMO_HOME=sumo_home())
    env["PATH"] = os.path.join(sumo_home(), "bin") + os.pathsep + env.get("PATH", "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 or not os.path.isfile(routes):
        raise SumoTrafficError(f"randomTrips.py failed on '{net_path}': {(r.stderr or r.stdout)[-800:]}")
    if out_dir is None:
        _TRIPS_CACHE[key] = routes
    return routes


# --- recording --------------------------------------------------------------------------

@dataclass
class Recording:
    """Every vehicle / person of a SUMO run at 10 Hz.  V actors, N samples, S steps.

    Samples are sorted by (actor, step); actor ``v`` owns samples ``ptr[v]:ptr[v+1]``.
    Step ``k`` is SUMO time ``t_begin + k * DT``.
    """

    net_name: str
    net_path: str
    t_begin: float  # s, SUMO time of step 0
    num_steps: int  # S
    ids: list[str]  # (V,) SUMO vehicle / person ids
    length: np.ndarray  # (V,) m
    width: np.ndarray  # (V,) m
    vclass: list[str]  # (V,)
    vtype: list[str]  # (V,)
    kind: np.ndarray  # (V,) int64 AgentType
    route: list[tuple[str, ...]]  # (V,) SUMO route edges (empty for persons)
    ptr: np.ndarray  # (V+1,)
    step: np.ndarray  # (N,) int32
    xy: np.ndarray  # (N, 2) float64 m, box centre
    yaw: np.ndarray  # (N,) float32 rad
    speed: np.ndarray  # (N,) float32 m/s (SUMO speed x the lane's shape/length factor)
    lane: np.ndarray  # (N,) int32 network lane index, -1 not an imported lane
    tls_states: dict[str, np.ndarray]  # tls id -> (S, num_links) uint8 SUMO state chars
    info: dict[str, str] = field(default_factory=dict)  # seed, files, SUMO version, timings

    @property
    def num_actors(self) -> int:
        return len(self.ids)

    @property
    def num_samples(self) -> int:
        return len(self.step)

    def nbytes(self) -> int:
        arrs = [self.step, self.xy, self.yaw, self.speed, self.lane, self.ptr, *self.tls_states.values()]
        return int(sum(a.nbytes for a in arrs))


def sumo_to_roadloop(front_xy: np.ndarray, angle_deg: np.ndarray, length: np.ndarray) -> tuple:
    """SUMO front-bumper position (N, 2) + angle (deg clockwise from north) -> (centre, yaw).

    yaw = pi/2 - angle (wrapped to [-pi, pi)); centre = front - length/2 * (cos yaw, sin yaw).
    """
    yaw = np.mod(np.pi / 2 - np.deg2rad(angle_deg) + np.pi, 2 * np.pi) - np.pi
    h = np.stack((np.cos(yaw), np.sin(yaw)), axis=-1)
    return np.asarray(front_xy, float) - 0.5 * np.asarray(length, float)[..., None] * h, yaw


def front_track_to_boxes(step: np.ndarray, ptr: np.ndarray, front: np.ndarray, angle: np.ndarray,
                         length: np.ndarray, rigid: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Box centres (N, 2) and yaws (N,) of actors from their SUMO front-bumper tracks.

    SUMO's angle is the lane direction under the front bumper, which jumps at the kinks of
    coarse junction shapes.  Instead the rear bumper is placed on the front's own past path,
    ``length`` m of arc behind (before the first sample: straight back along SUMO's angle);
    centre = midpoint of front and rear, yaw = direction rear -> front.  Tracks are split at
    gaps and teleports.  Actors with ``rigid`` True (pedestrians) use ``sumo_to_roadloop``.
    Samples are sorted by (actor, step); actor v owns ``ptr[v]:ptr[v+1]``.
    """
    centre, yaw = sumo_to_roadloop(front, angle, np.repeat(length, np.diff(ptr)))
    if len(step) < 2:
        return centre, yaw
    d = np.linalg.norm(np.diff(front, axis=0), axis=1)
    start = np.ones(len(step), bool)
    start[1:] = (np.diff(step) != 1) | (d > 8.0)
    start[ptr[:-1][ptr[:-1] < len(step)]] = True
    seg_starts = np.nonzero(start)[0]
    seg_ends = np.append(seg_starts[1:], len(step))
    owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    for a, b in zip(seg_starts, seg_ends, strict=True):
        v = owner[a]
        if rigid is not None and rigid[v]:
            continue
        L = float(length[v])
        f = front[a:b]
        s = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(f, axis=0), axis=1))))
        h0 = np.array([np.cos(yaw[a]), np.sin(yaw[a])])
        px = np.concatenate(([f[0, 0] - L * h0[0]], f[:, 0]))
        py = np.concatenate(([f[0, 1] - L * h0[1]], f[:, 1]))
        ps = np.concatenate(([-L], s))
        q = s - L
        rear = np.stack((np.interp(q, ps, px), np.interp(q, ps, py)), axis=1)
        axis = f - rear
        ok = np.linalg.norm(axis, axis=1) > 0.2 * L
        centre[a:b][ok] = 0.5 * (f[ok] + rear[ok])
        yaw[a:b][ok] = np.arctan2(axis[ok, 1], axis[ok, 0])
    return centre, yaw


def sumo_command(net_path: str, routes: list[str], additional: list[str] = (), *, begin: float = 0.0, seed: int = 0,
                 extra_args: list[str] = ()) -> list[str]:
    """The SUMO command line of a recording (``record_traffic``) and of a co-simulation
    (``roadloop.sumo.cosim``): both must be identical for SUMO to reproduce the recording."""
    cmd = [sumo_binary(), "-n", net_path, "-r", ",".join(routes), "--begin", str(begin),
           "--step-length", str(DT), "--seed", str(seed), "--no-step-log", "true", "--no-warnings", "true",
           "--lanechange.duration", "2", "--time-to-teleport", "120", "--collision.action", "warn",
           "--xml-validation", "never", *extra_args]
    if additional:
        cmd += ["-a", ",".join(additional)]
    return cmd


def _kind(vclass: str) -> int:
    if vclass in PED_CLASSES:
        return int(AgentType.PEDESTRIAN)
    if vclass in CYCLIST_CLASSES:
        return int(AgentType.CYCLIST)
    return int(AgentType.VEHICLE)


def record_traffic(net: RoadNetwork, routes: list[str], additional: list[str] = (), *, begin: float = 0.0,
                   warmup: float = 60.0, duration: float = 180.0, seed: int = 0,
                   extra_args: list[str] = ()) -> Recording:
    """Run SUMO on ``net`` with route/trip files and record ``duration`` s after ``warmup`` s.

    Every file is checked first (unknown edges -> ``SumoTrafficError``).  Continuous lane
    changes (``--lanechange.duration 2``) keep logged tracks smooth.
    """
    t_wall = time.perf_counter()
    routes, additional = [os.fspath(r) for r in routes], [os.fspath(a) for a in additional]
    for r in routes:
        check_routes_file(r, net)
    for a in additional:
        if not os.path.isfile(a):
            raise SumoTrafficError(f"additional file '{a}': file not found")
    ls = _libsumo()
    from libsumo import constants as tc

    cmd = sumo_command(net.path, routes, additional, begin=begin, seed=seed, extra_args=extra_args)
    try:
        ls.start(cmd)
    except Exception as e:  # libsumo raises its own exception types
        _close(ls)
        raise SumoTrafficError(
            f"SUMO failed to start on network '{net.path}' with routes {routes}: {e}") from e
    V, P = ls.vehicle, ls.person
    vvars = [tc.VAR_POSITION, tc.VAR_ANGLE, tc.VAR_SPEED, tc.VAR_LANE_ID]
    pvars = [tc.VAR_POSITION, tc.VAR_ANGLE, tc.VAR_SPEED]
    ids: list[str] = []
    idx: dict[str, int] = {}
    length, width, vclass, vtype, route = [], [], [], [], []
    rows: list[tuple] = []
    lane_idx = net.lane_index
    n_steps = int(round(duration / DT))
    try:
        ls.simulationStep(begin + warmup)
        t0 = ls.simulation.getTime() + DT
        tls_ids = list(ls.trafficlight.getIDList())
        tls_rows: dict[str, list[bytes]] = {t: [] for t in tls_ids}

        def add(dom, aid, is_person):
            idx[aid] = len(ids)
            ids.append(aid)
            length.append(dom.getLength(aid))
            width.append(dom.getWidth(aid))
            vclass.append("pedestrian" if is_person else V.getVehicleClass(aid))
            vtype.append(dom.getTypeID(aid))
            route.append(() if is_person else tuple(V.getRoute(aid)))
            dom.subscribe(aid, pvars if is_person else vvars)

        for aid in V.getIDList():
            add(V, aid, False)
        for aid in P.getIDList():
            add(P, aid, True)
        for k in range(n_steps):
            ls.simulationStep()
            for aid in ls.simulation.getDepartedIDList():
                add(V, aid, False)
            for aid in ls.simulation.getDepartedPersonIDList():
                add(P, aid, True)
            for aid, d in V.getAllSubscriptionResults().items():
                p = d[tc.VAR_POSITION]
                rows.append((k, idx[aid], p[0], p[1], d[tc.VAR_ANGLE], d[tc.VAR_SPEED],
                             lane_idx.get(d[tc.VAR_LANE_ID], -1)))
            for aid, d in P.getAllSubscriptionResults().items():
                p = d[tc.VAR_POSITION]
                rows.append((k, idx[aid], p[0], p[1], d[tc.VAR_ANGLE], d[tc.VAR_SPEED], -1))
            for t in tls_ids:
                tls_rows[t].append(ls.trafficlight.getRedYellowGreenState(t).encode())
    except SumoTrafficError:
        raise
    except Exception as e:
        raise SumoTrafficError(f"SUMO failed while simulating '{net.path}': {e}") from e
    finally:
        _close(ls)
    t_sim = time.perf_counter() - t_wall
    arr = np.array(rows, dtype=np.float64).reshape(-1, 7)
    arr = arr[(arr[:, 2] > INVALID_POS) & (arr[:, 3] > INVALID_POS)]
    order = np.lexsort((arr[:, 0], arr[:, 1]))
    arr = arr[order]
    actor = arr[:, 1].astype(np.int64)
    length_a = np.asarray(length, float)
    ptr = np.searchsorted(actor, np.arange(len(ids) + 1))
    is_person = np.array([c in PED_CLASSES for c in vclass], bool)
    centre, yaw = front_track_to_boxes(arr[:, 0].astype(np.int64), ptr, arr[:, 2:4], arr[:, 4], length_a,
                                       is_person)
    lane = arr[:, 6].astype(np.int32)
    # speed along the drawn lane shape (SUMO lane lengths may differ from their shapes' lengths)
    speed = arr[:, 5] * np.where(lane >= 0, net.lane_geom_factor[np.maximum(lane, 0)], 1.0)
    tls_states = {}
    for t, rs in tls_rows.items():
        n = max((len(r) for r in rs), default=0)
        buf = b"".join(r.ljust(n, b"o") for r in rs)
        tls_states[t] = np.frombuffer(buf, np.uint8).reshape(len(rs), n).copy()
    rec = Recording(
        net_name=net.name, net_path=net.path, t_begin=float(t0), num_steps=n_steps, ids=ids,
        length=length_a, width=np.asarray(width, float), vclass=vclass, vtype=vtype,
        kind=np.array([_kind(c) for c in vclass], np.int64), route=route, ptr=ptr,
        step=arr[:, 0].astype(np.int32), xy=centre, yaw=yaw.astype(np.float32),
        speed=speed.astype(np.float32), lane=lane, tls_states=tls_states,
        info={"seed": str(seed), "routes": ",".join(routes), "additional": ",".join(additional),
              "sumo_version": sumo_version(), "begin": f"{begin:.1f}", "warmup_s": f"{warmup:.1f}",
              "duration_s": f"{duration:.1f}", "record_seconds": f"{t_sim:.3f}",
              "extra_args": json.dumps(list(extra_args))})
    return rec


def _close(ls) -> None:
    try:
        ls.close()
    except Exception:  # noqa: BLE001 - nothing to close after a failed start
        pass
