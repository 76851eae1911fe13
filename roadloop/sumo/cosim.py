"""Live co-simulation with SUMO: SUMO moves the background traffic, roadloop moves the ego.

This is AlpaSim's optional "traffic sim" service, in-process: ``SumoCosim`` is a
``roadloop.sim.backend.TrafficBackend`` for ``roadloop.rollout.rollout(..., traffic=...)``.

Per scenario of the batch one SUMO process is started through TraCI with a labelled connection
(libsumo allows a single simulation per process; TraCI allows any number, and a batch of
scenarios then runs in lock-step, the SUMO processes in parallel threads).  The command line,
routes (or the regenerated random trips), additional files and seed are those of the recording
the scenario was cut from (``ScenarioMeta.extra``, written by ``roadloop.sumo.cutting``), so
SUMO reproduces the recorded traffic up to the window start.  Then, at every 0.1 s step:

1. roadloop moves the ego (policy controls, or the log during the warm-up);
2. the SUMO ego vehicle is placed at roadloop's ego pose:
   ``vehicle.moveToXY(id, "", -1, x_front, y_front, angle, keepRoute=2)`` with the front-bumper
   centre ``x_front = x + L/2 cos(yaw)`` and SUMO's angle ``90 - degrees(yaw)`` (clockwise from
   north; see docs/frames.md), and its speed set with ``vehicle.setPreviousSpeed``;
3. SUMO advances 0.1 s: every other vehicle's car following, lane changing and junction logic
   sees the ego where roadloop put it, so traffic reacts to the ego (a follower brakes when the
   ego brakes);
4. every scenario agent is read back by its SUMO id into its slot: absent -> ``present`` False;
   box centre and yaw from the front-bumper track as the recording does (the rear bumper on
   the front's own past path, ``roadloop.sumo.traffic.front_track_to_boxes``; the tracks are
   rebuilt over the 10 s before the window, or start from the step-0 box of a slow vehicle);
   speed = SUMO speed x the lane's shape/length factor.

Limits: only the scenario's agent slots are tracked (vehicles that would enter the region
only because the ego behaved differently stay invisible); SUMO's vehicles are 1-D on lanes
(2-D overlaps inside junctions are possible, as in the recording); vehicles SUMO teleports
jump.  Deterministic: SUMO is seeded, and the steps are issued in a fixed order.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from roadloop.errors import ScenarioError
from roadloop.sim.backend import replace_agents
from roadloop.sim.datatypes import DT, AgentType, ScenarioMeta, SimState
from roadloop.sumo.traffic import (
    INVALID_POS,
    SumoTrafficError,
    random_trips,
    resolve_portable_path,
    sumo_command,
)

REQUIRED = ("network_file", "vehicle", "sumo_time", "sumo_seed", "sumo_agents", "sumo_begin")
TELEPORT = 8.0  # m per step: a longer jump starts a new front track (as in the recording)
TRACK_HISTORY = 10.0  # s before the window start stepped one by one to rebuild the front tracks


def _traci():
    try:
        import traci
        from traci import constants as tc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SumoTrafficError("the SUMO co-simulation needs traci: pip install eclipse-sumo traci") from e
    return traci, tc


@dataclass(frozen=True)
class CosimSpec:
    """What it takes to restart the SUMO run a scenario was cut from."""

    scenario_id: str
    net: str
    routes: tuple[str, ...]
    additional: tuple[str, ...]
    begin: float  # s, SUMO --begin
    seed: int
    extra_args: tuple[str, ...]
    t0: float  # s, SUMO time of the scenario's step 0
    t_record: float  # s, SUMO time of the recording's first sample (its tracks start there)
    ego: str  # SUMO id of the ego vehicle
    agents: tuple[str, ...]  # SUMO ids of agents 1..A-1

    @staticmethod
    def from_meta(meta: ScenarioMeta) -> CosimSpec:
        ex = dict(meta.extra)
        missing = [k for k in REQUIRED if k not in ex]
        if not meta.source.startswith("sumo:") or missing:
            raise ScenarioError(
                f"scenario '{meta.scenario_id}' cannot be co-simulated with SUMO: "
                + (f"its source is '{meta.source}', not a SUMO recording" if not meta.source.startswith("sumo:")
                   else f"meta.extra lacks {', '.join(missing)} (cut with an older roadloop? rebuild the suite)"))
        net = resolve_portable_path(ex["network_file"])
        if not os.path.isfile(net):
            raise ScenarioError(f"scenario '{meta.scenario_id}': SUMO network '{net}' not found")
        routes = tuple(resolve_portable_path(r) for r in ex.get("routes", "").split(",") if r)
        if ex.get("random_trips") and (not routes or not all(os.path.isfile(r) for r in routes)):
            routes = (random_trips(net, **json.loads(ex["random_trips"])),)
        for r in routes:
            if not os.path.isfile(r):
                raise ScenarioError(f"scenario '{meta.scenario_id}': SUMO routes file '{r}' not found")
        add = tuple(resolve_portable_path(a) for a in ex.get("sumo_additional", "").split(",") if a)
        return CosimSpec(meta.scenario_id, net, routes, add, float(ex["sumo_begin"]), int(ex["sumo_seed"] or 0),
                         tuple(json.loads(ex.get("sumo_extra_args") or "[]")), float(ex["sumo_time"]),
                         float(ex.get("sumo_record_begin") or ex["sumo_time"]), ex["vehicle"],
                         tuple(json.loads(ex["sumo_agents"])))


class _Track:
    """Front-bumper track of one vehicle -> box centre and yaw (rear bumper on the path)."""

    __slots__ = ("pts", "s")

    def __init__(self) -> None:
        self.pts: list[np.ndarray] = []
        self.s: list[float] = []  # arc length; the track's first front is at s = length

    def start(self, rear: np.ndarray, front: np.ndarray, length: float) -> None:
        self.pts = [rear, front]
        self.s = [0.0, length]

    def driven(self, length: float) -> float:
        """Metres the front has moved since the track started."""
        return self.s[-1] - length if self.s else 0.0

    def push(self, front: np.ndarray, angle_deg: float, length: float) -> tuple[np.ndarray, float]:
        yaw_s = math.pi / 2 - math.radians(angle_deg)
        h = np.array([math.cos(yaw_s), math.sin(yaw_s)])
        if not self.pts or float(np.linalg.norm(front - self.pts[-1])) > TELEPORT:
            self.start(front - length * h, front, length)
        else:
            d = float(np.linalg.norm(front - self.pts[-1]))
            if d > 1e-9:
                self.pts.append(front)
                self.s.append(self.s[-1] + d)
        q = self.s[-1] - length
        s = np.asarray(self.s)
        if q <= s[0]:  # before the track's start: straight back from its first point
            p0, p1 = self.pts[0], self.pts[1]
            u = (p1 - p0) / max(float(np.linalg.norm(p1 - p0)), 1e-9)
            rear = p0 - (s[0] - q) * u
        else:
            k = int(np.searchsorted(s, q)) - 1
            w = (q - s[k]) / max(s[k + 1] - s[k], 1e-12)
            rear = self.pts[k] + w * (self.pts[k + 1] - self.pts[k])
            if k > 4:  # forget the part of the track that is no longer needed
                del self.pts[:k - 1], self.s[:k - 1]
        axis = front - rear
        n = float(np.linalg.norm(axis))
        if n <= 0.2 * length:  # degenerate (e.g. after a reversal): SUMO's own angle
            return front - 0.5 * length * h, math.atan2(h[1], h[0])
        return 0.5 * (front + rear), math.atan2(axis[1], axis[0])


def _connect(cmd: list[str], what: str):
    """Start one SUMO server process and connect to it (a private TraCI connection, safe to use
    from its own thread; ``traci.start`` is not thread-safe and prints while it waits)."""
    import subprocess
    import tempfile
    import time

    from sumolib.miscutils import getFreeSocketPort

    traci, _ = _traci()
    from traci.connection import Connection

    port = getFreeSocketPort()
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([*cmd, "--remote-port", str(port)], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120.0
    while True:
        try:
            conn = Connection("localhost", port, proc, None, True, None)
            err.close()
            return conn
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err.seek(0)
                msg = err.read().decode(errors="replace").strip().splitlines()
                err.close()
                proc.kill()
                raise SumoTrafficError(f"scenario '{what}': SUMO did not start: "
                                       f"{msg[-1] if msg else 'exit code ' + str(proc.poll())}") from None
            time.sleep(0.02)


class _Run:
    """One SUMO process (TraCI connection) for one scenario of the batch."""

    def __init__(self, spec: CosimSpec, kinds: np.ndarray, length: np.ndarray, lane_factor: dict[str, float]):
        self.spec = spec
        self.kinds = kinds  # (A,) AgentType
        self.length = length  # (A,) m
        self.lane_factor = lane_factor
        self.conn = None
        self.slot = {aid: i + 1 for i, aid in enumerate(spec.agents)}
        self.tracks = [_Track() for _ in range(len(kinds))]
        self.subscribed: set[str] = set()
        self.ego_missing = 0  # steps the ego was not in SUMO
        self.keep_route = 2

    def start(self, xy: np.ndarray, yaw: np.ndarray, present: np.ndarray) -> None:
        """Start SUMO and run it to the window start (step 0); the last ``TRACK_HISTORY`` s are
        stepped one by one to rebuild the agents' front tracks.  An agent whose front moved less
        than its length in that time starts instead from its step-0 box (``xy`` (A, 2), ``yaw``
        (A,), ``present`` (A,)): rear bumper -> front bumper, which the rear then follows."""
        _, tc = _traci()
        sp = self.spec
        try:
            self.conn = _connect(sumo_command(sp.net, list(sp.routes), list(sp.additional), begin=sp.begin,
                                              seed=sp.seed, extra_args=list(sp.extra_args)), sp.scenario_id)
            # the recording's tracks start at its first sample: so do these
            n_hist = int(round(min(TRACK_HISTORY, max(sp.t0 - sp.t_record, 0.0)) / DT))
            if sp.t0 - (n_hist + 1) * DT > sp.begin + 1e-6:
                self.conn.simulationStep(round(sp.t0 - (n_hist + 1) * DT, 1))
            ids = set(self.conn.vehicle.getIDList()) | set(self.conn.person.getIDList())
            self._subscribe([a for a in sp.agents if a in ids])
            self.conn.simulation.subscribe([tc.VAR_DEPARTED_VEHICLES_IDS, tc.VAR_DEPARTED_PERSONS_IDS])
            for _ in range(n_hist + 1):
                self._advance()
                self._read()
            now = self.conn.simulation.getTime()
            ego_in = sp.ego in self.conn.vehicle.getIDList()
        except SumoTrafficError:
            self.close()
            raise
        except Exception as e:  # traci raises FatalTraCIError / TraCIException / OSError
            self.close()
            raise SumoTrafficError(f"scenario '{sp.scenario_id}': SUMO failed to reach the window start "
                                   f"t={sp.t0} s on '{sp.net}': {e}") from e
        if abs(now - sp.t0) > 1e-6 or not ego_in:
            self.close()
            raise SumoTrafficError(f"scenario '{sp.scenario_id}': at t={now} s SUMO " + (
                f"is not at the window start {sp.t0} s" if abs(now - sp.t0) > 1e-6 else
                f"has no ego vehicle '{sp.ego}'") + " (the SUMO run differs from the recording)")
        for i in np.nonzero(present[1:])[0] + 1:
            L = float(self.length[i])
            tr = self.tracks[i]
            if self.kinds[i] != AgentType.PEDESTRIAN and tr.driven(L) < L:
                h = np.array([math.cos(yaw[i]), math.sin(yaw[i])])
                tr.start(xy[i] - 0.5 * L * h, xy[i] + 0.5 * L * h, L)

    def _subscribe(self, ids) -> None:
        _, tc = _traci()
        for aid in ids:
            if aid in self.subscribed or aid not in self.slot:
                continue
            if self.kinds[self.slot[aid]] == AgentType.PEDESTRIAN:
                self.conn.person.subscribe(aid, [tc.VAR_POSITION, tc.VAR_ANGLE, tc.VAR_SPEED])
            else:
                self.conn.vehicle.subscribe(aid, [tc.VAR_POSITION, tc.VAR_ANGLE, tc.VAR_SPEED, tc.VAR_LANE_ID])
            self.subscribed.add(aid)

    def _advance(self) -> None:
        traci, tc = _traci()
        try:
            self.conn.simulationStep()
        except traci.FatalTraCIError as e:
            raise SumoTrafficError(f"scenario '{self.spec.scenario_id}': SUMO stopped: {e}") from e
        dep = self.conn.simulation.getSubscriptionResults()
        self._subscribe(dep.get(tc.VAR_DEPARTED_VEHICLES_IDS, ()))
        self._subscribe(dep.get(tc.VAR_DEPARTED_PERSONS_IDS, ()))

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The agents now: xy (A, 2), yaw (A,), speed (A,), present (A,); extends the front tracks."""
        _, tc = _traci()
        c = self.conn
        A = len(self.kinds)
        xy = np.zeros((A, 2))
        yaw = np.zeros(A)
        speed = np.zeros(A)
        present = np.zeros(A, bool)
        for res in (c.vehicle.getAllSubscriptionResults(), c.person.getAllSubscriptionResults()):
            for aid, d in res.items():
                i = self.slot.get(aid)
                if i is None:
                    continue
                p = d[tc.VAR_POSITION]
                if p[0] <= INVALID_POS or p[1] <= INVALID_POS:
                    continue
                f = np.array([p[0], p[1]], dtype=np.float64)
                ang = float(d[tc.VAR_ANGLE])
                L = float(self.length[i])
                if self.kinds[i] == AgentType.PEDESTRIAN:
                    y = math.pi / 2 - math.radians(ang)
                    ctr, yw = f - 0.5 * L * np.array([math.cos(y), math.sin(y)]), y
                else:
                    ctr, yw = self.tracks[i].push(f, ang, L)
                xy[i], yaw[i] = ctr, math.remainder(yw, 2 * math.pi)
                speed[i] = float(d[tc.VAR_SPEED]) * self.lane_factor.get(d.get(tc.VAR_LANE_ID, ""), 1.0)
                present[i] = True
        for i in np.nonzero(~present[1:])[0] + 1:
            self.tracks[i] = _Track()  # a vehicle that left (or teleports) starts a new track when back
        return xy, yaw, speed, present

    def step(self, ego_xy: np.ndarray, ego_yaw: float, ego_speed: float, ego_len: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Place the ego, advance 0.1 s, read the agents (see ``_read``)."""
        traci, _ = _traci()
        front = ego_xy + 0.5 * ego_len * np.array([math.cos(ego_yaw), math.sin(ego_yaw)])
        angle = (90.0 - math.degrees(ego_yaw)) % 360.0
        try:
            self.conn.vehicle.moveToXY(self.spec.ego, "", -1, float(front[0]), float(front[1]), angle,
                                       keepRoute=self.keep_route)
            self.conn.vehicle.setPreviousSpeed(self.spec.ego, max(float(ego_speed), 0.0))
        except traci.TraCIException:
            self.ego_missing += 1  # SUMO removed the ego (e.g. at the end of its route)
        self._advance()
        return self._read()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - the process may be gone already
                pass
            self.conn = None


class SumoCosim:
    """``TrafficBackend`` moving the non-ego agents with live SUMO runs (module docstring).

    ``threads``: SUMO processes advanced in parallel (default: the CPU count).
    """

    def __init__(self, threads: int | None = None, keep_route: int = 2):
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.keep_route = keep_route
        self.runs: list[_Run] = []
        self._pool: ThreadPoolExecutor | None = None

    def _map(self, fn, items):
        if self._pool is None or len(items) <= 1:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    def reset(self, state: SimState) -> None:
        from roadloop.sumo.suite import get_network

        self.close()
        sc = state.static.scenario
        metas = sc.meta if isinstance(sc.meta, tuple) else (sc.meta,)
        specs = [CosimSpec.from_meta(m) for m in metas]
        A = state.num_agents
        for sp in specs:
            if len(sp.agents) > A - 1:
                raise ScenarioError(f"scenario '{sp.scenario_id}': meta lists {len(sp.agents)} SUMO agents but the "
                                    f"scenario has {A - 1} agent slots")
        kinds = sc.agents.kind.numpy()
        length = sc.agents.length.double().numpy()
        factors: dict[str, dict[str, float]] = {}
        for sp in specs:
            if sp.net not in factors:
                net = get_network(sp.net)
                factors[sp.net] = dict(zip(net.lane_ids, net.lane_geom_factor.tolist(), strict=True))
        self.runs = [_Run(sp, kinds[b], length[b], factors[sp.net]) for b, sp in enumerate(specs)]
        for r in self.runs:
            r.keep_route = self.keep_route
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 and len(self.runs) > 1 else None
        xy, yaw, pres = state.xy.double().numpy(), state.yaw.double().numpy(), state.present.numpy()
        self._map(lambda b: self.runs[b].start(xy[b], yaw[b], pres[b]), list(range(len(self.runs))))

    def step(self, prev: SimState, nxt: SimState) -> SimState:
        if len(self.runs) != nxt.batch_size:
            raise ScenarioError(f"SumoCosim was reset for {len(self.runs)} scenarios, got a batch of {nxt.batch_size}")
        exy, eyaw = nxt.xy[:, 0].double().numpy(), nxt.yaw[:, 0].double().numpy()
        ev = nxt.speed[:, 0].double().numpy()
        elen = nxt.static.scenario.agents.length[:, 0].double().numpy()
        out = self._map(lambda b: self.runs[b].step(exy[b], float(eyaw[b]), float(ev[b]), float(elen[b])),
                        list(range(len(self.runs))))
        xy = torch.from_numpy(np.stack([o[0] for o in out]))
        yaw = torch.from_numpy(np.stack([o[1] for o in out]))
        speed = torch.from_numpy(np.stack([o[2] for o in out]))
        present = torch.from_numpy(np.stack([o[3] for o in out]))
        return replace_agents(prev, nxt, xy, yaw, speed, present)

    def ego_missing_steps(self) -> list[int]:
        """Per scenario of the last batch: steps in which SUMO no longer had the ego vehicle
        (removed at the end of its route), so that other vehicles could not see it."""
        return [r.ego_missing for r in self.runs]

    def close(self) -> None:
        for r in self.runs:
            r.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


__all__ = ["CosimSpec", "SumoCosim"]
