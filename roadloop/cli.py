"""The ``roadloop`` command-line program (typer + rich)."""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from roadloop.errors import ConfigError, RoadloopError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="roadloop: closed-loop post-training of autonomous-driving policies.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput benchmarks.")
scen_app = typer.Typer(no_args_is_help=True, help="Scenario suites: list, build, import.")
app.add_typer(bench_app, name="bench")
app.add_typer(scen_app, name="scenarios")
console = Console()
if not console.is_terminal:  # piped / CI output: don't squeeze tables to 80 columns
    console = Console(width=140)
err_console = Console(stderr=True)
_DEVICE_HELP = "Where the model runs: cpu, cuda, cuda:N or auto (CUDA when available); the simulator stays on the CPU."


@app.callback()
def _main(threads: int = typer.Option(0, "--threads", envvar="ROADLOOP_THREADS",
                                      help="Torch intra-op threads (0: torch's default, one per core). "
                                           "Use 1 on a busy machine: idle threads spin-wait.")) -> None:
    """roadloop: closed-loop post-training of autonomous-driving policies."""
    if threads < 0:
        raise typer.BadParameter("--threads must be >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)


def friendly(fn):
    """Turn roadloop errors into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except RoadloopError as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=False)


@bench_app.command("sim")
@friendly
def bench_sim(json_path: Path = typer.Option(None, "--json", help="Write results as JSON here."),
              batch: str = typer.Option("1,64,1024", help="Comma-separated batch sizes."),
              steps: int = typer.Option(0, help="Steps per batch size (0: automatic)."),
              agents: int = typer.Option(32, help="Agents per scenario (ego included).")) -> None:
    """Simulator throughput with every check on: agent-steps/s, scenario-steps/s, peak memory."""
    import torch

    from roadloop.bench import run_sim_bench

    sizes = [int(x) for x in batch.split(",") if x.strip()]
    table = Table(title=f"roadloop bench sim ({agents} agents/scenario, all checks on, "
                  f"{torch.get_num_threads()} threads)")
    for c in ("batch", "steps", "agent-steps/s", "scenario-steps/s", "peak RSS MB"):
        table.add_column(c, justify="right")
    results = []
    for b in sizes:
        n = steps or max(20, min(300, int(20000 / b)))
        r = run_sim_bench(b, steps=n, agents=agents)
        results.append(r)
        table.add_row(str(b), str(n), f"{r.agent_steps_per_s:,.0f}", f"{r.scenario_steps_per_s:,.0f}",
                      f"{r.peak_rss_mb:,.0f}")
    console.print(table)
    if json_path:
        from roadloop.io import atomic_write_text

        out = {"agents": agents, "threads": torch.get_num_threads(),
               "agent_steps_per_s": {str(r.batch): r.agent_steps_per_s for r in results},
               "scenario_steps_per_s": {str(r.batch): r.scenario_steps_per_s for r in results},
               "peak_rss_mb": {str(r.batch): r.peak_rss_mb for r in results}}
        atomic_write_text(json_path, json.dumps(out, indent=2))


def _bench_model(policy: str | None, preset: str, device: str = "cpu"):
    """(VLA model on ``device``, description) for a bench: the checkpoint ``policy``, else an untrained
    ``preset`` (seed 0)."""
    import torch

    from roadloop.config import resolve_device
    from roadloop.policies.vla.model import VLAConfig, VLAModel, load_checkpoint

    device = resolve_device(device, "--device")
    if policy:
        return load_checkpoint(policy, device)[0], f"{policy} on {device}"
    torch.manual_seed(0)
    return VLAModel(VLAConfig.preset(preset)).to(device), f"untrained '{preset}' on {device}"


@bench_app.command("vla")
@friendly
def bench_vla(policy: str = typer.Option(None, help="VLA checkpoint directory (default: an untrained model)."),
              preset: str = typer.Option("default", help="Model preset when no checkpoint is given."),
              batch: str = typer.Option("1,16,64", help="Comma-separated batch sizes."),
              repeats: int = typer.Option(30, help="Timed calls per batch size (after 5 untimed ones)."),
              device: str = typer.Option("cpu", help=_DEVICE_HELP),
              json_path: Path = typer.Option(None, "--json", help="Write results as JSON here.")) -> None:
    """Decision latency (batch 1) and batched throughput of the VLA policy: raster + reasoning + trajectory."""
    import torch

    from roadloop.bench import run_vla_bench
    from roadloop.policies.vla.model import param_count
    from roadloop.policies.vla.policy import VLAPolicy

    model, what = _bench_model(policy, preset, device)
    pol = VLAPolicy(model)
    if not policy:
        what += f" (text runs to the {model.cfg.max_text_len}-token cap)"
    table = Table(title=f"roadloop bench vla: {what}, {param_count(pol.model) / 1e6:.2f}M params, "
                  f"{torch.get_num_threads()} threads")
    for c in ("batch", "latency ms (median)", "p90 ms", "decisions/s", "text tokens"):
        table.add_column(c, justify="right")
    results = []
    for b in [int(x) for x in batch.split(",") if x.strip()]:
        r = run_vla_bench(pol, b, repeats=repeats)
        results.append(r)
        table.add_row(str(b), f"{r.latency_ms:.1f}", f"{r.p90_ms:.1f}", f"{r.decisions_per_s:.1f}",
                      f"{r.text_tokens:.1f}")
    console.print(table)
    if json_path:
        from dataclasses import asdict

        from roadloop.io import atomic_write_text

        atomic_write_text(json_path, json.dumps({"policy": what, "device": str(pol.model.device),
                                                 "threads": torch.get_num_threads(),
                                                 "results": [asdict(r) for r in results]}, indent=2))


@bench_app.command("grpo")
@friendly
def bench_grpo(policy: str = typer.Option(None, help="VLA checkpoint directory (default: an untrained model)."),
               preset: str = typer.Option("default", help="Model preset when no checkpoint is given."),
               suites: str = typer.Option("train", help="Scenario suites (names or directories) to draw from."),
               scenarios: int = typer.Option(8, help="Scenarios per iteration (grpo.scenarios_per_iter)."),
               group: int = typer.Option(8, help="Rollouts per scenario (grpo.group_size)."),
               max_decisions: int = typer.Option(512, help="Decisions the learner trains on (grpo.max_decisions)."),
               epochs: int = typer.Option(2, help="PPO epochs per update (grpo.ppo_epochs)."),
               minibatch: int = typer.Option(64, help="Decisions per gradient step (grpo.minibatch_size)."),
               trainable: str = typer.Option("all,top:1", help="Comma-separated grpo.trainable specs to time."),
               random_start: bool = typer.Option(True, help="Start at a random point of the logs (grpo.random_start)."),
               repeats: int = typer.Option(3, help="Timed updates per setting (interleaved; the median is shown)."),
               device: str = typer.Option("cpu", help=_DEVICE_HELP),
               json_path: Path = typer.Option(None, "--json", help="Write results as JSON here.")) -> None:
    """GRPO iteration cost: one collection (env steps/s), then the learner's update on it (learner samples/s)
    for each trainable subset, with and without the frozen lower blocks cached."""
    import torch

    from roadloop.bench import run_grpo_bench
    from roadloop.config import resolve_device
    from roadloop.train.grpo import GRPOConfig
    from roadloop.train.run import load_pool

    device = resolve_device(device, "--device")
    specs = [s.strip() for s in trainable.split(",") if s.strip()]
    if not specs or repeats < 1:
        raise ConfigError("bench grpo: --trainable needs at least one spec and --repeats at least 1")
    for spec in specs:
        GRPOConfig(init="bench", trainable=spec).validate()
    cfg = GRPOConfig(init="bench", suites=suites, scenarios_per_iter=scenarios, group_size=group,
                     max_decisions=max_decisions, ppo_epochs=epochs, minibatch_size=minibatch,
                     random_start=random_start, device=device).validate()
    model, what = _bench_model(policy, preset, device)
    pool, _ = load_pool(suites)
    collect, results = run_grpo_bench(model, pool, cfg, specs, repeats)
    console.print(f"collection: {collect.rollouts} rollouts ({scenarios} x {group}), {collect.decisions} decisions, "
                  f"{collect.env_steps} env steps in {collect.seconds:.1f} s ({collect.env_steps_per_s:,.0f} "
                  f"env steps/s)")
    table = Table(title=f"roadloop bench grpo: {what}, {torch.get_num_threads()} threads")
    for c in ("trainable", "lower blocks cached", "trainable params", "samples", "learn s (median)", "samples/s",
              "iteration s"):
        table.add_column(c, justify="right")
    for r in results:
        table.add_row(r.trainable, str(r.lower_layers) if r.cached else "no", f"{r.trainable_params / 1e6:.2f}M",
                      str(r.samples), f"{r.learn_s:.2f}", f"{r.samples_per_s:.1f}", f"{r.iteration_s:.1f}")
    console.print(table)
    if json_path:
        from dataclasses import asdict

        from roadloop.io import atomic_write_text

        atomic_write_text(json_path, json.dumps({"policy": what, "suites": suites, "device": device,
                                                 "threads": torch.get_num_threads(),
                                                 "collect": asdict(collect),
                                                 "results": [asdict(r) for r in results]}, indent=2))


def _fmt(mean: float, ci=None, pct: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f(mean) if ci is None else f"{f(mean)} [{f(ci[0])}, {f(ci[1])}]"


def _fmt_change(change: float, halfwidth: float, pct: bool = False) -> str:
    """A paired change with its 95% half-width: ``+0.053 ± 0.036``, or in points (``-11.7 ± 5.0 pp``)."""
    k, d, unit = (100.0, 1, " pp") if pct else (1.0, 3, "")
    return f"{k * change:+.{d}f} ± {k * halfwidth:.{d}f}{unit}"


@bench_app.command("il")
@friendly
def bench_il(data: str = typer.Option(..., "--data", help="Demonstrations to draw the batches from (their first "
                                      "1,024 decisions)."),
             patches: str = typer.Option("8,16", help="Vision-token sizes to time (VLAConfig.patch: 8 -> 64 tokens, "
                                         "16 -> 16)."),
             precisions: str = typer.Option("fp32,bf16", help="Precisions to time (il.precision: fp32, bf16, auto)."),
             layouts: str = typer.Option("channels_last", help="Raster memory layouts to time (the vision stem runs "
                                         "in its input's): channels_last (as the trainers decode) and / or nchw."),
             preset: str = typer.Option("default", help="Model preset the sizes modify."),
             steps: int = typer.Option(10, help="Timed training steps per round."),
             repeats: int = typer.Option(3, help="Rounds per setting, interleaved (median shown)."),
             batch_size: int = typer.Option(64, help="Decisions per step (il.batch_size)."),
             device: str = typer.Option("cpu", help=_DEVICE_HELP),
             json_path: Path = typer.Option(None, "--json", help="Write results as JSON here.")) -> None:
    """Imitation training step (forward, backward, AdamW) per vision-token count, precision and stem layout:
    samples/s."""
    import torch

    from roadloop.bench import run_il_bench

    if steps < 1 or repeats < 1 or batch_size < 1:
        raise RoadloopError(f"--steps, --repeats and --batch-size must be >= 1, got {steps}, {repeats}, {batch_size}")
    try:
        sizes = [int(x) for x in patches.split(",") if x.strip()]
    except ValueError as e:
        raise RoadloopError(f"--patches must be comma-separated integers, got {patches!r}") from e
    precs = [x.strip() for x in precisions.split(",") if x.strip()]
    lays = tuple(x.strip() for x in layouts.split(",") if x.strip())
    if not sizes or not precs or not lays:
        raise RoadloopError(f"give at least one --patches, --precisions and --layouts value, got {patches!r}, "
                            f"{precisions!r}, {layouts!r}")
    results = run_il_bench(data, sizes, precs, preset=preset, steps=steps, repeats=repeats, batch_size=batch_size,
                           device=device, layouts=lays)
    table = Table(title=f"roadloop bench il: '{preset}' on {device}, batch {batch_size}, {torch.get_num_threads()} "
                  f"threads")
    for c in ("patch", "vision tokens", "sequence", "precision", "stem layout", "params", "ms / step (median)",
              "samples/s"):
        table.add_column(c, justify="right")
    for r in results:
        table.add_row(str(r.patch), str(r.vision_tokens), str(r.seq_len), r.precision, r.layout,
                      f"{r.params / 1e6:.2f}M", f"{r.step_ms:.0f}", f"{r.samples_per_s:.1f}")
    console.print(table)
    if json_path:
        from dataclasses import asdict

        from roadloop.io import atomic_write_text

        atomic_write_text(json_path, json.dumps({"data": data, "preset": preset, "device": device,
                                                 "threads": torch.get_num_threads(), "batch_size": batch_size,
                                                 "results": [asdict(r) for r in results]}, indent=2))


@bench_app.command("data")
@friendly
def bench_data(data: str = typer.Option(..., "--data", help="Demonstration directory, or several joined by commas."),
               modes: str = typer.Option("stream,memory", help="Loading modes to time, in order."),
               batches: int = typer.Option(200, help="Batches of 64 to produce per mode."),
               window: int = typer.Option(16, help="Shards shuffled together when streaming (il.stream_window)."),
               json_path: Path = typer.Option(None, "--json", help="Write results as JSON here.")) -> None:
    """Imitation data loading: decoded raster batches/s and memory, rasters in memory vs streamed from shards."""
    import torch

    from roadloop.bench import run_data_bench

    table = Table(title=f"roadloop bench data: {data}, {torch.get_num_threads()} threads")
    for c in ("mode", "decisions", "load s", "ms / batch of 64", "samples/s", "shards read", "RSS MB"):
        table.add_column(c, justify="right")
    results = []
    for mode in [m.strip() for m in modes.split(",") if m.strip()]:
        r = run_data_bench(data, mode, batches=batches, window=window)
        results.append(r)
        table.add_row(mode, f"{r.samples:,}", f"{r.load_s:.1f}", f"{r.batch_s_ms:.1f}", f"{r.samples_per_s:,.0f}",
                      str(r.shard_loads), f"{r.rss_mb:,.0f}")
    console.print(table)
    if json_path:
        from dataclasses import asdict

        from roadloop.io import atomic_write_text

        atomic_write_text(json_path, json.dumps({"data": data, "threads": torch.get_num_threads(),
                                                 "results": [asdict(r) for r in results]}, indent=2))


@app.command("eval")
@friendly
def eval_cmd(policy: str = typer.Option(..., help="Policy name (route-idm, expert) or checkpoint path."),
             suite: str = typer.Option(..., help="Suite name (smoke, train, val, ...) or suite directory."),
             json_path: Path = typer.Option(None, "--json", help="Write the headline JSON here."),
             report: Path = typer.Option(None, "--report", help="Write the HTML report into this folder."),
             seed: int = typer.Option(0, help="Rollout seed (sampling policies)."),
             batch_size: int = typer.Option(64, help="Scenarios simulated together."),
             replan_hz: float = typer.Option(None, help="Replanning rate: 10 or 2 Hz (any divisor of 10); "
                                             "default: the policy's own (10 Hz, 2 Hz for the VLA policy)."),
             temperature: float = typer.Option(None, help="Sampling temperature of a learned policy (0: greedy; "
                                               "default: the policy's own, 1.0 with top-p 0.95)."),
             top_p: float = typer.Option(None, "--top-p", help="Nucleus of a learned policy's sampling, in (0, 1] "
                                         "(default: the policy's own)."),
             traffic: str = typer.Option("sim", help="Who moves the other agents: 'sim' (roadloop's traffic "
                                         "models) or 'sumo' (live SUMO co-simulation; SUMO suites only)."),
             agents: str = typer.Option("log", help="With --traffic sim: 'log' (each agent's own model, log "
                                        "replay for recorded traffic) or 'idm' (vehicles with a path become "
                                        "reactive IDM agents)."),
             device: str = typer.Option("cpu", help=_DEVICE_HELP)) -> None:
    """Closed-loop evaluation of a policy on a suite; prints the per-family matrix."""
    from roadloop.eval.evaluate import evaluate, write_json
    from roadloop.policies import get_policy
    from roadloop.rollout import RolloutConfig
    from roadloop.sim.backend import with_agent_model

    pol = get_policy(policy, device=device)
    pol.set_decoding("--temperature" if temperature is not None else "--top-p", temperature=temperature, top_p=top_p)
    every = pol.replan_every if replan_hz is None else _replan_every(replan_hz)
    if traffic not in ("sim", "sumo"):
        raise RoadloopError(f"--traffic must be 'sim' or 'sumo', got '{traffic}'")
    if traffic == "sumo" and agents != "log":
        raise RoadloopError("--agents applies to --traffic sim (with --traffic sumo, SUMO moves every agent)")
    s = _load_any_suite(suite)
    scenarios = [with_agent_model(sc, agents) for sc in s.scenarios]
    backend = None
    if traffic == "sumo":
        from roadloop.sumo.cosim import CosimSpec, SumoCosim

        for sc in scenarios:  # fail early, naming the scenario, if one cannot be co-simulated
            CosimSpec.from_meta(sc.meta)
        backend = SumoCosim()
    mode = "" if traffic == "sim" and agents == "log" else f" [{traffic} traffic, {agents} agents]"
    with progress() as prog:
        task = prog.add_task(f"eval {pol.name} on {s.name}{mode}", total=len(s.scenarios))
        rep, kept = evaluate(pol, scenarios, suite_name=s.name, suite_hash=s.content_hash, seed=seed,
                             batch_size=batch_size, cfg=RolloutConfig(replan_every=every),
                             on_batch=lambda n: prog.advance(task, n), keep_rollouts=report is not None,
                             record=backend is None and agents == "log", traffic=backend)
    rep.extra.update(traffic=traffic, agents=agents)
    _print_report(rep)
    if json_path:
        write_json(rep, str(json_path))
        console.print(f"wrote {json_path}")
    if report:
        from roadloop.eval.html import write_report

        path = write_report(rep, kept, report)
        console.print(f"wrote {path}")


_OPENLOOP_COLS = (("min_ade", "minADE_k m", False), ("decision_acc", "decision acc.", True),
                  ("grounding", "grounding", True), ("consistency", "consistency", True))  # all metrics: --json


@app.command("eval-openloop")
@friendly
def eval_openloop_cmd(policy: str = typer.Option(..., help="VLA checkpoint directory (e.g. <il run>/final)."),
                      data: str = typer.Option(..., "--data", help="Held-out demonstrations (roadloop data "
                                               "collect --suites val,sumo-real-val); several: a,b."),
                      samples: int = typer.Option(0, help="Score a seeded random subset of this many decisions "
                                                  "(0: all of them)."),
                      k: int = typer.Option(6, help="Sampled plans per decision for minADE_k / minFDE_k."),
                      temperature: float = typer.Option(1.0, help="Sampling temperature of the k plans."),
                      top_p: float = typer.Option(0.95, help="Nucleus of the k sampled plans."),
                      seed: int = typer.Option(0, help="Seed of the subset and of the sampled plans."),
                      batch_size: int = typer.Option(64, help="Decisions decoded together."),
                      device: str = typer.Option("cpu", help=_DEVICE_HELP),
                      json_path: Path = typer.Option(None, "--json", help="Write the summary JSON here.")) -> None:
    """Open-loop metrics of a VLA checkpoint on held-out demonstrations, with 95% CIs (bootstrap over
    scenarios), overall and per family: minADE_6 / minFDE_6, decision accuracy, grounding, consistency."""
    import torch

    from roadloop.config import resolve_device
    from roadloop.data.dataset import load_demos
    from roadloop.eval.openloop import openloop_samples, summarize_openloop
    from roadloop.io import atomic_write_text
    from roadloop.policies.vla.model import load_checkpoint
    from roadloop.train.il import check_demo_raster

    if k < 0 or samples < 0 or batch_size < 1:
        raise RoadloopError(f"--k and --samples must be >= 0 and --batch-size >= 1, got {k}, {samples}, {batch_size}")
    if not 0 < top_p <= 1 or not temperature >= 0:
        raise RoadloopError(f"--top-p must be in (0, 1] and --temperature >= 0, got {top_p}, {temperature}")
    model, _ = load_checkpoint(policy, resolve_device(device, "--device"))
    demos = load_demos(data, rasters="stream")  # index order reads each shard once: rasters stay small
    check_demo_raster(demos, model.cfg, f"{data} (checkpoint {policy})")
    n = len(demos)
    idx = torch.arange(n)
    if 0 < samples < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    with progress() as prog:
        task = prog.add_task(f"open loop on {idx.numel():,} decisions", total=idx.numel())
        per = openloop_samples(model, demos, idx, k=k, temperature=temperature, top_p=top_p, seed=seed,
                               batch_size=batch_size, on_batch=lambda b: prog.advance(task, b))
    sel = idx.tolist()
    summ = summarize_openloop(per, [demos.scenario_id[i] for i in sel], [demos.family[i] for i in sel], seed=seed)
    table = Table(title=f"open loop: {policy} on {data} ({summ['n_samples']:,} decisions, "
                  f"{summ['n_scenarios']} scenarios; [95% CI], bootstrap over scenarios)")
    table.add_column("family", no_wrap=True)
    table.add_column("n", justify="right")
    for _, title, _ in _OPENLOOP_COLS:
        table.add_column(title, justify="right")
    rows = [("all", summ["overall"])] + sorted(summ["per_family"].items())
    for i, (name, block) in enumerate(rows):
        cells = [_fmt(block[key]["mean"], block[key]["ci"] if i == 0 else None, pct) for key, _, pct in _OPENLOOP_COLS]
        table.add_row(name, str(block["ade"]["n"]), *cells, end_section=i == 0)
    console.print(table)
    if json_path:
        doc = {"policy": str(policy), "data": data, "content_hash": demos.content_hash, "k": k,
               "temperature": temperature, "top_p": top_p, "seed": seed, **summ}
        atomic_write_text(json_path, json.dumps(doc, indent=2))
        console.print(f"wrote {json_path}")


@app.command("compare")
@friendly
def compare_cmd(before: str = typer.Argument(..., help="Evaluation JSON(s) of the reference policy (roadloop eval "
                                             "--json); several suites: a.json,b.json."),
                after: str = typer.Argument(..., help="Evaluation JSON(s) of the candidate, same suites and seeds."),
                json_path: Path = typer.Option(None, "--json", help="Write the rows as JSON here."),
                by_family: bool = typer.Option(False, "--by-family", help="Also the score and incident changes "
                                               "within each scenario family.")) -> None:
    """Paired comparison of two policies' closed-loop evaluations: per metric, the change over the rollouts
    both drove (same scenario, same seed) with its 95% interval (clustered by scenario: seeds of one scenario
    are not independent); a change whose interval holds 0 is noise."""
    from roadloop.eval.compare import MIN_FAMILY_PAIRS, compare_by_family, compare_reports, load_reports, rows_to_json
    from roadloop.io import atomic_write_text, json_clean

    b, a = load_reports(before), load_reports(after)
    rows = compare_reports(b, a)
    fam_rows, few = compare_by_family(b, a) if by_family else (None, {})
    names = [", ".join(sorted({r.policy for r in reps})) for reps in (b, a)]
    t = Table(title=f"{names[0]} -> {names[1]} ({rows[0].n} paired rollouts of {rows[0].scenarios} scenarios; 95% "
                    f"intervals of the paired change, clustered by scenario)")
    for c in ("metric", "before", "after", "change", "relative", "verdict"):
        t.add_column(c, justify="left" if c in ("metric", "verdict") else "right")
    for r in rows:
        pct = r.kind == "rate" or r.metric.startswith("reasoning")
        style = {"better": "green", "worse": "red"}.get(r.verdict, "")
        t.add_row(r.metric, _fmt(r.before, pct=pct), _fmt(r.after, pct=pct), _fmt_change(r.change, r.halfwidth, pct),
                  f"{100 * r.relative:+.0f}%" if math.isfinite(r.relative) else "-",
                  f"[{style}]{r.verdict}[/]" if style else r.verdict)
    console.print(t)
    if fam_rows:
        ft = Table(title="per family (paired rollouts; 95% intervals)")
        for c in ("family", "n", "score", "score change", "incident", "incident change"):
            ft.add_column(c, justify="left" if c == "family" else "right")

        def cell(r) -> tuple[str, str]:
            pct = r.kind == "rate"
            style = {"better": "green", "worse": "red"}.get(r.verdict, "")
            ch = _fmt_change(r.change, r.halfwidth, pct)
            return f"{_fmt(r.before, pct=pct)} -> {_fmt(r.after, pct=pct)}", f"[{style}]{ch}[/]" if style else ch

        for f, rs in fam_rows.items():
            by = {r.metric: r for r in rs}
            cells = [x for m in ("score", "incident") for x in (cell(by[m]) if m in by else ("-", "-"))]
            ft.add_row(f, str(rs[0].n), *cells)
        console.print(ft)
    if few:
        console.print(f"per family: fewer than {MIN_FAMILY_PAIRS} pairs, left out: "
                      + ", ".join(f"{f} ({n})" for f, n in few.items()))
    if json_path:
        doc = rows_to_json(rows, b, a, fam_rows)
        atomic_write_text(json_path, json.dumps(json_clean(doc), indent=2))  # NaN -> null
        console.print(f"wrote {json_path}")


_PROBE_COLS = (("reward", "training reward", "up"), ("drive_reward", "driving part", "up"), ("score", "score", "up"),
               ("incident", "incident", "rate"), ("collision_at_fault", "at-fault coll.", "rate"),
               ("offroad", "off-road", "rate"))


@app.command("probe")
@friendly
def probe_cmd(policies: list[str] = typer.Argument(..., help="VLA checkpoints; the others are paired with the "
                                                   "first."),
              config: list[Path] = typer.Option(None, "--config", help="GRPO config file(s) whose reward, starts and "
                                                "sampling to use, e.g. a run's RUN/config.yaml."),
              set_: list[str] = typer.Option(None, "--set", help="GRPO config override key=value (repeatable)."),
              suites: str = typer.Option(None, help="Training suites (default: the config's grpo.suites)."),
              batches: int = typer.Option(8, help="Fixed collections (scenarios x group rollouts each)."),
              scenarios: int = typer.Option(8, help="Scenarios per collection."),
              group: int = typer.Option(8, help="Rollouts per scenario."),
              device: str = typer.Option("cpu", help=_DEVICE_HELP),
              json_path: Path = typer.Option(None, "--json", help="Write means, per-rollout values and changes "
                                             "here.")) -> None:
    """GRPO's training reward of checkpoints on one fixed sample of the training distribution (the same
    scenarios, starts and seeds for every checkpoint): did post-training raise what it was trained on?
    Changes against the first checkpoint with 95% intervals over the scenario groups."""
    from dataclasses import replace

    from roadloop.config import load_config, resolve_device
    from roadloop.eval.compare import grouped_change, verdict
    from roadloop.io import atomic_write_text, json_clean
    from roadloop.policies.vla.model import load_checkpoint
    from roadloop.train.grpo import PROBE_SEED, GRPOConfig, probe_rollouts
    from roadloop.train.run import load_pool

    if batches < 1 or scenarios < 1:
        raise ConfigError(f"--batches and --scenarios must be >= 1, got {batches}, {scenarios}")
    device = resolve_device(device, "--device")
    cfg = load_config(GRPOConfig, list(set_ or []) + ["init=probe"], list(config or []))
    cfg = replace(cfg, suites=suites or cfg.suites, scenarios_per_iter=scenarios, group_size=group,
                  probe_batches=batches, device=device).validate()
    pool, hashes = load_pool(cfg.suites, cfg.families, cfg.max_scenarios)
    models = [load_checkpoint(p, device)[0] for p in policies]  # every checkpoint checked before any rollout
    runs = []
    with progress() as prog:
        task = prog.add_task(f"probe: {len(policies)} x {batches * scenarios * group} rollouts", total=len(policies))
        for p, model in zip(policies, models, strict=True):
            runs.append((p, probe_rollouts(model, pool, cfg)))
            prog.advance(task)
    t = Table(title=f"probe: {batches} x {scenarios} scenarios x {group} rollouts of {cfg.suites} (seed "
              f"{PROBE_SEED}); changes against {policies[0]} with 95% intervals over the {batches * scenarios} "
              f"scenario groups")
    t.add_column("policy", no_wrap=True)
    for _, title, _ in _PROBE_COLS:
        t.add_column(title, justify="right")
    doc = {"suites": cfg.suites, "suite_hashes": hashes, "batches": batches, "scenarios": scenarios, "group": group,
           "seed": PROBE_SEED, "reward": cfg.reward.weights(), "policies": []}
    ref = runs[0][1]
    for i, (p, r) in enumerate(runs):
        means = {k: float(r[k].nanmean()) for k, _, _ in _PROBE_COLS}
        entry = {"policy": p, "means": means, "rollouts": {k: v.tolist() for k, v in r.items()}}
        cells = [_fmt(means[k], pct=kind == "rate") for k, _, kind in _PROBE_COLS]
        if i:
            entry["changes"] = {}
            for j, (k, _, kind) in enumerate(_PROBE_COLS):
                ch, hw, n = grouped_change(ref[k].tolist(), r[k].tolist(), group)
                v = verdict(ch, hw, kind) if n >= 2 else "too few groups"
                entry["changes"][k] = {"change": ch, "halfwidth": hw, "groups": n, "verdict": v}
                style = {"better": "green", "worse": "red"}.get(v, "")
                txt = _fmt_change(ch, hw, kind == "rate")
                cells[j] += f"\n[{style}]{txt}[/]" if style else f"\n{txt}"
        t.add_row(p, *cells, end_section=True)
        doc["policies"].append(entry)
    console.print(t)
    if json_path:
        atomic_write_text(json_path, json.dumps(json_clean(doc), indent=2))
        console.print(f"wrote {json_path}")


def _replan_every(replan_hz: float) -> int:
    every = round(10.0 / replan_hz) if replan_hz > 0 else 0
    if every < 1 or abs(10.0 / every - replan_hz) > 1e-6:
        raise RoadloopError(f"--replan-hz must divide 10 Hz (10, 5, 2, 1...), got {replan_hz}")
    return every


def _print_report(rep) -> None:
    t = Table(title=f"{rep.policy} on {rep.suite} ({len(rep.rollouts)} rollouts, {rep.n_failed} failed, "
              f"{rep.seconds:.1f} s)")
    for c in ("family", "n", "score", "at-fault coll.", "off-road", "progress", "nuPlan"):
        t.add_column(c, justify="right" if c != "family" else "left")
    rows = list(rep.per_family.items()) + [("ALL", rep.overall)]
    for fam, m in rows:
        t.add_row(fam, str(m["score"].n), _fmt(m["score"].mean, m["score"].ci),
                  _fmt(m["collision_at_fault"].mean, pct=True), _fmt(m["offroad"].mean, pct=True),
                  _fmt(m["progress"].mean), _fmt(m["nuplan_score"].mean))
    console.print(t)
    fails = [r for r in rep.rollouts if r.failed]
    for r in fails[:10]:
        console.print(f"[yellow]failed[/] {r.rollout_id}: {r.fail_reason}")


@app.command("replay")
@friendly
def replay_cmd(rollout_id: str = typer.Argument(..., help="e.g. 'cut_in/000003#0@expert@1' (listed in eval reports)"),
               gif: Path = typer.Option(None, "--gif", help="Also export the replayed rollout as GIF/MP4.")) -> None:
    """Re-run a recorded rollout and check that it is bit-identical."""
    from roadloop.eval.replay import replay

    res = replay(rollout_id)
    if res.identical:
        console.print(f"[green]identical[/] {rollout_id} (sha256 {res.replayed[:16]})")
    else:
        console.print(f"[red]DIFFERENT[/] {rollout_id}: recorded {res.recorded[:16]}, replayed {res.replayed[:16]}")
    if gif:
        from roadloop.eval.export import export_rollout
        from roadloop.eval.replay import find
        from roadloop.scenarios.suites import load_suite
        from roadloop.sim.batching import collate

        rec, row = find(rollout_id)
        by_id = {s.meta.scenario_id: s for s in load_suite(rec.suite).scenarios}
        export_rollout(res.rollout, collate([by_id[i] for i in rec.scenario_ids]), row, gif)
        console.print(f"wrote {gif}")
    if not res.identical:
        raise typer.Exit(1)


@scen_app.command("list")
@friendly
def scen_list() -> None:
    """List the procedural families and the named suites."""
    from roadloop.scenarios.families import FAMILIES
    from roadloop.scenarios.suites import list_suites

    t = Table(title="families")
    t.add_column("name")
    t.add_column("description")
    for name, spec in FAMILIES.items():
        t.add_row(name, spec.description)
    console.print(t)
    console.print("suites: " + ", ".join(list_suites()))
    from roadloop.sumo.suite import SUMO_SUITES

    console.print("SUMO suites (real road networks, built on first use): " + ", ".join(SUMO_SUITES))


@scen_app.command("build")
@friendly
def scen_build(suite: str, out: Path = typer.Option(..., help="Directory to write the suite to.")) -> None:
    """Build (or load) a suite and save it in the on-disk format."""
    from roadloop.scenarios.suites import save_suite

    s = _load_any_suite(suite)
    save_suite(s, out)
    console.print(f"{s.name}: {len(s.scenarios)} scenarios, hash {s.content_hash[:16]} -> {out}")


def _load_any_suite(name_or_dir: str):
    """A suite directory, a named procedural suite or a named SUMO suite (``sumo-real``...)."""
    from roadloop.scenarios.suites import load_suite
    from roadloop.sumo.suite import SUMO_SUITES, load_sumo_suite

    if name_or_dir in SUMO_SUITES and not Path(name_or_dir).is_dir():
        return load_sumo_suite(name_or_dir)
    return load_suite(name_or_dir)


@scen_app.command("import-sumo")
@friendly
def scen_import_sumo(net: Path = typer.Argument(..., help="SUMO network (.net.xml or .net.xml.gz)."),
                     trips: list[Path] = typer.Option(None, "--trips", help="Trip/route file(s) for SUMO "
                                                      "(repeatable); default: seeded random trips."),
                     n: int = typer.Option(12, "--n", help="Scenarios to cut (one ego vehicle each)."),
                     out: Path = typer.Option(None, "--out", help="Suite directory (default: ./<network>-suite)."),
                     seed: int = typer.Option(0, help="Seed of SUMO, the random trips and the ego choice."),
                     additional: list[Path] = typer.Option(None, "--additional",
                                                           help="SUMO additional file(s): vtypes, signal plans."),
                     warmup: float = typer.Option(90.0, help="Seconds SUMO runs before recording."),
                     seconds: float = typer.Option(180.0, help="Seconds of traffic recorded."),
                     name: str = typer.Option(None, help="Network name (default: from the file name).")) -> None:
    """Build a scenario suite from any SUMO network: import, simulate traffic, cut, save."""
    import time

    from roadloop.errors import ScenarioError
    from roadloop.scenarios.suites import Suite, save_suite
    from roadloop.sumo.suite import build_sumo_suite, get_network

    t0 = time.perf_counter()
    rnet = get_network(str(net), name)
    rep = rnet.report
    console.print(f"imported {rep.summary()}")
    for why, k in sorted(rep.skipped.items()):
        console.print(f"  skipped {k} lanes: {why}")
    for w in rep.warnings[:5]:
        console.print(f"  [yellow]warning[/] {w}")
    rejected: list[tuple[str, str]] = []
    scs = build_sumo_suite(str(net), [str(t) for t in trips] if trips else None, n=n, seed=seed,
                           sim_seconds=seconds, warmup=warmup, additional=[str(a) for a in additional or ()],
                           name=rnet.name, rejected=rejected)
    if not scs:
        raise ScenarioError(f"SUMO network '{net}': no usable ego vehicle in {seconds:.0f} s of traffic (an ego "
                            f"must drive >= 40 m on passenger lanes for 17 s; {len(rejected)} rejected by the "
                            "log checks); try more --seconds or other --trips")
    suite = Suite.of(f"sumo-{rnet.name}", scs)
    d = out or Path(f"{rnet.name}-suite")
    save_suite(suite, d)
    if rejected:
        reasons: dict[str, int] = {}
        for _, why in rejected:
            key = why.split(" at step")[0]
            reasons[key] = reasons.get(key, 0) + 1
        console.print("egos skipped (log fails roadloop's checks): "
                      + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())))
    if len(scs) < n:
        console.print(f"[yellow]only {len(scs)} of {n} scenarios[/]: too few usable ego vehicles")
    console.print(f"{suite.name}: {len(scs)} scenarios, hash {suite.content_hash[:16]} -> {d} "
                  f"({time.perf_counter() - t0:.1f} s)")

# --- demonstrations -------------------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Expert demonstrations for imitation learning: collect, info.")
app.add_typer(data_app, name="data")


@data_app.command("collect")
@friendly
def data_collect(suites: str = typer.Option("train", help="Comma-separated suite names or directories."),
                 out: Path = typer.Option(Path("~/.roadloop/data/demos"), "--out", help="Output directory."),
                 every: int = typer.Option(5, help="Record every N-th simulator step (0.1 s) at decision steps."),
                 replan_hz: float = typer.Option(2.0, "--replan-hz", help="The expert's decision rate (Hz)."),
                 max_scenarios: int = typer.Option(None, "--max-scenarios", help="Only the first N scenarios."),
                 max_steps: int = typer.Option(None, "--max-steps", help="Closed-loop steps per rollout (tests)."),
                 batch_size: int = typer.Option(32, "--batch-size", help="Scenarios per rollout batch (= chunk)."),
                 shard_size: int = typer.Option(512, "--shard-size", help="Samples per shard at most."),
                 raster_resolution: float = typer.Option(0.75, "--raster-resolution",
                                                         help="Raster metres per pixel (64 px a side)."),
                 raster_ego_offset: float = typer.Option(0.15, "--raster-ego-offset",
                                                         help="Share of the raster behind the ego (0.75 m / 0.15: "
                                                              "41 m ahead)."),
                 resume: bool = typer.Option(True, "--resume/--no-resume",
                                             help="Skip chunks already in the manifest.")) -> None:
    """Drive the expert in closed loop and write demonstration shards + manifest.json."""
    import time

    from roadloop.data.collect import collect
    from roadloop.policies.vla.observe import RasterConfig

    try:
        raster = RasterConfig(resolution=raster_resolution, ego_offset=raster_ego_offset)
    except ValueError as err:
        raise RoadloopError(f"--raster-resolution / --raster-ego-offset: {err}") from None

    names = [x.strip() for x in suites.split(",") if x.strip()]
    replan_every = _replan_every(replan_hz)
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("collect", total=None)
        man = collect(names, out.expanduser(), shard_size=shard_size, every=every, max_scenarios=max_scenarios,
                      on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                      resume=resume, batch_size=batch_size, max_steps=max_steps, replan_every=replan_every,
                      raster=raster)
    dt = time.perf_counter() - t0
    console.print(f"{man.n_samples} samples from {man.n_scenarios} scenarios in {len(man.shards)} shards, "
                  f"hash {man.content_hash[:16]} -> {out} ({dt:.1f} s this run, "
                  f"{man.n_samples / max(man.seconds, 1e-9):.1f} samples/s overall)")


@data_app.command("info")
@friendly
def data_info(directory: Path = typer.Argument(..., help="A demonstration directory."),
              verify: bool = typer.Option(False, "--verify", help="Also check every shard's sha256.")) -> None:
    """Summary of a demonstration directory's manifest."""
    from roadloop.data.collect import load_manifest, verify_shard

    man = load_manifest(directory)
    size = sum((directory / s["file"]).stat().st_size for s in man.shards if (directory / s["file"]).is_file())
    if verify:
        for s in man.shards:
            verify_shard(directory, s)
    table = Table(title=f"demonstrations: {directory}")
    table.add_column("field")
    table.add_column("value")
    for k, v in [("suites", ", ".join(f"{n} ({h[:12]})" for n, h in man.suites.items())),
                 ("samples", str(man.n_samples)), ("scenarios", str(man.n_scenarios)),
                 ("chunks", f"{len(man.chunks)} / {man.n_chunks}" + ("" if man.complete else " (incomplete)")),
                 ("shards", str(len(man.shards))), ("size", f"{size / 1e6:.1f} MB"),
                 ("content hash", man.content_hash), ("code version", man.code_version or "-"),
                 ("config", json.dumps(man.config)), ("seconds", f"{man.seconds:.1f}")]:
        table.add_row(k, v)
    console.print(table)
    if verify:
        console.print("all shards match their sha256")


