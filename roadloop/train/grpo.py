"""Closed-loop GRPO post-training of the VLA policy (``roadloop train grpo``), AlpaGym-style.

One iteration:

1. **Collect** (``collect_groups``, a pure function of (weights, scenarios, seeds), so a Ray worker
   could run it): pick ``scenarios_per_iter`` scenarios (a pure function of seed + iteration),
   repeat each ``group_size`` (G) times with different rollout seeds, drive them all in ONE batched
   ``rollout`` with a recording ``VLAPolicy`` at 2 Hz (``replan_every`` = 5).  Each rollout gets a
   driving reward, each decision a reasoning reward (``roadloop.train.rewards``).
2. **Advantages** (``decision_advantages``): a decision's advantage has a driving part, its rollout's
   group-normalised driving advantage (plus its own group-normalised per-decision driving reward:
   the incident reward of ``reward.credit = local`` and the log gap of ``reward.log_gap``), and a
   reasoning part, its own group-normalised reasoning reward::

       A_drive[d, b] = norm_g(R_drive)[b] (+ norm_g(r_local)[d, b]),   A_reason[d, b] = norm_g(r_reason)[d, b]

   ``norm_g`` normalises within the group of the G rollouts of one scenario: ``std`` (Cosmos-RL's
   default) (r - mean) / (std + 1e-6); ``centered`` (r - mean) / ``adv_scale``, which keeps the size
   of rare safety violations instead of blowing a single crash up to the same size as a tiny
   progress difference (Plan-R1's point, REFERENCE 3).  Both are clipped to +-``adv_clip``.  The
   driving advantage is replicated to every decision of the rollout (AlpaGym).  Tokens
   (``token_advantages``): the text tokens and the action tokens the ego executes before the next
   decision get A_drive + A_reason; with ``drive_tokens = executed`` (2 of the 16 chunks at 2 Hz) the rest
   of the plan, replaced before it is driven, gets A_reason only (it still decides consistency); with
   ``all`` (default, AlpaGym) every token gets A_drive + A_reason; with ``actions`` the text tokens get
   A_reason and the action tokens A_drive.
3. **PPO** for ``ppo_epochs`` over shuffled minibatches of up to ``max_decisions`` decisions drawn
   uniformly from the collection (whole-log rollouts give ~2,000 decisions per iteration; the
   learner, not the simulator, is the slow part): per-token clipped surrogate
   (``clip_eps``, dual clip ``dual_clip`` for negative advantages) over the CoC text tokens and the
   32 action tokens (16 chunks x (accel, curvature)), the log-ratio clamped to +-``logratio_clamp``,
   plus ``kl_coef`` x the k3 estimator of KL(pi || pi_ref) on the sampled tokens, where pi_ref is the
   frozen init model (not evaluated when ``kl_coef`` = 0); token-level mean over the minibatch;
   AdamW, gradient clipping.  The old per-token log-probs are recomputed once per iteration with the
   sampling weights before the first epoch (``DecisionRecord`` holds per-sequence sums only), so the
   first ratio is exactly 1.

Measuring: closed-loop evaluation on ``eval_suite`` every ``eval_every`` iterations, and with
``probe_batches`` the training reward on a fixed sample of the training distribution
(``probe_reward``), which pairs across checkpoints where the per-iteration curves do not.
``shuffle_advantages`` is the null control: each iteration's advantages permuted across its rollouts,
the same optimiser and update sizes without the signal, so a run can be compared with what drift alone
does to the policy.

Resilience as in ``roadloop.train.il``: ``config.yaml`` + ``run.json`` (tracker run id, init
checkpoint and suite hashes) in the run directory, trainer checkpoints (weights, optimizer, RNG,
iteration) every ``ckpt_every`` iterations, ``resume=True`` loses at most the iterations since the
last one; collection seeds and minibatch orders are functions of (seed, iteration), so a resumed
run repeats exactly what the lost iterations would have done.  A non-finite loss or gradient drops
the iteration's update and restores the last good state (``GoodState``); ``max_bad_iters`` in a row
stop the run; a NaN checkpoint is never written (``save_train_state`` refuses).  The final model goes
to ``<out>/final`` with its lineage (init checkpoint + hash, suite hashes, tracker run id).

Departures from the papers / AlpaGym:

* Log-probs for ratios and KL are those of the untempered, untruncated model distribution
  (``VLAModel.token_logps``), while sampling uses ``temperature`` / ``top_p``; exact only for the
  defaults (1.0 / 1.0).  Tokens outside the nucleus are never sampled, so they never enter the loss.
  Measured (LOG 2026-12-07): ``top_p=0.95`` in training lowered the training reward itself and the
  held-out score on two seeds, so sample GRPO's rollouts from the whole distribution.
* The reasoning reward is per decision with its own group normalisation (over all decisions of the
  group's G rollouts, since only the first decision of a group shares one state), not folded into
  one per-rollout reward; with ``std`` each part is unit-scale, so the reasoning weights set only
  the grounding / consistency mix, not reasoning vs driving.
* Grounding and consistency are rule-based checks against simulator ground truth
  (``roadloop.reasoning.checks``), not a large reasoning model's 0-5 grade.
* Collision is at-fault only (AlpaGym's ``collision_any`` also counts being rear-ended); the
  XY-RMSE to the log is over the AlpaSim-kept window.  A failed rollout gets the worst reward.
* ``reward.credit=local`` (optional) moves the collision / off-road penalties onto the decisions of
  the few seconds before the incident; ``random_start`` (optional) starts rollouts at a random point
  of the logs after a log replay; ``replay_share`` (optional, ``IncidentReplay``) restarts a share of
  each iteration's groups a few seconds before incidents of earlier collections; ``reward.log_gap``
  (optional) gives each decision the growth of the ego's distance to its log over the next seconds.
  ``scenario_sampling = plr`` (optional, ``LevelSampler``) replays the scenarios whose last groups' driving
  rewards differed most (Prioritized Level Replay).
  None is in AlpaGym (one reward per rollout, rollouts from the scenario start, scenarios drawn uniformly).
* The learner trains on at most ``max_decisions`` decisions per iteration (uniform subset).
* ``groups = branch`` (optional; ``BranchPolicy``): the G rollouts of a group share a sampled trunk of
  ``pick_branch`` decisions, differ by one sampled decision, and then drive greedily; only that decision is
  trained.  A group then compares G actions from one state (the grouping GRPO's advantage assumes), with no
  sampling noise after them; AlpaGym's groups differ at every one of their ~14 decisions.
* ``ptx_coef`` (optional, off by default): every gradient step adds ``ptx_coef`` x the imitation loss of
  ``ptx_batch`` expert demonstrations (``expert_data``, streamed by ``roadloop.train.il.ExpertStream``;
  its position is checkpointed), InstructGPT's PPO-ptx; neither AlpaGym nor Alpamayo-R1's RL has it.
  A rehearsal against drifting away from the demonstrations; with the null control
  (``shuffle_advantages``) it separates what the rewards teach from what more imitation does (LOG).
* ``drive_tokens = executed`` (optional): the driving advantage trains the text and the executed action
  tokens only, not the 28 tokens of the plan's undriven tail (AlpaGym, and the default ``all``, give
  every token the sequence's advantage).  One demo-scale run (LOG) was worse, which is not conclusive
  at that scale's run-to-run noise.
* ``trainable = top:K`` (optional) trains only the last K transformer blocks and the output heads
  (``VLAModel.trainable_parameters``); Alpamayo-R1's RL updates the whole model.
* One process; no rollout / learner overlap (the collection is already batched).
* Dropout is off (model in eval mode) while learning, so the recomputed ratios are exact.
* No entropy bonus, no learning-rate schedule (constant ``lr``), Cosmos-RL's advantage clip +-5.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from roadloop.config import resolve_device, to_dict
from roadloop.errors import ConfigError, RoadloopError
from roadloop.policies.vla.model import TRAINABLE, VLAConfig, VLAModel, param_count, save_checkpoint
from roadloop.policies.vla.policy import VLAPolicy
from roadloop.registry.lineage import code_version
from roadloop.sim.batching import crop_log
from roadloop.sim.datatypes import DT, Scenario
from roadloop.train.checkpointing import GoodState, NonFiniteError, check_finite, save_train_state
from roadloop.train.il import ExpertStream
from roadloop.train.release import register_final
from roadloop.train.rewards import (
    RewardConfig,
    consistency_flags,
    driving_reward,
    first_scored_state,
    local_incident_reward,
    log_gap_reward,
    reasoning_reward,
)
from roadloop.train.run import (  # noqa: F401  (check_init_model, load_pool, spread: public here too)
    begin_run,
    check_init_model,
    load_pool,
    restore,
    spread,
    start_post_training,
)

if TYPE_CHECKING:
    from roadloop.train.road import RoaDConfig

ADV_EPS = 1e-6
FLAT_SPREAD = 1e-6  # reward units: a group whose driving rewards spread less has no driving advantage
ROLLOUT_METRICS = ("score", "progress", "collision_at_fault", "collision_any", "offroad", "comfort_violation",
                   "red_light", "wrong_way", "dist_to_log")  # computed per collection and tracked


@dataclass
class GRPOConfig:
    init: str = ""  # init VLA checkpoint (e.g. <il run>/final); also the frozen KL reference
    model_preset: str | None = None  # the init checkpoint must have this architecture (None: any)
    out: str = "~/.roadloop/runs/grpo"
    suites: str = "train,sumo-real-train"  # comma-separated suite names or directories
    families: str = ""  # comma-separated families to keep (empty: all)
    max_scenarios: int = 0  # keep the first N scenarios of the pool (0: all)
    scenarios_per_iter: int = 16  # S (16 x 8 rollouts an iteration: LOG 2026-12-07)
    group_size: int = 8  # G rollouts per scenario (>= 2)
    iterations: int = 100
    max_steps: int | None = 80  # closed-loop steps per rollout incl. warm-up (None: the whole log; LOG: 8 s learns
    # more stably than whole 15-20 s logs, whose one reward per rollout is spread over ~30 decisions)
    replan_every: int = 5  # 2 Hz
    groups: str = "rollout"  # rollout (AlpaGym): G independent rollouts of a scenario, every decision trained;
    # branch: the G rollouts share a sampled trunk, differ by ONE sampled decision, then drive greedily, and only
    # that decision is trained (``BranchPolicy``: its advantage is the whole difference of outcomes; LOG)
    branch_trunk: int = 4  # groups=branch: the shared trunk's decisions, drawn per iteration in [0, branch_trunk]
    ppo_epochs: int = 2
    minibatch_size: int = 64  # decisions per gradient step
    random_start: bool = True  # start each iteration's rollouts at a random point of the logs (log replay up
    # to it): short, low-noise rollouts that still cover the whole scenario (LOG)
    replay_share: float = 0.0  # share of each iteration's scenarios restarted shortly before an incident (at-fault
    # collision / off-road) of an earlier collection (incident replay, ``IncidentReplay``; LOG); 0: off
    replay_lead_s: float = 3.0  # the policy takes over this long before the replayed incident
    replay_size: int = 64  # incidents kept (the most recent)
    scenario_sampling: str = "uniform"  # uniform: S new scenarios of the pool an iteration (a permutation per
    # iteration); plr: Prioritized Level Replay (``LevelSampler``): a share of them replayed from the scenarios
    # already driven, the more often the more their last group's driving rewards differed (LOG)
    plr_replay_share: float = 0.5  # plr: share of each iteration's scenarios replayed (the rest unseen ones)
    plr_temperature: float = 0.1  # plr: beta of the rank prioritisation, P ~ (1 / rank) ** (1 / beta)
    plr_staleness: float = 0.1  # plr: rho, the share of the replay distribution given by staleness
    max_decisions: int = 512  # decisions the learner trains on per iteration, drawn uniformly (0: all)
    drive_tokens: str = "all"  # tokens the driving advantage trains: all (AlpaGym: every token), executed (the text
    # and the chunks driven before the next decision, the plan's tail gets the reasoning part only) or actions (the
    # action tokens get the driving part only, the text the reasoning part only; LOG)
    clip_eps: float = 0.2
    dual_clip: float = 3.0  # cap of the loss for negative advantages (Cosmos-RL); 0: off
    logratio_clamp: float = 5.0
    kl_coef: float = 0.01  # x k3 KL to the init model
    ptx_coef: float = 0.0  # x the imitation loss on a batch of ``expert_data`` added to every gradient step (PPO-ptx,
    # InstructGPT): a rehearsal of the demonstrations against drift; 0: off (LOG)
    expert_data: str = ""  # demonstration directories (``roadloop data collect``), comma-separated, for ``ptx_coef``
    ptx_batch: int = 64  # expert samples per gradient step
    ptx_window: int = 4  # shards streamed together (``ExpertStream``: shuffled passes, ptx_window + 2 in memory)
    lr: float = 5e-5  # LOG 2026-12-07: at 1e-4 / 2e-4 runs drifted more than they learned
    trainable: str = "all"  # parameters GRPO trains: all, or top:K (the last K blocks and the output heads,
    # ``VLAModel.trainable_parameters``; the frozen blocks run once per iteration): top:1 learns 3x faster and
    # measured as well as all at the same KL to the init (LOG)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0  # sampling (ratios use the untempered model: see departures)
    top_p: float = 1.0  # < 1 measured worse (departures)
    advantage: str = "centered"  # std: (r - mean) / (std + 1e-6); centered: (r - mean) / adv_scale (LOG: std lets
    # reasoning weigh as much as driving and the reward fell)
    adv_scale: float = 2.0  # reward units per unit advantage (centered)
    adv_clip: float = 5.0
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval_every: int = 10  # iterations between closed-loop evaluations (0: none)
    shuffle_advantages: bool = False  # null control: permute each iteration's advantages across its rollouts,
    # so that the same optimiser takes updates of the same sizes with no signal (what drift alone does; LOG)
    probe_batches: int = 0  # fixed collections (S x G rollouts each, ``probe_reward``) on which the training reward
    # is measured at the start, at every evaluation and at the end: does GRPO raise its own objective? (0: none; LOG)
    eval_suite: str = "val"
    eval_scenarios: int = 40  # N scenarios spread evenly over the eval suite (every family; 0: all)
    eval_temperature: float = 1.0  # as ``roadloop eval`` drives a checkpoint
    eval_top_p: float = 0.95
    ckpt_every: int = 5
    time_limit_min: float = 0.0  # stop early (with a checkpoint) past this wall time; <= 0: none
    max_bad_iters: int = 5
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (CUDA when available)
    track: bool = True
    register: bool = True  # register the final checkpoint as a registry candidate (roadloop registry)
    experiment: str = "roadloop-grpo"

    def validate(self) -> GRPOConfig:
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2 (advantages compare rollouts of one scenario), "
                              f"got {self.group_size}")
        for name in ("scenarios_per_iter", "ppo_epochs", "minibatch_size", "ckpt_every", "max_bad_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "eval_every", "max_scenarios", "eval_scenarios", "max_decisions", "replay_size",
                     "probe_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"grpo.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.replan_every <= 64:
            raise ConfigError(f"grpo.replan_every must be in [1, 64], got {self.replan_every}")
        if self.max_steps is not None and self.max_steps < 2:
            raise ConfigError(f"grpo.max_steps must be >= 2 or None, got {self.max_steps}")
        positive = ("clip_eps", "logratio_clamp", "lr", "grad_clip", "temperature", "adv_scale", "adv_clip")
        for name in positive:
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"grpo.{name} must be > 0, got {v}")
        if not self.clip_eps < 1:
            raise ConfigError(f"grpo.clip_eps must be < 1, got {self.clip_eps}")
        if not 0 <= self.replay_share < 1:
            raise ConfigError(f"grpo.replay_share must be in [0, 1) (some scenarios stay fresh), "
                              f"got {self.replay_share}")
        if self.replay_share > 0 and (self.max_steps is None or self.replay_size < 1
                                      or not (0 <= self.replay_lead_s and math.isfinite(self.replay_lead_s))):
            raise ConfigError("grpo.replay_share > 0 needs max_steps (rollout length), replay_size >= 1 and a "
                              f"finite replay_lead_s >= 0; got max_steps={self.max_steps}, replay_size="
                              f"{self.replay_size}, replay_lead_s={self.replay_lead_s}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"grpo.top_p must be in (0, 1], got {self.top_p}")
        if self.kl_coef < 0 or self.weight_decay < 0 or self.dual_clip < 0:
            raise ConfigError("grpo.kl_coef, weight_decay and dual_clip must be >= 0")
        if not (self.ptx_coef >= 0 and math.isfinite(self.ptx_coef)):
            raise ConfigError(f"grpo.ptx_coef must be a finite number >= 0, got {self.ptx_coef}")
        if self.ptx_coef > 0 and not self.expert_data:
            raise ConfigError("grpo.ptx_coef > 0 needs grpo.expert_data (demonstration directories, "
                              "`roadloop data collect`)")
        if self.expert_data and self.ptx_coef == 0:
            raise ConfigError("grpo.expert_data is only read with grpo.ptx_coef > 0 (the weight of its imitation loss)")
        if self.ptx_batch < 1 or self.ptx_window < 1:
            raise ConfigError(f"grpo.ptx_batch and ptx_window must be >= 1, got {self.ptx_batch} / {self.ptx_window}")
        if 0 < self.dual_clip <= 1:
            raise ConfigError(f"grpo.dual_clip must be > 1 (or 0: off), got {self.dual_clip}")
        if self.drive_tokens not in ("executed", "all", "actions"):
            raise ConfigError(f"grpo.drive_tokens must be 'all', 'executed' or 'actions', got '{self.drive_tokens}'")
        if not re.fullmatch(TRAINABLE, self.trainable):
            raise ConfigError(f"grpo.trainable must be 'all' or 'top:K' (the last K transformer blocks and the "
                              f"output heads), got {self.trainable!r}")
        if self.groups not in ("rollout", "branch"):
            raise ConfigError(f"grpo.groups must be 'rollout' or 'branch', got '{self.groups}'")
        if self.branch_trunk < 0:
            raise ConfigError(f"grpo.branch_trunk must be >= 0 (decisions before the branch), got {self.branch_trunk}")
        if self.scenario_sampling not in ("uniform", "plr"):
            raise ConfigError(f"grpo.scenario_sampling must be 'uniform' or 'plr', got '{self.scenario_sampling}'")
        if not 0 <= self.plr_replay_share <= 1 or not 0 <= self.plr_staleness <= 1:
            raise ConfigError(f"grpo.plr_replay_share and plr_staleness must be in [0, 1], got "
                              f"{self.plr_replay_share} / {self.plr_staleness}")
        if not (self.plr_temperature > 0 and math.isfinite(self.plr_temperature)):
            raise ConfigError(f"grpo.plr_temperature must be > 0, got {self.plr_temperature}")
        if self.scenario_sampling == "plr" and self.replay_share > 0:
            raise ConfigError("grpo.scenario_sampling=plr and replay_share > 0 both choose which scenarios an "
                              "iteration drives: use one of them")
        if self.groups == "branch" and self.reward.credit == "local":
            raise ConfigError("grpo.reward.credit=local does not apply to groups=branch: the branch decision is the "
                              "only sampled one, so every incident after it is its consequence (credit=rollout), "
                              "and a window would drop the later ones")
        if self.advantage not in ("std", "centered"):
            raise ConfigError(f"grpo.advantage must be 'std' or 'centered', got '{self.advantage}'")
        if not self.init:
            raise ConfigError("grpo.init: give the checkpoint to start from (--init DIR, e.g. <il run>/final)")
        if self.model_preset is not None:
            VLAConfig.preset(self.model_preset)
        resolve_device(self.device, "grpo.device")
        self.reward.validate()
        return self


# ---------------------------------------------------------------------------------------------
# inputs


def pick_scenarios(n_pool: int, n: int, seed: int, iteration: int) -> list[int]:
    """The pool indices used at ``iteration`` (a pure function of seed and iteration)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return torch.randperm(n_pool, generator=g)[:min(n, n_pool)].tolist()


