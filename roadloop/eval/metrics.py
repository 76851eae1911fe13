"""Closed-loop metrics, registered by name (see docs/metrics.md for the table).

Every metric maps a ``Rollout`` (time-major, B rollouts) and its scenario batch to a (B,)
float tensor, one value per rollout.  Failed rollouts (the policy raised or returned NaN) get
NaN and are counted separately.

AlpaSim scene score (REFERENCE 1.5), per rollout:
  * drop the warm-up steps (log replay, not scored);
  * truncate after the first off-road or collision step and after the first step with
    distance to the log >= 4 m: the distance from the ego centre to the logged ego's *path* (the
    polyline of its whole recorded trajectory), AlpaSim's ``dist_to_gt_trajectory``.  Not the
    distance to where the log was at that time (AlpaSim's ``dist_to_gt_location``, our metric
    ``dist_to_log``): driving slower or faster than the log along its path does not close the window,
    leaving the path sideways does;
  * 0 if an at-fault collision or off-road occurred (in the kept window); otherwise
    min(clamp(progress, 0, 1) / 0.8, 1), where progress is the ego's arc length along the route
    over the kept window divided by the arc length the logged ego covered over the whole
    scored horizon (progress = 1 when the log travels < 5 m).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from roadloop.errors import UnknownNameError
from roadloop.rollout import Rollout
from roadloop.sim.datatypes import AgentType, Scenario
from roadloop.sim.geometry import point_segment_distance
from roadloop.sim.state import _project_on_route

DIST_TO_LOG_TRUNCATE = 4.0  # m
LOG_MIN_TRAVEL = 5.0  # m
PROGRESS_FULL = 0.8
COMFORT = {  # nuPlan comfort bounds (REFERENCE 1.2)
    "lon_accel_min": -4.05, "lon_accel_max": 2.40, "lat_accel": 4.89, "jerk": 8.37, "lon_jerk": 4.13,
    "yaw_rate": 0.95, "yaw_accel": 1.93,
}
TTC_THRESHOLD = 0.95  # s
SPEED_VIOLATION_SCALE = 2.23  # m/s, nuPlan's max overspeed for a 0 speed-limit score


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[[EpisodeView], torch.Tensor]
    unit: str
    range: str
    aggregate: str  # "mean" or "rate" (mean of a 0/1 value)
    description: str


def distance_to_path(xy: torch.Tensor, path: torch.Tensor, valid: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Distance (T, B) m from points xy (T, B, 2) to each batch row's polyline path (B, L, 2), through its
    ``valid`` (B, L) vertices only (a segment needs both ends valid; a lone valid vertex counts as a
    point); NaN where a row has no valid vertex.  ``chunk`` time steps at a time bound the (chunk, B, L)
    temporaries."""
    pa, pb = path[:, :-1].unsqueeze(0), path[:, 1:].unsqueeze(0)  # (1, B, L-1, 2)
    seg_ok = (valid[:, :-1] & valid[:, 1:]).unsqueeze(0)
    inf = float("inf")
    out = []
    for t0 in range(0, xy.shape[0], chunk):
        p = xy[t0:t0 + chunk].unsqueeze(2)  # (t, B, 1, 2)
        d_seg, _ = point_segment_distance(p, pa, pb)
        d = torch.where(seg_ok, d_seg, inf).amin(-1) if path.shape[1] > 1 else p.new_full(p.shape[:2], inf)
        d_pt = torch.where(valid.unsqueeze(0), torch.linalg.vector_norm(p - path.unsqueeze(0), dim=-1), inf)
        out.append(torch.minimum(d, d_pt.amin(-1)))
    d = torch.cat(out) if out else xy.new_zeros((0, xy.shape[1]))
    return torch.where(valid.any(-1).unsqueeze(0), d, torch.full_like(d, float("nan")))


