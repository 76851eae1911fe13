"""Cut a SUMO ``Recording`` into roadloop scenarios (one ego vehicle and time window each).

Per scenario: the ego's recorded track (``warmup_steps`` of history + the steps to drive), its
route (recorded track onward, continued along its SUMO route through the lane graph), the
network cropped to ``radius`` m around both, the nearest other road users as agents with
their logs, and the traffic-light states SUMO recorded for the window.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import torch

from roadloop.errors import ScenarioError
from roadloop.scenarios.builder import ScenarioBuilder, arclength, resample
from roadloop.sim.batching import collate, validate
from roadloop.sim.checks import compute_checks
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import AgentType, Scenario, ScenarioMeta, TrafficModel
from roadloop.sim.state import init_state
from roadloop.sim.step import step
from roadloop.sumo.crop import add_crop_to_builder, crop_network, lane_piece
from roadloop.sumo.network import RoadNetwork
from roadloop.sumo.traffic import Recording, portable_path

EGO_CLASSES = {"passenger", "private", "taxi", "evehicle", "hov"}
MAX_STEP_JUMP = 6.0  # m per 0.1 s step: more is a teleport, not driving
ROUTE_AHEAD = 60.0  # m of route beyond the ego's position at the end of the window
ROUTE_MIN_AHEAD = 50.0  # m the ego's recorded drive must continue after the window
PATH_AHEAD = 30.0  # m of agent path beyond their last position in the window
META_KEYS = ("netOffset", "projParameter", "convBoundary", "origBoundary", "network_file", "net_version")


def _dedup(seq: np.ndarray) -> list[int]:
    seq = np.asarray(seq)
    if len(seq) == 0:
        return []
    keep = np.concatenate(([True], seq[1:] != seq[:-1]))
    return [int(x) for x in seq[keep]]


def ego_windows(rec: Recording, num_steps: int, min_travel: float = 40.0,
                net: RoadNetwork | None = None) -> tuple[dict[int, np.ndarray], set[int]]:
    """Actor -> possible window start steps: a passenger car present for all ``num_steps``,
    always on imported (passenger) lanes, no teleport, travelling >= ``min_travel`` m, and
    driving on >= 50 m after the window (or still driving when the recording ends).

    With ``net``, windows that cross a junction are preferred: if a vehicle has any, only
    those are returned.  Returns (windows, actors whose windows cross a junction)."""
    T = num_steps
    out: dict[int, np.ndarray] = {}
    junction: set[int] = set()
    for v in range(rec.num_actors):
        a, b = int(rec.ptr[v]), int(rec.ptr[v + 1])
        if b - a < T or rec.vclass[v] not in EGO_CLASSES or rec.length[v] > 7.5:
            continue
        st, xy, lane = rec.step[a:b], rec.xy[a:b], rec.lane[a:b]
        d = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        cd = np.concatenate(([0.0], np.cumsum(d)))
        bad = np.concatenate(([0], np.cumsum((lane < 0).astype(np.int64))))
        jump = np.concatenate(([0], np.cumsum((d > MAX_STEP_JUMP).astype(np.int64))))
        i = np.arange(b - a - T + 1)
        j = i + T - 1
        ok = ((st[j] - st[i]) == T - 1) & (cd[j] - cd[i] >= min_travel) & (bad[j + 1] - bad[i] == 0)
        ok &= (jump[j] - jump[i]) == 0
        # the route must go on >= 50 m after the window (recorded, or the vehicle is still driving)
        ok &= (cd[-1] - cd[j] >= ROUTE_MIN_AHEAD) | (int(st[-1]) == rec.num_steps - 1)
        if net is not None and ok.any():
            jn = np.concatenate(([0], np.cumsum(net.lane_internal[np.maximum(lane, 0)] & (lane >= 0))))
            through = ok & (jn[j + 1] - jn[i] > 0)
            if through.any():
                ok = through
                junction.add(v)
        if ok.any():
            out[v] = st[i[ok]].astype(np.int64)
    return out, junction


def _project(net: RoadNetwork, lane: int, p: np.ndarray) -> float:
    """Arc length along ``lane`` of the point nearest to ``p`` (2,)."""
    xy = net.lane_xy(lane)
    s = net.lane_s[net.lane_ptr[lane]:net.lane_ptr[lane + 1]]
    a, ab = xy[:-1], np.diff(xy, axis=0)
    t = np.clip(((p - a) * ab).sum(1) / (ab * ab).sum(1).clip(1e-12), 0, 1)
    k = int(np.argmin(np.linalg.norm(a + t[:, None] * ab - p, axis=1)))
    return float(s[k] + t[k] * (s[k + 1] - s[k]))


def _reaches(net: RoadNetwork, lane: int, edge: str, depth: int = 0) -> bool:
    """``lane`` is on ``edge`` or leads to it through junction-internal lanes."""
    if not net.lane_internal[lane]:
        return net.edge_ids[net.lane_edge[lane]] == edge
    return depth < 3 and any(_reaches(net, int(x), edge, depth + 1) for x in net.successors[lane] if x >= 0)


def _blend(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smoothstep from polyline ``a`` to the roughly parallel ``b`` (lane change), (N, 2)."""
    a, b = resample(a, 1.0), resample(b, 1.0)
    u = np.linspace(0.0, 1.0, max(len(a), len(b)))
    sa, sb = arclength(a) / max(arclength(a)[-1], 1e-9), arclength(b) / max(arclength(b)[-1], 1e-9)
    pa = np.stack((np.interp(u, sa, a[:, 0]), np.interp(u, sa, a[:, 1])), 1)
    pb = np.stack((np.interp(u, sb, b[:, 0]), np.interp(u, sb, b[:, 1])), 1)
    w = (u * u * (3 - 2 * u))[:, None]
    return (1 - w) * pa + w * pb


