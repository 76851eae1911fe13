"""Benchmarks behind ``roadloop bench``: the simulator (``sim``), the VLA policy (``vla``), the
imitation data loading (``data``), the imitation training step (``il``) and the GRPO learner
(``grpo``, at the end of the file).

Simulator throughput (``roadloop bench sim``).

Scene: a 4-lane, 600 m road with the ego and 31 IDM vehicles (32 agents), a signalised stop
line, every check on (all-pairs collision with broad phase, off-road through the lane index,
wrong way, red light, TTC, progress) and IDM traffic reacting to the ego and each other.  The
ego drives with constant gentle controls so that only the simulator is measured.

Reported per batch size: agent-steps/s (B x A x steps / s), scenario-steps/s and peak RSS.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from roadloop.scenarios.builder import ScenarioBuilder, straight
from roadloop.sim.batching import collate
from roadloop.sim.checks import compute_checks
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import ScenarioMeta, TrafficModel
from roadloop.sim.state import init_state
from roadloop.sim.step import step


def bench_scenario(seed: int, num_agents: int = 32, num_steps: int = 200):
    """A deterministic multi-lane scene with ``num_agents`` agents (agent 0 = ego)."""
    rng = np.random.default_rng(seed)
    b = ScenarioBuilder(num_steps)
    lanes = [b.add_lane(straight((0, 3.5 * i), (600, 3.5 * i), 2), 3.5, 15.0) for i in range(4)]
    for i in range(3):
        b.neighbours(lanes[i], left=lanes[i + 1])
    b.edge_of_lane(lanes[0], "right")
    b.edge_of_lane(lanes[3], "left")
    states = np.full(num_steps, 1, np.int64)
    states[num_steps // 2:] = 3
    b.add_light(states, [lanes[0]])  # a light at the end of lane 0 (turns red halfway)
    b.set_route([lanes[1]])
    b.add_agent([[20.0, 3.5]], 0.0, 10.0)
    slots = [(x, ln) for ln in range(4) for x in np.arange(5.0, 300.0, 9.0) if not (ln == 1 and abs(x - 20) < 10)]
    pick = rng.choice(len(slots), num_agents - 1, replace=False)
    for k in sorted(pick):
        x, ln = slots[k]
        b.add_agent([[x, 3.5 * ln]], 0.0, float(rng.uniform(6, 12)), model=TrafficModel.IDM,
                    path_lanes=[lanes[ln]], desired_speed=float(rng.uniform(9, 14)))
    return b.build(ScenarioMeta(f"bench/{seed:06d}", "bench", seed, "bench", warmup_steps=0))


@dataclass
class BenchResult:
    batch: int
    agents: int
    steps: int
    seconds: float
    agent_steps_per_s: float
    scenario_steps_per_s: float
    peak_rss_mb: float


def run_sim_bench(batch: int, steps: int = 50, agents: int = 32, cfg: SimConfig | None = None,
                  warmup: int = 3) -> BenchResult:
    cfg = cfg or SimConfig()
    uniq = [bench_scenario(s, agents) for s in range(min(batch, 8))]
    batch_sc = collate([uniq[i % len(uniq)] for i in range(batch)])
    state = init_state(batch_sc, cfg)
    controls = torch.tensor([[0.2, 0.0]]).expand(batch, 2).contiguous()
    with torch.inference_mode():
        for _ in range(warmup):
            nxt = step(state, controls, cfg)
            compute_checks(state, nxt, cfg)
        s = state
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = step(s, controls, cfg)
            compute_checks(s, nxt, cfg)
            s = nxt
        dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return BenchResult(batch, agents, steps, dt, batch * agents * steps / dt, batch * steps / dt, rss)


# ---------------------------------------------------------------------------------------------
# VLA policy decision latency / throughput (``roadloop bench vla``)

@dataclass
class VLABenchResult:
    batch: int
    decisions: int
    latency_ms: float  # median wall time of one policy call (raster + reasoning + trajectory)
    p90_ms: float
    decisions_per_s: float  # batch / median latency
    text_tokens: float  # mean generated text tokens per decision


def bench_observation(batch: int):
    """The observation ``roadloop bench vla`` times: ``batch`` rows of the bench scene (``bench_scenario``
    seeds 0-7, 32 agents) after 15 steps, with the 16-step ego history and the recent states."""
    from roadloop.policies.base import Observation

    uniq = [bench_scenario(s, 32) for s in range(min(batch, 8))]
    sc = collate([uniq[i % len(uniq)] for i in range(batch)])
    cfg = SimConfig()
    states = [init_state(sc, cfg)]
    with torch.inference_mode():
        for _ in range(15):
            states.append(step(states[-1], torch.tensor([[0.2, 0.0]]).expand(batch, 2).contiguous(), cfg))
    hist = states[-16:]
    return Observation(state=states[-1], ego_history_xy=torch.stack([h.xy[:, 0] for h in hist], 1),
                       ego_history_yaw=torch.stack([h.yaw[:, 0] for h in hist], 1),
                       ego_history_speed=torch.stack([h.speed[:, 0] for h in hist], 1), step=15, recent=tuple(hist))


def run_vla_bench(policy, batch: int, repeats: int = 30, warmup: int = 5) -> VLABenchResult:
    """Time ``policy.act`` (a ``VLAPolicy``) on the bench scene at batch ``batch``: everything one
    decision needs (BEV raster of 4 frames, ego history, command, CoC text, 16 action tokens)."""
    from roadloop.policies.vla import tokenizer as tok

    obs = bench_observation(batch)
    policy.reset(obs.state, torch.arange(batch))
    times, ntok = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            out = policy.act(obs)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
                ntok += [len(tok.encode(t)) + 1 for t in out.reasoning]
    med = float(np.median(times))
    return VLABenchResult(batch, repeats, 1000 * med, 1000 * float(np.quantile(times, 0.9)), batch / med,
                          float(np.mean(ntok)))


# ---------------------------------------------------------------------------------------------
# Demonstration loading for imitation (``roadloop bench data``)

@dataclass
class DataBenchResult:
    mode: str  # "memory" or "stream" (``roadloop.data.dataset.load_demos``)
    samples: int  # decisions in the collection(s)
    load_s: float  # load_demos wall time
    batches: int
    batch_s_ms: float  # mean wall time to produce one decoded training batch
    samples_per_s: float
    shard_loads: int  # shards decompressed while producing the batches (stream)
    rss_mb: float  # resident memory after the batches (process-wide)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_data_bench(data: str, mode: str, batches: int = 200, batch_size: int = 64, window: int = 16,
                   seed: int = 0) -> DataBenchResult:
    """Produce ``batches`` decoded raster batches in the imitation trainer's sample order
    (``epoch_order`` for memory, ``stream_epoch_order`` for stream) and time them: the data side
    of a training step, without the model."""
    import gc

    from roadloop.data.dataset import load_demos, stream_epoch_order
    from roadloop.train.il import epoch_order

    gc.collect()
    t0 = time.perf_counter()
    demos = load_demos(data, rasters=mode, cache_shards=window + 2)
    load_s = time.perf_counter() - t0
    n = len(demos)
    if mode == "stream":
        order = stream_epoch_order(demos, torch.arange(n), seed, 0, window)
    else:
        order = epoch_order(n, seed, 0)
    batches = max(1, min(batches, n // batch_size))
    t0 = time.perf_counter()
    for i in range(batches):
        demos.bev(order[i * batch_size:(i + 1) * batch_size])
    dt = time.perf_counter() - t0
    loads = demos.raster.loads if mode == "stream" else 0
    rss = _rss_mb()
    del demos
    gc.collect()
    return DataBenchResult(mode, n, load_s, batches, 1000 * dt / batches, batches * batch_size / dt, loads, rss)


# ---------------------------------------------------------------------------------------------
# Imitation: the model side of a training step per vision-token count and precision (``roadloop bench il``)

LAYOUTS = ("channels_last", "nchw")  # the rasters' memory layout, which the vision stem runs in


@dataclass
class ILStepResult:
    patch: int  # VLAConfig.patch: raster px per vision token side
    vision_tokens: int
    seq_len: int
    precision: str  # resolved: fp32 or bf16
    layout: str  # the rasters' memory layout: channels_last (as the trainers decode them) or nchw
    params: int
    step_ms: float  # median wall time of one step (forward, backward, clipping, AdamW) over the rounds
    samples_per_s: float  # batch_size / step_ms


def run_il_bench(data: str, patches: list[int], precisions: list[str], preset: str = "default", steps: int = 10,
                 repeats: int = 3, warmup: int = 2, batch_size: int = 64, device: str = "cpu", seed: int = 0,
                 layouts: tuple[str, ...] = ("channels_last",)) -> list[ILStepResult]:
    """Time ``train_il``'s step (``il.step_loss``, backward, gradient clipping, AdamW) on real
    demonstrations for each (patch, precision, layout), without the data side (``run_data_bench``;
    ``nchw``: the rasters laid out (B, F, C, H, W) in memory, as the trainers decoded them before
    ``decode_raster(..., channels_last=True)`` and as the live policy renders them):
    ``steps + warmup`` batches are drawn from the first 1,024 decisions and assembled once, then
    each setting runs ``warmup`` untimed steps and ``repeats`` timed rounds of ``steps``, the
    rounds interleaved over the settings so that the machine's drift hits all alike.  Each setting
    starts from the same seed.  Raises ``RoadloopError`` for an impossible setting before any
    timing."""
    import dataclasses
    import statistics

    from roadloop.config import resolve_device
    from roadloop.data.dataset import load_demos
    from roadloop.errors import RoadloopError
    from roadloop.policies.vla.model import VLAConfig, VLAModel, param_count
    from roadloop.train.il import PRECISIONS, TokenizedDemos, resolve_precision, step_loss
    from roadloop.train.run import adamw

    dev = resolve_device(device, "--device")
    base = VLAConfig.preset(preset)
    for lay in layouts:
        if lay not in LAYOUTS:
            raise RoadloopError(f"layout must be one of {', '.join(LAYOUTS)}, got {lay!r}")
    settings = []
    for patch in patches:
        cfg = dataclasses.replace(base, patch=patch).validate()
        for prec in precisions:
            if prec not in PRECISIONS:
                raise RoadloopError(f"precision must be one of {', '.join(PRECISIONS)}, got {prec!r}")
            settings += [(cfg, resolve_precision(prec, dev), lay) for lay in layouts]
    demos = load_demos(data, rasters="stream")
    pool = min(len(demos), 1024)
    g = torch.Generator().manual_seed(seed)
    data_t = TokenizedDemos.build(demos, base)
    batches = [data_t.batch(torch.randint(pool, (batch_size,), generator=g)) for _ in range(steps + warmup)]
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    nchw = [{**b, "bev": b["bev"].contiguous()} for b in batches] if "nchw" in layouts else []
    runs = []
    for cfg, prec, lay in settings:
        torch.manual_seed(seed)
        model = VLAModel(cfg).to(dev).train()
        runs.append((model, adamw(model, 1e-3, 0.01), prec, batches if lay == "channels_last" else nchw))

    def one(model, opt, prec: str, batch: dict) -> None:
        loss = step_loss(model, batch, prec)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def sync() -> None:
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize(dev)

    for model, opt, prec, bs in runs:
        for b in bs[:warmup]:
            one(model, opt, prec, b)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(max(1, repeats)):
        for i, (model, opt, prec, bs) in enumerate(runs):
            sync()
            t0 = time.perf_counter()
            for b in bs[warmup:]:
                one(model, opt, prec, b)
            sync()
            times[i].append((time.perf_counter() - t0) / max(1, steps))
    out = []
    for (cfg, prec, lay), (model, *_), ts in zip(settings, runs, times, strict=True):
        step_s = statistics.median(ts)
        out.append(ILStepResult(cfg.patch, cfg.n_patches, cfg.seq_len, prec, lay, param_count(model), 1000 * step_s,
                                batch_size / step_s))
    return out


# ---------------------------------------------------------------------------------------------
# GRPO: one collection, and the learner's update on it per trainable subset (``roadloop bench grpo``)

@dataclass
class GRPOCollectResult:
    rollouts: int  # S x G
    decisions: int  # D x S x G recorded decisions
    env_steps: int  # scenario-steps simulated
    seconds: float  # collection wall time (rollouts, rasters, sampling, rewards)
    env_steps_per_s: float


@dataclass
class GRPOLearnResult:
    trainable: str  # ``GRPOConfig.trainable`` spec
    cached: bool  # the frozen lower blocks' hidden states computed once per update (``frozen_lower_layers``)
    lower_layers: int  # blocks cached (0: full forward passes in every minibatch)
    trainable_params: int
    samples: int  # decisions x PPO epochs per update
    learn_s: float  # median wall time of one ``ppo_update`` (fixed log-probs included)
    samples_per_s: float  # samples / learn_s
    iteration_s: float  # collection + learn_s: one training iteration at these settings


def run_grpo_bench(model, pool: list, cfg, specs: list[str], repeats: int = 3
                   ) -> tuple[GRPOCollectResult, list[GRPOLearnResult]]:
    """Time one GRPO iteration's parts with ``cfg`` (a ``GRPOConfig``): collect iteration 0's groups
    once, then run ``ppo_update`` on that same collection from the same weights for every trainable
    spec in ``specs`` (and, where it leaves lower blocks frozen, both with and without their hidden
    states cached), ``repeats`` rounds interleaved so that the machine's drift hits every setting
    alike.  Raises ``RoadloopError`` for a spec the model cannot take, before any rollout."""
    import copy

    from roadloop.train import grpo

    settings = []
    for spec in specs:
        probe = copy.deepcopy(model)
        n_params = sum(p.numel() for p in probe.trainable_parameters(spec))
        settings += [(spec, False, n_params)] + ([(spec, True, n_params)] if probe.frozen_blocks() > 0 else [])
    model = model.eval()
    ref = copy.deepcopy(model).requires_grad_(False)
    gb = grpo.collect_iteration(model, pool, cfg, 0)
    collect = GRPOCollectResult(gb.batch_size, gb.num_decisions * gb.batch_size, gb.env_steps, gb.seconds,
                                gb.env_steps / max(gb.seconds, 1e-9))
    adv = grpo.decision_advantages(gb, cfg)
    times: dict[tuple[str, bool], list[float]] = {(s, c): [] for s, c, _ in settings}
    samples: dict[tuple[str, bool], int] = {}
    lower_of: dict[tuple[str, bool], int] = {}
    for _ in range(repeats):
        for spec, cached, _n in settings:
            m = copy.deepcopy(model)
            opt = grpo.make_optimizer(m, cfg, spec)
            lower = grpo.frozen_lower_layers(m, ref) if cached else 0
            t0 = time.perf_counter()
            st = grpo.ppo_update(m, ref, opt, gb, adv, cfg, 0, lower)
            times[(spec, cached)].append(time.perf_counter() - t0)
            samples[(spec, cached)] = int(st.get("samples", 0))
            lower_of[(spec, cached)] = lower
    out = []
    for spec, cached, n_params in settings:
        t = float(np.median(times[(spec, cached)]))
        n = samples[(spec, cached)]
        out.append(GRPOLearnResult(spec, cached, lower_of[(spec, cached)], n_params, n, t, n / max(t, 1e-9),
                                   collect.seconds + t))
    return collect, out