def group_seeds(n_scenarios: int, group_size: int, seed: int, iteration: int) -> torch.Tensor:
    """(S, G) int64 rollout seeds, distinct within and across iterations."""
    base = (seed * 1_000_003 + iteration) * 65_536
    return base + torch.arange(n_scenarios * group_size, dtype=torch.int64).view(n_scenarios, group_size)


# ---------------------------------------------------------------------------------------------
# collection


@dataclass
class GroupBatch:
    """S scenarios x G rollouts (B = S G, rollout b = s G + g) and their D decisions (2 Hz)."""

    scenario_ids: list[str]  # (S,)
    group_size: int
    seeds: torch.Tensor  # (B,) int64
    decision_steps: torch.Tensor  # (D,) int64 simulator step of each decision
    bev: torch.Tensor  # (D, B, F, C, H, W) uint8 (``decode_raster``)
    history: torch.Tensor  # (D, B, 16, 5) float32
    command: torch.Tensor  # (D, B) int64
    text: torch.Tensor  # (D, B, L) int64 sampled text ids
    actions: torch.Tensor  # (D, B, N, 2) int64 sampled action bins
    logp: torch.Tensor  # (D, B) float32 recorded log-likelihood (text + actions) under the sampling weights
    grounding: torch.Tensor  # (D, B) bool
    consistency: torch.Tensor  # (D, B) bool
    drive_reward: torch.Tensor  # (B,) reward units
    reason_reward: torch.Tensor  # (D, B)
    local_reward: torch.Tensor  # (D, B) per-decision driving rewards: incidents of ``reward.credit = local``
    # and the log gap (``reward.log_gap``); zeros without either
    terms: dict[str, torch.Tensor]  # weighted driving reward terms {term: (B,)}
    metrics: dict[str, torch.Tensor]  # closed-loop metrics {name: (B,)} (NaN: failed rollout)
    failed: torch.Tensor  # (B,) bool
    incident_step: torch.Tensor  # (B,) int64 rollout state index of the first at-fault collision or off-road
    # in the scored steps, -1 none (log step: + the scenario's ``log_start``)
    env_steps: int  # scenario-steps simulated (B x T)
    seconds: float
    families: list[str] = field(default_factory=list)  # (S,) each scenario's family (empty: not recorded)

    @property
    def num_decisions(self) -> int:
        return int(self.text.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seeds.shape[0])

    def total_reward(self) -> torch.Tensor:
        """(B,) driving reward + the rollout's mean reasoning reward (the tracked ``rollout/reward``)."""
        r = self.drive_reward
        return r + (self.reason_reward + self.local_reward).sum(0) / max(self.num_decisions, 1) \
            if self.num_decisions else r


