"""Imitation pre-training of the VLA policy on expert demonstrations (``roadloop train il``).

Loss: next-token cross-entropy on the Chain-of-Causation text (teacher forcing) plus
``action_weight`` x cross-entropy on the 16 (accel, curvature) chunk tokens of the expert's
64-step controls (``tokenizer.quantize_controls``).  AdamW, linear warm-up then cosine decay,
gradient clipping.

Resilience: the run directory holds ``config.yaml`` (resolved config), ``run.json`` (tracker run
id, dataset hash) and trainer checkpoints (``roadloop.train.checkpointing``: weights, optimizer,
RNG, data-order position) every ``ckpt_every`` steps; ``resume=True`` continues from the newest
one and loses at most the steps since it.  A non-finite loss or gradient skips the step and
restores the last good state (``GoodState``); ``max_bad_steps`` in a row stop the run.  The final
model goes to ``<out>/final`` (``save_checkpoint``: safetensors + config.json with the dataset
hash and the open-loop metrics) and is what ``roadloop eval --policy <out>/final`` drives.

``data_loading=stream`` keeps only the rasters of ``stream_window + 2`` shards in memory instead
of the whole collection's (213 KB a sample), for collections larger than the machine's memory:
each epoch shuffles the shards (stratified by family: the collector writes one family per shard),
takes them ``stream_window`` at a time and shuffles the samples of those shards together
(``shard_epoch_order``), so every shard is decompressed once per epoch.
The sample order differs from ``memory``'s, so the two modes give different (equally valid) runs.
Loading a collection in memory that would not fit is refused with an error naming this option.

``precision=bf16`` runs the forward pass and the loss under bfloat16 autocast (weights, optimizer
state and checkpoints stay fp32); ``auto`` (default) picks it on CPUs with native bf16 arithmetic
(AVX512-BF16 or AMX), where it measured 1.4-1.9x the fp32 samples per second, and fp32 elsewhere:
on CPUs without it bf16 is emulated and slow, and on an H100 the default model is bound by kernel
launches and autocast's casts made it slower (docs/LOG.md).

Time budget: with ``time_limit_min`` and ``fit_schedule`` (the default) the cosine schedule is fitted
to the time left whenever the planned steps would not fit in it (``ScheduleFit``): from the
``FIT_MIN_STEPS``-th timed step of a process on, the schedule's last step is where the remaining time,
less ``FIT_RESERVE`` of the limit, runs out at the mean wall time of the last ``FIT_WINDOW`` steps
(evaluations left out of the mean and added back at their own rate), re-estimated every step and
never beyond the plan (``fitted_total``).  The run then decays to ``min_lr_frac`` x lr and ends inside
the limit instead of being cut at a high learning rate ("budgeted training", Li et al. 2020).  A run
that fits its plan is untouched, step for step.  The number of steps of a fitted run depends on the
machine's speed, so two runs agree bit for bit only when neither was fitted (``fit_schedule=false``
or ``time_limit_min=0`` for a run that must); the checkpoint records ``steps`` and
``planned_steps``.  The limit still stops any run that overruns it (``stopped_early``).

Weight averaging: with ``ema_decay`` = d > 0 the run keeps an exponential moving average of the weights
(Polyak averaging; ``WeightAverage``), bias-corrected so that after t steps it is the average of the
weights after every step so far, the one s steps back weighted by d^s (no warm-up constant: the first
update copies, the second averages two).  The in-training and final open-loop evaluations and
``<out>/final`` then hold the average; the trainer checkpoints hold both (the average in ``extra``, so a
resumed run goes on with it bit for bit).  Measured in docs/LOG.md (2026-12-07).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from roadloop.config import resolve_device, to_dict
from roadloop.data.dataset import RASTER_MODES, DemoTensors, load_demos, stream_epoch_order
from roadloop.errors import ConfigError, RoadloopError
from roadloop.eval.openloop import model_inputs, openloop_metrics
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import VLAConfig, VLAModel, param_count, save_checkpoint
from roadloop.reasoning.checks import decision_spans
from roadloop.train.checkpointing import GoodState, NonFiniteError, check_finite, save_train_state
from roadloop.train.run import adamw, begin_run, cosine_lr, open_run_dir, restore

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast pays."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(f()) for f in checks if f is not None)


def resolve_precision(precision: str, device: str) -> str:
    """``fp32`` or ``bf16`` for ``precision`` (``auto``: bf16 on a CPU with native bf16, else fp32) on ``device``."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else "fp32"


