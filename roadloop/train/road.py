"""RoaD: Rollouts as Demonstrations (arXiv 2512.01993, REFERENCE 1.4), ``roadloop train road``.

Closed-loop *supervised* fine-tuning.  Each round:

1. **Guided rollouts**: the policy drives ``scenarios_per_round`` scenarios in closed loop through the
   one rollout engine, wrapped in ``ClosestOfK``: at every replanning step (2 Hz) it samples K
   candidate outputs (CoC text + action tokens) from the same observation, the privileged ``Expert``
   plans from the same state, and the candidate whose plan is closest to the expert's (ADE over
   the first ``horizon_s`` seconds) is committed and executed.  Every committed (observation, text,
   action tokens) is recorded.  With ``guide`` < 1, only that share of the decisions (drawn per row and
   decision) executes the closest candidate; the others execute an ordinary sample (candidate 0), so the
   rollouts visit the states the policy itself drives into, and the closest candidate is still what is
   recorded there (the correction).
2. **Imitation** on those pairs with the ordinary imitation loss (``VLAModel.loss``: text
   cross-entropy + ``action_weight`` x action-token cross-entropy, as ``roadloop.train.il``) for
   ``epochs`` passes, AdamW, gradient clipping.  With ``aggregate`` the demonstrations of every
   round so far are used (written to ``<out>/demos/round-NNNN.npz``, so a resumed run has them).

The imitation loss of the round's own demonstrations is measured before and after its update
(``road/loss_before``, ``road/loss_after``): the sign that the policy moved towards its best
on-policy samples.

Resilience as in ``roadloop.train.il``: config.yaml + run.json (lineage), a trainer checkpoint after
every round (weights, optimizer, RNG), ``resume=True`` loses at most the round in progress; the
round's scenarios and seeds are functions of (seed, round).  Non-finite steps restore the last good
state (``GoodState``).  Final model to ``<out>/final`` with lineage.

Departures from the paper:

* K = 16 candidates by default (the reimplementation uses 64), to fit a CPU budget; temperature 0.8,
  2 s ADE horizon as in the reimplementation.
* The expert is roadloop's privileged PDM-Closed-style planner run on the same observation (the
  paper's expert continuation is the logged human trajectory); the committed candidate's own
  reasoning text is the text target (no re-labelling) unless ``text_target="label"``.
* Options beyond the paper: ``select="ade_reasoning"`` commits the closest candidate among those
  whose text passes the grounding and consistency checks; ``text_target="label"`` trains the text
  on the ground-truth CoC label of the committed plan; ``random_start`` starts the round's 8 s
  rollouts anywhere in the logs (as GRPO's); ``expert_data`` mixes the original expert
  demonstrations into every learning batch (``expert_share`` of it), a rehearsal against drifting
  away from what imitation learned (DAgger-style aggregation with the initial dataset).
* ``failure_starts`` (beyond the paper): before each round's guided collection the policy drives the
  round's scenarios once unguided (an ordinary sample at the evaluation temperature, the same seeds
  and start: ``probe_failures``); where it has an at-fault collision or leaves the road, that
  scenario's guided rollout starts ``failure_lead_s`` before the incident instead (``crop_log``: the
  logged situation there, then the usual warm-up), so the demonstrations cover the moments the
  policy fails rather than the uneventful stretches it already drives like the expert (LOG).
* ``guide`` < 1 (beyond the paper, DAgger's beta-mixture with the policy's own samples as the expert's
  stand-in): the executed plan is the closest candidate in only ``guide`` of the decisions; the recorded
  target is always the closest one.  With ``guide`` = 1 (default) the rollouts stay near the expert's
  states, which at full scale the imitation policy already drives well (LOG).
* ``record="expert"`` (beyond the paper: DAgger with the privileged expert as the labeller): the recorded
  target is what the expert would drive from the visited state (its controls, or its plan tracker's:
  its plans run along the route centreline and are not reachable from an ego off that line) and the
  CoC label of that driven plan, not a candidate.  With ``guide`` < 1 the states are the policy's,
  the labels the expert's.
* All committed decisions are kept, including those after an incident (none is filtered); failed
  rollouts (the policy raised) are dropped.
* Dropout follows the checkpoint's config while learning (model in train mode).  ``lr`` is constant
  by default; ``lr_schedule=cosine`` (beyond the paper) decays it over all rounds' learning steps to
  ``min_lr_frac`` x ``lr`` (``round_lr``: by round progress, since a round's data size is known only
  once it is collected).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roadloop.config import resolve_device, to_dict
from roadloop.errors import ConfigError, RoadloopError
from roadloop.io import atomic_write_bytes
from roadloop.policies.base import Observation, Policy, PolicyOutput
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import VLAConfig, VLAModel, param_count, save_checkpoint
from roadloop.registry.lineage import code_version
from roadloop.sim import dynamics
from roadloop.sim.batching import crop_log
from roadloop.sim.datatypes import DT, Scenario, SimState
from roadloop.train.checkpointing import GoodState, NonFiniteError, check_finite, save_train_state
from roadloop.train.grpo import (
    crop_limit,
    decode_bev,
    evaluate_model,
    first_incident,
    pick_scenarios,
    pick_start,
    rollout_steps,
)
from roadloop.train.il import TokenizedDemos, load_expert_demos
from roadloop.train.release import register_final
from roadloop.train.run import adamw, begin_run, cosine_lr, restore, start_post_training

_SEED_SALT = 0x0A0D_5EED
SELECT_MODES = ("ade", "ade_reasoning")
TEXT_TARGETS = ("own", "label")
RECORD_MODES = ("candidate", "expert")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class RoaDConfig:
    init: str = ""  # init VLA checkpoint (e.g. <il run>/final)
    model_preset: str | None = None  # the init checkpoint must have this architecture (None: any)
    out: str = "~/.roadloop/runs/road"
    suites: str = "train"  # comma-separated suite names or directories
    families: str = ""  # comma-separated families to keep (empty: all)
    max_scenarios: int = 0  # keep the first N scenarios of the pool (0: all)
    scenarios_per_round: int = 32
    rounds: int = 4
    k: int = 16  # candidates per decision
    temperature: float = 0.8  # candidate sampling
    top_p: float = 1.0
    horizon_s: float = 2.0  # s, ADE horizon of the candidate / expert comparison
    max_steps: int | None = 80  # closed-loop steps per rollout incl. warm-up (None: the whole log)
    random_start: bool = False  # start each round's rollouts at a random point of the logs (as grpo.random_start)
    failure_starts: bool = False  # restart the guided rollout of each scenario the unguided policy fails in a probe
    failure_lead_s: float = 3.0  # s before the probe's first incident where that guided rollout starts
    select: str = "ade"  # "ade": closest candidate; "ade_reasoning": closest among grounded + consistent ones
    text_target: str = "own"  # "own": the committed candidate's text; "label": the CoC label of its plan
    guide: float = 1.0  # share of decisions that execute the closest candidate (else an ordinary sample), in [0, 1]
    record: str = "candidate"  # "candidate": the closest candidate; "expert": what the expert drives + its label
    replan_every: int = 5  # 2 Hz
    epochs: int = 2  # passes over the demonstrations per round
    batch_size: int = 64
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant", or "cosine": from lr down to min_lr_frac x lr over all rounds' steps
    min_lr_frac: float = 0.1  # with lr_schedule=cosine: the last step's share of lr
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    action_weight: float = 1.0
    aggregate: bool = True  # train on every round's demonstrations so far (else this round's only)
    expert_data: str = ""  # expert demonstrations (``roadloop data collect``) mixed into every batch; "": none
    expert_share: float = 0.5  # with expert_data: share of each learning batch drawn from it, in [0, 1)
    eval_every: int = 1  # rounds between closed-loop evaluations (0: none)
    eval_suite: str = "val"
    eval_scenarios: int = 40  # N scenarios spread evenly over the eval suite (0: all)
    eval_temperature: float = 1.0
    eval_top_p: float = 0.95
    time_limit_min: float = 0.0
    max_bad_steps: int = 20
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (CUDA when available)
    track: bool = True
    register: bool = True  # register the final checkpoint as a registry candidate (roadloop registry)
    experiment: str = "roadloop-road"

    def validate(self) -> RoaDConfig:
        for name in ("scenarios_per_round", "k", "epochs", "batch_size", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"road.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rounds", "eval_every", "max_scenarios", "eval_scenarios"):
            if getattr(self, name) < 0:
                raise ConfigError(f"road.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "lr", "grad_clip", "horizon_s", "failure_lead_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"road.{name} must be > 0, got {v}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"road.top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.replan_every <= 64:
            raise ConfigError(f"road.replan_every must be in [1, 64], got {self.replan_every}")
        if self.max_steps is not None and self.max_steps < 2:
            raise ConfigError(f"road.max_steps must be >= 2 or None, got {self.max_steps}")
        if self.failure_starts and self.max_steps is None:
            raise ConfigError("road.failure_starts restarts rollouts of max_steps steps shortly before the probe's "
                              "incidents: set max_steps (it is None: whole logs)")
        if self.select not in SELECT_MODES:
            raise ConfigError(f"road.select must be one of {', '.join(SELECT_MODES)}, got '{self.select}'")
        if self.text_target not in TEXT_TARGETS:
            raise ConfigError(f"road.text_target must be one of {', '.join(TEXT_TARGETS)}, got '{self.text_target}'")
        if not 0 <= self.guide <= 1:
            raise ConfigError(f"road.guide must be in [0, 1], got {self.guide}")
        if self.record not in RECORD_MODES:
            raise ConfigError(f"road.record must be one of {', '.join(RECORD_MODES)}, got '{self.record}'")
        if self.record == "expert" and (self.text_target != "own" or self.select != "ade"):
            raise ConfigError("road.record=expert records the expert's plan and its CoC label: text_target and select "
                              "do not apply (leave them at 'own' and 'ade')")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"road.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if not 0 <= self.min_lr_frac <= 1:
            raise ConfigError(f"road.min_lr_frac must be in [0, 1], got {self.min_lr_frac}")
        if not 0 <= self.expert_share < 1:
            raise ConfigError(f"road.expert_share must be in [0, 1), got {self.expert_share}")
        if not self.init:
            raise ConfigError("road.init: give the checkpoint to start from (--init DIR, e.g. <il run>/final)")
        if self.model_preset is not None:
            VLAConfig.preset(self.model_preset)
        resolve_device(self.device, "road.device")
        return self


# ---------------------------------------------------------------------------------------------
# the guided policy


def choose_candidate(ade: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """(B,) index of the committed candidate: the smallest ADE (B, K) (m) among the candidates with
    ``ok`` (B, K) bool, or among all K where no candidate of the row is ok."""
    any_ok = ok.any(1, keepdim=True)
    return torch.where(ok | ~any_ok, ade, torch.inf).argmin(1)


class ClosestOfK(Policy):
    """Samples K candidates per row, commits the one closest (ADE over ``horizon`` steps) to the
    expert's plan from the same observation, and records (observation, committed tokens).

    ``select="ade_reasoning"``: the closest among the candidates whose text is grounded in the scene
    and consistent with the candidate's own plan (``reasoning.checks``); the closest of all where no
    candidate passes both checks.  ``text_target="label"``: the recorded text is the ground-truth
    CoC label (``reasoning.labels.coc_labels``) of the committed plan, not the candidate's own text
    (what is driven, and its log-probability, stay the candidate's).  ``guide`` < 1: each row executes
    the closest candidate with that probability per decision and candidate 0 (an ordinary sample)
    otherwise; the closest one is recorded either way.  ``record="expert"``: the recorded target is what
    the expert would drive from this state (``Expert.executed_controls``, tokenized) and the CoC label
    of that plan (DAgger)."""

    name = "road"
    replan_every = 5

    def __init__(self, model: VLAModel, expert: Policy | None = None, k: int = 16, temperature: float = 0.8,
                 top_p: float = 1.0, horizon: int = 20, select: str = "ade", text_target: str = "own",
                 guide: float = 1.0, record: str = "candidate"):
        from roadloop.policies.expert import Expert

        self.model = model
        self.expert = expert or Expert()
        self.k, self.temperature, self.top_p = int(k), float(temperature), float(top_p)
        self.horizon = int(horizon)
        if select not in SELECT_MODES:
            raise ConfigError(f"ClosestOfK: select must be one of {', '.join(SELECT_MODES)}, got '{select}'")
        if text_target not in TEXT_TARGETS:
            raise ConfigError(f"ClosestOfK: text_target must be one of {', '.join(TEXT_TARGETS)}, got '{text_target}'")
        self.select, self.text_target = select, text_target
        if not 0 <= guide <= 1:
            raise ConfigError(f"ClosestOfK: guide must be in [0, 1], got {guide}")
        self.guide = float(guide)
        if record not in RECORD_MODES:
            raise ConfigError(f"ClosestOfK: record must be one of {', '.join(RECORD_MODES)}, got '{record}'")
        self.record = record
        self._coins: list[torch.Generator] = []
        self._seeds = torch.zeros(0, dtype=torch.int64)
        self.version = "road"
        self.raster = model.cfg.raster_config()
        self.records: list[dict[str, torch.Tensor]] = []
        self._gens: list[torch.Generator] | None = None

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        self.records = []
        self._seeds = seeds.clone()
        self.expert.reset(state, seeds)
        self._gens = [torch.Generator().manual_seed((int(s) * 1_000_003 + j * 7919 + _SEED_SALT) % (2 ** 63))
                      for s in seeds.tolist() for j in range(self.k)]
        self._coins = [torch.Generator().manual_seed((int(s) * 2_654_435_761 + _SEED_SALT + 1) % (2 ** 63))
                       for s in seeds.tolist()]

    @torch.no_grad()
    def act(self, obs: Observation) -> PolicyOutput:
        from roadloop.policies.vla.observe import encode_raster
        from roadloop.policies.vla.policy import observation_tensors

        state = obs.state
        B, K = state.batch_size, self.k
        if self._gens is None or len(self._gens) != B * K:
            self.reset(state, torch.zeros(B, dtype=torch.int64))
        expert_out = self.expert.act(obs)
        expert_xy = expert_out.plan_xy  # (B, 64, 2)
        frames = list(obs.recent[-self.raster.frames:]) or [state]
        # the uint8-grid raster, as VLAPolicy's (bev_q is what is recorded); the K candidates of a row share
        # its prefix (vision stem, history, command: computed once, cached keys / values repeated)
        inputs = observation_tensors(frames, obs, self.raster)
        bev_q = encode_raster(inputs["bev"])
        was = self.model.training
        self.model.eval()
        text, acts, lt, la = self.model.sample(inputs, self.temperature, self.top_p, self._gens, repeat=K)
        self.model.train(was)
        text, acts = text.cpu(), acts.cpu()
        ctrl = tok.dequantize(acts, self.model.cfg.action_chunk)  # (B K, 64, 2)
        rk = lambda x: x.repeat_interleave(K, 0)  # noqa: E731
        xy, yaw, speed = dynamics.unicycle_rollout(rk(state.xy[:, 0]), rk(state.yaw[:, 0]), rk(state.speed[:, 0]),
                                                   ctrl)
        H = min(self.horizon, xy.shape[1])
        ade = torch.linalg.vector_norm(xy[:, :H] - rk(expert_xy[:, :H]), dim=-1).mean(-1).view(B, K)
        ok = torch.ones(B, K, dtype=torch.bool)
        if self.select == "ade_reasoning":
            from roadloop.reasoning.checks import grounding
            from roadloop.reasoning.labels import scene_facts
            from roadloop.train.rewards import consistency_flags

            texts, facts = tok.decode_batch(text), scene_facts(state)
            grounded = torch.tensor([grounding(t, state, i // K, facts) for i, t in enumerate(texts)])
            ok = (grounded & consistency_flags(texts, acts, rk(state.speed[:, 0]), self.model.cfg.action_chunk)
                  ).view(B, K)
        j = choose_candidate(ade, ok)
        pick = torch.arange(B) * K + j
        guided = torch.ones(B, dtype=torch.bool)
        if self.guide < 1:  # one draw per row and decision, from the row's own generator
            guided = torch.cat([torch.rand(1, generator=g) for g in self._coins]) < self.guide
        run = torch.where(guided, pick, torch.arange(B) * K)  # executed: the closest, or candidate 0
        target = text[pick]  # the closest candidate's text (tokens), what the policy said there
        said = tok.decode_batch(text[run])
        actions = acts[pick]
        plan_xy, plan_sp = xy[pick], speed[pick]
        expert_target = self.record == "expert"  # DAgger: what the expert would drive from this (policy's) state
        if expert_target:
            actions = tok.quantize_controls(self.expert.executed_controls(state, expert_out),
                                            self.model.cfg.action_chunk)
            plan_xy, _, plan_sp = dynamics.unicycle_rollout(state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0],
                                                            tok.dequantize(actions, self.model.cfg.action_chunk))
        if expert_target or self.text_target == "label":
            from roadloop.reasoning.labels import coc_labels

            seed = int(self._seeds[0]) if self._seeds.numel() else 0  # wording varies per row and step
            labels = coc_labels(state, plan_xy, plan_sp, rng_seed=seed * 1_000_003 + obs.step)
            target = tok.encode_batch([lb.text for lb in labels], self.model.cfg.max_text_len)
        self.records.append({"bev": bev_q, "history": inputs["history"].float(),
                             "command": inputs["command"], "text": target, "actions": actions,
                             "ade": ade.gather(1, j.view(B, 1)).squeeze(1), "ade_mean": ade.mean(1),
                             "reasoning_ok": ok.float().mean(1), "guided": guided.float()})
        return PolicyOutput(plan_xy=xy[run], plan_yaw=yaw[run], plan_speed=speed[run], controls=ctrl[run],
                            reasoning=said, logp=(lt + la).float().cpu()[run])


# ---------------------------------------------------------------------------------------------
# demonstrations


@dataclass
class RoaDDemos:
    """Committed decisions as imitation targets (M samples)."""

    bev: torch.Tensor  # (M, F, C, H, W) uint8
    history: torch.Tensor  # (M, 16, 5) float32
    command: torch.Tensor  # (M,) int64
    text: torch.Tensor  # (M, L) int64
    actions: torch.Tensor  # (M, N, 2) int64

    FIELDS = ("bev", "history", "command", "text", "actions")

    def __len__(self) -> int:
        return int(self.command.shape[0])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bev": decode_bev(self.bev[idx]), "history": self.history[idx], "command": self.command[idx],
                "text": self.text[idx], "actions": self.actions[idx]}

    @staticmethod
    def cat(parts: list[RoaDDemos]) -> RoaDDemos:
        return RoaDDemos(*(torch.cat([getattr(p, f) for p in parts]) for f in RoaDDemos.FIELDS))

    def to_bytes(self) -> bytes:
        from roadloop.data.collect import npz_bytes

        return npz_bytes({f: getattr(self, f).numpy() for f in self.FIELDS})

    @staticmethod
    def from_file(path: Path) -> RoaDDemos:
        with np.load(path, allow_pickle=False) as z:
            return RoaDDemos(*(torch.from_numpy(np.array(z[f])) for f in RoaDDemos.FIELDS))


def _expert_demos(cfg: RoaDConfig, vcfg: VLAConfig) -> TokenizedDemos | None:
    """The tokenized ``cfg.expert_data`` demonstrations (None without); errors name the directory."""
    if not cfg.expert_data:
        return None
    return TokenizedDemos.build(load_expert_demos(cfg.expert_data, vcfg, "road.expert_data"), vcfg)


def _with_expert(mb: dict[str, torch.Tensor], expert: TokenizedDemos, share: float, gen: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """Append round(n share / (1 - share)) random expert samples to a batch of n RoaD samples, so that
    ``share`` of the result is expert data (drawn with ``gen``: a pure function of seed and round)."""
    n = int(mb["command"].shape[0])
    m = int(round(n * share / (1.0 - share)))
    if m == 0:
        return mb
    eb = expert.batch(torch.randint(len(expert.demos), (m,), generator=gen))
    return {k: torch.cat((v, eb[k].to(v.dtype))) for k, v in mb.items()}


@dataclass
class GuidedRollouts:
    demos: RoaDDemos
    metrics: dict[str, float]  # road/* values of the guided rollouts
    env_steps: int
    seconds: float


def collect_guided(model: VLAModel, scenarios: list[Scenario], seeds: torch.Tensor, cfg: RoaDConfig,
                   start: int | None = None) -> GuidedRollouts:
    """Drive ``scenarios`` (one seed each) with ``ClosestOfK``; a pure function of (weights, scenarios, seeds,
    cfg, start).  ``start``: log-replay steps before the policy drives (``grpo.pick_start``; None: the
    scenarios' own warm-up); the policy then drives ``max_steps`` minus the warm-up steps."""
    from roadloop.eval.metrics import compute_metrics
    from roadloop.rollout import RolloutConfig, rollout
    from roadloop.sim.batching import collate

    t0 = time.perf_counter()
    batch = collate(scenarios)
    T = rollout_steps(scenarios, batch.num_steps, cfg.max_steps, start)
    pol = ClosestOfK(model, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                     horizon=max(1, round(cfg.horizon_s / 0.1)), select=cfg.select, text_target=cfg.text_target,
                     guide=cfg.guide, record=cfg.record)
    with torch.no_grad():
        ro = rollout(pol, batch, seeds, RolloutConfig(replan_every=cfg.replan_every, max_steps=T, warmup=start))
    met = compute_metrics(ro, batch, ["score", "progress", "collision_at_fault", "offroad", "comfort_violation"])
    if not pol.records:
        raise ConfigError(f"rollouts of {T} steps made no decision (warm-up too long for max_steps={cfg.max_steps})")
    keep = ~ro.failed  # (B,)
    rows = lambda key: torch.cat([r[key][keep] for r in pol.records])  # noqa: E731
    demos = RoaDDemos(rows("bev"), rows("history"), rows("command"), rows("text"), rows("actions"))
    ok = keep if bool(keep.any()) else torch.ones_like(keep)
    m = {f"road/{k}": float(v[ok].mean()) for k, v in met.items()}
    m["road/ade_committed"] = float(rows("ade").mean()) if len(demos) else math.nan
    m["road/ade_candidates"] = float(rows("ade_mean").mean()) if len(demos) else math.nan
    if cfg.select == "ade_reasoning":  # share of candidates passing both reasoning checks
        m["road/reasoning_ok_candidates"] = float(rows("reasoning_ok").mean()) if len(demos) else math.nan
    m["road/guided"] = float(rows("guided").mean()) if len(demos) else math.nan
    m["road/failed"] = float(ro.failed.float().mean())
    return GuidedRollouts(demos, m, batch.batch_size * ro.num_steps, time.perf_counter() - t0)


@torch.no_grad()
def probe_failures(model: VLAModel, scenarios: list[Scenario], seeds: torch.Tensor, cfg: RoaDConfig,
                   start: int | None = None) -> torch.Tensor:
    """(S,) int64 log step of the first at-fault collision or off-road of each scenario when the policy drives
    it unguided (``VLAPolicy`` at ``eval_temperature`` / ``eval_top_p``, one rollout per scenario with
    ``seeds`` (S,), ``start`` and ``max_steps`` as the guided collection), -1 where it has none; a pure
    function of (weights, scenarios, seeds, cfg, start)."""
    from roadloop.policies.vla.policy import VLAPolicy
    from roadloop.rollout import RolloutConfig, rollout
    from roadloop.sim.batching import collate

    batch = collate(scenarios)
    T = rollout_steps(scenarios, batch.num_steps, cfg.max_steps, start)
    pol = VLAPolicy(model, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, version="road-probe")
    ro = rollout(pol, batch, seeds, RolloutConfig(replan_every=cfg.replan_every, max_steps=T, warmup=start))
    return first_incident(ro)


def failure_crops(scenarios: list[Scenario], incident: torch.Tensor, cfg: RoaDConfig,
                  start: int | None) -> tuple[list[Scenario], int]:
    """The round's scenarios for ``failure_starts``: each one with a probe incident (``incident`` (S,) log
    steps, -1 for none) cut ``failure_lead_s`` before it (less its warm-up), the others cut where the
    round's ``start`` would engage the policy; all to be driven from their own warm-up (start None).
    Returns (scenarios, number restarted before an incident)."""
    lead = round(cfg.failure_lead_s / DT)
    w0 = max(sc.meta.warmup_steps for sc in scenarios)
    out, n = [], 0
    for sc, t in zip(scenarios, incident.tolist(), strict=True):
        if t >= 0:
            want, n = t - lead - sc.meta.warmup_steps, n + 1
        else:
            want = 0 if start is None else start - w0
        out.append(crop_log(sc, min(max(want, 0), crop_limit(sc, int(cfg.max_steps)))))
    return out, n


def round_lr(cfg: RoaDConfig, rnd: int, frac: float) -> float:
    """Learning rate at ``frac`` in [0, 1) of round ``rnd``'s learning steps: ``cfg.lr``, or with
    ``lr_schedule=cosine`` the cosine from ``lr`` (first step of round 0) to ``min_lr_frac`` x ``lr`` (end of
    the last round), by round progress; a function of (round, position) only, so a resumed run repeats it."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cosine_lr(cfg.lr, (rnd + frac) / max(cfg.rounds, 1), cfg.min_lr_frac)


@torch.no_grad()
def demo_loss(model: VLAModel, demos: RoaDDemos, action_weight: float, chunk: int = 256) -> float:
    """Mean imitation loss of ``model`` (eval mode) over ``demos``."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(demos), chunk):
        idx = torch.arange(i, min(i + chunk, len(demos)))
        tot += float(model.loss(demos.batch(idx), action_weight=action_weight)["loss"]) * idx.numel()
        n += idx.numel()
    model.train(was)
    return tot / max(n, 1)


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class RoaDResult:
    checkpoint: Path
    rounds: int
    seconds: float
    env_steps_per_s: float
    learner_samples_per_s: float
    history: list[dict[str, float]]
    eval: dict[str, float]
    run_id: str | None
    stopped_early: bool


def train_road(cfg: RoaDConfig, resume: bool = False, on_progress: Callable[[int, int, dict], None] | None = None,
               log: Callable[[str], None] = print) -> RoaDResult:
    """Run (or resume) RoaD; see the module docstring."""
    t_start = time.perf_counter()
    st = start_post_training(cfg, resume)
    model, pool, run_dir, ev_pool, ev_hash = st.model, st.pool, st.run_dir, st.ev_pool, st.ev_hash
    init_dir, init_sha, hashes = st.init_dir, st.init_sha, st.hashes

    expert = _expert_demos(cfg, model.cfg)
    expert_hash = expert.demos.content_hash if expert is not None else None
    if st.prev and st.prev.get("expert_data") != expert_hash:
        raise RoadloopError(f"road.expert_data {cfg.expert_data or '(none)'} differs from the demonstrations this run "
                            f"started with ({str(st.prev.get('expert_data'))[:12]}); not resuming on other data")
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    rnd, elapsed, state = restore(run_dir, model, opt, resume, "round", cfg.rounds, log)
    code = code_version()
    tracker, lineage = begin_run(cfg, run_dir, st.prev,
                                 {**st.lineage(cfg), **({"expert_data": expert_hash} if expert_hash else {})})
    demo_dir = run_dir / "demos"
    past: list[RoaDDemos] = []
    if cfg.aggregate:
        for r in range(rnd):
            p = demo_dir / f"round-{r:04d}.npz"
            if not p.is_file():
                raise RoadloopError(f"{p} is missing: cannot aggregate the earlier rounds' demonstrations")
            past.append(RoaDDemos.from_file(p))
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    env_steps = learn_samples = 0
    collect_s = learn_s = 0.0
    with tracker:
        if state is None:
            tracker.log_params({"road": to_dict(cfg), "model": to_dict(model.cfg), "params": param_count(model),
                                "init_sha": init_sha, "suites": hashes, "n_pool": len(pool)})
            if ev_pool:
                last_eval = evaluate_model(model, ev_pool, cfg, cfg.eval_suite, ev_hash)
                tracker.log_metrics(last_eval, 0)
        good = GoodState(model, opt)
        good.snapshot(rnd)
        t0 = time.perf_counter() - elapsed
        stopped_early = False
        bad_run = 0
        while rnd < cfg.rounds:
            picks = pick_scenarios(len(pool), cfg.scenarios_per_round, cfg.seed, rnd)
            seeds = (cfg.seed * 1_000_003 + rnd) * 65_536 + torch.arange(len(picks), dtype=torch.int64)
            picked = [pool[i] for i in picks]
            start = pick_start(picked, cfg, rnd)
            probe_m: dict[str, float] = {}
            if cfg.failure_starts:
                inc = probe_failures(model, picked, seeds, cfg, start)
                picked, n_fail = failure_crops(picked, inc, cfg, start)
                start = None
                probe_m = {"road/probe_incident_rate": float((inc >= 0).float().mean()),
                           "road/failure_starts": float(n_fail)}
            g = collect_guided(model, picked, seeds, cfg, start)
            if cfg.aggregate:
                atomic_write_bytes(demo_dir / f"round-{rnd:04d}.npz", g.demos.to_bytes())
            data = RoaDDemos.cat(past + [g.demos]) if cfg.aggregate else g.demos
            m = {**g.metrics, **probe_m}
            m["road/loss_before"] = demo_loss(model, g.demos, cfg.action_weight)
            tl = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + rnd)
            model.train()
            n_seen, steps, loss_sum = 0, 0, 0.0
            per_epoch = math.ceil(len(data) / cfg.batch_size)
            for ep in range(cfg.epochs):
                perm = torch.randperm(len(data), generator=gen)
                for j, i in enumerate(range(0, len(data), cfg.batch_size)):
                    for gr in opt.param_groups:
                        gr["lr"] = round_lr(cfg, rnd, (ep * per_epoch + j) / (cfg.epochs * per_epoch))
                    mb = data.batch(perm[i:i + cfg.batch_size])
                    if expert is not None:
                        mb = _with_expert(mb, expert, cfg.expert_share, gen)
                    out = model.loss(mb, action_weight=cfg.action_weight)
                    opt.zero_grad(set_to_none=True)
                    try:
                        check_finite(out["loss"], model)
                        out["loss"].backward()
                        check_finite(out["loss"], model)
                    except NonFiniteError as e:
                        bad_run += 1
                        good.restore()
                        log(f"round {rnd}: {e}; restored the state at the start of the round ({bad_run} in a row)")
                        if bad_run >= cfg.max_bad_steps:
                            raise RoadloopError(f"{bad_run} non-finite steps in a row in round {rnd}: stopping "
                                                f"(last good checkpoint in {run_dir})") from e
                        continue
                    bad_run = 0
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    steps += 1
                    n_seen += int(mb["command"].shape[0])
                    loss_sum += float(out["loss"].detach())
            model.eval()
            good.snapshot(rnd + 1)
            dt = time.perf_counter() - tl
            m["road/loss_after"] = demo_loss(model, g.demos, cfg.action_weight)
            m["loss/loss"] = loss_sum / max(steps, 1)
            m["road/lr"] = float(opt.param_groups[0]["lr"])
            m["road/demos"] = float(len(g.demos))
            m["road/demos_total"] = float(len(data))
            m["perf/env_steps_per_s"] = g.env_steps / max(g.seconds, 1e-9)
            m["perf/learner_samples_per_s"] = n_seen / max(dt, 1e-9)
            env_steps += g.env_steps
            collect_s += g.seconds
            learn_samples += n_seen
            learn_s += dt
            if cfg.aggregate:
                past.append(g.demos)
            rnd += 1
            tracker.log_metrics(m, rnd)
            history.append({"round": float(rnd), **m})
            if on_progress:
                on_progress(rnd, cfg.rounds, m)
            save_train_state(run_dir, rnd, model, opt, extra={"elapsed": time.perf_counter() - t0}, keep=2)
            if ev_pool and rnd % cfg.eval_every == 0:
                last_eval = evaluate_model(model, ev_pool, cfg, cfg.eval_suite, ev_hash)
                tracker.log_metrics(last_eval, rnd)
                log(f"round {rnd}: " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in last_eval.items()))
            if cfg.time_limit_min > 0 and time.perf_counter() - t0 > 60 * cfg.time_limit_min and rnd < cfg.rounds:
                log(f"time limit {cfg.time_limit_min} min reached at round {rnd}/{cfg.rounds}: stopping")
                stopped_early = True
                break
        train_s = time.perf_counter() - t0
        if ev_pool and (not last_eval or rnd % cfg.eval_every != 0):
            last_eval = evaluate_model(model, ev_pool, cfg, cfg.eval_suite, ev_hash)
            tracker.log_metrics(last_eval, rnd)
        env_sps = env_steps / max(collect_s, 1e-9)
        learn_sps = learn_samples / max(learn_s, 1e-9)
        final = save_checkpoint(model.eval(), run_dir / "final",
                                extra={"trainer": "road", **lineage, "rounds": rnd, "train_seconds": round(train_s, 1),
                                       "eval": last_eval, "config": to_dict(cfg)})
        tracker.log_metrics({"train_seconds": train_s, "perf/env_steps_per_s_mean": env_sps,
                             "perf/learner_samples_per_s_mean": learn_sps}, rnd)
        tracker.set_tags({"checkpoint": str(final), "stopped_early": stopped_early})
        if cfg.register:
            registered = register_final(final, {"trainer": "road", **lineage, "parent": str(init_dir),
                                                 "parent_weights_sha256": init_sha, "config": to_dict(cfg),
                                                 "code": code}, log)
            tracker.set_tags({"registered": registered or "no"})
    log(f"RoaD: {rnd} rounds in {train_s / 60:.1f} min ({env_sps:.0f} env steps/s, {learn_sps:.0f} learner "
        f"samples/s) -> {final} (total {(time.perf_counter() - t_start) / 60:.1f} min)")
    return RoaDResult(final, rnd, train_s, env_sps, learn_sps, history, last_eval, tracker.run_id, stopped_early)


__all__ = ["LR_SCHEDULES", "RECORD_MODES", "SELECT_MODES", "TEXT_TARGETS", "ClosestOfK", "GuidedRollouts", "RoaDConfig",
           "RoaDDemos", "RoaDResult", "choose_candidate", "collect_guided", "demo_loss", "failure_crops",
           "probe_failures", "round_lr", "train_road"]