# --- training ---------------------------------------------------------------------------------
train_app = typer.Typer(no_args_is_help=True, help="Training: imitation (il), GRPO, RoaD.")
app.add_typer(train_app, name="train")


@train_app.command("il", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def train_il_cmd(overrides: list[str] = typer.Argument(None, help="Config overrides key=value, e.g. "
                                                       "model.preset=tiny epochs=2 (see roadloop/train/il.py)."),
                 data: str = typer.Option(None, "--data", help="Demonstration directory, or several joined by commas "
                                          "(override 'data')."),
                 val_data: str = typer.Option(None, "--val-data", help="Held-out demonstrations."),
                 out: str = typer.Option(None, "--out", help="Run directory (override 'out')."),
                 config: list[Path] = typer.Option(None, "--config", help="YAML config file(s) merged in order."),
                 resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                             "last checkpoint.")) -> None:
    """Imitation pre-training of the VLA policy on expert demonstrations (MLflow-tracked)."""
    from roadloop.config import load_config
    from roadloop.train.il import ILConfig, train_il

    ov = list(overrides or [])
    ov += [f"{k}={v}" for k, v in (("data", data), ("val_data", val_data), ("out", out)) if v is not None]
    cfg = load_config(ILConfig, ov, list(config or []))
    with progress() as bar:
        task = bar.add_task("train il", total=None)

        def prog(step: int, total: int, m: dict) -> None:
            bar.update(task, completed=step, total=total,
                       description=f"train il  loss {m['loss']:.3f}  {m['samples_per_s']:.0f} samples/s")

        res = train_il(cfg, resume=resume, on_progress=prog, log=lambda msg: bar.console.print(msg))
    how = (" (stopped by the time limit)" if res.stopped_early
           else f" (of {res.planned_steps} planned: schedule fitted to the time limit)"
           if res.steps < res.planned_steps else "")
    t = Table(title=f"imitation: {res.steps} steps{how}, {res.seconds / 60:.1f} min, {res.samples_per_s:.0f} samples/s")
    t.add_column("open-loop metric (held out)")
    t.add_column("value", justify="right")
    for k, v in res.metrics.items():
        t.add_row(k, f"{v:.3f}")
    console.print(t)
    console.print(f"checkpoint: {res.checkpoint}  (MLflow run {res.run_id})")
    console.print(f"next: roadloop eval --policy {res.checkpoint} --suite val")