def step_loss(model: VLAModel, batch: dict, precision: str, action_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``model.loss(batch)`` as a training step computes it: under bfloat16 autocast on the model's
    device type when ``precision`` (resolved, ``resolve_precision``) is bf16."""
    with torch.autocast(model.device.type, torch.bfloat16, enabled=precision == "bf16"):
        return model.loss(batch, action_weight=action_weight)


@dataclass
class ModelSpec:
    preset: str = "default"  # tiny / default / large (VLAConfig.preset)
    dropout: float = 0.0
    stem: str | None = None  # vision stem, "patch" or "conv" (VLAConfig.stem); None: the preset's
    patch: int | None = None  # px per vision token side (VLAConfig.patch: 8 -> 64 tokens, 16 -> 16); None: preset's


@dataclass
class ILConfig:
    data: str = "~/.roadloop/data/demos"  # demonstration directory (roadloop data collect); several: a,b
    val_data: str | None = None  # held-out demonstrations (e.g. the val suites); None: split of ``data``
    val_fraction: float = 0.1  # share of ``data``'s scenarios held out when val_data is None
    out: str = "~/.roadloop/runs/il"
    model: ModelSpec = field(default_factory=ModelSpec)
    epochs: float = 5.5  # fits time_limit_min on a 2-core CPU with bf16 (docs/LOG.md: 25-28 min)
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_frac: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    action_weight: float = 1.0
    decision_weight: float = 1.0  # weight of the decision phrases' tokens in the text loss (a weighted mean;
    # 1: every token alike).  About 4 of a label's ~20 tokens, the part decision accuracy scores (LOG)
    precision: str = "auto"  # bf16: forward and loss under bfloat16 autocast (weights, optimizer stay fp32);
    # fp32; auto: bf16 on CPUs with native bf16 arithmetic, else fp32 (resolve_precision)
    data_loading: str = "memory"  # memory: all rasters in RAM (213 KB a sample); stream: read shard by shard
    stream_window: int = 16  # stream: shards shuffled together (this many + 2 stay in memory), family-stratified
    time_limit_min: float = 29.0  # stop early (with a checkpoint) past this wall time; <= 0: none
    fit_schedule: bool = True  # shorten the cosine schedule to the steps the time limit leaves (module docstring)
    log_every: int = 25
    ckpt_every: int = 250
    eval_every: int = 1000  # open-loop metrics on eval_samples held-out samples; 0: only at the end
    eval_samples: int = 256
    final_eval_samples: int = 1024  # open-loop metrics of the final model on this many held-out samples; 0: none
    eval_k: int = 6
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (CUDA when available)
    max_bad_steps: int = 20
    ema_decay: float = 0.0  # weight average (module docstring): per-step decay d in [0, 1); 0: off
    track: bool = True
    experiment: str = "roadloop-il"

    def validate(self) -> ILConfig:
        for name in ("batch_size", "log_every", "ckpt_every", "eval_samples", "max_bad_steps", "stream_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"il.{name} must be >= 1, got {getattr(self, name)}")
        if self.final_eval_samples < 0:
            raise ConfigError(f"il.final_eval_samples must be >= 0 (0: no final open-loop evaluation), "
                              f"got {self.final_eval_samples}")
        if not self.epochs > 0 or not self.lr > 0:
            raise ConfigError(f"il.epochs and il.lr must be > 0, got {self.epochs}, {self.lr}")
        if not self.decision_weight > 0:
            raise ConfigError(f"il.decision_weight must be > 0, got {self.decision_weight}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"il.ema_decay must be in [0, 1) (0: no weight average), got {self.ema_decay}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"il.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.data_loading not in RASTER_MODES:
            raise ConfigError(f"il.data_loading must be one of {', '.join(RASTER_MODES)}, got {self.data_loading!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"il.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        resolve_device(self.device, "il.device")
        try:
            self.model_config()
        except RoadloopError as e:
            raise ConfigError(f"il.model: {e}") from e
        return self

    def model_config(self) -> VLAConfig:
        """The model this run trains: the preset with ``model``'s overrides, validated."""
        over = {"dropout": self.model.dropout, "stem": self.model.stem, "patch": self.model.patch}
        return VLAConfig(**{**to_dict(VLAConfig.preset(self.model.preset)),
                            **{k: v for k, v in over.items() if v is not None}}).validate()


@dataclass
class TokenizedDemos:
    """Demonstrations + their model targets (text ids (N, L), action bins (N, n_action, 2)) and, with
    a decision weight, the text tokens' loss weights (N, L)."""

    demos: DemoTensors
    text: torch.Tensor
    actions: torch.Tensor
    text_weight: torch.Tensor | None = None

    @staticmethod
    def build(demos: DemoTensors, cfg: VLAConfig, decision_weight: float = 1.0) -> TokenizedDemos:
        w = None
        if decision_weight != 1.0:
            w = tok.span_weights(demos.text, [decision_spans(t) for t in demos.text], cfg.max_text_len,
                                 decision_weight)
        return TokenizedDemos(demos, tok.encode_batch(demos.text, cfg.max_text_len),
                              tok.quantize_controls(demos.controls, cfg.action_chunk), w)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model batch (teacher forcing) of the samples ``idx``."""
        out = {**model_inputs(self.demos, idx), "text": self.text[idx], "actions": self.actions[idx]}
        if self.text_weight is not None:
            out["text_weight"] = self.text_weight[idx]
        return out


def load_expert_demos(data: str, vcfg: VLAConfig, key: str, rasters: str = "memory", cache_shards: int = 16
                      ) -> DemoTensors:
    """Expert demonstrations for a post-training rehearsal (``key``, e.g. ``road.expert_data``, names the
    config entry in errors): one or more collections (comma-separated), non-empty, with the rasters
    ``vcfg`` reads (``load_demos``'s ``rasters`` / ``cache_shards``)."""
    try:
        demos = load_demos(data, rasters=rasters, cache_shards=cache_shards)
    except RoadloopError as err:
        raise RoadloopError(f"{key} {data}: {err}") from None
    if len(demos) == 0:
        raise RoadloopError(f"{key} {data}: no demonstrations")
    check_demo_raster(demos, vcfg, f"{key} {data}")
    return demos


def check_demo_raster(demos: DemoTensors, vcfg: VLAConfig, where: str) -> None:
    """``RoadloopError`` (prefixed ``where``) unless ``demos``' rasters are the ones the model ``vcfg`` reads:
    the same shape (frames, channels, H, W) and the same geometry (m per pixel, share behind the ego), so that
    a model never learns from, or is scored on, a view it does not see when it drives."""
    F, C, H, W = demos.raster.shape[1:]
    if (F, C, H, W) != (vcfg.frames, vcfg.raster_channels, vcfg.raster_size, vcfg.raster_size):
        raise RoadloopError(f"{where}: rasters are {F} frames x {C} channels x {H} x {W} but the model reads "
                            f"{vcfg.frames} x {vcfg.raster_channels} x {vcfg.raster_size} x {vcfg.raster_size}")
    want = vcfg.raster_config().geometry()
    got = demos.raster_geometry
    if any(abs(float(got[k]) - float(want[k])) > 1e-9 for k in ("resolution", "ego_offset")):
        raise RoadloopError(f"{where}: rasters recorded at {got['resolution']} m/px with {got['ego_offset']} of the "
                            f"image behind the ego, but the model reads {want['resolution']} m/px and "
                            f"{want['ego_offset']}; collect the demonstrations with the model's raster "
                            f"(roadloop data collect --raster-resolution / --raster-ego-offset)")


def data_model_config(vcfg: VLAConfig, demos: DemoTensors) -> VLAConfig:
    """``vcfg`` reading the raster ``demos`` were recorded with (its size and geometry; ``RoadloopError`` if
    the frame count differs): imitation learns the view its demonstrations hold."""
    g = demos.raster_geometry
    if int(g["frames"]) != vcfg.frames:
        raise RoadloopError(f"the demonstrations hold {g['frames']} raster frames, the model reads {vcfg.frames}")
    try:
        return dataclasses.replace(vcfg, raster_size=int(g["size"]), raster_resolution=float(g["resolution"]),
                                   raster_ego_offset=float(g["ego_offset"])).validate()
    except (TypeError, ValueError) as err:
        raise RoadloopError(f"the demonstrations' raster {g} does not fit the model: {err}") from None


class ExpertStream:
    """Expert demonstrations read as an endless sequence of shuffled passes, streamed shard by shard
    (``stream_epoch_order`` with ``window`` shards at a time; ``window + 2`` stay in memory), for a
    rehearsal loss during post-training (GRPO's ``ptx_coef``).  ``take(pos, n)`` is a pure function of
    (collections, seed, window, pos), so a trainer that checkpoints its position resumes the sequence."""

    def __init__(self, data: str, vcfg: VLAConfig, seed: int, window: int = 4, key: str = "expert_data"):
        if window < 1:
            raise ConfigError(f"{key}: the stream window must be >= 1 shard, got {window}")
        demos = load_expert_demos(data, vcfg, key, rasters="stream", cache_shards=window + 2)
        self.tok = TokenizedDemos.build(demos, vcfg)
        self.seed, self.window = seed, window
        self.content_hash = demos.content_hash
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.tok.demos)

    def order(self, epoch: int) -> torch.Tensor:
        """(N,) sample order of pass ``epoch`` (this pass and the one before are cached)."""
        if epoch not in self._orders:
            n = len(self)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = stream_epoch_order(self.tok.demos, torch.arange(n), self.seed, epoch, self.window)
        return self._orders[epoch]

    def take(self, pos: int, n: int) -> dict[str, torch.Tensor]:
        """Teacher-forcing model batch of the ``n`` samples at positions ``pos`` .. ``pos + n - 1`` of the
        sequence (position p is sample ``order(p // N)[p % N]``)."""
        N = len(self)
        p = torch.arange(pos, pos + n, dtype=torch.int64)
        idx = torch.empty(n, dtype=torch.int64)
        for e in torch.unique(p // N).tolist():
            m = p // N == e
            idx[m] = self.order(int(e))[p[m] % N]
        return self.tok.batch(idx)


def lr_at(step: int, total: int, cfg: ILConfig) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_frac`` x lr at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cosine_lr(cfg.lr, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps), cfg.min_lr_frac)


FIT_SKIP_STEPS = 5  # steps at the start of a process left out of the timing (allocation, first batches)
FIT_MIN_STEPS = 20  # steps timed before the schedule may be fitted to the time limit
FIT_WINDOW = 100  # the steps left are priced at the mean time of this many recent steps
FIT_RESERVE = 0.03  # share of the time limit the fitted schedule leaves unplanned


def fitted_total(step: int, planned: int, step_s: float, left_s: float) -> int:
    """The schedule's last step when ``left_s`` seconds remain at ``step_s`` seconds a step: ``step``
    + the steps that fit, at least ``step + 1``, at most ``planned`` (also when ``step_s`` is unknown)."""
    if not (step_s > 0 and math.isfinite(step_s)):
        return planned
    return min(planned, max(step + 1, step + int(max(left_s, 0.0) / step_s)))


class ScheduleFit:
    """Fits an imitation run's schedule to its time limit (module docstring).  ``update`` after every
    step returns the schedule's last step; ``paused`` reports an evaluation's time and how many steps
    apart evaluations recur, so its cost is priced per step rather than as slow steps."""

    def __init__(self, planned: int, limit_s: float, clock: Callable[[], float], t0: float):
        self.planned, self.limit_s, self.clock, self.t0 = planned, limit_s, clock, t0  # t0: the limit's start
        self.times: deque[float] = deque(maxlen=FIT_WINDOW)
        self.skip = FIT_SKIP_STEPS
        self.last: float | None = None
        self.pause = 0.0  # seconds of evaluation since the last step
        self.eval_per_step = 0.0  # seconds

    def paused(self, seconds: float, every: int) -> None:
        self.pause += seconds
        self.eval_per_step = seconds / max(1, every)

    def update(self, step: int, total: int) -> int:
        """The schedule's last step after ``step`` steps (``total`` until enough steps are timed)."""
        now = self.clock()
        if self.last is not None and self.skip <= 0:
            self.times.append(now - self.last - self.pause)
        self.skip -= 1
        self.last, self.pause = now, 0.0
        if len(self.times) < FIT_MIN_STEPS:
            return total
        step_s = sum(self.times) / len(self.times) + self.eval_per_step
        return fitted_total(step, self.planned, step_s, self.limit_s * (1 - FIT_RESERVE) - (now - self.t0))


def _ema_update(decay: float, avg: list[torch.Tensor], cur: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
    """One bias-corrected EMA step (``AveragedModel``'s ``multi_avg_fn``): after t = n_averaged + 1 updates
    avg = sum_s d^(t-s) w_s / sum_s d^(t-s), i.e. lerp(avg, w_t, (1 - d) / (1 - d^t))."""
    t = int(n_averaged) + 1
    torch._foreach_lerp_(avg, cur, (1.0 - decay) / (1.0 - decay ** t))


class WeightAverage:
    """Exponential moving average of a model's parameters (module docstring), on
    ``torch.optim.swa_utils.AveragedModel``; ``model`` is the averaged copy, ``update()`` after each
    optimizer step, ``state_dict()`` / ``load_state_dict()`` for trainer checkpoints."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self._avg = AveragedModel(model, multi_avg_fn=partial(_ema_update, decay), use_buffers=False)
        self._src = model

    @property
    def model(self) -> torch.nn.Module:
        """The averaged model (same class and config as the trained one)."""
        return self._avg.module

    @property
    def updates(self) -> int:
        return int(self._avg.n_averaged)

    def update(self) -> None:
        self._avg.update_parameters(self._src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._avg.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._avg.load_state_dict(state)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (a pure function of seed and epoch, so resuming replays it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


@dataclass
class ILResult:
    checkpoint: Path
    steps: int
    seconds: float
    samples_per_s: float
    metrics: dict[str, float]
    run_id: str
    stopped_early: bool
    planned_steps: int = 0  # the steps of the configured schedule (``steps`` is smaller when it was fitted)


def train_il(cfg: ILConfig, resume: bool = False, on_progress: Callable[[int, int, dict], None] | None = None,
             log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> ILResult:
    """Train (or resume) an imitation run; see the module docstring.  Returns where the model went.

    ``clock``: the wall clock (seconds) the time limit and the fitted schedule read."""
    cfg.validate()
    t_start = clock()
    run_dir, prev = open_run_dir(cfg.out, resume)
    stream = cfg.data_loading == "stream"
    train_all = load_demos(cfg.data, rasters=cfg.data_loading, cache_shards=cfg.stream_window + 2)
    vcfg = data_model_config(cfg.model_config(), train_all)
    check_demo_raster(train_all, vcfg, cfg.data)
    rc = vcfg.raster_config()
    if rc != VLAConfig().raster_config():
        log(f"the demonstrations' raster: {rc.size} px at {rc.resolution} m/px, {rc.ahead:.1f} m ahead of the ego")
    if prev and prev.get("dataset") != train_all.content_hash:
        raise RoadloopError(f"{cfg.data}: dataset hash {train_all.content_hash[:12]} differs from the one this run "
                            f"started on ({str(prev.get('dataset'))[:12]}); not resuming on other data")
    data = TokenizedDemos.build(train_all, vcfg, cfg.decision_weight)
    if cfg.val_data:
        val = load_demos(cfg.val_data, rasters=cfg.data_loading, cache_shards=cfg.stream_window + 2)
        check_demo_raster(val, vcfg, f"il.val_data {cfg.val_data}")
        train_idx = torch.arange(len(train_all))
        val_idx = torch.arange(len(val))
    else:
        val = train_all
        train_idx, val_idx = train_all.split(cfg.val_fraction)
    if train_idx.numel() == 0 or val_idx.numel() == 0:
        raise RoadloopError(f"need both training and held-out samples, got {train_idx.numel()} / {val_idx.numel()}")
    g = torch.Generator().manual_seed(cfg.seed)
    ev_idx = val_idx[torch.randperm(val_idx.numel(), generator=g)[:cfg.eval_samples]]
    fin_idx = val_idx[torch.randperm(val_idx.numel(), generator=g)[:cfg.final_eval_samples]]
    if stream:  # evaluation in index order, so that each batch reads one or two shards (the same samples)
        ev_idx, fin_idx = ev_idx.sort().values, fin_idx.sort().values
        log(f"streaming rasters from {len(train_all.raster.paths)} shards, {cfg.stream_window} at a time")

    def order_of(epoch: int) -> torch.Tensor:
        if stream:
            return stream_epoch_order(train_all, train_idx, cfg.seed, epoch, cfg.stream_window)
        return epoch_order(train_idx.numel(), cfg.seed, epoch)

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, "il.device")
    precision = resolve_precision(cfg.precision, device)
    model = VLAModel(vcfg).to(device).train()
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = max(1, train_idx.numel() // cfg.batch_size)
    total = planned = max(1, int(round(cfg.epochs * steps_per_epoch)))
    step, elapsed, state = restore(run_dir, model, opt, resume, "step", total, log)
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if state is not None:
        saved = state["extra"].get("ema_decay", 0.0)
        if saved != cfg.ema_decay:
            raise ConfigError(f"{run_dir}: the run was checkpointed with il.ema_decay={saved}, this config has "
                              f"{cfg.ema_decay}; resume with the same weight average")
        if ema is not None:
            ema.load_state_dict(state["extra"]["ema"])

    def extra() -> dict:
        out = {"elapsed": clock() - t0, "total": total}
        return out if ema is None else {**out, "ema_decay": cfg.ema_decay, "ema": ema.state_dict()}

    eval_model = model if ema is None else ema.model  # what the evaluations and ``final`` hold
    fit = cfg.fit_schedule and cfg.time_limit_min > 0
    if state is not None and fit:  # a schedule fitted before the interruption goes on as fitted
        total = max(step, min(total, int(state["extra"].get("total", total))))
        if total != planned:
            log(f"the schedule goes on as fitted before the interruption: {total} of {planned} planned steps")
    tracker, _ = begin_run(cfg, run_dir, prev, {"dataset": train_all.content_hash, "val_dataset": val.content_hash})
    with tracker:
        if state is None:
            tracker.log_params({"il": to_dict(cfg), "model": to_dict(vcfg), "params": param_count(model),
                                "dataset": train_all.content_hash, "val_dataset": val.content_hash,
                                "n_train": int(train_idx.numel()), "n_val": int(val_idx.numel()),
                                "precision": precision})
        good = GoodState(model, opt)
        good.snapshot(step)
        bad_run = 0
        t0 = clock() - elapsed
        seen = 0
        tick = clock()
        fitter = ScheduleFit(planned, 60 * cfg.time_limit_min, clock, t0) if fit else None
        stopped_early = False
        order, order_epoch = torch.empty(0, dtype=torch.int64), -1
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = order_of(epoch), epoch
            bi = train_idx[order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step, total, cfg)
            out = step_loss(model, data.batch(bi), precision, cfg.action_weight)
            opt.zero_grad(set_to_none=True)
            try:
                check_finite(out["loss"], model)
                out["loss"].backward()
                check_finite(out["loss"], model)
            except NonFiniteError as e:
                bad_run += 1
                good.restore()
                log(f"step {step}: {e}; restored the last good state ({bad_run} in a row)")
                tracker.log_metrics({"nonfinite_steps": good.restores}, step)
                if bad_run >= cfg.max_bad_steps:
                    raise RoadloopError(f"{bad_run} non-finite steps in a row at step {step}: stopping "
                                        f"(last good checkpoint in {run_dir})") from e
                step += 1
                continue
            bad_run = 0
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update()
            step += 1
            seen += bi.numel()
            if fitter is not None and step < total:
                new_total = fitter.update(step, total)
                if new_total < planned and total == planned:
                    log(f"step {step}: the {planned} planned steps do not fit in the {cfg.time_limit_min} min "
                        f"limit; cosine schedule fitted to {new_total} steps (re-fitted as the run goes)")
                total = new_total
            if step % cfg.log_every == 0 or step == total:
                now = clock()
                sps = seen / max(now - tick, 1e-9)
                seen, tick = 0, now
                m = {"loss": float(out["loss"].detach()), "text_loss": float(out["text_loss"].detach()),
                     "action_loss": float(out["action_loss"].detach()), "lr": opt.param_groups[0]["lr"],
                     "grad_norm": float(gnorm), "samples_per_s": sps}
                if total < planned:
                    m["schedule_steps"] = total
                tracker.log_metrics(m, step)
                if on_progress:
                    on_progress(step, total, m)
            if step % cfg.ckpt_every == 0 or step == total:
                good.snapshot(step)
                save_train_state(run_dir, step, model, opt, extra=extra(), keep=2)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                te = clock()
                om = openloop_metrics(eval_model, val, ev_idx, k=cfg.eval_k, seed=cfg.seed)
                if fitter is not None:
                    fitter.paused(clock() - te, cfg.eval_every)
                tracker.log_metrics({f"val/{k}": v for k, v in om.items()}, step)
                log(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in om.items() if k != "n"))
            if cfg.time_limit_min > 0 and clock() - t0 > 60 * cfg.time_limit_min and step < total:
                log(f"time limit {cfg.time_limit_min} min reached at step {step}/{total}: stopping")
                save_train_state(run_dir, step, model, opt, extra=extra(), keep=2)
                stopped_early = True
                break
        train_s = clock() - t0
        om = openloop_metrics(eval_model, val, fin_idx, k=cfg.eval_k, seed=cfg.seed) if cfg.final_eval_samples else {}
        tracker.log_metrics({f"val/{k}": v for k, v in om.items()}, step)
        sps = step * cfg.batch_size / max(train_s, 1e-9)
        final = save_checkpoint(eval_model.eval(), run_dir / "final",
                                extra={"dataset": train_all.content_hash, "val_dataset": val.content_hash,
                                       "trainer": "il", "steps": step, "planned_steps": planned,
                                       "weights": "last" if ema is None else
                                       f"ema {cfg.ema_decay} over {ema.updates} steps",
                                       "run_id": tracker.run_id, "precision": precision,
                                       "train_seconds": round(train_s, 1), "openloop": om, "config": to_dict(cfg)})
        tracker.log_metrics({"train_seconds": train_s, "samples_per_s_mean": sps}, step)
        tracker.set_tags({"checkpoint": str(final), "stopped_early": stopped_early})
    fitted = (f", the schedule fitted to the time limit ({planned} planned)"
              if step < planned and not stopped_early else "")
    log(f"trained {step} steps in {train_s / 60:.1f} min ({sps:.0f} samples/s){fitted} -> {final} "
        f"(total {(clock() - t_start) / 60:.1f} min)")
    return ILResult(final, step, train_s, sps, om, tracker.run_id, stopped_early, planned)


__all__ = ["PRECISIONS", "ExpertStream", "ILConfig", "ILResult", "ModelSpec", "ScheduleFit", "TokenizedDemos",
           "WeightAverage", "cpu_has_native_bf16", "epoch_order", "fitted_total", "load_expert_demos", "lr_at",
           "resolve_precision", "step_loss", "train_il"]
