"""``roadloop demo``: the whole closed loop in one command, on the embedded default.

Stages (each reused on a re-run when its inputs' content hashes match, see ``Stage``):

1. **Scenario suites**: ``demo-train`` (the first ``train_per_family`` scenarios of every procedural
   family of ``train`` + ``sumo-real-train``) and ``demo-val`` (the first ``val_per_family`` of
   ``val`` + ``sumo-real-val``: held out, disjoint seeds and SUMO vehicles), saved as suites.
2. **Demonstrations**: the privileged expert drives ``demo-train``; observations, commands, plans and
   Chain-of-Causation labels at 2 Hz (``roadloop.data.collect``).
3. **Imitation**: ``train_il`` (``il.*`` in the config).
4. **Closed-loop post-training** from the imitation checkpoint on ``demo-train``: the methods of ``post``
   in order, each from the previous one's checkpoint: ``road`` (RoaD, rollouts as demonstrations,
   ``road.*``; the default) and ``grpo`` (closed-loop GRPO, ``grpo.*``).  At the demo's scale one
   GRPO run moves the policy about as much as its own noise does, while RoaD improved it in every
   run measured (docs/LOG.md), so the default is ``[road]``; ``post=[road,grpo]`` or ``post=[grpo]``
   run GRPO.
5. **Evaluation** of the expert, the imitation and the post-trained policies on ``demo-val``
   (``eval_seeds``): the registry's validation matrix, so the gates reuse it.  The expert draws
   nothing at random, so it drives each scenario once (``Policy.seed_independent``).
6. **Gates and promotion**: the imitation checkpoint is registered and promoted as the first
   champion; the post-trained one is registered and promoted only if every gate passes against it.
7. **Report**: ``<out>/report/index.html`` (``roadloop.eval.demo_report``): before/after table,
   curves, per-family matrix, gate decision, and the held-out rollouts whose outcome post-training
   changed, replayed side by side with their reasoning.

Everything goes under ``out``: suites, demonstrations, runs, the MLflow store and the registry
(``<out>/home``, i.e. ``ROADLOOP_HOME``), the scenario cache (``<out>/cache``) and the report.  A
stage's key hashes its configuration and the content hashes of its inputs; an interrupted training
stage resumes from its last checkpoint.  ``roadloop/configs/demo.yaml`` is the default
configuration, ``demo-quick.yaml`` the CI-sized one (``--quick``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadloop.config import to_dict
from roadloop.errors import ConfigError, RoadloopError
from roadloop.io import atomic_write_text
from roadloop.registry.lineage import canonical_sha256
from roadloop.train.grpo import GRPOConfig
from roadloop.train.il import ILConfig
from roadloop.train.road import RoaDConfig

STAGE_FILE = "demo-stage.json"
MODEL_NAME = "roadloop-vla"


@dataclass(frozen=True)
class PostMethod:
    """A closed-loop post-training method of ``DemoConfig.post``; its settings are the ``DemoConfig`` field of
    the same name."""

    title: str  # the stage's name
    short: str  # its progress bar's name
    unit: str  # what the config and the trainer's result count: rounds / iterations
    size: Callable[[Any], str]  # the work of one unit, from the config


POST_METHODS = {
    "road": PostMethod("RoaD (rollouts as demonstrations)", "RoaD", "rounds",
                       lambda c: f"{c.scenarios_per_round} scenarios x {c.k} candidates a decision"),
    "grpo": PostMethod("closed-loop GRPO", "GRPO", "iterations",
                       lambda c: f"{c.scenarios_per_iter} scenarios x {c.group_size} rollouts"),
}


@dataclass
class DemoConfig:
    out: str = "roadloop-demo"
    train_per_family: int = 8  # procedural scenarios per family in demo-train (from `train`)
    val_per_family: int = 6  # ... in demo-val (from `val`)
    sumo: bool = True  # add sumo-real-train / sumo-real-val (real road networks, SUMO traffic)
    max_steps: int | None = None  # closed-loop steps per demonstration rollout (None: whole log)
    il: ILConfig = field(default_factory=ILConfig)
    post: list[str] = field(default_factory=lambda: ["road"])  # closed-loop post-training, in order: road, grpo
    road: RoaDConfig = field(default_factory=RoaDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1])  # held-out rollouts = scenarios x seeds
    gate_overrides: list[str] = field(default_factory=list)  # GateConfig key=value on top of the demo matrix
    pairs: int = 4  # changed-outcome rollouts replayed side by side in the report
    threads: int = 0  # torch threads (0: leave as set)

    def validate(self) -> DemoConfig:
        if self.train_per_family < 1 or self.val_per_family < 1:
            raise ConfigError(f"demo.train_per_family and demo.val_per_family must be >= 1, got "
                              f"{self.train_per_family}, {self.val_per_family}")
        if not self.eval_seeds:
            raise ConfigError("demo.eval_seeds must hold at least one seed")
        if self.pairs < 0:
            raise ConfigError(f"demo.pairs must be >= 0, got {self.pairs}")
        bad = [m for m in self.post if m not in POST_METHODS]
        if not self.post or bad or len(set(self.post)) != len(self.post):
            raise ConfigError(f"demo.post must list post-training methods, each once, from {', '.join(POST_METHODS)} "
                              f"(run in order, each from the previous checkpoint); got {list(self.post)}")
        self.il.validate()
        return self


def load_demo_config(overrides: list[str] | tuple = (), quick: bool = False,
                     files: list[str | Path] | tuple = ()) -> DemoConfig:
    """``demo.yaml`` (+ ``demo-quick.yaml`` when ``quick``) + ``files`` + ``key=value`` overrides."""
    from roadloop.config import load_config

    return load_config(DemoConfig, list(overrides), ["demo.yaml"] + (["demo-quick.yaml"] if quick else [])
                       + list(files))


# ---------------------------------------------------------------------------------------------
# stages


@dataclass
class Stage:
    """One stage's record: how long it took, whether it was reused, one line on what it made."""

    name: str
    seconds: float = 0.0
    reused: bool = False
    detail: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 1), "reused": self.reused, "detail": self.detail}


