"""Import SUMO road networks (``.net.xml`` / ``.net.xml.gz``) with sumolib into numpy arrays.

Coordinates stay in SUMO's network frame (metres, x east, y north), which is roadloop's local
frame; the geo-projection (``netOffset``, ``projParameter``, boundaries) is kept in
``RoadNetwork.meta``.  Only lanes that allow passenger cars become drivable lanes; crossings
become crosswalk quads; everything else is counted in the ``ImportReport``.

A uniform grid over densified lane points (``LaneGrid``) finds the lanes near query points;
``roadloop.sumo.crop`` uses it to cut regions into scenarios.
"""

from __future__ import annotations

import gc
import gzip
import math
import os
import time
import xml.sax
from dataclasses import dataclass, field

import numpy as np

from roadloop.errors import ScenarioError
from roadloop.sim.datatypes import DT, LightState

GRID_CELL = 32.0  # m, spatial grid cell size
GRID_STEP = 4.0  # m, lanes are densified to this spacing for the spatial grid
CROP_MARGIN = 6.0  # m, extra lane length kept on both sides of the in-radius part
RAIL_CLASSES = {"tram", "rail_urban", "rail", "rail_electric", "rail_fast", "subway", "cable_car"}
FOOT_CLASSES = {"pedestrian", "wheelchair"}
BIKE_CLASSES = {"bicycle", "scooter", "moped"} | FOOT_CLASSES

# SUMO link state character -> LightState
CHAR_TO_LIGHT = np.zeros(256, np.int64)
for _c in "Gg":
    CHAR_TO_LIGHT[ord(_c)] = int(LightState.GREEN)
for _c in "yY":
    CHAR_TO_LIGHT[ord(_c)] = int(LightState.YELLOW)
for _c in "rsu":
    CHAR_TO_LIGHT[ord(_c)] = int(LightState.RED)


class NetworkImportError(ScenarioError):
    """A SUMO network could not be imported (missing, not XML, no drivable lanes...)."""


def import_sumolib():
    try:
        import sumolib  # noqa: F401
        import sumolib.net
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise NetworkImportError(
            "SUMO support needs sumolib: install eclipse-sumo, sumolib and libsumo "
            "(pip install eclipse-sumo sumolib libsumo)") from e
    return sumolib


@dataclass
class ImportReport:
    """What an import kept and skipped."""

    path: str
    lanes_total: int = 0  # every lane in the file (normal + internal + crossing + walkingarea)
    lanes_imported: int = 0  # drivable lanes imported (normal + internal)
    lanes_internal: int = 0  # of which junction-internal
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of lanes
    crosswalks: int = 0
    walkingareas: int = 0
    traffic_lights: int = 0
    controlled_links: int = 0  # controlled connections between imported lanes
    stop_sign_lanes: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the import

    def summary(self) -> str:
        sk = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return (f"{os.path.basename(self.path)}: {self.lanes_imported}/{self.lanes_total} lanes imported "
                f"({self.lanes_internal} internal), skipped: {sk or 'none'}; {self.crosswalks} crosswalks, "
                f"{self.traffic_lights} traffic lights ({self.controlled_links} controlled links), "
                f"{self.seconds:.2f} s")


@dataclass
class TrafficLight:
    """The active (last loaded) program of one SUMO traffic light."""

    id: str
    program_id: str
    offset: float  # s
    durations: np.ndarray  # (NPh,) s
    states: list[str]  # (NPh,) state strings, one char per link index
    num_links: int

    def link_states(self, t0: float, num_steps: int) -> np.ndarray:
        """Fixed-time replay of the program: (num_steps, num_links) uint8 state chars."""
        table = np.frombuffer("".join(s.ljust(self.num_links, "o") for s in self.states).encode(),
                              np.uint8).reshape(len(self.states), self.num_links)
        cycle = float(self.durations.sum())
        if cycle <= 0:
            return np.repeat(table[:1], num_steps, axis=0)
        t = np.mod(t0 + np.arange(num_steps) * DT + self.offset, cycle)
        ph = np.searchsorted(np.cumsum(self.durations), t, side="right").clip(0, len(self.states) - 1)
        return table[ph]


