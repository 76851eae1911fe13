"""Collect expert demonstrations in closed loop and write them as hashed NPZ shards.

``collect(suites, out_dir)`` drives the privileged ``Expert`` through every scenario of the
suites with ``roadloop.rollout.rollout`` (decisions at 2 Hz by default, ``replan_every`` = 5: the
rate the VLA policy drives at; the expert scores the same at 2 and 10 Hz, LOG).  A thin
``Recorder`` policy wraps the expert and, every ``every`` steps from its first decision,
records what a learned policy sees and what it should output:

* ``raster``   (N, 4, 13, 64, 64) uint8  BEV raster (``render_bev`` of the last 4 states at 10 Hz,
  ``Observation.recent``).  Quantisation: channels in [0, 1] are stored as ``round(255 x)``
  (decode ``q / 255``); ``lane_cos`` / ``lane_sin`` in [-1, 1] as ``round(127.5 (x + 1))``
  (decode ``q / 127.5 - 1``).  See ``decode_raster``.
* ``history``  (N, 16, 5) float32        ``ego_history_features``
* ``command``  (N,) int64                ``command_index(route_command(state))``
* ``speed``    (N,) float32 m/s          current ego speed
* ``waypoints`` (N, 64, 2) float32 m     the expert's next 64 poses (t+0.1 .. t+6.4 s) in the ego frame
  (x forward, y left); ``waypoints_yaw`` (N, 64) rad relative to the current heading,
  ``waypoints_speed`` (N, 64) m/s
* ``controls`` (N, 64, 2) float32        (accel m/s^2, curvature 1/m) fitted to the plan with
  ``unicycle_controls_from_poses`` (``ActionBounds()``); replaying them from (0, 0, 0, speed)
  reproduces ``waypoints``
* ``text`` (N,) str, ``lon`` / ``lat`` (N,) int64: the Chain-of-Causation label (``coc_labels``)
* ``facts_<field>``: the ``SceneFacts`` of the state (ground truth that reasoning text is checked
  against, so open-loop grounding can be scored without the simulator): per agent (N, A)
  (``kind valid dist x_ego y_ego y_route gap near_route in_corridor intrudes speed accel
  crossing``), per route stop line (N, K) (``light_gap light_state``), ``junction_gap`` (N,).
  A and K are the chunk's own sizes; ``load_demos`` pads across shards (invalid agents,
  light_gap = 1e9).
* ``scenario_id``, ``family``, ``suite`` (N,) str, ``step`` (N,) int64

Resumable and deterministic: the scenarios are put in a fixed order (by step count, then suite
order) and cut into chunks of ``batch_size`` scenarios; each chunk is one rollout batch whose
samples are written as shards of at most ``shard_size`` samples (atomically, fixed zip
timestamps so the bytes are reproducible), then ``manifest.json`` is rewritten atomically.  A
restart skips the chunks the manifest lists; stray temp files are ignored.  Rows whose rollout
failed, and steps past a scenario's own log (batch padding), are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from roadloop.errors import RoadloopError
from roadloop.io import atomic_write_bytes, atomic_write_text, sha256_file
from roadloop.policies.base import HISTORY_STEPS, Observation, Policy, PolicyOutput
from roadloop.policies.expert import Expert
from roadloop.policies.vla.observe import (  # noqa: F401  (encode / decode re-exported)
    SIGNED_CHANNELS,
    RasterConfig,
    _to_ego,
    command_index,
    decode_raster,
    ego_history_features,
    encode_raster,
    render_bev,
    route_command,
)
from roadloop.reasoning.labels import SceneFacts, coc_labels, scene_facts
from roadloop.rollout import RolloutConfig, rollout
from roadloop.sim.batching import collate
from roadloop.sim.datatypes import Scenario, SimState
from roadloop.sim.dynamics import ActionBounds, unicycle_controls_from_poses
from roadloop.sim.geometry import wrap_angle

FORMAT = "roadloop-demos"
VERSION = 5  # 2: facts_* arrays, 2 Hz default; 3: junction, speed_limit and speed raster channels;
# 4: lateral labels by the relative "heading is back" rule (reasoning.meta_action; a road curve is never a lane change);
# 5: an agent's side in the CoC label read in the ego frame when it is not near the route (reasoning.labels._lateral)
MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FACT_FIELDS = tuple(f.name for f in dataclasses.fields(SceneFacts))


def _np(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return x.numpy() if x.dtype in (torch.bool, torch.int64) else x.float().numpy()


# --- the recorder ---------------------------------------------------------------------------

class Recorder(Policy):
    """Wraps a policy (the expert) and records observations and its plans every ``every`` steps."""

    def __init__(self, inner: Policy, every: int = 5, raster: RasterConfig | None = None):
        self.inner, self.every, self.raster = inner, every, raster or RasterConfig()
        self.name, self.version = inner.name, inner.version
        self.buf: list[SimState] = []
        self.records: list[dict[str, np.ndarray | list]] = []
        self.first_step: int | None = None

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        self.buf, self.records, self.first_step = [], [], None
        self.inner.reset(state, seeds)

    def act(self, obs: Observation) -> PolicyOutput:
        self.buf = list(obs.recent[-self.raster.frames:]) or [obs.state]
        out = self.inner.act(obs)
        if self.first_step is None:
            self.first_step = obs.step
        if (obs.step - self.first_step) % self.every == 0:
            self.records.append(self._record(obs, out))
        return out

    def _record(self, obs: Observation, out: PolicyOutput) -> dict:
        state = obs.state
        ex, eyaw, ev = state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0]
        pyaw = out.plan_yaw
        if pyaw is None:  # heading from the waypoints' direction of travel
            d = torch.diff(torch.cat((ex.unsqueeze(1), out.plan_xy), 1), dim=1)
            pyaw = torch.atan2(d[..., 1], d[..., 0])
        pose_xy = torch.cat((ex.unsqueeze(1), out.plan_xy), 1)
        pose_yaw = torch.cat((eyaw.unsqueeze(1), pyaw), 1)
        ctrl = unicycle_controls_from_poses(pose_xy, pose_yaw, ev, bounds=ActionBounds())
        facts = scene_facts(state)
        labels = coc_labels(state, out.plan_xy, out.plan_speed, rng_seed=obs.step, facts=facts)
        psp = out.plan_speed if out.plan_speed is not None else torch.full_like(pyaw, float("nan"))
        return {
            "step": obs.step,
            "raster": encode_raster(render_bev(self.buf, self.raster)).numpy(),
            "history": ego_history_features(obs).float().numpy(),
            "command": command_index(route_command(state)).numpy(),
            "speed": ev.float().numpy(),
            "waypoints": _to_ego(out.plan_xy, ex, eyaw).float().numpy(),
            "waypoints_yaw": wrap_angle(pyaw - eyaw.unsqueeze(-1)).float().numpy(),
            "waypoints_speed": psp.float().numpy(),
            "controls": ctrl.float().numpy(),
            "text": [lb.text for lb in labels],
            "lon": np.array([int(lb.decision[0]) for lb in labels], dtype=np.int64),
            "lat": np.array([int(lb.decision[1]) for lb in labels], dtype=np.int64),
            **{f"facts_{k}": _np(getattr(facts, k)) for k in FACT_FIELDS},
        }


# --- manifest ---------------------------------------------------------------------------------

@dataclass
class Manifest:
    """``manifest.json`` of a demonstration directory."""

    suites: dict[str, str]  # suite name -> suite content hash
    config: dict  # every, batch_size, shard_size, max_scenarios, raster (must match to resume)
    code_version: str = ""
    n_samples: int = 0
    n_scenarios: int = 0
    n_chunks: int = 0  # chunks in the full collection
    chunks: list[dict] = field(default_factory=list)  # [{index, scenarios, failed, shards: [file]}]
    shards: list[dict] = field(default_factory=list)  # [{file, sha256, n}]
    content_hash: str = ""
    seconds: float = 0.0  # collection time, summed over resumed runs

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.n_chunks

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "suites": self.suites, "config": self.config,
                "code_version": self.code_version, "n_samples": self.n_samples, "n_scenarios": self.n_scenarios,
                "n_chunks": self.n_chunks, "complete": self.complete, "content_hash": self.content_hash,
                "seconds": round(self.seconds, 3), "shards": self.shards, "chunks": self.chunks}

    def update_hash(self) -> None:
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s['file']}:{s['sha256']}:{s['n']}\n".encode())
        self.content_hash = h.hexdigest()
        self.n_samples = sum(int(s["n"]) for s in self.shards)


def load_manifest(out_dir: str | Path) -> Manifest:
    """Read and check ``manifest.json`` (RoadloopError if missing, unreadable or of another format)."""
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise RoadloopError(f"{p}: no demonstration manifest here (run `roadloop data collect` first)")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RoadloopError(f"{p}: unreadable manifest: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise RoadloopError(f"{p}: not a {FORMAT} v{VERSION} manifest")
    if d.get("version") != VERSION:
        raise RoadloopError(f"{p}: {FORMAT} v{d.get('version')} manifest, but this code reads v{VERSION} "
                            f"(the recorded observations or labels changed: collect the demonstrations again)")
    return Manifest(suites=d["suites"], config=d["config"], code_version=d.get("code_version", ""),
                    n_samples=int(d["n_samples"]), n_scenarios=int(d.get("n_scenarios", 0)),
                    n_chunks=int(d.get("n_chunks", 0)), chunks=list(d.get("chunks", [])),
                    shards=list(d["shards"]), content_hash=d.get("content_hash", ""),
                    seconds=float(d.get("seconds", 0.0)))


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# --- shards -----------------------------------------------------------------------------------

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` with fixed zip timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            z.writestr(info, b.getvalue(), compresslevel=1)
    return buf.getvalue()


def _chunk_samples(rec: Recorder, batch: Scenario, scen: list[tuple[str, Scenario]], failed: torch.Tensor
                   ) -> dict[str, np.ndarray]:
    """Samples of one rollout batch, ordered by (scenario, step); failed rows and padded steps dropped."""
    keys = [k for k in rec.records[0] if k != "step"] if rec.records else []
    rows: dict[str, list] = {k: [] for k in keys + ["scenario_id", "family", "suite", "step"]}
    for b, (suite, s) in enumerate(scen):
        if bool(failed[b]):
            continue
        for r in rec.records:
            if r["step"] >= s.num_steps - 1:  # past this scenario's log (padding of a longer batch)
                continue
            for k in keys:
                rows[k].append(r[k][b])
            rows["scenario_id"].append(s.meta.scenario_id)
            rows["family"].append(s.meta.family)
            rows["suite"].append(suite)
            rows["step"].append(r["step"])
    out = {}
    if not rows["step"]:
        return {"step": np.zeros(0, dtype=np.int64)}
    for k, v in rows.items():
        if k in ("text", "scenario_id", "family", "suite"):
            out[k] = np.array(v, dtype=str)
        elif k == "step":
            out[k] = np.array(v, dtype=np.int64)
        else:
            out[k] = np.stack(v)
    return out


def _prepare_dir(out: Path, resume: bool, manifest: Manifest) -> Manifest:
    if (out / MANIFEST).is_file():
        old = load_manifest(out)
        if resume:
            if old.suites != manifest.suites or old.config != manifest.config:
                raise RoadloopError(f"{out}: holds a collection of other suites or settings "
                                    f"({old.suites}, {old.config}); use --no-resume or another --out")
            old.n_chunks = manifest.n_chunks
            return old
    for p in list(out.glob("shard-*.npz")) + [out / MANIFEST]:  # start over: only our own files
        p.unlink(missing_ok=True)
    return manifest


def collect(suite_names: list[str], out_dir: str | Path, shard_size: int = 512, every: int = 5,
            max_scenarios: int | None = None, on_progress: Callable[[int, int], None] | None = None,
            resume: bool = True, batch_size: int = 32, stop_after_chunks: int | None = None,
            max_steps: int | None = None, replan_every: int = 5, raster: RasterConfig | None = None) -> Manifest:
    """Drive the expert over the suites' scenarios and write demonstration shards to ``out_dir``.

    ``max_scenarios``: first N scenarios of the suites (in suite order, suites concatenated).
    ``on_progress(done, total)`` is called with scenario counts (completed chunks included).
    ``max_steps``: closed-loop steps per rollout (None: each batch's full log; for quick tests).
    ``replan_every``: the expert's decision period in 0.1 s steps (5 = 2 Hz); ``every`` should be
    a multiple of it (samples are taken at decision steps).
    ``stop_after_chunks``: process at most this many new chunks, then return (partial manifest).
    ``raster``: the raster's size and geometry (default ``RasterConfig()``, 41 m ahead); the manifest records
    it, and a model trained on the collection reads the same (``roadloop train il`` takes it from there).
    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    from roadloop.scenarios.suites import load_suite

    if every < 1 or shard_size < 1 or batch_size < 1 or replan_every < 1:
        raise RoadloopError(f"every, shard_size, batch_size and replan_every must be >= 1, got {every}, "
                            f"{shard_size}, {batch_size}, {replan_every}")
    if every % replan_every:
        raise RoadloopError(f"every ({every}) must be a multiple of replan_every ({replan_every}): samples are "
                            "taken at the expert's decision steps")
    if not suite_names:
        raise RoadloopError("no suites given")
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, Scenario]] = []
    hashes: dict[str, str] = {}
    for name in suite_names:
        suite = load_suite(name)
        hashes[name] = suite.content_hash
        # samples record the suite's own name, not the path it was given by: the same demonstrations have the
        # same content hash wherever their suites lie
        items += [(suite.name, s) for s in suite.scenarios]
    if max_scenarios is not None:
        items = items[:max_scenarios]
    if not items:
        raise RoadloopError(f"suites {suite_names} hold no scenarios")
    order = sorted(range(len(items)), key=lambda i: (items[i][1].num_steps, i))
    chunks = [[items[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    rc = raster or RasterConfig()
    config = {"every": every, "batch_size": batch_size, "shard_size": shard_size, "max_scenarios": max_scenarios,
              "max_steps": max_steps, "replan_every": replan_every, "history_steps": HISTORY_STEPS,
              "raster": rc.geometry()}
    man = _prepare_dir(out, resume, Manifest(suites=hashes, config=config, code_version=_git_commit(),
                                             n_scenarios=len(items), n_chunks=len(chunks)))
    done = {int(c["index"]) for c in man.chunks}
    n_done = sum(len(chunks[i]) for i in done if i < len(chunks))
    if on_progress:
        on_progress(n_done, len(items))
    rec = Recorder(Expert(), every=every, raster=rc)
    new = 0
    for ci, chunk in enumerate(chunks):
        if ci in done:
            continue
        if stop_after_chunks is not None and new >= stop_after_chunks:
            break
        batch = collate([s for _, s in chunk])
        with torch.inference_mode():
            cfg = RolloutConfig(replan_every=replan_every, max_steps=max_steps)
            ro = rollout(rec, batch, torch.zeros(len(chunk), dtype=torch.int64), cfg)
        if bool(ro.failed.all()):
            raise RoadloopError(f"every expert rollout of chunk {ci} failed: {ro.fail_reason[0]}")
        data = _chunk_samples(rec, batch, chunk, ro.failed)
        n = len(data["step"])
        files = []
        for k in range(0, n, shard_size):
            f = f"shard-{len(man.shards):05d}.npz"
            blob = npz_bytes({key: v[k:k + shard_size] for key, v in data.items()})
            atomic_write_bytes(out / f, blob)
            man.shards.append({"file": f, "sha256": hashlib.sha256(blob).hexdigest(), "n": min(shard_size, n - k)})
            files.append(f)
        man.chunks.append({"index": ci, "scenarios": [s.meta.scenario_id for _, s in chunk],
                           "failed": [s.meta.scenario_id for b, (_, s) in enumerate(chunk) if bool(ro.failed[b])],
                           "shards": files})
        man.update_hash()
        man.seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        atomic_write_text(out / MANIFEST, json.dumps(man.to_json(), indent=1))
        new += 1
        n_done += len(chunk)
        if on_progress:
            on_progress(n_done, len(items))
    man.update_hash()
    return man


def verify_shard(out_dir: str | Path, entry: dict) -> Path:
    """Check a manifest shard entry's file exists and matches its sha256; return its path."""
    p = Path(out_dir) / entry["file"]
    if not p.is_file():
        raise RoadloopError(f"{p}: shard listed in {MANIFEST} is missing")
    if p.stat().st_size == 0:
        raise RoadloopError(f"{p}: shard is empty")
    digest = sha256_file(p)
    if digest != entry["sha256"]:
        raise RoadloopError(f"{p}: shard hash does not match its manifest (sha256 {digest[:12]}..., "
                            f"{MANIFEST} expects {str(entry['sha256'])[:12]}...)")
    return p


__all__ = ["FORMAT", "MANIFEST", "Manifest", "Recorder", "VERSION", "collect", "decode_raster", "encode_raster",
           "load_manifest", "npz_bytes", "verify_shard"]