def _key(obj) -> str:
    return canonical_sha256(obj)[:16]


def _no_paths(cfg: dict, *keys: str) -> dict:
    """``cfg`` without its path entries: a stage's key holds the content hashes of its inputs instead, so a
    moved ``--out`` folder is still reused."""
    return {k: v for k, v in cfg.items() if k not in keys}


def _stage_key(d: Path) -> str | None:
    try:
        return json.loads((d / STAGE_FILE).read_text()).get("key")
    except (OSError, ValueError):
        return None


def _mark(d: Path, key: str, **info) -> None:
    atomic_write_text(d / STAGE_FILE, json.dumps({"key": key, **info}, indent=1))


def _fresh(d: Path, key: str) -> bool:
    """True when ``d`` was completed for ``key``; otherwise clears ``d`` if it belongs to another key
    (an interrupted stage of the same key is kept, to resume)."""
    have = _stage_key(d)
    if have == key and (d / STAGE_FILE).is_file() and json.loads((d / STAGE_FILE).read_text()).get("done"):
        return True
    if d.exists() and have is not None and have != key:
        shutil.rmtree(d)
    return False


@contextlib.contextmanager
def _env(home: Path, cache: Path) -> Iterator[None]:
    """ROADLOOP_HOME / ROADLOOP_CACHE pointed into the demo's folder for the duration."""
    old = {k: os.environ.get(k) for k in ("ROADLOOP_HOME", "ROADLOOP_CACHE", "MLFLOW_TRACKING_URI",
                                           "ROADLOOP_TRACKING_URI")}
    os.environ["ROADLOOP_HOME"], os.environ["ROADLOOP_CACHE"] = str(home), str(cache)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("ROADLOOP_TRACKING_URI", None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# hooks a front end (the CLI) gives: progress bars and messages


@dataclass
class Hooks:
    log: Callable[[str], None] = print
    # bar(description, total) -> advance(n) callback; the bar ends when the stage ends
    bar: Callable[[str, int], Callable[[int], None]] = lambda desc, total: (lambda n: None)
    stage_done: Callable[[Stage], None] = lambda st: None


def _bar_to(hooks: Hooks, desc: str, total: int) -> Callable[[int], None]:
    """A progress bar fed with the absolute count done (what the trainers and the collector report)."""
    adv = hooks.bar(desc, total)
    last = [0]

    def to(done: int) -> None:
        adv(done - last[0])
        last[0] = done

    return to


@dataclass
class DemoResult:
    out: Path
    report: Path
    stages: list[Stage]
    reports: dict  # label -> EvalReport
    promoted: bool
    gate_reasons: list[str]
    seconds: float


def _suite_specs(cfg: DemoConfig) -> dict[str, dict]:
    from roadloop.scenarios.suites import suite_pairs

    specs = {}
    for name, base, n in (("demo-train", "train", cfg.train_per_family), ("demo-val", "val", cfg.val_per_family)):
        per: Counter = Counter()
        pairs = []
        for f, s in suite_pairs(base):
            if per[f] < n:
                per[f] += 1
                pairs.append((f, s))
        specs[name] = {"pairs": pairs, "sumo": f"sumo-real-{base}" if cfg.sumo else None}
    return specs


def build_suites(cfg: DemoConfig, out: Path, hooks: Hooks) -> tuple[dict[str, Path], Stage]:
    """``demo-train`` / ``demo-val`` saved under ``out/suites`` (content-hashed; reused when built)."""
    from roadloop.scenarios.generate import CHUNK, generate_many
    from roadloop.scenarios.suites import Suite, code_hash, load_suite, save_suite
    from roadloop.sumo.suite import sumo_code_hash

    t0 = time.perf_counter()
    st = Stage("scenario suites", reused=True)
    dirs, sizes = {}, {}
    specs = _suite_specs(cfg)
    for name, spec in specs.items():
        d = out / "suites" / name
        key = _key({"spec": spec, "code": code_hash(), "sumo_code": sumo_code_hash() if spec["sumo"] else None})
        if _fresh(d, key):
            try:
                sizes[name] = len(load_suite(d).scenarios)
                dirs[name] = d
                continue
            except RoadloopError as e:  # damaged: rebuild it
                hooks.log(f"{d}: {e}; rebuilding")
                shutil.rmtree(d)
        st.reused = False
        pairs = spec["pairs"]
        adv = hooks.bar(f"generating {name}", len(pairs) + (1 if spec["sumo"] else 0))
        scs = []
        for k in range(0, len(pairs), CHUNK):  # the generator's batch size: as fast as one call
            part = pairs[k:k + CHUNK]
            scs += generate_many(part)
            adv(len(part))
        if spec["sumo"]:
            scs += load_suite(spec["sumo"]).scenarios
            adv(1)
        if d.exists():
            shutil.rmtree(d)
        save_suite(Suite.of(name, scs), d)
        _mark(d, key, done=True)
        dirs[name], sizes[name] = d, len(scs)
    st.seconds = time.perf_counter() - t0
    st.detail = f"{sizes['demo-train']} training / {sizes['demo-val']} held-out scenarios"
    return dirs, st


def demos_stage_key(suite_hash: str, max_steps: int | None) -> str:
    """Key of the demonstrations stage: its suite, rollout length and the demonstrations format, so that
    a demo folder collected by code that wrote another format is collected again, not read and refused."""
    from roadloop.data.collect import VERSION

    return _key({"suite": suite_hash, "max_steps": max_steps, "format": VERSION})


def collect_demos(cfg: DemoConfig, train_dir: Path, out: Path, hooks: Hooks) -> tuple[Path, str, Stage]:
    """Expert demonstrations on ``demo-train`` (``out/data/train``); resumes an interrupted collection."""
    from roadloop.data.collect import collect, load_manifest
    from roadloop.scenarios.suites import load_suite

    t0 = time.perf_counter()
    d = out / "data" / "train"
    suite_hash = load_suite(train_dir).content_hash
    key = demos_stage_key(suite_hash, cfg.max_steps)
    st = Stage("expert demonstrations", reused=_fresh(d, key))
    if not st.reused:
        _mark(d, key, done=False)
        to = _bar_to(hooks, "expert demonstrations", len(load_suite(train_dir).scenarios))
        collect([str(train_dir)], d, on_progress=lambda done, total: to(done), resume=True, max_steps=cfg.max_steps)
        _mark(d, key, done=True)
    man = load_manifest(d)
    st.seconds = time.perf_counter() - t0
    st.detail = (f"{man.n_samples} samples with CoC labels from {man.n_scenarios} scenarios "
                 f"(hash {man.content_hash[:8]})")
    return d, man.content_hash, st


def _run_json(d: Path) -> dict:
    try:
        return json.loads((d / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def train_imitation(cfg: DemoConfig, data: Path, data_hash: str, out: Path, hooks: Hooks) -> tuple[Path, Stage]:
    from roadloop.train.il import train_il

    t0 = time.perf_counter()
    d = out / "runs" / "il"
    il = cfg.il
    il.data, il.val_data, il.out = str(data), None, str(d)
    key = _key({"il": _no_paths(to_dict(il), "data", "val_data", "out"), "data": data_hash})
    st = Stage("imitation pre-training", reused=_fresh(d, key))
    if not st.reused:
        resume = (d / "latest").exists()
        _mark(d, key, done=False)
        to = _bar_to(hooks, "imitation" + (" (resuming)" if resume else ""), 1000)
        res = train_il(il, resume=resume, on_progress=lambda step, total, m: to(1000 * step // max(total, 1)),
                       log=hooks.log)
        _mark(d, key, done=True, metrics=res.metrics, seconds=res.seconds, samples_per_s=res.samples_per_s)
    info = json.loads((d / STAGE_FILE).read_text())
    m = info.get("metrics", {})
    st.seconds = time.perf_counter() - t0
    st.detail = (f"{il.model.preset} model, {info.get('seconds', 0) / 60:.1f} min at "
                 f"{info.get('samples_per_s', 0):.0f} samples/s; held-out minADE_6 "
                 f"{m.get('min_ade', math.nan):.2f} m, decision accuracy {m.get('decision_acc', math.nan):.0%}")
    return d / "final", st


def _post_stage(cfg: DemoConfig, method: str, init: Path, dirs: dict[str, Path], out: Path,
                hooks: Hooks) -> tuple[Path, Stage]:
    """One post-training method (``road`` or ``grpo``) from ``init`` into ``out/runs/<method>``."""
    from roadloop.policies.vla.model import load_checkpoint
    from roadloop.scenarios.suites import load_suite

    t0 = time.perf_counter()
    d = out / "runs" / method
    pm, c = POST_METHODS[method], getattr(cfg, method)
    c.init, c.out, c.register = str(init), str(d), False
    c.suites, c.eval_suite = str(dirs["demo-train"]), str(dirs["demo-val"])
    c.validate()
    _, meta = load_checkpoint(init)
    key = _key({method: _no_paths(to_dict(c), "init", "out", "suites", "eval_suite"), "init": meta["weights_sha256"],
                "suites": [load_suite(p).content_hash for p in dirs.values()]})
    st = Stage(pm.title, reused=_fresh(d, key))
    if not st.reused:
        from roadloop.train.grpo import train_grpo
        from roadloop.train.road import train_road

        train = {"road": train_road, "grpo": train_grpo}[method]
        resume = (d / "latest").exists()
        _mark(d, key, done=False)
        to = _bar_to(hooks, f"{pm.short} {pm.unit}" + (" (resuming)" if resume else ""), getattr(c, pm.unit))
        res = train(c, resume=resume, on_progress=lambda it, total, m: to(it), log=hooks.log)
        _mark(d, key, done=True, steps=getattr(res, pm.unit), seconds=res.seconds,
              env_steps_per_s=res.env_steps_per_s, learner_samples_per_s=res.learner_samples_per_s)
    info = json.loads((d / STAGE_FILE).read_text())
    st.seconds = time.perf_counter() - t0
    n = info.get("steps", info.get(pm.unit))  # stage files written before the demo ran RoaD: "iterations"
    st.detail = (f"{n} {pm.unit} x {pm.size(c)} in {info.get('seconds', 0) / 60:.1f} min "
                 f"({info.get('env_steps_per_s', 0):.0f} env steps/s)")
    return d / "final", st


def post_train(cfg: DemoConfig, init: Path, dirs: dict[str, Path], out: Path, hooks: Hooks) -> tuple[Path, list[Stage]]:
    """The ``post`` methods in order from the imitation checkpoint ``init``; the last checkpoint and the stages."""
    stages = []
    for method in cfg.post:
        init, st = _post_stage(cfg, method, init, dirs, out, hooks)
        hooks.stage_done(st)
        stages.append(st)
    return init, stages


def gate_config(cfg: DemoConfig, val_dir: Path):
    """The demo's gates: the default thresholds on the ``demo-val`` matrix, the envelope it covers."""
    from roadloop.registry.gates import load_gate_config
    from roadloop.registry.matrix import map_of
    from roadloop.scenarios.suites import load_suite

    scs = load_suite(val_dir).scenarios
    fams = sorted({s.meta.family for s in scs})
    maps = sorted({map_of(s.meta) for s in scs})
    per_family = min(Counter(s.meta.family for s in scs).values()) * len(cfg.eval_seeds)
    over = [f"matrix.suites=[{json.dumps(str(val_dir))}]", f"matrix.seeds=[{','.join(map(str, cfg.eval_seeds))}]",
            f"envelope.families=[{','.join(fams)}]", f"envelope.maps=[{','.join(maps)}]",
            f"envelope.min_rollouts={per_family}",
            # the held-out suite in one rollout batch per seed (up to 128): 20% faster than batches of 64 here
            f"matrix.batch_size={min(max(len(scs), 1), 128)}"]
    return load_gate_config(overrides=over + list(cfg.gate_overrides))


def _registered(reg, ckpt: Path, lineage: dict, reason: str):
    """The registry version holding ``ckpt``'s weights (registered now if none does)."""
    from roadloop.io import sha256_file

    sha = sha256_file(ckpt / "model.safetensors")
    for mv in reg.versions(MODEL_NAME):
        if mv.weights_sha256 == sha:
            return mv
    return reg.register(ckpt, lineage, name=MODEL_NAME, reason=reason)


def release(cfg: DemoConfig, il_ckpt: Path, post_ckpt: Path, val_dir: Path, out: Path, hooks: Hooks):
    """Evaluate expert / imitation / post-trained on the gate matrix; promote through the gates."""
    from roadloop.eval.demo_report import gate_dict
    from roadloop.eval.evaluate import report_from_json
    from roadloop.policies import get_policy
    from roadloop.registry import Registry
    from roadloop.registry.errors import GateFailedError
    from roadloop.registry.gates import GateSummary
    from roadloop.registry.matrix import eval_code_hash, evaluate_matrix, load_matrix, matrix_key, matrix_size

    t0 = time.perf_counter()
    gcfg = gate_config(cfg, val_dir)
    suites = load_matrix(gcfg.matrix)
    key = matrix_key(gcfg.matrix, suites)
    n = matrix_size(suites, gcfg.matrix)

    on_eval = hooks.bar  # (description, rollouts) -> advance(n): the registry's evaluation progress
    ev = Stage("evaluation on held-out scenarios", reused=True)
    exp_path = out / "eval" / f"expert-{key[:16]}.json"
    if exp_path.is_file():
        expert = report_from_json(json.loads(exp_path.read_text()))
    else:
        ev.reused = False
        expert = evaluate_matrix(get_policy("expert"), gcfg.matrix, suites, on_batch=on_eval("validate expert", n))
        atomic_write_text(exp_path, json.dumps(expert.to_json()))
    reg = Registry()
    il_mv = _registered(reg, il_ckpt, None, "roadloop demo: imitation checkpoint")
    method = " + ".join(POST_METHODS[m].title for m in cfg.post)
    post_mv = _registered(reg, post_ckpt, None, f"roadloop demo: closed-loop post-training ({method})")
    before = len(reg.evaluations(MODEL_NAME, il_mv.version)) + len(reg.evaluations(MODEL_NAME, post_mv.version))
    il_rep = reg.matrix_report(il_mv, gcfg, suites, on_eval=on_eval)
    post_rep = reg.matrix_report(post_mv, gcfg, suites, on_eval=on_eval)
    after = len(reg.evaluations(MODEL_NAME, il_mv.version)) + len(reg.evaluations(MODEL_NAME, post_mv.version))
    ev.reused = ev.reused and after == before
    ev.seconds = time.perf_counter() - t0
    ev.detail = f"{n} rollouts per policy ({len(suites[0].scenarios)} scenarios x {len(gcfg.matrix.seeds)} seed(s))"
    hooks.stage_done(ev)

    t1 = time.perf_counter()
    gs = Stage("gates and promotion")
    if reg.champion(MODEL_NAME) is None:
        try:
            reg.promote(il_mv.version, gcfg, name=MODEL_NAME, reason="roadloop demo: imitation baseline, first "
                        "release", on_eval=on_eval)
        except GateFailedError as e:
            reg.promote(il_mv.version, gcfg, name=MODEL_NAME, force=True,
                        reason=f"roadloop demo: the imitation baseline is the reference the post-trained policy "
                               f"is gated against; failed absolute gates: {', '.join(e.gates.failed)}")
    champ = reg.champion(MODEL_NAME)
    first = next((c for c in reg.champion_history(MODEL_NAME) if c.version == il_mv.version), None)
    notes = [] if first is None else [f"{il_mv.ref} (imitation) was made the first champion" + (
        " by a recorded, forced promotion: " + first.reason.split("; ", 1)[-1] if first.forced else
        " through the gates")]
    promoted = champ is not None and champ.version == post_mv.version
    run = None
    if not promoted:  # a refusal recorded against this champion, config and code is final: not asked again
        run = next((r for r in reversed(reg.gate_runs(MODEL_NAME, post_mv.version))
                    if champ is not None and r["champion"] == champ.version and not r["passed"]
                    and r["config_sha256"] == gcfg.sha256 and r["eval_code"] == eval_code_hash()), None)
        gs.reused = run is not None
    if not promoted and run is None:
        try:
            pr = reg.promote(post_mv.version, gcfg, name=MODEL_NAME, reason=f"roadloop demo: {method}",
                             on_eval=on_eval)
            run, promoted = pr.gate_run, True
        except GateFailedError:
            promoted = False
    if run is None:
        runs = reg.gate_runs(MODEL_NAME, post_mv.version)
        run = runs[-1] if runs else None
    if run is None:
        summary = GateSummary(False, [])
    else:
        summary = GateSummary.from_json(run["results"]) if isinstance(run, dict) else run.summary
    gate = gate_dict(summary, post_mv.ref, il_mv.ref, promoted, "; ".join(notes))
    gs.seconds = time.perf_counter() - t1
    gs.detail = (f"{post_mv.ref} promoted" if promoted else f"{post_mv.ref} refused: "
                 + ", ".join(r["name"] for r in gate["results"] if not r["passed"]))
    reports = {"expert": expert, "imitation": il_rep, "post-trained": post_rep}
    return reports, gate, (il_mv, post_mv), ev, gs


# ---------------------------------------------------------------------------------------------
# the report's data


def _incident(m: dict) -> bool:
    from roadloop.eval.compare import metric_value

    return metric_value("incident")(m) == 1.0  # NaN (metrics missing) counts as no incident


def changed_outcomes(before, after, n: int) -> list[tuple[str, int, str]]:
    """Up to ``n`` (scenario id, seed, kind) where the outcome changed: ``fixed`` (an incident before,
    none after; best after-score first), keeping room for ``n // 4`` (>= 1 when n >= 2) ``regressed``
    ones (the reverse), which also fill what the fixed ones leave."""
    a = {(r.scenario_id, r.seed): r for r in after.rollouts if not r.failed}
    fixed, regressed = [], []
    for r in before.rollouts:
        o = a.get((r.scenario_id, r.seed))
        if o is None or r.failed:
            continue
        if _incident(r.metrics) and not _incident(o.metrics):
            fixed.append((-o.metrics.get("score", 0.0), r.scenario_id, r.seed))
        elif not _incident(r.metrics) and _incident(o.metrics):
            regressed.append((-r.metrics.get("score", 0.0), r.scenario_id, r.seed))
    n_reg = min(len(regressed), max(1, n // 4)) if regressed and n >= 2 else 0
    picks = [(sid, seed, "fixed") for _, sid, seed in sorted(fixed)[:n - n_reg]]
    picks += [(sid, seed, "regressed") for _, sid, seed in sorted(regressed)[:n - len(picks)]]
    return picks


PAIR_CANDIDATES = 3  # changed-outcome candidates re-driven per pair shown


def paired_rollouts(picks: list[tuple[str, int, str]], policies: tuple, val_dir: Path, replan_every: int,
                    n: int | None = None) -> list:
    """Re-drive the picks with both policies, keeping the rollouts, and build the side-by-side views of up to ``n``
    (default: all) whose outcome changed in the re-drive, fixed ones first (``changed_outcomes`` on the re-driven
    rollouts; ``demo_report.paired_rollouts`` builds the views).

    The re-drive batches only the picks, while the evaluation batched the whole held-out suite, and float
    rounding depends on the batch's size: a sampling policy's re-driven rollout can part from the evaluated one,
    and its outcome with it.  So more candidates are re-driven than are shown (``PAIR_CANDIDATES`` each), and
    what is shown is what the re-drive did."""
    import dataclasses

    from roadloop.eval.demo_report import paired_rollouts as pair_views
    from roadloop.eval.evaluate import evaluate
    from roadloop.rollout import RolloutConfig
    from roadloop.scenarios.suites import load_suite

    if not picks:
        return []
    n = len(picks) if n is None else n
    by_id = {s.meta.scenario_id: s for s in load_suite(val_dir).scenarios}
    runs = []
    for pol in policies:
        reps, kept = [], []
        for seed in sorted({p[1] for p in picks}):
            scs = [by_id[sid] for sid, sd, _ in picks if sd == seed]
            rep, k = evaluate(pol, scs, seed=seed, keep_rollouts=True, cfg=RolloutConfig(replan_every=replan_every))
            reps.append(rep)
            kept += k
        runs.append((dataclasses.replace(reps[0], rollouts=[r for rep in reps for r in rep.rollouts]), kept))
    shown = {(sid, seed) for sid, seed, _ in changed_outcomes(runs[0][0], runs[1][0], n)}
    runs = [(dataclasses.replace(rep, rollouts=[r for r in rep.rollouts if (r.scenario_id, r.seed) in shown]), kept)
            for rep, kept in runs]
    return pair_views(runs[0], runs[1], limit=n, min_score_change=math.inf)


CURVES = {  # series label -> (run, metric key)
    "imitation: train loss": ("il", "loss"),
    "imitation: held-out minADE_6 (m)": ("il", "val/min_ade"),
    "RoaD: guided rollout score": ("road", "road/score"),
    "RoaD: guided at-fault collision rate": ("road", "road/collision_at_fault"),
    "RoaD: guided off-road rate": ("road", "road/offroad"),
    "RoaD: imitation loss on the round's rollouts, after its update": ("road", "road/loss_after"),
    "RoaD: held-out score": ("road", "eval/score"),
    "GRPO: rollout reward": ("grpo", "rollout/reward"),
    "GRPO: rollout score": ("grpo", "rollout/score"),
    "GRPO: at-fault collision rate": ("grpo", "rollout/collision_at_fault"),
    "GRPO: off-road rate": ("grpo", "rollout/offroad"),
    "GRPO: reasoning consistency": ("grpo", "rollout/consistency"),
    "GRPO: held-out score": ("grpo", "eval/score"),
}


def learning_curves(runs: dict[str, Path]) -> dict[str, list[tuple[float, float]]]:
    """The tracked curves of the demo's runs (empty series left out)."""
    from roadloop.train.tracking import read_metrics

    out = {}
    for label, (run, key) in CURVES.items():
        rid = _run_json(runs[run]).get("run_id") if run in runs else None
        if not rid:
            continue
        pts = [(float(s), float(v)) for s, v in read_metrics(rid, key) if math.isfinite(v)]
        if pts:
            out[label] = pts
    return out


# ---------------------------------------------------------------------------------------------
# the whole loop


NEXT_COMMANDS = [
    ("roadloop eval --policy champion --suite val --report report/",
     "the released champion on the full held-out suite"),
    ("roadloop train road --init {il} rounds=8", "longer RoaD post-training from the same start"),
    ("roadloop train grpo --init {il} iterations=100", "closed-loop GRPO from the same start"),
    ("roadloop registry list", "versions, champion, gate results"),
    ("roadloop registry rollback --reason '...'", "make the previous champion current again"),
    ("roadloop replay ROLLOUT_ID", "re-run any evaluated rollout bit for bit"),
]


def run_demo(cfg: DemoConfig, hooks: Hooks | None = None) -> DemoResult:
    """Run (or re-run, reusing what is built) the whole demo; see the module docstring."""
    import torch

    from roadloop.eval.demo_report import DemoReportData, write_demo_report

    hooks = hooks or Hooks()
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stages: list[Stage] = []

    def done(st: Stage) -> None:
        stages.append(st)
        hooks.stage_done(st)

    with _env(out / "home", out / "cache"):
        dirs, st = build_suites(cfg, out, hooks)
        done(st)
        data, data_hash, st = collect_demos(cfg, dirs["demo-train"], out, hooks)
        done(st)
        il_ckpt, st = train_imitation(cfg, data, data_hash, out, hooks)
        done(st)
        post_ckpt, sts = post_train(cfg, il_ckpt, dirs, out, hooks)
        stages.extend(sts)
        reports, gate, (il_mv, post_mv), ev, gs = release(cfg, il_ckpt, post_ckpt, dirs["demo-val"], out, hooks)
        stages.append(ev)
        done(gs)

        t1 = time.perf_counter()
        from roadloop.registry import Registry

        reg = Registry()
        picks = changed_outcomes(reports["imitation"], reports["post-trained"], PAIR_CANDIDATES * cfg.pairs)
        pols = (reg.load_policy(il_mv.version, MODEL_NAME), reg.load_policy(post_mv.version, MODEL_NAME))
        pairs = paired_rollouts(picks, pols, dirs["demo-val"], pols[0].replan_every, cfg.pairs)
        curves = learning_curves({"il": out / "runs" / "il", **{m: out / "runs" / m for m in cfg.post}})
        rs = Stage("report", seconds=time.perf_counter() - t1,
                   detail=f"{len(pairs)} changed-outcome rollouts re-driven side by side")
        stages.append(rs)
        total = time.perf_counter() - t0
        data_ = DemoReportData(
            title="roadloop demo: closed-loop post-training of a reasoning driving policy",
            reports=reports, baseline="imitation", candidate="post-trained", curves=curves, gate=gate, pairs=pairs,
            stages=[s.to_json() for s in stages],
            next_commands=[(c.format(il=il_ckpt), w) for c, w in NEXT_COMMANDS],
            meta={"out": str(out), "this run": f"{total / 60:.1f} min" + (" (stages reused)" if any(
                      s.reused for s in stages) else ""), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "threads": str(torch.get_num_threads())})
        report = write_demo_report(data_, out / "report")
        hooks.stage_done(rs)
        summary = {"stages": [s.to_json() for s in stages], "total_seconds": round(total, 1),
                   "promoted": gate["promoted"], "gate": gate,
                   "policies": {k: r.headline() for k, r in reports.items()}, "report": str(report)}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    reasons = [f"{r['name']}: {r['reason']}" for r in gate["results"] if not r["passed"]]
    return DemoResult(out, report, stages, reports, gate["promoted"], reasons, total)


__all__ = ["DemoConfig", "DemoResult", "Hooks", "Stage", "changed_outcomes", "gate_config", "learning_curves",
           "load_demo_config", "run_demo"]
