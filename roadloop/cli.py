"""The ``roadloop`` command-line program (typer + rich)."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from roadloop.errors import RoadloopError

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


def _fmt(mean: float, ci=None, pct: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f(mean) if ci is None else f"{f(mean)} [{f(ci[0])}, {f(ci[1])}]"


@app.command("eval")
@friendly
def eval_cmd(policy: str = typer.Option(..., help="Policy name (route-idm, expert) or checkpoint path."),
             suite: str = typer.Option(..., help="Suite name (smoke, train, val, ...) or suite directory."),
             json_path: Path = typer.Option(None, "--json", help="Write the headline JSON here."),
             report: Path = typer.Option(None, "--report", help="Write the HTML report into this folder."),
             seed: int = typer.Option(0, help="Rollout seed (sampling policies)."),
             batch_size: int = typer.Option(64, help="Scenarios simulated together."),
             replan_hz: float = typer.Option(10.0, help="Replanning rate: 10 or 2 Hz (any divisor of 10).")) -> None:
    """Closed-loop evaluation of a policy on a suite; prints the per-family matrix."""
    from roadloop.eval.evaluate import evaluate, write_json
    from roadloop.policies import get_policy
    from roadloop.rollout import RolloutConfig
    from roadloop.scenarios.suites import load_suite

    pol = get_policy(policy)
    every = round(10.0 / replan_hz)
    if every < 1 or abs(10.0 / every - replan_hz) > 1e-6:
        raise RoadloopError(f"--replan-hz must divide 10 Hz (10, 5, 2, 1...), got {replan_hz}")
    s = load_suite(suite)
    with progress() as prog:
        task = prog.add_task(f"eval {pol.name} on {s.name}", total=len(s.scenarios))
        rep, kept = evaluate(pol, s.scenarios, suite_name=s.name, suite_hash=s.content_hash, seed=seed,
                             batch_size=batch_size, cfg=RolloutConfig(replan_every=every),
                             on_batch=lambda n: prog.advance(task, n), keep_rollouts=report is not None,
                             record=True)
    _print_report(rep)
    if json_path:
        write_json(rep, str(json_path))
        console.print(f"wrote {json_path}")
    if report:
        from roadloop.eval.html import write_report

        path = write_report(rep, kept, report)
        console.print(f"wrote {path}")


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


@scen_app.command("build")
@friendly
def scen_build(suite: str, out: Path = typer.Option(..., help="Directory to write the suite to.")) -> None:
    """Build (or load) a suite and save it in the on-disk format."""
    from roadloop.scenarios.suites import load_suite, save_suite

    s = load_suite(suite)
    save_suite(s, out)
    console.print(f"{s.name}: {len(s.scenarios)} scenarios, hash {s.content_hash[:16]} -> {out}")


def main() -> None:  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