def _neighbours(net: RoadNetwork, lane: int, depth: int = 3) -> list[int]:
    out = []
    for side in (net.lane_left, net.lane_right):
        x = lane
        for _ in range(depth):
            x = int(side[x])
            if x < 0:
                break
            out.append(x)
    return out


def _continue_along_route(net: RoadNetwork, lane: int, p: np.ndarray, route: tuple[str, ...],
                          need: float) -> tuple[list[np.ndarray], list[int]]:
    """Lane centreline from ``p`` on ``lane`` onward for ``need`` m, following the SUMO route
    edges (changing lanes, blended over the lane, where only a neighbour lane leads on)."""
    s = _project(net, lane, p)
    # join a few metres ahead: ``p`` is a box centre, possibly off the centreline (lane change)
    s = min(s + 4.0, 0.5 * (s + float(net.lane_length[lane])))
    piece = lane_piece(net, lane, s, float(net.lane_length[lane]))
    pieces: list[np.ndarray] = []
    got = float(net.lane_length[lane] - s)
    lanes: list[int] = []
    edge = net.edge_ids[net.lane_edge[lane]]
    pos = route.index(edge) if edge in route else -1
    cur = lane
    for _ in range(12):
        nxt = route[pos + 1] if 0 <= pos < len(route) - 1 else None
        if got >= need or nxt is None:
            break
        good = [int(c) for c in net.successors[cur] if c >= 0 and _reaches(net, int(c), nxt)]
        if not good:
            for nb in _neighbours(net, cur):
                good = [int(c) for c in net.successors[nb] if c >= 0 and _reaches(net, int(c), nxt)]
                if good:
                    s_nb = _project(net, nb, piece[0])
                    other = lane_piece(net, nb, s_nb, float(net.lane_length[nb]))
                    if len(piece) >= 2 and arclength(piece)[-1] > 1.0 and arclength(other)[-1] > 1.0:
                        piece = _blend(piece, other)
                    else:
                        piece = other
                    lanes.append(nb)
                    cur = nb
                    break
        if not good:
            break
        pieces.append(piece)
        cur = good[0]
        if not net.lane_internal[cur]:
            pos += 1
        lanes.append(cur)
        piece = net.lane_xy(cur)
        got += float(net.lane_length[cur])
    pieces.append(piece)
    return pieces, lanes