@dataclass
class RoadNetwork:
    """A SUMO network as numpy arrays.  L lanes, NP lane points, NC connections."""

    name: str
    path: str
    lane_ids: list[str]  # (L,) SUMO lane ids
    lane_pts: np.ndarray  # (NP, 2) m, all lane centreline points, lane after lane
    lane_ptr: np.ndarray  # (L+1,) lane i owns points lane_ptr[i]:lane_ptr[i+1]
    lane_s: np.ndarray  # (NP,) m, arc length of each point along its lane
    lane_width: np.ndarray  # (L,) m
    lane_speed: np.ndarray  # (L,) m/s
    lane_length: np.ndarray  # (L,) m, polyline length
    lane_geom_factor: np.ndarray  # (L,) polyline length / SUMO lane length (SUMO moves along
    #                               the shape at speed * factor when they differ)
    lane_internal: np.ndarray  # (L,) bool, junction-internal lane
    lane_edge: np.ndarray  # (L,) int64 index into edge_ids
    lane_left: np.ndarray  # (L,) int64 left neighbour a passenger car may change to, -1 none
    lane_right: np.ndarray  # (L,) int64
    lane_outer_left: np.ndarray  # (L,) bool, left side is an outer road boundary
    lane_outer_right: np.ndarray  # (L,) bool
    lane_stop_sign: np.ndarray  # (L,) bool, a stop / all-way-stop link leaves the lane end
    successors: np.ndarray  # (L, S) int64, -1 pad
    predecessors: np.ndarray  # (L, S') int64, -1 pad
    conn_from: np.ndarray  # (NC,) int64 lane
    conn_to: np.ndarray  # (NC,) int64 lane after the junction
    conn_via: np.ndarray  # (NC,) int64 junction-internal lane, -1 none
    conn_tls: np.ndarray  # (NC,) int64 index into traffic_lights, -1 uncontrolled
    conn_link: np.ndarray  # (NC,) int64 link index within the light's state string, -1
    conn_dir: np.ndarray  # (NC,) uint8 SUMO direction char ('s', 'l', 'r', 't', ...)
    edge_ids: list[str]  # SUMO edge ids of the imported lanes
    crosswalk_xy: np.ndarray  # (C, 4, 2) m, crossing quads
    crosswalk_ids: list[str]  # (C,) SUMO crossing lane ids
    traffic_lights: list[TrafficLight]
    stop_line_xy: np.ndarray  # (K, 2, 2) m, stop lines at the ends of light-controlled lanes
    stop_line_lane: np.ndarray  # (K,) int64
    meta: dict[str, str]  # projection, boundaries, file, SUMO network version
    report: ImportReport
    all_edge_ids: frozenset[str] = frozenset()  # every edge id in the file (for trip checks)
    lane_index: dict[str, int] = field(default_factory=dict)  # SUMO lane id -> lane
    grid: LaneGrid | None = None

    @property
    def num_lanes(self) -> int:
        return len(self.lane_ids)

    def lane_xy(self, i: int) -> np.ndarray:
        return self.lane_pts[self.lane_ptr[i]:self.lane_ptr[i + 1]]

    def tls_index(self, tls_id: str) -> int:
        for i, tl in enumerate(self.traffic_lights):
            if tl.id == tls_id:
                return i
        return -1


# --- spatial grid -----------------------------------------------------------------------