def _post_training_overrides(overrides, init, out, suites) -> list[str]:
    ov = list(overrides or [])
    return ov + [f"{k}={v}" for k, v in (("init", init), ("out", out), ("suites", suites)) if v is not None]


def _summary_table(title: str, first: dict, last: dict, keys: list[str]) -> Table:
    t = Table(title=title)
    for c in ("metric", "first", "last"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k in keys:
        if k in last:
            t.add_row(k, _fmt(first.get(k, math.nan)), _fmt(last[k]))
    return t


@train_app.command("grpo", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def train_grpo_cmd(overrides: list[str] = typer.Argument(None, help="Config overrides key=value, e.g. "
                                                         "group_size=8 reward.preset=progress_safety "
                                                         "(see roadloop/train/grpo.py)."),
                   init: str = typer.Option(None, "--init", help="VLA checkpoint to start from (override 'init')."),
                   out: str = typer.Option(None, "--out", help="Run directory (override 'out')."),
                   suites: str = typer.Option(None, "--suites", help="Comma-separated training suites."),
                   config: list[Path] = typer.Option(None, "--config", help="YAML config file(s) merged in order."),
                   resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                               "last checkpoint.")) -> None:
    """Closed-loop GRPO post-training of a VLA checkpoint (AlpaGym-style rewards; MLflow-tracked)."""
    from roadloop.config import load_config
    from roadloop.train.grpo import GRPOConfig, train_grpo

    cfg = load_config(GRPOConfig, _post_training_overrides(overrides, init, out, suites), list(config or []))
    with progress() as bar:
        task = bar.add_task("train grpo", total=cfg.iterations)

        def prog(it: int, total: int, m: dict) -> None:
            bar.update(task, completed=it, total=total,
                       description=f"train grpo  reward {m['rollout/reward']:.3f}  score {m['rollout/score']:.3f}  "
                                   f"kl {m.get('loss/kl', math.nan):.4f}  {m['perf/env_steps_per_s']:.0f} env steps/s")

        res = train_grpo(cfg, resume=resume, on_progress=prog, log=lambda msg: bar.console.print(msg))
    first = res.history[0] if res.history else {}
    last = {**(res.history[-1] if res.history else {}), **res.eval}
    keys = ["rollout/reward", "rollout/drive_reward", "rollout/score", "rollout/collision_at_fault",
            "rollout/offroad", "rollout/comfort_violation", "rollout/grounding", "rollout/consistency", "loss/kl",
            "loss/clip_frac", "eval/score", "eval/collision_at_fault", "eval/offroad", "eval/progress"]
    console.print(_summary_table(f"GRPO: {res.iterations} iterations, {res.seconds / 60:.1f} min, "
                                 f"{res.env_steps_per_s:.0f} env steps/s, {res.learner_samples_per_s:.0f} learner "
                                 f"samples/s", first, last, keys))
    console.print(f"checkpoint: {res.checkpoint}  (MLflow run {res.run_id})")
    console.print(f"next: roadloop eval --policy {res.checkpoint} --suite val")


@train_app.command("road", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def train_road_cmd(overrides: list[str] = typer.Argument(None, help="Config overrides key=value, e.g. k=16 "
                                                         "rounds=4 (see roadloop/train/road.py)."),
                   init: str = typer.Option(None, "--init", help="VLA checkpoint to start from (override 'init')."),
                   out: str = typer.Option(None, "--out", help="Run directory (override 'out')."),
                   suites: str = typer.Option(None, "--suites", help="Comma-separated training suites."),
                   config: list[Path] = typer.Option(None, "--config", help="YAML config file(s) merged in order."),
                   resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                               "last checkpoint.")) -> None:
    """RoaD: closed-loop supervised fine-tuning on expert-guided rollouts of the policy itself."""
    from roadloop.config import load_config
    from roadloop.train.road import RoaDConfig, train_road

    cfg = load_config(RoaDConfig, _post_training_overrides(overrides, init, out, suites), list(config or []))
    with progress() as bar:
        task = bar.add_task("train road", total=cfg.rounds)

        def prog(rnd: int, total: int, m: dict) -> None:
            bar.update(task, completed=rnd, total=total,
                       description=f"train road  score {m['road/score']:.3f}  loss {m['road/loss_before']:.3f} -> "
                                   f"{m['road/loss_after']:.3f}")

        res = train_road(cfg, resume=resume, on_progress=prog, log=lambda msg: bar.console.print(msg))
    first = res.history[0] if res.history else {}
    last = {**(res.history[-1] if res.history else {}), **res.eval}
    keys = ["road/score", "road/collision_at_fault", "road/offroad", "road/ade_committed", "road/ade_candidates",
            "road/loss_before", "road/loss_after", "road/demos_total", "eval/score", "eval/collision_at_fault",
            "eval/offroad", "eval/progress"]
    console.print(_summary_table(f"RoaD: {res.rounds} rounds, {res.seconds / 60:.1f} min, "
                                 f"{res.env_steps_per_s:.0f} env steps/s, {res.learner_samples_per_s:.0f} learner "
                                 f"samples/s", first, last, keys))
    console.print(f"checkpoint: {res.checkpoint}  (MLflow run {res.run_id})")
    console.print(f"next: roadloop eval --policy {res.checkpoint} --suite val")


# ---------------------------------------------------------------------------------------------
# release: model registry and safety gates (roadloop/registry, docs/registry.md)

registry_app = typer.Typer(no_args_is_help=True, help="Model registry: register, list, show, promote, rollback, "
                           "audit (MLflow model registry + an append-only audit log).")
app.add_typer(registry_app, name="registry")
_URI_HELP = "MLflow tracking / registry URI (default: $ROADLOOP_TRACKING_URI, else sqlite:///$ROADLOOP_HOME/mlflow.db)."
_DB_HELP = "Registry state database (default: $ROADLOOP_REGISTRY_DB, else registry.db next to a SQLite MLflow store)."


def _registry(uri: str | None, db: Path | None, lock_timeout: float = 30.0):
    from roadloop.registry import Registry

    return Registry(uri, db, lock_timeout=lock_timeout)


def _gate_config(config: list[Path] | None, overrides: list[str] | None, max_per_family: int | None):
    from roadloop.registry import load_gate_config

    ov = list(overrides or [])
    if max_per_family is not None:
        ov.append(f"matrix.max_per_family={max_per_family}")
    return load_gate_config(list(config or []), ov)


def _when(t: float) -> str:
    import time as _time

    return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(t))