def _truncate(xy: np.ndarray, s_max: float) -> np.ndarray:
    """The polyline's first ``s_max`` m (interpolating the cut point)."""
    s = arclength(xy)
    if s[-1] <= s_max:
        return xy
    k = int(np.searchsorted(s, s_max))
    end = np.array([np.interp(s_max, s, xy[:, 0]), np.interp(s_max, s, xy[:, 1])])
    return np.concatenate((xy[:k], end[None]))


def _future(rec: Recording, net: RoadNetwork, v: int, step0: int, s_from: float, ahead: float
            ) -> tuple[np.ndarray, list[int]]:
    """Actor ``v``'s path from step ``step0``: recorded positions until ``ahead`` m past arc
    length ``s_from``, continued along its SUMO route if the recording ends first.
    Returns (xy (N, 2), network lanes in order)."""
    a, b = int(rec.ptr[v]), int(rec.ptr[v + 1])
    i0 = a + int(np.searchsorted(rec.step[a:b], step0))
    xy = rec.xy[i0:b]
    # stop at the first teleport / gap: the track after it is not driven
    jump = np.linalg.norm(np.diff(xy, axis=0), axis=1) > MAX_STEP_JUMP
    brk = np.nonzero((np.diff(rec.step[i0:b]) != 1) | jump)[0]
    cut = int(brk[0]) + 1 if len(brk) else len(xy)
    xy = xy[:cut]
    cd = arclength(xy) if len(xy) > 1 else np.zeros(len(xy))
    stop = int(np.searchsorted(cd, s_from + ahead)) + 1
    xy, lanes = xy[:stop], rec.lane[i0:i0 + cut][:stop]
    got = float(cd[min(stop, len(cd)) - 1]) - s_from if len(cd) else 0.0
    lane_seq = _dedup(lanes[lanes >= 0])
    still_there = cut == b - i0 and int(rec.step[b - 1]) == rec.num_steps - 1
    if got < ahead and still_there and lane_seq and rec.route[v]:
        pieces, more = _continue_along_route(net, lane_seq[-1], xy[-1], rec.route[v], ahead - got)
        xy = np.concatenate([xy, *pieces])
        xy = _truncate(xy, s_from + ahead + 1.0)
        lane_seq += more
    return xy, lane_seq


def _boxes_overlap(xy, yaw, length, width) -> np.ndarray:
    """(n, n) bool: oriented boxes i and j overlap (separating-axis test on the 4 box axes)."""
    n = len(xy)
    c, s = np.cos(yaw), np.sin(yaw)
    ax = np.stack((np.stack((c, s), -1), np.stack((-s, c), -1)), 1)  # (n, 2, 2) box axes
    half = np.stack((length, width), -1) / 2  # (n, 2)
    axes = np.concatenate((np.broadcast_to(ax[:, None], (n, n, 2, 2)),
                           np.broadcast_to(ax[None, :], (n, n, 2, 2))), axis=2)  # (n, n, 4, 2)
    d = xy[None, :, :] - xy[:, None, :]  # (n, n, 2)
    dist = np.abs(np.einsum("ijd,ijkd->ijk", d, axes))
    ri = (np.abs(np.einsum("iad,ijkd->ijka", ax, axes)) * half[:, None, None, :]).sum(-1)
    rj = (np.abs(np.einsum("jad,ijkd->ijka", ax, axes)) * half[None, :, None, :]).sum(-1)
    return ~(dist > ri + rj).any(-1)