class LaneGrid:
    """Uniform grid over lane points densified to ``GRID_STEP`` m (pure numpy)."""

    def __init__(self, pts: np.ndarray, ptr: np.ndarray, s: np.ndarray, cell: float = GRID_CELL):
        L = len(ptr) - 1
        lane_of_pt = np.repeat(np.arange(L), np.diff(ptr))
        # segments inside each lane (drop the cross-lane ones)
        same = lane_of_pt[1:] == lane_of_pt[:-1]
        a, b = pts[:-1][same], pts[1:][same]
        sa, sb = s[:-1][same], s[1:][same]
        seg_lane = lane_of_pt[:-1][same]
        n = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1) / GRID_STEP).astype(np.int64))
        seg = np.repeat(np.arange(len(a)), n)
        u = (np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
        dense = a[seg] + u[:, None] * (b - a)[seg]
        ds = sa[seg] + u * (sb - sa)[seg]
        dl = seg_lane[seg]
        ends = ptr[1:] - 1  # add each lane's last point
        self.xy = np.concatenate((dense, pts[ends]))
        self.s = np.concatenate((ds, s[ends]))
        self.lane = np.concatenate((dl, np.arange(L)))
        self.cell = cell
        self.origin = self.xy.min(0) - cell
        cx, cy = self._cells(self.xy)
        self.ny = int(cy.max()) + 3
        key = cx * self.ny + cy
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.xy, self.s, self.lane = self.xy[order], self.s[order], self.lane[order]

    def _cells(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.floor((xy - self.origin) / self.cell).astype(np.int64)
        return c[:, 0], c[:, 1]

    def query(self, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lanes with a point within ``radius`` m of any of the query points ``q`` (M, 2).

        Returns (lanes (n,), s_min (n,), s_max (n,)): arc-length range of the in-radius points.
        """
        q = np.asarray(q, float).reshape(-1, 2)
        k = int(math.ceil(radius / self.cell))
        cx, cy = self._cells(q)
        off = np.arange(-k, k + 1)
        ox, oy = np.meshgrid(off, off, indexing="ij")
        qx = (cx[:, None] + ox.ravel()[None]).ravel()
        qy = (cy[:, None] + oy.ravel()[None]).ravel()
        ok = (qx >= 0) & (qy >= 0) & (qy < self.ny)
        keys = np.unique(qx[ok] * self.ny + qy[ok])
        lo = np.searchsorted(self.key, keys, "left")
        hi = np.searchsorted(self.key, keys, "right")
        cnt = hi - lo
        if cnt.sum() == 0:
            e = np.zeros(0, np.int64)
            return e, np.zeros(0), np.zeros(0)
        idx = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(cnt.sum())
        cand = self.xy[idx]
        near = np.zeros(len(idx), bool)
        r2 = radius * radius
        for i in range(0, len(q), 256):  # chunk the (candidates x queries) distances
            d2 = ((cand[:, None, :] - q[None, i:i + 256, :]) ** 2).sum(-1)
            near |= (d2 <= r2).any(1)
        idx = idx[near]
        lanes, inv = np.unique(self.lane[idx], return_inverse=True)
        smin = np.full(len(lanes), np.inf)
        smax = np.full(len(lanes), -np.inf)
        np.minimum.at(smin, inv, self.s[idx])
        np.maximum.at(smax, inv, self.s[idx])
        return lanes, smin, smax


# --- import -----------------------------------------------------------------------------

def _make_reader(sumolib):
    class _Reader(sumolib.net.NetReader):
        """sumolib's reader, also keeping lane change permissions (changeLeft/changeRight)."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.change: dict[str, tuple[str | None, str | None]] = {}
            self.all_edges: set[str] = set()

        def startElement(self, name, attrs):
            super().startElement(name, attrs)
            if name == "lane" and ("changeLeft" in attrs or "changeRight" in attrs):
                self.change[attrs["id"]] = (attrs.get("changeLeft"), attrs.get("changeRight"))
            elif name == "edge":
                self.all_edges.add(attrs["id"])

    return _Reader


def _read(path: str):
    """Parse with sumolib's NetReader (withInternal, withPrograms), as ``sumolib.net.readNet``."""
    sumolib = import_sumolib()
    if not os.path.isfile(path):
        raise NetworkImportError(f"SUMO network '{path}': file not found")
    if os.path.getsize(path) == 0:
        raise NetworkImportError(f"SUMO network '{path}': the file is empty")
    reader = _make_reader(sumolib)(withInternal=True, withPrograms=True)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path) if gz else open(path, "rb")) as src:
            xml.sax.parse(src, reader)
    except xml.sax.SAXParseException as e:
        raise NetworkImportError(f"SUMO network '{path}' is not valid XML: {e.getMessage()} "
                                 f"(line {e.getLineNumber()})") from e
    except (OSError, EOFError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise NetworkImportError(f"SUMO network '{path}' could not be read as a SUMO network: "
                                 f"{type(e).__name__}: {e}") from e
    return reader.getNet(), reader


def _skip_reason(perms: set[str]) -> str | None:
    if "passenger" in perms:
        return None
    if not perms:
        return "no_access"
    if perms & RAIL_CLASSES:
        return "rail"
    if perms <= FOOT_CLASSES:
        return "sidewalk"
    if perms <= BIKE_CLASSES:
        return "bike"
    return "restricted"  # bus / delivery / taxi-only lanes


def _allows_passenger(spec: str | None) -> bool:
    if spec is None:
        return True
    toks = spec.split()
    return "passenger" in toks or "all" in toks


def load_network(path: str | os.PathLike, name: str | None = None) -> RoadNetwork:
    """Import a SUMO network file.  Raises ``NetworkImportError`` naming the file and problem.

    The cyclic garbage collector is paused during the import: sumolib builds millions of small
    objects on large networks and repeated full collections would make the import quadratic.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_network(path, name)
    finally:
        if enabled:
            gc.enable()


def _load_network(path: str | os.PathLike, name: str | None) -> RoadNetwork:
    t_start = time.perf_counter()
    path = os.fspath(path)
    net, reader = _read(path)
    sumolib = import_sumolib()
    rep = ImportReport(path=path)
    skipped: dict[str, int] = {}
    ids: list[str] = []
    shapes: list[np.ndarray] = []
    width, speed, internal, lane_edge, lane_sidx, sumo_len = [], [], [], [], [], []
    edge_ids: list[str] = []
    edge_lanes: list[list[int]] = []
    degenerate: set[str] = set()
    cw_xy, cw_ids = [], []
    node_pairs = set()
    for e in net.getEdges(withInternal=False):
        node_pairs.add((e.getFromNode().getID(), e.getToNode().getID()))
    for e in net.getEdges(withInternal=True):
        fn = e.getFunction()
        lanes = e.getLanes()
        rep.lanes_total += len(lanes)
        if fn == "walkingarea":
            rep.walkingareas += 1
            skipped["walkingarea"] = skipped.get("walkingarea", 0) + len(lanes)
            continue
        if fn == "crossing":
            for ln in lanes:
                sh = np.asarray(ln.getShape(), float)[:, :2]
                if len(sh) < 2 or np.linalg.norm(sh[-1] - sh[0]) < 1e-3:
                    continue
                d = (sh[-1] - sh[0]) / np.linalg.norm(sh[-1] - sh[0])
                n = np.array([-d[1], d[0]]) * 0.5 * ln.getWidth()
                cw_xy.append(np.stack((sh[0] + n, sh[-1] + n, sh[-1] - n, sh[0] - n)))
                cw_ids.append(ln.getID())
            skipped["crossing"] = skipped.get("crossing", 0) + len(lanes)
            continue
        if fn not in ("", "internal"):
            skipped[fn or "other"] = skipped.get(fn or "other", 0) + len(lanes)
            continue
        mine: list[int] = []
        for ln in lanes:
            why = _skip_reason(ln.getPermissions())
            if why is None:
                sh = np.asarray(ln.getShape(), float).reshape(-1, 2)
                seg = np.linalg.norm(np.diff(sh, axis=0), axis=1)
                if len(sh) < 2 or seg.sum() < 1e-3:
                    why = "degenerate"
                    degenerate.add(ln.getID())
                else:
                    sh = sh[np.concatenate(([True], seg > 1e-9))]
            if why is not None:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            mine.append(len(ids))
            ids.append(ln.getID())
            shapes.append(sh)
            width.append(ln.getWidth())
            speed.append(ln.getSpeed())
            sumo_len.append(ln.getLength())
            internal.append(fn == "internal")
            lane_edge.append(len(edge_ids))
            lane_sidx.append(ln.getIndex())
        if mine:
            edge_ids.append(e.getID())
            edge_lanes.append(mine)
    # the raw lane graph (SUMO ids) over all lanes; drop internal lanes cut off from the
    # drivable network (e.g. a junction lane open to cars between delivery-only streets)
    raw_succ: dict[str, list[str]] = {}
    conns = []
    for e in net.getEdges(withInternal=True):
        if e.getFunction() not in ("", "internal"):
            continue
        for ln in e.getLanes():
            for c in ln.getOutgoing():
                raw_succ.setdefault(ln.getID(), []).append(c.getViaLaneID() or c.getToLane().getID())
                conns.append(c)
    orphans = _orphan_internal(ids, internal, raw_succ, degenerate)
    if orphans:
        skipped["orphan_internal"] = len(orphans)
        keep = [lid not in orphans for lid in ids]
        new_pos = np.cumsum(keep) - 1
        ids, shapes, width, speed, sumo_len, internal, lane_edge, lane_sidx = (
            [x for x, k in zip(col, keep, strict=True) if k]
            for col in (ids, shapes, width, speed, sumo_len, internal, lane_edge, lane_sidx))
        remapped = [[int(new_pos[i]) for i in mine if keep[i]] for mine in edge_lanes]
        kept_edges = [i for i, m in enumerate(remapped) if m]
        edge_map = {old: new for new, old in enumerate(kept_edges)}
        edge_ids = [edge_ids[i] for i in kept_edges]
        edge_lanes = [remapped[i] for i in kept_edges]
        lane_edge = [edge_map[e] for e in lane_edge]
    rep.skipped = skipped
    if not ids:
        raise NetworkImportError(
            f"SUMO network '{path}' has no drivable lanes (no lane allows passenger cars; "
            f"{rep.lanes_total} lanes in the file, skipped: "
            f"{', '.join(f'{k}={v}' for k, v in sorted(skipped.items())) or 'none'})")
    L = len(ids)
    index = {lid: i for i, lid in enumerate(ids)}
    npts = np.array([len(s) for s in shapes])
    ptr = np.concatenate(([0], np.cumsum(npts)))
    pts = np.concatenate(shapes)
    seglen = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    seglen[ptr[1:-1] - 1] = 0.0  # no segment between the last point of a lane and the next lane
    s = np.concatenate(([0.0], np.cumsum(seglen)))
    s = s - np.repeat(s[ptr[:-1]], npts)
    length = s[ptr[1:] - 1]

    # neighbours and outer boundaries within each edge
    left = -np.ones(L, np.int64)
    right = -np.ones(L, np.int64)
    outer_l = np.zeros(L, bool)
    outer_r = np.zeros(L, bool)
    sidx = np.asarray(lane_sidx)
    for ei, mine in enumerate(edge_lanes):
        mine = sorted(mine, key=lambda i: sidx[i])
        for a, b in zip(mine[:-1], mine[1:], strict=True):
            if sidx[b] != sidx[a] + 1:
                continue
            cl_a = reader.change.get(ids[a], (None, None))[0]
            cr_b = reader.change.get(ids[b], (None, None))[1]
            if _allows_passenger(cl_a):
                left[a] = b
            if _allows_passenger(cr_b):
                right[b] = a
        if not internal[mine[0]]:
            e = net.getEdge(edge_ids[ei])
            outer_r[mine[0]] = True
            outer_l[mine[-1]] = (e.getToNode().getID(), e.getFromNode().getID()) not in node_pairs

    # connections between imported lanes
    c_from, c_to, c_via, c_tls, c_link, c_dir, c_state = [], [], [], [], [], [], []
    tls_pos = {t.getID(): i for i, t in enumerate(net.getTrafficLights())}
    for c in conns:
        via = c.getViaLaneID() or ""
        ai, ti = index.get(c.getFromLane().getID(), -1), index.get(c.getToLane().getID(), -1)
        if ai < 0 or ti < 0:
            continue
        vi = index.get(via, -1) if via else -1
        if via and vi < 0 and via not in degenerate:
            continue
        c_from.append(ai)
        c_to.append(ti)
        c_via.append(vi)
        tl = c.getTLSID()
        c_tls.append(tls_pos.get(tl, -1) if tl and not internal[ai] else -1)
        c_link.append(c.getTLLinkIndex() if c_tls[-1] >= 0 else -1)
        c_dir.append(ord((c.getDirection() or "?")[0]))
        c_state.append(c.getState() or "")

    def succ_of(lid: str, depth: int = 0) -> list[int]:
        out = []
        for b in raw_succ.get(lid, []):
            if b in index:
                out.append(index[b])
            elif b in degenerate and depth < 4:
                out.extend(succ_of(b, depth + 1))
        return out

    succ_l = [sorted(set(succ_of(lid))) for lid in ids]
    pred_l: list[list[int]] = [[] for _ in range(L)]
    for a, ss in enumerate(succ_l):
        for b in ss:
            pred_l[b].append(a)
    succ = _pad_lists(succ_l)
    pred = _pad_lists(pred_l)

    conn_tls = np.asarray(c_tls, np.int64)
    conn_from = np.asarray(c_from, np.int64)
    stop_sign = np.zeros(L, bool)
    for ai, st, tl in zip(c_from, c_state, c_tls, strict=True):
        if st in ("s", "w") and tl < 0:
            stop_sign[ai] = True
    ctrl = np.unique(conn_from[conn_tls >= 0]) if len(conn_from) else np.zeros(0, np.int64)
    sl_xy = np.zeros((len(ctrl), 2, 2))
    for k, i in enumerate(ctrl):
        p = pts[ptr[i]:ptr[i + 1]]
        d = p[-1] - p[-2]
        n = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-9) * width[i] / 2
        sl_xy[k] = (p[-1] + n, p[-1] - n)

    lights = []
    for t in net.getTrafficLights():
        progs = t.getPrograms()
        if not progs:
            rep.warnings.append(f"traffic light {t.getID()} has no program")
            lights.append(TrafficLight(t.getID(), "", 0.0, np.zeros(0), [], 0))
            continue
        pid, prog = list(progs.items())[-1]  # SUMO runs the last loaded program
        ph = prog.getPhases()
        nl = max(len(p.state) for p in ph)
        lights.append(TrafficLight(t.getID(), str(pid), float(prog._offset or 0.0),
                                   np.array([float(p.duration) for p in ph]), [p.state for p in ph], nl))
        for _, _, link in t.getConnections():
            if link >= nl:
                rep.warnings.append(f"traffic light {t.getID()}: link {link} beyond its state length {nl}")

    loc = getattr(net, "_location", {}) or {}
    meta = {k: str(v) for k, v in loc.items()}
    meta.update(network_file=os.path.abspath(path),
                net_version=".".join(map(str, getattr(net, "_version", ()))),
                sumo_version=str(getattr(sumolib, "__version__", "")))
    rep.lanes_imported = L
    rep.lanes_internal = int(np.sum(internal))
    rep.crosswalks = len(cw_ids)
    rep.traffic_lights = len(lights)
    rep.controlled_links = int((conn_tls >= 0).sum())
    rep.stop_sign_lanes = int(stop_sign.sum())
    if degenerate:
        rep.warnings.append(f"{len(degenerate)} zero-length lanes dropped (connections bridged)")
    rnet = RoadNetwork(
        name=name or _net_name(path), path=os.path.abspath(path), lane_ids=ids, lane_pts=pts, lane_ptr=ptr,
        lane_s=s, lane_width=np.asarray(width, float), lane_speed=np.asarray(speed, float),
        lane_length=length, lane_geom_factor=length / np.maximum(np.asarray(sumo_len, float), 1e-3),
        lane_internal=np.asarray(internal, bool), lane_edge=np.asarray(lane_edge, np.int64),
        lane_left=left, lane_right=right, lane_outer_left=outer_l, lane_outer_right=outer_r,
        lane_stop_sign=stop_sign, successors=succ, predecessors=pred, conn_from=conn_from,
        conn_to=np.asarray(c_to, np.int64), conn_via=np.asarray(c_via, np.int64), conn_tls=conn_tls,
        conn_link=np.asarray(c_link, np.int64), conn_dir=np.asarray(c_dir, np.uint8), edge_ids=edge_ids,
        crosswalk_xy=np.asarray(cw_xy, float).reshape(-1, 4, 2), crosswalk_ids=cw_ids, traffic_lights=lights,
        stop_line_xy=sl_xy, stop_line_lane=ctrl.astype(np.int64), meta=meta, report=rep,
        all_edge_ids=frozenset(reader.all_edges), lane_index=index)
    rnet.grid = LaneGrid(pts, ptr, s)
    rep.seconds = time.perf_counter() - t_start
    return rnet


def _orphan_internal(ids: list[str], internal: list[bool], raw_succ: dict[str, list[str]],
                     degenerate: set[str]) -> set[str]:
    """Internal lanes without an imported predecessor or successor (iterated to a fixpoint)."""
    def nexts(lid: str, depth: int = 0):
        for b in raw_succ.get(lid, ()):
            if b in degenerate and depth < 4:
                yield from nexts(b, depth + 1)
            else:
                yield b

    succ = {a: set(nexts(a)) for a in ids}
    pred: dict[str, set[str]] = {}
    for a, bs in succ.items():
        for b in bs:
            pred.setdefault(b, set()).add(a)
    alive = set(ids)
    todo = [lid for lid, i in zip(ids, internal, strict=True) if i]
    changed = True
    while changed:
        changed = False
        for lid in todo:
            if lid in alive and not (succ[lid] & alive and pred.get(lid, set()) & alive):
                alive.discard(lid)
                changed = True
    return set(ids) - alive


def _pad_lists(lists: list[list[int]]) -> np.ndarray:
    S = max(1, max((len(x) for x in lists), default=1))
    out = -np.ones((len(lists), S), np.int64)
    for i, x in enumerate(lists):
        out[i, :len(x)] = x
    return out


def _net_name(path: str) -> str:
    b = os.path.basename(path)
    for suf in (".gz", ".xml", ".net"):
        b = b[: -len(suf)] if b.endswith(suf) else b
    return b