def _eval_progress(prog: Progress):
    def start(desc: str, total: int):
        task = prog.add_task(desc, total=total)
        return lambda n: prog.advance(task, n)

    return start


def _print_gates(run) -> None:
    cand = run.candidate
    who = f"{cand['name']}@{cand['version']}" if "version" in cand else cand.get("checkpoint")
    champ = run.champion
    t = Table(title=f"gates: {who} vs champion " + (f"{champ['name']}@{champ['version']}" if champ else "(none)")
              + (" [recorded result reused]" if run.reused else ""))
    for c in ("gate", "result", "details"):
        t.add_column(c)
    for r in run.summary.results:
        t.add_row(r.gate, "[green]pass[/]" if r.passed else "[bold red]FAIL[/]", "; ".join(r.reasons[:4]) +
                  (f" (+{len(r.reasons) - 4} more)" if len(r.reasons) > 4 else ""))
    console.print(t)
    rep = run.candidate_report
    if rep is not None:
        o = rep.overall
        console.print(f"candidate on {rep.suite}: {len(rep.rollouts)} rollouts, score "
                      f"{_fmt(o['score'].mean, o['score'].ci)}, at-fault "
                      f"{_fmt(o['collision_at_fault'].mean, pct=True)}, off-road {_fmt(o['offroad'].mean, pct=True)}")
    console.print("[green]PASSED[/]" if run.passed else f"[bold red]FAILED[/]: {', '.join(run.summary.failed)}")