def pick_start(scenarios: list[Scenario], cfg: GRPOConfig | RoaDConfig, iteration: int) -> int | None:
    """Log-replay steps before the policy engages at ``iteration`` (round) with ``random_start`` (None: each
    scenario's own warm-up): uniform over the points from which ``max_steps`` minus the warm-up steps
    still fit in the shortest picked log; a pure function of (seed, iteration, scenarios)."""
    if not cfg.random_start or cfg.max_steps is None:
        return None
    w0 = max(sc.meta.warmup_steps for sc in scenarios)
    horizon = max(cfg.max_steps - w0, 1)
    hi = min(sc.num_steps for sc in scenarios) - 1 - horizon
    if hi <= w0:
        return None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration + 77_777)
    return w0 + int(torch.randint(0, hi - w0 + 1, (1,), generator=g))


def rollout_steps(scenarios: list[Scenario], num_steps: int, max_steps: int | None, start: int | None) -> int:
    """Simulated steps of a collection: ``max_steps`` (None: the whole log of ``num_steps``), shifted by
    ``start`` (log-replay steps, ``pick_start``) so that the policy still drives ``max_steps`` minus the
    scenarios' warm-up; never past the log."""
    T = num_steps - 1 if max_steps is None else min(max_steps, num_steps - 1)
    if start is not None:
        w0 = max(sc.meta.warmup_steps for sc in scenarios)
        T = min(start + T - w0, num_steps - 1)
    return T


def pick_branch(cfg: GRPOConfig, iteration: int) -> int | None:
    """The decision at which the groups of ``iteration`` branch (``groups = branch``; None otherwise): uniform
    in [0, ``branch_trunk``], a pure function of (seed, iteration)."""
    if cfg.groups != "branch":
        return None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration + 33_333)
    return int(torch.randint(0, cfg.branch_trunk + 1, (1,), generator=g))


def collect_iteration(model: VLAModel, pool: list[Scenario], cfg: GRPOConfig, iteration: int) -> GroupBatch:
    """The collection of ``iteration`` of a run with ``cfg.seed`` (no incident replay): its scenarios
    (``pick_scenarios``), rollout seeds (``group_seeds``), start (``pick_start``) and branch (``pick_branch``)."""
    picked = [pool[i] for i in pick_scenarios(len(pool), cfg.scenarios_per_iter, cfg.seed, iteration)]
    return collect_groups(model, picked, group_seeds(len(picked), cfg.group_size, cfg.seed, iteration), cfg,
                          pick_start(picked, cfg, iteration), pick_branch(cfg, iteration))