def cut_scenario(rec: Recording, net: RoadNetwork, v: int, t0: int, *, seed: int = 0, radius: float = 80.0,
                 max_agents: int = 32, warmup_steps: int = 20, num_steps: int = 170,
                 family: str | None = None, extra: dict[str, str] | None = None) -> Scenario:
    """The scenario with actor ``v`` as ego over recording steps [t0, t0 + num_steps)."""
    T = num_steps
    name = net.name
    a, b = int(rec.ptr[v]), int(rec.ptr[v + 1])
    i0 = a + int(np.searchsorted(rec.step[a:b], t0))
    ego_xy = rec.xy[i0:i0 + T]
    if len(ego_xy) != T or int(rec.step[i0 + T - 1]) != t0 + T - 1:
        raise ScenarioError(f"actor {rec.ids[v]} is not recorded over steps [{t0}, {t0 + T})")
    travelled = float(arclength(ego_xy)[-1])
    route_xy, route_lanes = _future(rec, net, v, t0, travelled, ROUTE_AHEAD)
    route_xy = resample(route_xy, 1.0)

    # other actors: nearest (over the window, at equal times) within the radius
    m = (rec.step >= t0) & (rec.step < t0 + T)
    m[a:b] = False
    sidx = np.nonzero(m)[0]
    actor = np.repeat(np.arange(rec.num_actors), np.diff(rec.ptr))[sidx]
    d = np.linalg.norm(rec.xy[sidx] - ego_xy[rec.step[sidx] - t0], axis=1)
    dmin = np.full(rec.num_actors, np.inf)
    np.minimum.at(dmin, actor, d)
    cand = np.nonzero(dmin <= radius)[0]
    cand = cand[np.argsort(dmin[cand], kind="stable")]

    # agents' logs (ego first)
    sel = np.concatenate(([v], cand))
    row = -np.ones(rec.num_actors, np.int64)
    row[sel] = np.arange(len(sel))
    mm = (rec.step >= t0) & (rec.step < t0 + T)
    mm_idx = np.nonzero(mm)[0]
    act_all = np.repeat(np.arange(rec.num_actors), np.diff(rec.ptr))[mm_idx]
    keep = row[act_all] >= 0
    mm_idx, r = mm_idx[keep], row[act_all[keep]]
    k = rec.step[mm_idx] - t0
    n = len(sel)
    XY = np.zeros((n, T, 2))
    YAW = np.zeros((n, T))
    SPD = np.zeros((n, T))
    VAL = np.zeros((n, T), bool)
    XY[r, k], YAW[r, k], SPD[r, k], VAL[r, k] = rec.xy[mm_idx], rec.yaw[mm_idx], rec.speed[mm_idx], True

    # drop agents whose box overlaps a kept one at step 0 (nearest first)
    ov = _boxes_overlap(XY[:, 0], YAW[:, 0], rec.length[sel], rec.width[sel])
    ov &= VAL[:, 0][:, None] & VAL[:, 0][None]
    kept: list[int] = [0]
    dropped = 0
    for i in range(1, n):
        if len(kept) >= max_agents:
            break
        if ov[i, kept].any():
            dropped += 1
            continue
        kept.append(i)

    # crop the network around the ego's track and route
    q = np.concatenate((ego_xy[::5], route_xy[::4]))
    crop = crop_network(net, q, radius)
    builder = ScenarioBuilder(T)
    next_lane = {x: y for x, y in zip(route_lanes[:-1], route_lanes[1:], strict=True)}
    paths: dict[int, tuple] = {}
    for i in kept[1:]:
        u = int(sel[i])
        valid = np.nonzero(VAL[i])[0]
        if rec.kind[u] == AgentType.PEDESTRIAN:
            xy_p = XY[i, valid]
            lanes_p: list[int] = []
        else:
            seg = arclength(XY[i, valid]) if len(valid) > 1 else np.zeros(1)
            xy_p, lanes_p = _future(rec, net, u, t0 + int(valid[0]), float(seg[-1]), PATH_AHEAD)
        paths[i] = (xy_p, lanes_p)
        for x, y in zip(lanes_p[:-1], lanes_p[1:], strict=True):
            next_lane.setdefault(x, y)
    states = {t: s[t0:t0 + T] for t, s in rec.tls_states.items()}
    lane_map = add_crop_to_builder(builder, net, crop, link_states=states, next_lane=next_lane)
    r_lanes = [int(lane_map[x]) for x in route_lanes if lane_map[x] >= 0]
    builder.set_route(r_lanes, xy=route_xy)
    lane0 = int(rec.lane[i0])
    builder.add_agent(XY[0], YAW[0], SPD[0], VAL[0], length=float(rec.length[v]), width=float(rec.width[v]),
                      kind=AgentType.VEHICLE, model=TrafficModel.LOG, path=route_xy,
                      desired_speed=float(net.lane_speed[lane0]))
    for i in kept[1:]:
        u = int(sel[i])
        xy_p, lanes_p = paths[i]
        path = xy_p if len(xy_p) >= 2 and arclength(xy_p)[-1] > 0.5 else None
        pl = [int(lane_map[x]) for x in lanes_p if lane_map[x] >= 0]
        kind = int(rec.kind[u])
        if kind == AgentType.PEDESTRIAN:
            desired = float(np.mean(SPD[i][VAL[i]])) if VAL[i].any() else 1.3
        else:
            first = lanes_p[0] if lanes_p else -1
            desired = float(net.lane_speed[first]) if first >= 0 else float(max(SPD[i].max(), 5.0))
        builder.add_agent(XY[i], YAW[i], SPD[i], VAL[i], length=float(rec.length[u]),
                          width=float(rec.width[u]), kind=AgentType(kind), model=TrafficModel.LOG, path=path,
                          path_lanes=pl if (pl and path is not None) else None, desired_speed=desired)
    t_abs = rec.t_begin + t0 * 0.1
    ex = {k: net.meta[k] for k in META_KEYS if k in net.meta}
    if "network_file" in ex:
        ex["network_file"] = portable_path(ex["network_file"])
    portable = lambda paths: ",".join(portable_path(q) for q in paths.split(",") if q)
    # random trips live in a per-process temporary folder: the co-simulation regenerates them from
    # their parameters (``random_trips``), and their path would make equal scenarios hash differently
    routes = "" if rec.info.get("random_trips") else portable(rec.info.get("routes", ""))
    ex.update(sumo_version=rec.info.get("sumo_version", ""), vehicle=rec.ids[v], sumo_time=f"{t_abs:.1f}",
              routes=routes, dropped_overlapping_agents=str(dropped),
              sumo_seed=rec.info.get("seed", ""),
              # what the co-simulation (roadloop.sumo.cosim) needs to restart the same SUMO run:
              # SUMO ids of agents 1..A-1 in slot order, the run's begin time, additional files,
              # extra SUMO options and, for random trips, their randomTrips.py parameters
              sumo_agents=json.dumps([rec.ids[int(sel[i])] for i in kept[1:]]),
              sumo_begin=rec.info.get("begin", "0.0"), sumo_record_begin=f"{rec.t_begin:.1f}",
              sumo_additional=portable(rec.info.get("additional", "")),
              sumo_extra_args=rec.info.get("extra_args", "[]"), random_trips=rec.info.get("random_trips", ""))
    ex.update(extra or {})
    tag = f"sumo-{name}" if not seed else f"sumo-{name}-s{int(seed)}"  # other seeds: same vehicle ids, new traffic
    meta = ScenarioMeta(scenario_id=f"{tag}/{rec.ids[v]}@{t_abs:.1f}", family=family or f"sumo_{name}",
                        seed=int(seed), source=f"sumo:{name}", warmup_steps=warmup_steps,
                        extra=tuple(sorted((str(k2), str(v2)) for k2, v2 in ex.items())))
    sc = builder.build(meta)
    validate(sc)
    return sc