class EpisodeView:
    """Lazily computed per-rollout quantities shared by the metrics (each (B,) or (T, B))."""

    def __init__(self, ro: Rollout, scenarios: Scenario):
        self.ro = ro
        self.sc = scenarios
        c = ro.checks
        T, B = ro.num_steps, ro.batch_size
        self.T, self.B = T, B
        scored = ro.scored.view(T, 1).expand(T, B)
        ag = scenarios.agents
        # (T, B) m, step t: the ego at state t + 1 to the logged ego's whole path (NaN: no log)
        self.dist_to_path = distance_to_path(ro.xy[1:, :, 0], ag.xy[:, 0], ag.valid[:, 0])
        off_path = torch.nan_to_num(self.dist_to_path, nan=0.0) >= DIST_TO_LOG_TRUNCATE
        incident = c.offroad | c.collision | off_path
        first = torch.where((incident & scored).any(0), (incident & scored).to(torch.int8).argmax(0),
                            torch.full((B,), T - 1))
        steps = torch.arange(T).view(T, 1)
        self.keep = scored & (steps <= first.view(1, B))  # (T, B) steps counted by the AlpaSim score
        self.scored = scored
        self.first_scored = int(ro.scored.to(torch.int8).argmax()) if bool(ro.scored.any()) else T
        self.t_end = first  # (B,) last kept step

    def any_kept(self, x: torch.Tensor) -> torch.Tensor:
        return (x & self.keep).any(0)

    def any_scored(self, x: torch.Tensor) -> torch.Tensor:
        return (x & self.scored).any(0)

    def log_travel(self) -> torch.Tensor:
        """Arc length (B,) m the logged ego covers along the route over the scored horizon."""
        ag = self.sc.agents
        t0 = min(self.first_scored, ag.num_steps - 1)  # first scored state
        Tl = ag.num_steps
        steps = torch.arange(Tl)
        last = torch.where(ag.valid[:, 0] & (steps <= self.T), steps, torch.zeros_like(steps)).amax(-1)
        xy_end = ag.xy[:, 0].gather(1, last.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)
        r = self.sc.route
        return _project_on_route(xy_end, r.xy, r.valid) - _project_on_route(ag.xy[:, 0, t0], r.xy, r.valid)

    def ego_travel(self) -> torch.Tensor:
        """Arc length (B,) m the ego covered along the route over the kept window."""
        rs = self.ro.route_s  # (T+1, B): state t
        start = rs[min(self.first_scored, self.T)]
        return rs.gather(0, (self.t_end + 1).view(1, -1)).squeeze(0) - start


def alpasim_score(progress: torch.Tensor, at_fault: torch.Tensor, offroad: torch.Tensor) -> torch.Tensor:
    """0 on an at-fault collision or off-road, else min(clamp(progress, 0, 1) / 0.8, 1)."""
    s = torch.clamp(torch.clamp(progress, 0.0, 1.0) / PROGRESS_FULL, max=1.0)
    return torch.where(at_fault | offroad, torch.zeros_like(s), s)


def _progress(v: EpisodeView) -> torch.Tensor:
    log = v.log_travel()
    ratio = v.ego_travel() / log.clamp_min(1e-6)
    return torch.where(log < LOG_MIN_TRAVEL, torch.ones_like(ratio), ratio)


def _alpasim_score(v: EpisodeView) -> torch.Tensor:
    c = v.ro.checks
    return alpasim_score(_progress(v), v.any_kept(c.collision_at_fault), v.any_kept(c.offroad))