class BranchPolicy(VLAPolicy):
    """The policy of a branched collection (``groups = branch``), over S groups of G consecutive batch rows.

    Decisions before ``branch_at`` (the trunk) are sampled once per group, with the generator of its first
    row, and every row of the group takes that output: the simulator is deterministic, so the G rollouts stay
    identical.  Decision ``branch_at`` is sampled per row with the row's own generator and is the only one
    recorded (``trace``).  Later decisions are greedy, so that the G outcomes differ by the branch decision
    alone: the group's spread of driving rewards is that decision's effect, not the noise of the 10-15
    sampled decisions that follow it in a rollout group."""

    def __init__(self, model: VLAModel, group_size: int, branch_at: int, temperature: float, top_p: float):
        super().__init__(model, temperature=temperature, top_p=top_p, version="grpo-branch")
        self.group_size, self.branch_at = group_size, branch_at
        self._decision = 0

    def reset(self, state, seeds: torch.Tensor) -> None:
        super().reset(state, seeds)
        if state.batch_size % self.group_size:
            raise ConfigError(f"BranchPolicy: batch of {state.batch_size} is not groups of {self.group_size}")
        self._decision = 0

    def act(self, obs):
        self.record = self._decision == self.branch_at
        try:
            return super().act(obs)
        finally:
            self._decision += 1

    def decode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        d, G = self._decision, self.group_size
        if d == self.branch_at:
            return super().decode(inputs)
        if d > self.branch_at:
            return self.model.sample(inputs, 0.0, self.top_p, None, self.greedy_actions)
        lead = torch.arange(0, inputs["command"].shape[0], G)
        out = self.model.sample({k: v[lead] for k, v in inputs.items()}, self.temperature, self.top_p,
                                [self._gens[i] for i in lead.tolist()], self.greedy_actions)
        return tuple(x.repeat_interleave(G, 0) for x in out)


def crop_limit(scenario: Scenario, max_steps: int) -> int:
    """The latest ``crop_log`` start of a single ``scenario`` from which a rollout of ``max_steps`` steps still
    fits in the ego's logged steps (0 when the log is shorter)."""
    last = int(scenario.agents.valid[0].nonzero().max())  # the ego's last logged step
    return max(last - int(max_steps), 0)


def first_incident(ro) -> torch.Tensor:
    """(B,) int64 state index of each rollout's first at-fault collision or off-road in its scored steps
    (step t leads to state t + 1), -1 for none or a failed rollout."""
    first = first_scored_state(ro.checks.collision_at_fault | ro.checks.offroad, ro.scored)
    return torch.where(ro.failed, torch.full_like(first, -1), first)


class IncidentReplay:
    """Incident replay (``replay_share``): a queue of (pool index, log step) of recent incidents, from
    which a share of each iteration's scenarios is drawn and restarted ``replay_lead_s`` before the
    incident (``crop_log``: the log from there, then the usual warm-up), so that the groups meet the
    rare safety events the policy still fails instead of the uneventful stretches of most logs.

    A drawn entry leaves the queue; its group adds it back (at its new first incident) only if the
    policy still fails there.  One entry per group: the earliest incident of its G rollouts.  The
    state is plain lists, saved in the trainer checkpoint, so a resumed run draws what it would have.
    The scenarios not replayed start at a random point of their log (``random_start``) or at 0."""

    def __init__(self, cfg: GRPOConfig, entries: list | None = None):
        self.cfg = cfg
        self.entries: list[tuple[int, int]] = [(int(i), int(t)) for i, t in (entries or [])]

    def to_state(self) -> list[list[int]]:
        return [[i, t] for i, t in self.entries]

    def draw(self, pool: list[Scenario], fresh: list[int], iteration: int) -> tuple[list[int], list[int], int]:
        """(pool indices, crop offsets (log steps), number replayed) of ``iteration``'s S scenarios: up to
        ``round(replay_share x S)`` drawn (and removed) from the queue, the rest the first of ``fresh``;
        a pure function of (queue, fresh, seed, iteration)."""
        cfg = self.cfg
        S = len(fresh)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration + 55_555)
        n_rep = min(round(cfg.replay_share * S), len(self.entries))
        take = set(torch.randperm(len(self.entries), generator=g)[:n_rep].tolist())
        drawn = [e for k, e in enumerate(self.entries) if k in take]  # in queue order
        self.entries = [e for k, e in enumerate(self.entries) if k not in take]
        picks = [i for i, _ in drawn] + fresh[:S - n_rep]
        lead = round(cfg.replay_lead_s / DT)
        offsets = []
        for k, i in enumerate(picks):
            sc = pool[i]
            hi = crop_limit(sc, cfg.max_steps)
            if k < n_rep:
                want = drawn[k][1] - lead - sc.meta.warmup_steps
            elif cfg.random_start:
                want = int(torch.randint(0, hi + 1, (1,), generator=g))
            else:
                want = 0
            offsets.append(min(max(want, 0), hi))
        return picks, offsets, n_rep

    def add(self, gb: GroupBatch, picks: list[int], offsets: list[int]) -> int:
        """Queue the earliest incident (as a log step) of each group of ``gb`` that has one; returns how many."""
        S, G = len(picks), gb.group_size
        inc = gb.incident_step.view(S, G)
        n = 0
        for s in range(S):
            hit = inc[s][inc[s] >= 0]
            if hit.numel():
                self.entries.append((picks[s], offsets[s] + int(hit.min())))
                n += 1
        self.entries = self.entries[-self.cfg.replay_size:]
        return n


def group_spread(gb: GroupBatch) -> torch.Tensor:
    """(S,) float64 spread of each group's driving rewards, mean_g |R_g - mean R| (reward units): the
    per-rollout driving reward plus its per-decision local terms.  0 for a group whose rollouts all
    ended alike, which gives GRPO no driving advantage."""
    r = (gb.drive_reward + gb.local_reward.sum(0)).double().view(-1, gb.group_size)
    return (r - r.mean(1, keepdim=True)).abs().mean(1)


class LevelSampler:
    """Prioritized Level Replay (Jiang, Grefenstette & Rocktaeschel 2021) over the scenario pool
    (``scenario_sampling = plr``).

    Each scenario driven so far has a score, the ``group_spread`` of its last group: the mean size of
    the group's driving advantage before scaling, zero for a group whose rollouts all ended alike,
    which teaches GRPO nothing about driving.  An iteration drives
    ``round(plr_replay_share x S)`` scenarios replayed from the seen ones and the rest new ones (the
    unseen scenarios in the iteration's permutation of the pool, ``pick_scenarios``; all replayed once
    none is left).  The replayed ones are drawn without replacement from PLR's mixture::

        P = (1 - rho) P_score + rho P_stale,   P_score(i) ~ (1 / rank(score_i)) ** (1 / beta),
        P_stale(i) ~ iteration - last_iteration_i

    (``plr_temperature`` = beta, ``plr_staleness`` = rho; rank 1 is the largest spread; staleness
    keeps old scores from going stale forever).  Scores are replaced, not averaged, by each new group
    (PLR's rule).  Departure from PLR: a fixed replay share per iteration instead of a Bernoulli draw
    per level, so each batch mixes both.  With no scenario seen yet the picks equal ``uniform``'s.  The
    state is two plain maps, saved in the trainer checkpoint, so a resumed run draws what it would have.
    """

    def __init__(self, cfg: GRPOConfig, n_pool: int, state: dict | None = None):
        self.cfg, self.n_pool = cfg, n_pool
        state = state or {}
        self.score: dict[int, float] = {int(i): float(v) for i, v in state.get("score", [])}
        self.seen: dict[int, int] = {int(i): int(t) for i, t in state.get("seen", [])}
        if any(not 0 <= i < n_pool for i in self.score):
            raise RoadloopError(f"the checkpoint's level-replay state names scenarios beyond the pool of {n_pool}: "
                                "the pool changed since the run started")

    def to_state(self) -> dict[str, list]:
        return {"score": [[i, v] for i, v in sorted(self.score.items())],
                "seen": [[i, t] for i, t in sorted(self.seen.items())]}

    def replay_probs(self, iteration: int) -> tuple[list[int], torch.Tensor]:
        """(seen pool indices (ascending), their replay probabilities (n,) float64)."""
        idx = sorted(self.score)
        sc = torch.tensor([self.score[i] for i in idx], dtype=torch.float64)
        rank = torch.empty_like(sc)
        rank[torch.argsort(-sc, stable=True)] = torch.arange(1, len(idx) + 1, dtype=torch.float64)
        p_score = rank.pow(-1.0 / self.cfg.plr_temperature)
        p_score = p_score / p_score.sum()
        stale = torch.tensor([iteration - self.seen[i] for i in idx], dtype=torch.float64).clamp_min(0)
        rho = self.cfg.plr_staleness if float(stale.sum()) > 0 else 0.0
        p_stale = stale / stale.sum() if rho > 0 else torch.zeros_like(sc)
        return idx, (1 - rho) * p_score + rho * p_stale

    def draw(self, n: int, iteration: int) -> tuple[list[int], int]:
        """(pool indices, number replayed) of ``iteration``'s ``n`` scenarios (replayed first); a pure
        function of (state, seed, iteration)."""
        cfg = self.cfg
        order = pick_scenarios(self.n_pool, self.n_pool, cfg.seed, iteration)
        unseen = [i for i in order if i not in self.score]
        n = min(n, self.n_pool)
        n_rep = min(max(round(cfg.plr_replay_share * n), n - len(unseen)), len(self.score))
        picks: list[int] = []
        if n_rep:
            idx, p = self.replay_probs(iteration)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration + 99_991)
            picks = [idx[k] for k in torch.multinomial(p, n_rep, replacement=False, generator=g).tolist()]
        return picks + unseen[:n - n_rep], n_rep

    def update(self, gb: GroupBatch, picks: list[int], iteration: int) -> torch.Tensor:
        """Score the groups of ``gb`` (one per pick) and mark them seen at ``iteration``; returns (S,) scores."""
        if len(picks) * gb.group_size != gb.drive_reward.numel():
            raise ConfigError(f"LevelSampler.update: {len(picks)} picks for {gb.drive_reward.numel()} rollouts "
                              f"in groups of {gb.group_size}")
        dev = group_spread(gb)
        for i, v in zip(picks, dev.tolist(), strict=True):
            self.score[i] = v if math.isfinite(v) else 0.0
            self.seen[i] = iteration
        return dev