def log_violations(scenarios: list[Scenario]) -> list[str]:
    """Replay each scenario's log through roadloop's own per-step checks; one reason per scenario
    ("" if clean): the logged ego collides (any fault), leaves the lanes or crosses a red stop line
    after its warm-up.

    SUMO moves vehicles along 1-D lanes: inside junctions their 2-D boxes may overlap or cut
    across a corner outside every lane shape, and an ego with such a log cannot be scored
    (replaying the log itself would be penalised).  ``cut_scenarios`` skips these egos.
    """
    if not scenarios:
        return []
    batch = collate(scenarios)
    cfg = SimConfig(check_ttc=False)
    state = init_state(batch, cfg)
    B = len(scenarios)
    warm = torch.tensor([s.meta.warmup_steps for s in scenarios])
    first = {k: torch.full((B,), -1) for k in ("collision", "offroad", "red_light")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only spin-wait
    try:
        _replay_checks(state, cfg, warm, first, batch.num_steps)
    finally:
        torch.set_num_threads(threads)
    out = []
    for b in range(B):
        why = [f"logged ego {k.replace('_', ' ')} at step {int(f[b])}" for k, f in first.items() if f[b] >= 0]
        out.append("; ".join(why))
    return out


def _replay_checks(state, cfg: SimConfig, warm: torch.Tensor, first: dict[str, torch.Tensor], T: int) -> None:
    with torch.inference_mode():
        for t in range(T - 1):
            nxt = step(state, None, cfg)
            c = compute_checks(state, nxt, cfg)
            for k, f in first.items():
                hit = getattr(c, k) & (f < 0) & (t + 1 >= warm)
                f[hit] = t + 1
            state = nxt


def cut_scenarios(rec: Recording, net: RoadNetwork, n: int, *, seed: int = 0, radius: float = 80.0,
                  max_agents: int = 32, warmup_steps: int = 20, num_steps: int = 170,
                  min_travel: float = 40.0, egos: list[str] | None = None,
                  extra_fn=None, check_logs: bool = True,
                  rejected: list[tuple[str, str]] | None = None) -> list[Scenario]:
    """Up to ``n`` scenarios, one per ego vehicle, egos and window starts drawn with ``seed``
    (egos whose window crosses a junction first).

    ``egos`` restricts the ego candidates to these vehicle ids; ``extra_fn(vehicle_id)`` may add
    metadata (e.g. the split).  With ``check_logs`` egos whose log fails roadloop's checks
    (``log_violations``) are skipped; (scenario id, reason) pairs are appended to ``rejected``.
    Deterministic for a given recording and seed.
    """
    wins, through = ego_windows(rec, num_steps, min_travel, net)
    cands = sorted(wins, key=lambda v: rec.ids[v])
    if egos is not None:
        allow = set(egos)
        cands = [v for v in cands if rec.ids[v] in allow]
    rng = np.random.default_rng(seed)
    order = [cands[i] for i in rng.permutation(len(cands))]
    order = [v for v in order if v in through] + [v for v in order if v not in through]
    out: list[Scenario] = []
    i = 0
    while len(out) < n and i < len(order):
        chunk = order[i:i + (max(2 * (n - len(out)), 4) if check_logs else n - len(out))]
        i += len(chunk)
        scs = []
        for v in chunk:
            starts = wins[v]
            r = np.random.default_rng([seed, zlib.crc32(rec.ids[v].encode())])
            t0 = int(starts[r.integers(len(starts))])
            scs.append(cut_scenario(rec, net, v, t0, seed=seed, radius=radius, max_agents=max_agents,
                                    warmup_steps=warmup_steps, num_steps=num_steps,
                                    extra=extra_fn(rec.ids[v]) if extra_fn else None))
        reasons = log_violations(scs) if check_logs else [""] * len(scs)
        for sc, why in zip(scs, reasons, strict=True):
            if why:
                if rejected is not None:
                    rejected.append((sc.meta.scenario_id, why))
            elif len(out) < n:
                out.append(sc)
    return out