def _comfort_terms(v: EpisodeView) -> dict[str, torch.Tensor]:
    """Max absolute comfort quantities (B,) over the scored steps (3-step moving average first)."""
    ro = v.ro
    dt = 0.1
    acc = ro.accel[1:, :, 0]
    yr = ro.yaw_rate[1:, :, 0]
    sp = ro.speed[1:, :, 0]

    def smooth(x):
        k = 3
        xp = torch.cat((x[:1].expand(k // 2, -1), x, x[-1:].expand(k // 2, -1)), 0)
        return xp.unfold(0, k, 1).mean(-1)

    acc, yr = smooth(acc), smooth(yr)
    lat = sp * yr
    jerk_lon = torch.diff(acc, dim=0, prepend=acc[:1]) / dt
    jerk = torch.sqrt(jerk_lon ** 2 + (torch.diff(lat, dim=0, prepend=lat[:1]) / dt) ** 2)
    yacc = torch.diff(yr, dim=0, prepend=yr[:1]) / dt
    m = v.scored.clone()
    if v.first_scored < v.T:  # differences that reach back into the warm-up are not scored
        m[v.first_scored] = False
    neg = torch.full_like(acc, float("-inf"))
    mx = lambda x: torch.where(m, x, neg).amax(0)
    return {"lon_accel_max": mx(acc), "lon_accel_min": -mx(-acc), "lat_accel": mx(lat.abs()),
            "jerk": mx(jerk), "lon_jerk": mx(jerk_lon.abs()), "yaw_rate": mx(yr.abs()), "yaw_accel": mx(yacc.abs())}


def _comfort_violation(v: EpisodeView) -> torch.Tensor:
    t = _comfort_terms(v)
    bad = (t["lon_accel_max"] > COMFORT["lon_accel_max"]) | (t["lon_accel_min"] < COMFORT["lon_accel_min"])
    for k in ("lat_accel", "jerk", "lon_jerk", "yaw_rate", "yaw_accel"):
        bad |= t[k] > COMFORT[k]
    return bad.float()


def _nuplan_score(v: EpisodeView) -> torch.Tensor:
    c = v.ro.checks
    fault = c.collision_at_fault & v.scored
    hit_static = (fault & (c.collision_kind == AgentType.STATIC)).any(0)
    hit_moving = (fault & (c.collision_kind != AgentType.STATIC)).any(0)
    m_coll = torch.where(hit_moving, 0.0, torch.where(hit_static, 0.5, 1.0))
    m_drive = torch.where(v.any_scored(c.offroad), 0.0, 1.0)
    wrong_m = (c.wrong_way & v.scored).float().mul(v.ro.speed[1:, :, 0] * 0.1).sum(0)
    m_dir = torch.where(wrong_m < 2.0, 1.0, torch.where(wrong_m < 6.0, 0.5, 0.0))
    prog = _progress(v).clamp(0.0, 1.0)
    # nuPlan's "making progress" uses the progress over the whole scored horizon
    m_prog = torch.where(prog >= 0.2, 1.0, 0.0)
    moving = v.ro.speed[1:, :, 0] > 0.1
    ttc_ok = ~((c.ttc < TTC_THRESHOLD) & moving & v.scored).any(0)
    over = torch.where(v.scored, c.speeding, torch.zeros_like(c.speeding)).sum(0) / v.scored.sum(0).clamp_min(1)
    speed_ok = 1.0 - torch.clamp(over / SPEED_VIOLATION_SCALE, 0.0, 1.0)
    comfort_ok = 1.0 - _comfort_violation(v)
    weighted = (5 * ttc_ok.float() + 5 * prog + 4 * speed_ok + 2 * comfort_ok) / 16.0
    return m_coll * m_drive * m_dir * m_prog * weighted


def _route_completion(v: EpisodeView) -> torch.Tensor:
    return (_progress(v) >= 0.95).float()


def _reasoning_consistency(v: EpisodeView) -> torch.Tensor:
    """Share of the rollout's decisions with CoC text (graded: finite ``Rollout.grounded``) whose parsed
    decision equals the meta-actions of the plan it came with (``reasoning.checks.consistency``); NaN when
    the policy wrote none (or is not a ``writes_coc`` policy)."""
    from roadloop.reasoning.checks import consistency
    from roadloop.reasoning.meta_action import meta_actions

    ro = v.ro
    ok = torch.zeros(v.B)
    n = torch.zeros(v.B)
    for d, t in enumerate(ro.decision_steps.tolist()):
        texts = ro.reasoning[d] if d < len(ro.reasoning) else ()
        graded = torch.isfinite(ro.grounded[d]).tolist() if d < ro.grounded.shape[0] else [False] * v.B
        if not any(graded):
            continue
        lon, lat = meta_actions(ro.xy[t, :, 0], ro.yaw[t, :, 0], ro.speed[t, :, 0], ro.plan_xy[d])
        for b, text in enumerate(texts):
            if graded[b]:
                n[b] += 1
                ok[b] += float(consistency(text, lon[b], lat[b]))
    return torch.where(n > 0, ok / n.clamp_min(1), torch.full_like(n, float("nan")))


def _reasoning_grounding(v: EpisodeView) -> torch.Tensor:
    """Share of the rollout's decisions with reasoning text that is grounded in the scene it was written in
    (every mentioned component exists as stated; ``Rollout.grounded``); NaN when the policy wrote no text."""
    g = v.ro.grounded
    ok = torch.isfinite(g)
    n = ok.sum(0)
    s = torch.where(ok, g, torch.zeros_like(g)).sum(0)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


def _km(v: EpisodeView) -> torch.Tensor:
    sp = v.ro.speed[1:, :, 0]
    return (sp * 0.1 * v.scored).sum(0) / 1000.0


METRICS: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    METRICS[spec.name] = spec
    return spec


for _spec in [
    MetricSpec("score", _alpasim_score, "-", "[0, 1]", "mean", "AlpaSim scene score (module docstring)"),
    MetricSpec("nuplan_score", _nuplan_score, "-", "[0, 1]", "mean", "nuPlan-style closed-loop score (CLS)"),
    MetricSpec("progress", _progress, "-", "[0, inf)", "mean",
               "ego route progress over the kept window / logged ego's progress"),
    MetricSpec("collision_at_fault", lambda v: v.any_scored(v.ro.checks.collision_at_fault).float(), "-",
               "{0, 1}", "rate", "an at-fault collision (front or lateral) in the scored steps"),
    MetricSpec("collision_any", lambda v: v.any_scored(v.ro.checks.collision).float(), "-", "{0, 1}", "rate",
               "any collision in the scored steps (being rear-ended included)"),
    MetricSpec("offroad", lambda v: v.any_scored(v.ro.checks.offroad).float(), "-", "{0, 1}", "rate",
               "a corner of the ego box left the drivable area"),
    MetricSpec("red_light", lambda v: v.any_scored(v.ro.checks.red_light).float(), "-", "{0, 1}", "rate",
               "the ego crossed a stop line on red"),
    MetricSpec("wrong_way", lambda v: v.any_scored(v.ro.checks.wrong_way).float(), "-", "{0, 1}", "rate",
               "the ego drove against the lane direction"),
    MetricSpec("route_completion", _route_completion, "-", "{0, 1}", "rate",
               "progress >= 0.95 of the logged ego's"),
    MetricSpec("comfort_violation", _comfort_violation, "-", "{0, 1}", "rate",
               "any nuPlan comfort bound exceeded in the scored steps"),
    MetricSpec("min_ttc", lambda v: torch.where(v.scored, v.ro.checks.ttc, torch.full_like(v.ro.checks.ttc,
               float("inf"))).amin(0).clamp_max(10.0), "s", "[0, 10]", "mean",
               "minimum time-to-collision (capped at 10 s)"),
    MetricSpec("dist_to_log", lambda v: torch.where(v.keep, torch.nan_to_num(v.ro.checks.dist_to_log, nan=0.0),
               torch.zeros_like(v.ro.checks.dist_to_log)).sum(0) / v.keep.sum(0).clamp_min(1), "m", "[0, inf)",
               "mean", "mean distance to the logged ego over the kept window"),
    MetricSpec("dist_to_log_path", lambda v: torch.where(v.keep, torch.nan_to_num(v.dist_to_path, nan=0.0),
               torch.zeros_like(v.dist_to_path)).amax(0), "m", "[0, inf)", "mean",
               "largest distance to the logged ego's path over the kept window"),
    MetricSpec("km", _km, "km", "[0, inf)", "sum", "distance driven in the scored steps"),
    MetricSpec("reasoning_consistency", _reasoning_consistency, "-", "[0, 1]", "mean",
               "share of decisions whose reasoning text states the plan's meta-actions (NaN: no text)"),
    MetricSpec("reasoning_grounding", _reasoning_grounding, "-", "[0, 1]", "mean",
               "share of decisions whose reasoning text is grounded in the scene (NaN: no text)"),
]:
    register(_spec)


def compute_metrics(ro: Rollout, scenarios: Scenario, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-rollout values {name: (B,)} of the named (default: all) metrics; NaN for failed rollouts."""
    view = EpisodeView(ro, scenarios)
    out = {}
    for n in names or list(METRICS):
        if n not in METRICS:
            raise UnknownNameError("metric", n, list(METRICS))
        val = METRICS[n].fn(view).float()
        out[n] = torch.where(ro.failed, torch.full_like(val, float("nan")), val)
    return out