def collect_groups(model: VLAModel, scenarios: list[Scenario], seeds: torch.Tensor, cfg: GRPOConfig,
                   start: int | None = None, branch_at: int | None = None) -> GroupBatch:
    """Roll each of the S ``scenarios`` out G times (``seeds`` (S, G)) in one batch and score them.
    ``start``: log-replay steps before the policy drives (``pick_start``; None: the scenarios' own
    warm-up); the policy then drives ``max_steps`` minus the scenarios' warm-up steps.  With
    ``groups = branch`` the G rollouts branch at decision ``branch_at`` (``pick_branch``; None: 0, and at
    most the rollouts' last decision) and the batch holds that one decision (D = 1; ``BranchPolicy``).

    A pure function of (weights, scenarios, seeds, cfg, start, branch_at): no global RNG is used.
    """
    from roadloop.eval.metrics import compute_metrics
    from roadloop.policies.vla import tokenizer as tok
    from roadloop.rollout import RolloutConfig, decision_schedule, rollout
    from roadloop.sim.batching import collate

    S, G = seeds.shape
    if S != len(scenarios) or S == 0:
        raise ConfigError(f"collect_groups: {len(scenarios)} scenarios for seeds of shape {tuple(seeds.shape)}")
    t0 = time.perf_counter()
    batch = collate([sc for sc in scenarios for _ in range(G)])
    T = rollout_steps(scenarios, batch.num_steps, cfg.max_steps, start)
    warm = max(sc.meta.warmup_steps for sc in scenarios) if start is None else start
    n_dec = len(decision_schedule(warm, T, cfg.replan_every))
    if n_dec == 0:
        raise ConfigError(f"rollouts of {T} steps made no decision (warm-up too long for max_steps={cfg.max_steps})")
    if cfg.groups == "branch":
        k = min(branch_at or 0, n_dec - 1)
        policy: VLAPolicy = BranchPolicy(model, G, k, cfg.temperature, cfg.top_p)
    else:
        policy = VLAPolicy(model, temperature=cfg.temperature, top_p=cfg.top_p, version="grpo", record=True)
    with torch.no_grad():
        ro = rollout(policy, batch, seeds.reshape(-1),
                     RolloutConfig(replan_every=cfg.replan_every, max_steps=T, warmup=start))
    metrics = compute_metrics(ro, batch, list(ROLLOUT_METRICS))
    drive, terms = driving_reward(ro, batch, cfg.reward, metrics)
    tr = policy.trace
    B = S * G
    D = len(tr)
    chunk = model.cfg.action_chunk
    gr = ro.grounded == 1.0  # (D, B): checked by the rollout engine against the scene at each decision
    local = local_incident_reward(ro, cfg.reward) + log_gap_reward(ro, cfg.reward)
    if cfg.groups == "branch":  # the branch decision alone
        gr, local = gr[k:k + 1], local[k:k + 1]
    co = torch.zeros(D, B, dtype=torch.bool)
    if cfg.reward.uses_reasoning:
        for d, rec in enumerate(tr):
            co[d] = consistency_flags(tok.decode_batch(rec.text), rec.actions, rec.speed, chunk)
    return GroupBatch(
        scenario_ids=[sc.meta.scenario_id for sc in scenarios], group_size=G, seeds=seeds.reshape(-1).clone(),
        decision_steps=torch.tensor([r.step for r in tr], dtype=torch.int64),
        bev=torch.stack([r.bev for r in tr]), history=torch.stack([r.history for r in tr]),
        command=torch.stack([r.command for r in tr]), text=torch.stack([r.text for r in tr]),
        actions=torch.stack([r.actions for r in tr]),
        logp=torch.stack([r.logp_text + r.logp_action for r in tr]),
        grounding=gr, consistency=co, drive_reward=drive, reason_reward=reasoning_reward(gr, co, cfg.reward),
        local_reward=local,
        terms=terms, metrics=metrics, failed=ro.failed.clone(), incident_step=first_incident(ro),
        env_steps=B * ro.num_steps,
        seconds=time.perf_counter() - t0, families=[sc.meta.family for sc in scenarios])


# ---------------------------------------------------------------------------------------------
# advantages


def group_advantages(r: torch.Tensor, mode: str, scale: float = 1.0, clip: float = 5.0) -> torch.Tensor:
    """Normalise rewards r (S, K) within each row (a group); NaN entries are left out and get 0.

    ``std``: (r - mean) / (std + 1e-6) (unbiased std, 0 for a group of < 2 values);
    ``centered``: (r - mean) / ``scale``.  Clipped to +-``clip``.
    """
    ok = torch.isfinite(r)
    n = ok.sum(1, keepdim=True)
    x = torch.where(ok, r, torch.zeros_like(r))
    mean = x.sum(1, keepdim=True) / n.clamp_min(1)
    dev = torch.where(ok, r - mean, torch.zeros_like(r))
    if mode == "std":
        std = torch.sqrt((dev ** 2).sum(1, keepdim=True) / (n - 1).clamp_min(1))
        a = dev / (std + ADV_EPS)
    elif mode == "centered":
        a = dev / scale
    else:
        raise ConfigError(f"advantage mode must be 'std' or 'centered', got '{mode}'")
    return a.clamp(-clip, clip)


def decision_advantages(gb: GroupBatch, cfg: GRPOConfig) -> torch.Tensor:
    """(D, B, 2) advantage parts of every decision (module docstring, step 2): ``[..., 0]`` driving (the
    rollout's group-normalised driving advantage, plus the group-normalised per-decision driving rewards
    ``local_reward`` with ``reward.credit = local`` or ``reward.log_gap``), ``[..., 1]`` reasoning
    (group-normalised grounding + consistency reward).
    ``sum(-1)`` is the decision's total advantage.

    A failed rollout (the policy raised or returned NaN) keeps its worst-case driving reward and takes
    part like any other: failing is the worst outcome."""
    S, G, D = len(gb.scenario_ids), gb.group_size, gb.num_decisions
    a_drive = group_advantages(gb.drive_reward.view(S, G), cfg.advantage, cfg.adv_scale, cfg.adv_clip)
    drive = a_drive.reshape(1, S * G).expand(D, S * G).clone()
    reason = torch.zeros(D, S * G)

    def per_decision(r: torch.Tensor) -> torch.Tensor:  # (D, B) normalised over the G x D decisions of a group
        rr = r.view(D, S, G).permute(1, 2, 0).reshape(S, G * D)
        a = group_advantages(rr, cfg.advantage, cfg.adv_scale, cfg.adv_clip)
        return a.view(S, G, D).permute(2, 0, 1).reshape(D, S * G)

    if D and cfg.reward.per_decision_driving:
        drive += per_decision(gb.local_reward)
    if D and cfg.reward.uses_reasoning:
        reason = per_decision(gb.reason_reward)
    return torch.stack((drive, reason), -1).contiguous()