@app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def demo_cmd(overrides: list[str] = typer.Argument(None, help="Config overrides key=value, e.g. road.rounds=8 "
                                                 "post=[road,grpo] (see roadloop/configs/demo.yaml)."),
             out: Path = typer.Option(Path("roadloop-demo"), "--out", help="Where everything goes (suites, data, "
                                      "runs, MLflow store, registry, report); a re-run reuses what is there."),
             quick: bool = typer.Option(False, "--quick", help="Toy-sized run of every stage (a couple of minutes; "
                                        "for CI and a first look, its numbers mean nothing)."),
             config: list[Path] = typer.Option(None, "--config", help="YAML config file(s) merged in order.")) -> None:
    """The whole loop in one command: suites, expert demonstrations, imitation, closed-loop post-training (RoaD;
    GRPO with post=[road,grpo]), evaluation, gates, promotion and an HTML report (about 15 minutes on a 2-core
    laptop)."""
    from roadloop.demo import Hooks, load_demo_config, run_demo

    cfg = load_demo_config(list(overrides or []) + [f"out={out}"], quick=quick, files=list(config or []))
    t0 = time.perf_counter()
    with progress() as prog:
        def stage_done(st) -> None:
            tag = "[dim]reused[/]" if st.reused else f"{st.seconds:.0f} s"
            prog.console.print(f"[bold green]✓[/] {st.name} ({tag}): {st.detail}")

        res = run_demo(cfg, Hooks(log=lambda m: prog.console.print(f"  [dim]{m}[/]"), bar=_eval_progress(prog),
                                  stage_done=stage_done))
    t = Table(title="held-out scenarios: imitation vs post-trained vs expert")
    for c in ("policy", "score [95% CI]", "at-fault coll.", "off-road", "comfort viol.", "consistency", "grounding"):
        t.add_column(c, justify="left" if c == "policy" else "right")

    def share(st) -> str:
        return "–" if st is None or st.mean != st.mean else f"{st.mean:.2f}"

    for label, rep in res.reports.items():
        o = rep.overall
        t.add_row(label, _fmt(o["score"].mean, o["score"].ci), _fmt(o["collision_at_fault"].mean, pct=True),
                  _fmt(o["offroad"].mean, pct=True), _fmt(o["comfort_violation"].mean, pct=True),
                  share(o.get("reasoning_consistency")), share(o.get("reasoning_grounding")))
    console.print(t)
    console.print("[bold green]post-trained policy promoted[/] (it passed every gate)" if res.promoted else
                  "[bold yellow]post-trained policy not promoted[/]: " + "; ".join(res.gate_reasons[:4]))
    console.print(f"report: [bold]{res.report}[/]   (total {(time.perf_counter() - t0) / 60:.1f} min)")
    console.print(f"next: open the report, or `ROADLOOP_HOME={res.out / 'home'} roadloop registry list`")