def shuffled(adv: torch.Tensor, seed: int, iteration: int) -> torch.Tensor:
    """``adv`` (D, B, 2) with its rollouts permuted (a function of seed and iteration): the null control of
    ``shuffle_advantages``, each decision keeps its rollout's advantages' sizes but not their meaning."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration + 99_991)
    return adv[:, torch.randperm(adv.shape[1], generator=g)]


def executed_action_tokens(cfg: GRPOConfig, model_cfg: VLAConfig) -> int:
    """Action tokens (accel and curvature bins, 2 per chunk) whose controls the ego executes before the
    next decision: the chunks covering the first ``replan_every`` plan steps."""
    return 2 * min(-(-cfg.replan_every // model_cfg.action_chunk), model_cfg.n_action)


def token_advantages(adv: torch.Tensor, text_len: int, n_action_tokens: int, n_exec: int | None,
                     split: bool = False) -> torch.Tensor:
    """Per-token advantages (M, L + 2N) from decision advantage parts (M, 2) (``decision_advantages``).

    Text tokens and the ``n_exec`` executed action tokens carry driving + reasoning; with ``n_exec`` not
    None, the later action tokens (a plan tail replaced at the next decision before it is driven) carry
    the reasoning part only, since the driving outcome does not depend on them.  ``split``
    (``drive_tokens = actions``): the text tokens carry the reasoning part only, the action tokens the
    driving part only."""
    if split:
        return torch.cat((adv[:, 1:2].expand(-1, text_len), adv[:, 0:1].expand(-1, n_action_tokens)), 1)
    total = adv.sum(-1, keepdim=True)
    out = total.expand(adv.shape[0], text_len + n_action_tokens).clone()
    if n_exec is not None:
        out[:, text_len + n_exec:] = adv[:, 1:2]
    return out


# ---------------------------------------------------------------------------------------------
# PPO


def decode_bev(q: torch.Tensor) -> torch.Tensor:
    """uint8 (..., F, C, H, W) -> float32 (``decode_raster``: exactly what the policy saw when acting), laid out
    channels-last in memory for the vision stem."""
    from roadloop.policies.vla.observe import decode_raster

    return decode_raster(q, channels_last=True)


def decision_batch(gb: GroupBatch, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Teacher-forcing model batch of the decisions with flat indices ``flat`` (index = d B + b)."""
    B = gb.batch_size
    d, b = flat // B, flat % B
    return {"bev": decode_bev(gb.bev[d, b]), "history": gb.history[d, b], "command": gb.command[d, b],
            "text": gb.text[d, b], "actions": gb.actions[d, b]}