@app.command("gate", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def gate_cmd(candidate: str = typer.Argument(..., help="Registered version (NAME@VERSION, VERSION) or a VLA "
                                             "checkpoint folder."),
             overrides: list[str] = typer.Argument(None, help="Gate config overrides key=value, e.g. "
                                                   "matrix.seeds=[0] thresholds.family_score_drop=0.1."),
             config: list[Path] = typer.Option(None, "--config", help="Gate config YAML file(s) (default: "
                                               "roadloop/configs/gates.yaml)."),
             max_per_family: int = typer.Option(None, "--max-per-family", help="Quick run: the first N scenarios "
                                                "of each family per suite (matrix.max_per_family)."),
             name: str = typer.Option("roadloop-vla", "--name", help="Registered model name."),
             json_path: Path = typer.Option(None, "--json", help="Write the gate report (results + both "
                                            "evaluation reports) here; `registry promote --gate-report` takes it."),
             no_record: bool = typer.Option(False, "--no-record", help="Do not record the result in the registry."),
             uri: str = typer.Option(None, "--uri", help=_URI_HELP),
             db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Run the safety gates on the validation matrix: candidate vs the current champion.  Exit 1 if a gate fails."""
    from roadloop.io import atomic_write_text

    cfg = _gate_config(config, overrides, max_per_family)
    reg = _registry(uri, db)
    with progress() as prog:
        run = reg.gate(candidate, cfg, name=name, record=not no_record, on_eval=_eval_progress(prog))
    _print_gates(run)
    if json_path:
        atomic_write_text(json_path, json.dumps(run.to_json(), indent=1))
        console.print(f"wrote {json_path}")
    if not run.passed:
        raise typer.Exit(1)


@registry_app.command("register")
@friendly
def registry_register(checkpoint: Path = typer.Argument(..., help="VLA checkpoint folder (model.safetensors + "
                                                        "config.json), e.g. runs/grpo/final."),
                      name: str = typer.Option("roadloop-vla", "--name", help="Registered model name."),
                      lineage: Path = typer.Option(None, "--lineage", help="JSON file with lineage fields (trainer, "
                                                   "config, dataset_hash, suites, parent, run_id...; see "
                                                   "docs/registry.md); config.json's record is used otherwise."),
                      report: list[Path] = typer.Option(None, "--report", help="Evaluation report JSON(s) "
                                                        "(roadloop eval --json) to store with it."),
                      reason: str = typer.Option("", "--reason", help="Why (recorded in the audit log)."),
                      uri: str = typer.Option(None, "--uri", help=_URI_HELP),
                      db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Register a checkpoint as a new candidate version (lineage + SHA-256 manifest); does not promote it."""
    lin = None
    if lineage is not None:
        try:
            lin = json.loads(lineage.read_text())
        except (OSError, ValueError) as e:
            raise RoadloopError(f"--lineage {lineage}: cannot read a JSON object ({e})") from e
        if not isinstance(lin, dict):
            raise RoadloopError(f"--lineage {lineage}: must hold a JSON object")
    mv = _registry(uri, db).register(checkpoint, lin, name=name, reports=list(report or []),
                                     reason=reason or "manual registration")
    missing = mv.lineage.get("missing") or []
    console.print(f"registered [bold]{mv.ref}[/] (weights {mv.weights_sha256[:12]}, manifest "
                  f"{mv.manifest_sha256[:12]})" + (f"; lineage lacks: {', '.join(missing)}" if missing else ""))
    console.print(f"next: roadloop gate {mv.ref}   /   roadloop registry promote {mv.ref}")


@registry_app.command("list")
@friendly
def registry_list(name: str = typer.Option(None, "--name", help="Only this model."),
                  sync: bool = typer.Option(False, "--sync", help="Also point MLflow's 'champion' alias at the "
                                            "champion (the registry database is authoritative)."),
                  uri: str = typer.Option(None, "--uri", help=_URI_HELP),
                  db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Registered versions, the champion (*), and each version's latest gate result."""
    reg = _registry(uri, db)
    names = [name] if name else reg.names()
    if name and not reg.versions(name):
        raise reg._unknown(name)
    if not names:
        console.print(f"the registry {reg.db_path} is empty: roadloop registry register CHECKPOINT")
        return
    for nm in names:
        champ = reg.champion(nm)
        gates = {}
        for g in reg.gate_runs(nm):
            gates[g["candidate"]] = g
        t = Table(title=f"{nm} (champion: {champ.version if champ else 'none'})")
        for c in ("", "version", "registered", "actor", "trainer", "weights", "code", "last gate", "lineage gaps"):
            t.add_column(c)
        for mv in reg.versions(nm):
            code = mv.lineage.get("code") or {}
            commit = (code.get("git_commit") or "?")[:8] + ("+dirty" if code.get("git_dirty") else "")
            g = gates.get(mv.version)
            gate = "-" if g is None else (("pass" if g["passed"] else "FAIL " + ",".join(g["results"]["failed"]))
                                          + f" vs {g['champion'] or 'none'}")
            t.add_row("*" if champ and champ.version == mv.version else "", str(mv.version), _when(mv.registered_at),
                      mv.actor, str(mv.lineage.get("trainer") or "-"), mv.weights_sha256[:12], commit, gate,
                      ", ".join(mv.lineage.get("missing") or []) or "-")
        console.print(t)
        for w in reg.sync_alias(nm) if champ and sync else []:
            err_console.print(f"[yellow]warning:[/] {w}")


@registry_app.command("show")
@friendly
def registry_show(ref: str = typer.Argument("champion", help="NAME@VERSION, VERSION or champion."),
                  name: str = typer.Option("roadloop-vla", "--name", help="Model name for a bare version."),
                  as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
                  uri: str = typer.Option(None, "--uri", help=_URI_HELP),
                  db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """A version's lineage, artifact check, evaluations, gate results and champion history."""
    from dataclasses import asdict

    from roadloop.registry import IntegrityError

    reg = _registry(uri, db)
    mv = reg.resolve(ref, name)
    try:
        path = reg.artifact_dir(mv)
        integrity = f"ok ({path})"
    except IntegrityError as e:
        integrity = f"FAILED: {e}"
    history = [asdict(c) for c in reg.champion_history(mv.name) if c.version == mv.version]
    info = {"ref": mv.ref, "registered_at": _when(mv.registered_at), "actor": mv.actor, "reason": mv.reason,
            "source": mv.source, "weights_sha256": mv.weights_sha256, "manifest_sha256": mv.manifest_sha256,
            "artifacts": integrity, "lineage": mv.lineage, "evaluations": reg.evaluations(mv.name, mv.version),
            "gate_runs": reg.gate_runs(mv.name, mv.version), "champion_history": history}
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    lin = mv.lineage
    code = lin.get("code") or {}
    rows = [("registered", f"{info['registered_at']} by {mv.actor}" + (f" ({mv.reason})" if mv.reason else "")),
            ("artifacts", integrity), ("source", mv.source), ("weights sha256", mv.weights_sha256),
            ("trainer", str(lin.get("trainer"))), ("training run", json.dumps(lin.get("training_run"))),
            ("parent", json.dumps(lin.get("parent"))), ("dataset hash", str(lin.get("dataset_hash"))),
            ("suites", json.dumps(lin.get("suites"))),
            ("code", f"{code.get('git_commit')} dirty={code.get('git_dirty')} "
                     f"sources={str(code.get('source_sha256'))[:12]}"
                     + (f" (captured at {code['captured']})" if code.get("captured") else "")),
            ("config", "recorded" if lin.get("config") else "missing"),
            ("lineage gaps", ", ".join(lin.get("missing") or []) or "none")]
    t = Table(title=mv.ref, show_header=False)
    t.add_column("field")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    for e in lin.get("evaluations") or []:
        console.print(f"report with registration: {e['suite']} n={e['n']} score {_fmt(e['score'])} ({e['file']})")
    for e in info["evaluations"]:
        s = e["summary"]
        console.print(f"evaluation {e['id']} ({_when(e['at'])}): {s.get('suite')} n={s.get('n')} score "
                      f"{_fmt(s.get('score'))} at-fault {_fmt(s.get('collision_at_fault'), pct=True)} off-road "
                      f"{_fmt(s.get('offroad'), pct=True)}")
    for g in info["gate_runs"]:
        console.print(f"gate run {g['id']} ({_when(g['at'])}, {g['origin']}) vs champion {g['champion']}: "
                      + ("[green]pass[/]" if g["passed"] else f"[red]FAIL[/] {', '.join(g['results']['failed'])}"))
    for c in history:
        console.print(f"champion since {_when(c['at'])} ({c['action']}{', FORCED' if c['forced'] else ''}) by "
                      f"{c['actor']}; released for {json.dumps(c['envelope'])}")


@registry_app.command("promote", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly
def registry_promote(ref: str = typer.Argument(..., help="NAME@VERSION or VERSION to make the champion."),
                     overrides: list[str] = typer.Argument(None, help="Gate config overrides key=value."),
                     config: list[Path] = typer.Option(None, "--config", help="Gate config YAML file(s)."),
                     max_per_family: int = typer.Option(None, "--max-per-family",
                                                        help="matrix.max_per_family (quick runs)."),
                     gate_report: Path = typer.Option(None, "--gate-report", help="A fresh `roadloop gate --json` "
                                                      "report for this candidate and champion (else a recorded "
                                                      "result is reused, else the gates run now)."),
                     force: bool = typer.Option(False, "--force", help="Promote even if gates fail (needs "
                                                "--reason; recorded as forced)."),
                     reason: str = typer.Option("", "--reason", help="Why (recorded in the audit log)."),
                     name: str = typer.Option("roadloop-vla", "--name", help="Model name for a bare version."),
                     lock_timeout: float = typer.Option(30.0, "--lock-timeout", help="Seconds to wait for another "
                                                        "writer's lock."),
                     uri: str = typer.Option(None, "--uri", help=_URI_HELP),
                     db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Make a version the champion if every safety gate passes; refuses with the failed gates otherwise (exit 1)."""
    from roadloop.registry import GateFailedError

    cfg = _gate_config(config, overrides, max_per_family)
    reg = _registry(uri, db, lock_timeout)
    try:
        with progress() as prog:
            res = reg.promote(ref, cfg, name=name, gate_report=gate_report, force=force, reason=reason,
                              on_eval=_eval_progress(prog))
    except GateFailedError as e:
        err_console.print(f"[bold red]refused:[/] {e}")
        raise typer.Exit(1) from None
    if res.gate_run is not None:
        _print_gates(res.gate_run)
    c = res.change
    forced = " [bold red](FORCED)[/]" if c.forced else ""
    was = f" (was {c.replaced})" if c.replaced is not None else ""
    console.print(f"[bold green]{c.name}@{c.version} is the champion[/]{forced}{was}; released for "
                  f"{len(c.envelope.get('families', []))} families, maps {', '.join(c.envelope.get('maps', []))}")
    for w in res.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")


@registry_app.command("rollback")
@friendly
def registry_rollback(name: str = typer.Argument("roadloop-vla", help="Registered model name."),
                      reason: str = typer.Option("", "--reason", help="Why (recorded in the audit log)."),
                      lock_timeout: float = typer.Option(30.0, "--lock-timeout", help="Seconds to wait for another "
                                                         "writer's lock."),
                      uri: str = typer.Option(None, "--uri", help=_URI_HELP),
                      db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Make the previous champion the champion again (repeat to walk further back)."""
    res = _registry(uri, db, lock_timeout).rollback(name, reason=reason)
    c = res.change
    console.print(f"[bold]{c.name}@{c.version} is the champion again[/] (rolled back from {c.replaced})")
    for w in res.warnings:
        err_console.print(f"[yellow]warning:[/] {w}")


@registry_app.command("audit")
@friendly
def registry_audit(name: str = typer.Argument(None, help="Only this model."),
                   limit: int = typer.Option(50, "--limit", help="Show the last N entries (0: all)."),
                   verify: bool = typer.Option(False, "--verify", help="Check the audit log's hash chain; exit 1 "
                                               "if broken."),
                   uri: str = typer.Option(None, "--uri", help=_URI_HELP),
                   db: Path = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """The append-only audit log: registrations, gate results, promotions (forced ones marked), rollbacks."""
    reg = _registry(uri, db)
    t = Table(title=f"audit log ({reg.db_path})")
    for c in ("id", "time (UTC)", "actor", "action", "model", "reason / details"):
        t.add_column(c, overflow="fold")
    for a in reg.audit(name, limit or None):
        act = f"[bold red]{a.action}[/]" if a.action in ("promote-forced", "gate-fail", "promote-refused") else a.action
        t.add_row(str(a.id), a.at_iso, a.actor, act, f"{a.name}@{a.version}" if a.version is not None else a.name,
                  a.reason or json.dumps({k: v for k, v in a.details.items() if v not in (None, [], {})})[:200])
    console.print(t)
    if verify:
        problems = reg.verify_audit()
        for p in problems:
            err_console.print(f"[bold red]{p}[/]")
        console.print("[green]audit chain intact[/]" if not problems else "[bold red]audit chain BROKEN[/]")
        if problems:
            raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