def flat_token_logps(model: VLAModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (M, L + 2N) of text then action tokens, and their mask (pads False)."""
    lt, la, mask = model.token_logps(batch)
    M = lt.shape[0]
    la = la.reshape(M, -1)
    return torch.cat((lt, la), 1), torch.cat((mask, torch.ones_like(la, dtype=torch.bool)), 1)


def ppo_loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
             cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate + k3 KL to the reference; tensors (M, K) per token, adv (M, K) per
    token or (M,) per sequence."""
    m = mask.float()
    n = m.sum().clamp_min(1.0)
    lr = (logp - old).clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = torch.exp(lr)
    a = adv.to(logp.dtype)
    a = a.view(-1, 1) if a.dim() == 1 else a
    s1 = ratio * a
    s2 = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a
    pg = -torch.minimum(s1, s2)
    if cfg.dual_clip > 0:
        pg = torch.where(a < 0, torch.minimum(pg, -cfg.dual_clip * a), pg)
    dref = (ref - logp).clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    kl = torch.exp(dref) - dref - 1.0
    pg_loss = (pg * m).sum() / n
    kl_mean = (kl * m).sum() / n
    loss = pg_loss + cfg.kl_coef * kl_mean
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
        stats = {"policy": pg_loss.detach(), "kl": kl_mean.detach(), "clip_frac": (clipped * m).sum() / n,
                 "ratio_mean": (ratio * m).sum() / n, "ratio_dev_max": ((ratio - 1).abs() * m).amax()}
    return loss, stats


@torch.no_grad()
def fixed_logps(model: VLAModel, ref: VLAModel | None, gb: GroupBatch, idx: torch.Tensor, chunk: int = 256,
                lower_layers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token (old, ref, mask) of the decisions ``idx`` under the sampling weights and the reference
    (``ref=None``, i.e. no KL term: ref = old, no second forward pass), and with ``lower_layers`` > 0 the
    hidden states (n, S, d) after that many blocks (``VLAModel.lower_states``), else None."""
    olds, refs, masks, hidden = [], [], [], []
    for i in range(0, idx.numel(), chunk):
        batch = decision_batch(gb, idx[i:i + chunk])
        if lower_layers > 0:
            batch = {"text": batch["text"], "actions": batch["actions"],
                     "lower": model.lower_states(batch, lower_layers)}
            hidden.append(batch["lower"]["hidden"])
        o, mk = flat_token_logps(model, batch)
        r = o if ref is None else flat_token_logps(ref, batch)[0]
        olds.append(o)
        refs.append(r)
        masks.append(mk)
    return torch.cat(olds), torch.cat(refs), torch.cat(masks), (torch.cat(hidden) if hidden else None)


def frozen_lower_layers(model: VLAModel, ref: VLAModel) -> int:
    """How many of the lowest blocks (with the embeddings and the vision stem) are frozen in ``model``
    (``VLAModel.frozen_blocks``) and shared bit for bit with the reference: their hidden states are then
    computed once per iteration (``fixed_logps``) instead of once per minibatch (0: none)."""
    theirs = dict(ref.named_parameters())
    same = all(torch.equal(p, theirs[k]) for k, p in model.named_parameters() if not p.requires_grad)
    return model.frozen_blocks() if same else 0


def ppo_update(model: VLAModel, ref: VLAModel, opt: torch.optim.Optimizer, gb: GroupBatch, adv: torch.Tensor,
               cfg: GRPOConfig, iteration: int, lower_layers: int = 0, expert: ExpertStream | None = None,
               ptx_pos: int = 0) -> dict[str, float]:
    """PPO epochs on one GroupBatch with decision advantage parts ``adv`` (D, B, 2) (``decision_advantages``)
    (module docstring, step 3); ``lower_layers`` from ``frozen_lower_layers``.  With ``expert`` every gradient
    step adds ``cfg.ptx_coef`` x the imitation loss of the ``cfg.ptx_batch`` expert samples at stream position
    ``ptx_pos`` onwards; ``out["ptx_pos"]`` is the position after the update.  Raises ``NonFiniteError``."""
    n = gb.num_decisions * gb.batch_size
    out = {"samples": 0.0, "ptx_pos": float(ptx_pos)}
    if n == 0:
        return out
    g = torch.Generator().manual_seed(cfg.seed * 7919 + iteration)
    idx = torch.arange(n)
    if 0 < cfg.max_decisions < n:  # a uniform subset (a function of seed and iteration)
        idx = torch.randperm(n, generator=g)[:cfg.max_decisions].sort().values
    old, refl, mask, hidden = fixed_logps(model, ref if cfg.kl_coef > 0 else None, gb, idx,
                                          lower_layers=lower_layers)
    rec = gb.logp.reshape(-1)[idx].to(old.device)
    out["old_logp_mismatch"] = float(((old * mask).sum(1) - rec).abs().max())
    L = gb.text.shape[-1]
    n_exec = executed_action_tokens(cfg, model.cfg) if cfg.drive_tokens == "executed" else None
    adv_tok = token_advantages(adv.reshape(-1, 2)[idx], L, old.shape[1] - L, n_exec,
                               split=cfg.drive_tokens == "actions").to(old.device)

    def minibatch(p: torch.Tensor) -> dict:
        if hidden is None:
            return decision_batch(gb, idx[p])
        B = gb.batch_size
        d, b = idx[p] // B, idx[p] % B
        return {"text": gb.text[d, b], "actions": gb.actions[d, b],
                "lower": {"hidden": hidden[p.to(hidden.device)], "layers": lower_layers}}

    sums: dict[str, float] = {}
    steps = 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(idx.numel(), generator=g)
        for j in range(0, idx.numel(), cfg.minibatch_size):
            p = perm[j:j + cfg.minibatch_size]
            logp, mk = flat_token_logps(model, minibatch(p))
            loss, st = ppo_loss(logp, old[p.to(old.device)], refl[p.to(old.device)], mk,
                                adv_tok[p.to(old.device)], cfg)
            if expert is not None:
                ptx = model.loss(expert.take(ptx_pos, cfg.ptx_batch))["loss"]
                ptx_pos += cfg.ptx_batch
                loss = loss + cfg.ptx_coef * ptx
                st["ptx"] = ptx.detach()
            if epoch == 0 and j == 0:
                out["first_ratio_dev"] = float(st["ratio_dev_max"])
                out["first_kl"] = float(st["kl"])
            opt.zero_grad(set_to_none=True)
            check_finite(loss, model)
            loss.backward()
            check_finite(loss, model)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            steps += 1
            for k, v in {**st, "loss": loss.detach(), "grad_norm": gnorm}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out["samples"] += float(idx.numel())
    out.update({k: v / max(steps, 1) for k, v in sums.items() if k != "ratio_dev_max"})
    out["steps"] = float(steps)
    out["ptx_pos"] = float(ptx_pos)
    return out


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class GRPOResult:
    checkpoint: Path
    iterations: int
    seconds: float
    env_steps_per_s: float
    learner_samples_per_s: float
    history: list[dict[str, float]]  # per-iteration logged values (this process only)
    eval: dict[str, float]  # last closed-loop evaluation (empty if none)
    run_id: str | None
    stopped_early: bool
    probe: dict[int, dict[str, float]] = field(default_factory=dict)  # iteration -> ``probe_reward`` (this process)


def iteration_metrics(gb: GroupBatch) -> dict[str, float]:
    """Tracked rollout values of one collection (means over the non-failed rollouts / decisions),
    ``rollout/flat_groups``, the share of its groups whose driving rewards are all equal (``group_spread``),
    and per scenario family driven in it ``family/<family>/score`` and ``family/<family>/incident`` (the
    share of its rollouts with an at-fault collision or off-road): a family's curve has a point at each
    iteration that drew one of its scenarios."""
    ok = ~gb.failed
    mean = lambda x: float(x[ok].float().mean()) if bool(ok.any()) else math.nan  # noqa: E731
    dmean = lambda x: float(x[:, ok].float().mean()) if bool(ok.any()) and gb.num_decisions else math.nan  # noqa: E731
    m = {"rollout/reward": mean(gb.total_reward()), "rollout/drive_reward": mean(gb.drive_reward),
         "rollout/reason_reward": dmean(gb.reason_reward), "rollout/grounding": dmean(gb.grounding),
         "rollout/consistency": dmean(gb.consistency), "rollout/failed": float(gb.failed.float().mean())}
    for k in ROLLOUT_METRICS:
        m[f"rollout/{k}"] = mean(gb.metrics[k])
    m["rollout/flat_groups"] = float((group_spread(gb) < FLAT_SPREAD).double().mean())
    if gb.families and bool(ok.any()):
        names = sorted(set(gb.families))
        code = torch.tensor([names.index(f) for f in gb.families]).repeat_interleave(gb.group_size)  # (B,)
        incident = (gb.metrics["collision_at_fault"] > 0) | (gb.metrics["offroad"] > 0)
        for i, f in enumerate(names):
            sel = (code == i) & ok
            if bool(sel.any()):
                m[f"family/{f}/score"] = float(gb.metrics["score"][sel].float().mean())
                m[f"family/{f}/incident"] = float(incident[sel].float().mean())
    return m


PROBE_SEED = 123  # one probe sample for every training seed, so that runs compare


PROBE_KEYS = ("reward", "drive_reward", "score", "progress", "collision_at_fault", "offroad", "incident")


def probe_rollouts(model: VLAModel, pool: list[Scenario], cfg: GRPOConfig) -> dict[str, torch.Tensor]:
    """Per-rollout training reward (``GroupBatch.total_reward``), its driving part, headline metrics and
    ``incident`` (an at-fault collision or an off-road excursion, as ``roadloop compare`` counts it) of
    ``model`` on ``cfg.probe_batches`` fixed collections of the training distribution, each (K S G,) in
    collection order (rollouts ``i * G .. (i + 1) * G - 1`` are one scenario's group): the scenarios, starts
    (``random_start``; no incident replay) and rollout seeds of iterations 0.. of a run with seed
    ``PROBE_SEED``, the same for every checkpoint and training seed, so two probes pair rollout by rollout
    (given the same ``scenarios_per_iter``, ``group_size`` and pool)."""
    pcfg = replace(cfg, seed=PROBE_SEED)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in PROBE_KEYS}
    for k in range(cfg.probe_batches):
        gb = collect_iteration(model, pool, pcfg, k)
        parts["reward"].append(gb.total_reward())
        parts["drive_reward"].append(gb.drive_reward)
        for m in PROBE_KEYS[2:-1]:
            parts[m].append(gb.metrics[m].float())
        col, off = parts["collision_at_fault"][-1], parts["offroad"][-1]
        parts["incident"].append(torch.where(col.isnan() | off.isnan(), torch.nan, ((col > 0) | (off > 0)).float()))
    return {k: torch.cat(v).float() for k, v in parts.items()}


def probe_reward(model: VLAModel, pool: list[Scenario], cfg: GRPOConfig) -> dict[str, float]:
    """Means of ``probe_rollouts`` as ``probe/<key>``.  The training curves draw new scenarios every
    iteration; this tells whether the policy got better at what it is trained on."""
    return {f"probe/{k}": float(v.nanmean()) for k, v in probe_rollouts(model, pool, cfg).items()}


def evaluate_model(model: VLAModel, scenarios: list[Scenario], cfg, suite_name: str = "",
                   suite_hash: str = "") -> dict[str, float]:
    """Closed-loop headline metrics of ``model`` on ``scenarios``; ``cfg`` (GRPO or RoaD) gives
    ``eval_temperature``, ``eval_top_p``, ``replan_every``, ``max_steps`` and ``seed``."""
    from roadloop.eval.evaluate import evaluate
    from roadloop.policies.vla.policy import VLAPolicy
    from roadloop.rollout import RolloutConfig

    pol = VLAPolicy(model, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, version="grpo-eval")
    # max_steps None: every scenario's whole log, as ``roadloop eval`` drives it
    T = None if cfg.max_steps is None else min(min(s.num_steps for s in scenarios) - 1, cfg.max_steps)
    rep, _ = evaluate(pol, scenarios, suite_name=suite_name, suite_hash=suite_hash, seed=cfg.seed,
                      cfg=RolloutConfig(replan_every=cfg.replan_every, max_steps=T))
    keys = ("score", "nuplan_score", "progress", "collision_at_fault", "offroad", "comfort_violation", "red_light",
            "reasoning_consistency", "reasoning_grounding")
    return {f"eval/{k}": rep.overall[k].mean for k in keys if k in rep.overall}


def make_optimizer(model: VLAModel, cfg: GRPOConfig, trainable: str | None = None) -> torch.optim.AdamW:
    """The learner's AdamW over the parameters ``trainable`` (default ``cfg.trainable``) selects."""
    params = model.trainable_parameters(cfg.trainable if trainable is None else trainable)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))


def train_grpo(cfg: GRPOConfig, resume: bool = False, on_progress: Callable[[int, int, dict], None] | None = None,
               log: Callable[[str], None] = print) -> GRPOResult:
    """Run (or resume) GRPO post-training; see the module docstring."""
    t_start = time.perf_counter()
    st = start_post_training(cfg, resume)
    model, pool, run_dir, ev_pool, ev_hash = st.model, st.pool, st.run_dir, st.ev_pool, st.ev_hash
    init_dir, init_sha, hashes = st.init_dir, st.init_sha, st.hashes
    expert = None
    if cfg.ptx_coef > 0:
        expert = ExpertStream(cfg.expert_data, model.cfg, cfg.seed, cfg.ptx_window, key="grpo.expert_data")
        log(f"ptx: {len(expert):,} expert demonstrations ({expert.content_hash[:12]}), x {cfg.ptx_coef} per step")
    expert_hash = expert.content_hash if expert is not None else None
    if st.prev and st.prev.get("expert_data") != expert_hash:
        raise RoadloopError(f"grpo.expert_data {cfg.expert_data or '(none)'} differs from the demonstrations this run "
                            f"started with ({str(st.prev.get('expert_data'))[:12]}); not resuming on other data")

    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.eval()  # no dropout while learning: exact ratios (module docstring)
    try:
        opt = make_optimizer(model, cfg)
    except RoadloopError as err:
        raise ConfigError(f"grpo.trainable: {err}") from None
    it, elapsed, state = restore(run_dir, model, opt, resume, "iteration", cfg.iterations, log)
    code = code_version()
    tracker, lineage = begin_run(cfg, run_dir, st.prev,
                                 {**st.lineage(cfg), **({"expert_data": expert_hash} if expert_hash else {})})
    ptx_pos = int((state or {}).get("extra", {}).get("ptx_pos", 0))
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    probes: dict[int, dict[str, float]] = {}
    env_steps = learn_samples = 0
    collect_s = learn_s = 0.0
    with tracker:
        if state is None:
            tracker.log_params({"grpo": to_dict(cfg), "reward_weights": cfg.reward.weights(),
                                "model": to_dict(model.cfg), "params": param_count(model), "init_sha": init_sha,
                                "suites": hashes, "n_pool": len(pool)})
            if ev_pool:
                last_eval = evaluate_model(model, ev_pool, cfg, cfg.eval_suite, ev_hash)
                tracker.log_metrics(last_eval, 0)
                log("iteration 0: " + _fmt(last_eval))
            _probe(model, pool, cfg, 0, probes, tracker, log)
        replay = IncidentReplay(cfg, (state or {}).get("extra", {}).get("replay", [])) if cfg.replay_share > 0 else None
        levels = LevelSampler(cfg, len(pool), (state or {}).get("extra", {}).get("levels")) \
            if cfg.scenario_sampling == "plr" else None
        good = GoodState(model, opt)
        good.snapshot(it)
        lower = frozen_lower_layers(model, ref)
        bad_run = 0
        t0 = time.perf_counter() - elapsed
        stopped_early = False
        while it < cfg.iterations:
            if levels is not None:
                picks, n_rep = levels.draw(cfg.scenarios_per_iter, it)
                picked = [pool[i] for i in picks]
                gb = collect_groups(model, picked, group_seeds(len(picks), cfg.group_size, cfg.seed, it), cfg,
                                    pick_start(picked, cfg, it), pick_branch(cfg, it))
                spreads = levels.update(gb, picks, it)
            elif replay is None:
                gb = collect_iteration(model, pool, cfg, it)
            else:
                fresh = pick_scenarios(len(pool), cfg.scenarios_per_iter, cfg.seed, it)
                picks, offsets, n_rep = replay.draw(pool, fresh, it)
                cropped = [crop_log(pool[i], o) for i, o in zip(picks, offsets, strict=True)]
                gb = collect_groups(model, cropped, group_seeds(len(picks), cfg.group_size, cfg.seed, it), cfg,
                                    branch_at=pick_branch(cfg, it))
                n_new = replay.add(gb, picks, offsets)
            adv = decision_advantages(gb, cfg)
            if cfg.shuffle_advantages:
                adv = shuffled(adv, cfg.seed, it)
            tl = time.perf_counter()
            try:
                st = ppo_update(model, ref, opt, gb, adv, cfg, it, lower, expert, ptx_pos)
            except NonFiniteError as e:
                bad_run += 1
                good.restore()
                log(f"iteration {it}: {e}; dropped its update and restored the last good state "
                    f"(after iteration {good.step}; {bad_run} in a row)")
                tracker.log_metrics({"loss/nonfinite_iters": good.restores}, it + 1)
                if bad_run >= cfg.max_bad_iters:
                    raise RoadloopError(f"{bad_run} non-finite iterations in a row at iteration {it}: stopping "
                                        f"(last good checkpoint in {run_dir})") from e
                st = {"samples": 0.0}
            else:
                bad_run = 0
                good.snapshot(it + 1)
                ptx_pos = int(st["ptx_pos"])
            dt_learn = time.perf_counter() - tl
            it += 1
            env_steps += gb.env_steps
            collect_s += gb.seconds
            learn_samples += int(st.get("samples", 0))
            learn_s += dt_learn
            m = iteration_metrics(gb)
            m.update({f"loss/{k}": v for k, v in st.items() if k not in ("samples", "steps", "ptx_pos")})
            m["loss/adv_abs"] = float(adv.sum(-1).abs().mean()) if adv.numel() else math.nan
            m["perf/env_steps_per_s"] = gb.env_steps / max(gb.seconds, 1e-9)
            m["perf/learner_samples_per_s"] = st.get("samples", 0.0) / max(dt_learn, 1e-9)
            m["perf/collect_s"], m["perf/learn_s"] = gb.seconds, dt_learn
            if replay is not None:
                m.update({"replay/replayed": float(n_rep), "replay/new_incidents": float(n_new),
                          "replay/queue": float(len(replay.entries))})
            if levels is not None:
                m.update({"levels/replayed": float(n_rep), "levels/seen": float(len(levels.score)),
                          "levels/spread": float(spreads.mean()),
                          "levels/spread_replayed": float(spreads[:n_rep].mean()) if n_rep else math.nan,
                          "levels/spread_new": float(spreads[n_rep:].mean()) if n_rep < len(spreads) else math.nan})
            tracker.log_metrics(m, it)
            history.append({"iteration": float(it), **m})
            if on_progress:
                on_progress(it, cfg.iterations, m)
            if it % cfg.ckpt_every == 0 or it == cfg.iterations:
                save_train_state(run_dir, it, model, opt, extra=_ckpt_extra(t0, replay, ptx_pos, levels), keep=2)
            if ev_pool and it % cfg.eval_every == 0:
                last_eval = evaluate_model(model, ev_pool, cfg, cfg.eval_suite, ev_hash)
                tracker.log_metrics(last_eval, it)
                log(f"iteration {it}: " + _fmt(last_eval))
            if cfg.eval_every and it % cfg.eval_every == 0 and it < cfg.iterations:
                _probe(model, pool, cfg, it, probes, tracker, log)
            if cfg.time_limit_min > 0 and time.perf_counter() - t0 > 60 * cfg.time_limit_min and it < cfg.iterations:
                log(f"time limit {cfg.time_limit_min} min reached at iteration {it}/{cfg.iterations}: stopping")
                save_train_state(run_dir, it, model, opt, extra=_ckpt_extra(t0, replay, ptx_pos, levels), keep=2)
                stopped_early = True
                break
        train_s = time.perf_counter() - t0
        if ev_pool and (not last_eval or it % cfg.eval_every != 0):
            last_eval = evaluate_model(model, ev_pool, cfg, cfg.eval_suite, ev_hash)
            tracker.log_metrics(last_eval, it)
        _probe(model, pool, cfg, it, probes, tracker, log)
        env_sps = env_steps / max(collect_s, 1e-9)
        learn_sps = learn_samples / max(learn_s, 1e-9)
        final = save_checkpoint(model.eval(), run_dir / "final",
                                extra={"trainer": "grpo", **lineage, "iterations": it,
                                       "train_seconds": round(train_s, 1), "eval": last_eval, "config": to_dict(cfg)})
        tracker.log_metrics({"train_seconds": train_s, "perf/env_steps_per_s_mean": env_sps,
                             "perf/learner_samples_per_s_mean": learn_sps}, it)
        tracker.set_tags({"checkpoint": str(final), "stopped_early": stopped_early})
        if cfg.register:
            registered = register_final(final, {"trainer": "grpo", **lineage, "parent": str(init_dir),
                                                 "parent_weights_sha256": init_sha, "config": to_dict(cfg),
                                                 "code": code}, log)
            tracker.set_tags({"registered": registered or "no"})
    log(f"GRPO: {it} iterations in {train_s / 60:.1f} min ({env_sps:.0f} env steps/s, {learn_sps:.0f} learner "
        f"samples/s) -> {final} (total {(time.perf_counter() - t_start) / 60:.1f} min)")
    return GRPOResult(final, it, train_s, env_sps, learn_sps, history, last_eval, tracker.run_id, stopped_early,
                      probes)


def _probe(model: VLAModel, pool: list[Scenario], cfg: GRPOConfig, it: int, probes: dict, tracker, log) -> None:
    if cfg.probe_batches and it not in probes:
        probes[it] = probe_reward(model, pool, cfg)
        tracker.log_metrics(probes[it], it)
        log(f"iteration {it}: probe " + _fmt(probes[it]))


def _ckpt_extra(t0: float, replay: IncidentReplay | None, ptx_pos: int = 0,
                levels: LevelSampler | None = None) -> dict:
    extra: dict = {"elapsed": time.perf_counter() - t0, "ptx_pos": ptx_pos}
    if replay is not None:
        extra["replay"] = replay.to_state()
    if levels is not None:
        extra["levels"] = levels.to_state()
    return extra


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in m.items())


__all__ = [
    "BranchPolicy",
    "GRPOConfig",
    "GRPOResult",
    "GroupBatch",
    "IncidentReplay",
    "LevelSampler",
    "check_init_model",
    "collect_groups",
    "collect_iteration",
    "crop_limit",
    "decision_advantages",
    "decision_batch",
    "decode_bev",
    "evaluate_model",
    "executed_action_tokens",
    "first_incident",
    "fixed_logps",
    "flat_token_logps",
    "frozen_lower_layers",
    "make_optimizer",
    "group_advantages",
    "group_seeds",
    "group_spread",
    "iteration_metrics",
    "load_pool",
    "pick_branch",
    "pick_scenarios",
    "pick_start",
    "probe_reward",
    "probe_rollouts",
    "rollout_steps",
    "ppo_loss",
    "shuffled",
    "ppo_update",
    "token_advantages",
    "train_grpo",
]
