"""Open-loop metrics of a VLA model on held-out demonstrations.

For each demonstration the model decodes one greedy output (the policy's deterministic answer:
greedy text, action tokens by ``greedy_actions``, see ``VLAModel.sample``) and
K sampled outputs (temperature / top-p as configured, one generator per sample and draw, so the
numbers do not depend on the batch size):

* ``min_ade`` / ``min_fde`` (m): minADE_K / minFDE_K over 6.4 s: the sampled plans (dequantised
  controls rolled out with the unicycle model from the ego's current speed) against the expert's
  64 waypoints, best of K (K = 6 by default); ``ade`` / ``fde``: the greedy plan's errors.
* ``decision_acc``: the decision parsed from the greedy text equals the label's (longitudinal,
  lateral) meta-actions (unparseable text counts as wrong).
* ``grounding``: the greedy text is grounded in the recorded scene facts (``reasoning.checks``).
* ``consistency``: the greedy text's decision equals the meta-actions of the greedy trajectory.

All four text metrics judge free text against ground truth, never against the label's wording.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from roadloop.data.dataset import DemoTensors
from roadloop.eval.evaluate import bootstrap_ci
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import VLAModel
from roadloop.reasoning.checks import consistency, grounding, parse_coc
from roadloop.reasoning.meta_action import meta_actions
from roadloop.sim import dynamics


def plans_from_tokens(actions: torch.Tensor, speed: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, N, 2) action bins + current speed (B,) m/s -> (B, 64, 2) ego-frame waypoints (m)."""
    B = actions.shape[0]
    ctrl = tok.dequantize(actions.cpu(), chunk)
    return dynamics.unicycle_rollout(torch.zeros(B, 2), torch.zeros(B), speed.float(), ctrl)[0]


def model_inputs(demos: DemoTensors, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Observation tensors of the samples ``idx``: ``bev``, ``history``, ``command``."""
    return {"bev": demos.bev(idx), "history": demos.history[idx], "command": demos.command[idx]}


def score_outputs(demos: DemoTensors, idx: torch.Tensor, text_ids: torch.Tensor, actions: torch.Tensor,
                  chunk: int) -> dict[str, torch.Tensor]:
    """Per-sample scores (B,) of one output per sample (text ids (B, L), action bins (B, N, 2)):
    ``ade``, ``fde`` (m), ``decision_acc``, ``grounding``, ``consistency`` (0 / 1), ``text_len``."""
    B = idx.numel()
    wp, sp = demos.waypoints[idx], demos.speed[idx]
    xy = plans_from_tokens(actions, sp, chunk)
    err = torch.linalg.vector_norm(xy - wp, dim=-1)
    texts = tok.decode_batch(text_ids.cpu())
    lon, lat = meta_actions(torch.zeros(B, 2), torch.zeros(B), sp, xy)
    facts = demos.scene_facts(idx)
    acc, gr, co, tl = (torch.zeros(B) for _ in range(4))
    for b, t in enumerate(texts):
        p = parse_coc(t)
        acc[b] = float(p is not None and int(p.lon) == int(demos.lon[idx[b]]) and int(p.lat) == int(demos.lat[idx[b]]))
        gr[b] = float(grounding(t, None, b, facts))
        co[b] = float(consistency(t, lon[b], lat[b]))
        tl[b] = len(tok.encode(t))
    return {"ade": err.mean(1), "fde": err[:, -1], "decision_acc": acc, "grounding": gr, "consistency": co,
            "text_len": tl}


OPENLOOP_KEYS = ("min_ade", "min_fde", "ade", "fde", "decision_acc", "grounding", "consistency", "text_len")


@torch.no_grad()
def openloop_samples(model: VLAModel, demos: DemoTensors, idx: torch.Tensor | None = None, k: int = 6,
                     temperature: float = 1.0, top_p: float = 0.95, seed: int = 0, batch_size: int = 64,
                     greedy_actions: str = "mean", on_batch: Callable[[int], None] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-sample metrics (module docstring) of the samples ``idx`` (default: all), each (n,) float;
    ``min_ade`` / ``min_fde`` are NaN when ``k`` <= 0.  ``on_batch(n)`` after each batch of n."""
    was_training = model.training
    model.eval()
    idx = torch.arange(len(demos)) if idx is None else idx
    if idx.numel() == 0:
        raise ValueError("openloop_samples: no samples")
    chunk = model.cfg.action_chunk
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in OPENLOOP_KEYS}
    for start in range(0, idx.numel(), batch_size):
        bi = idx[start:start + batch_size]
        B = bi.numel()
        obs = model_inputs(demos, bi)
        text, acts, _, _ = model.sample(obs, temperature=0.0, greedy_actions=greedy_actions)
        for key, v in score_outputs(demos, bi, text, acts, chunk).items():
            parts[key].append(v.float())
        if k > 0:
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + int(i) * 101 + j)
                    for i in bi.tolist() for j in range(k)]
            # k samples of each decision; they share its prefix (vision stem and prefix pass once per decision)
            _, sacts, _, _ = model.sample(obs, temperature=temperature, top_p=top_p, generator=gens, repeat=k)
            s_xy = plans_from_tokens(sacts, demos.speed[bi].repeat_interleave(k), chunk).view(B, k, -1, 2)
            serr = torch.linalg.vector_norm(s_xy - demos.waypoints[bi].unsqueeze(1), dim=-1)  # (B, k, 64)
            parts["min_ade"].append(serr.mean(-1).amin(1))
            parts["min_fde"].append(serr[..., -1].amin(1))
        else:
            parts["min_ade"].append(torch.full((B,), math.nan))
            parts["min_fde"].append(torch.full((B,), math.nan))
        if on_batch is not None:
            on_batch(B)
    model.train(was_training)
    return {key: torch.cat(v) for key, v in parts.items()}


def openloop_metrics(model: VLAModel, demos: DemoTensors, idx: torch.Tensor | None = None, k: int = 6,
                     temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                     batch_size: int = 64, greedy_actions: str = "mean") -> dict[str, float]:
    """Mean metrics (module docstring) over the samples ``idx`` (default: all), plus ``n``."""
    per = openloop_samples(model, demos, idx, k=k, temperature=temperature, top_p=top_p, seed=seed,
                           batch_size=batch_size, greedy_actions=greedy_actions)
    out = {key: float(v.double().mean()) for key, v in per.items()}
    out["n"] = float(per["ade"].numel())
    return out


def summarize_openloop(per_sample: dict[str, torch.Tensor], scenario_id: list[str], family: list[str],
                       n_boot: int = 2000, seed: int = 0) -> dict:
    """Means with 95% scenario-clustered bootstrap CIs, overall and per family.

    Returns ``{"overall": {metric: {"mean", "ci", "n"}}, "per_family": {family: {metric: ...}},
    "n_samples", "n_scenarios"}``; ``scenario_id`` / ``family`` name each sample's scenario / family."""
    sid, fam = np.asarray(scenario_id), np.asarray(family)
    vals = {key: v.double().numpy() for key, v in per_sample.items()}

    def block(mask: np.ndarray) -> dict:
        out = {}
        for key, v in vals.items():
            fin = np.isfinite(v) & mask
            out[key] = {"mean": float(v[fin].mean()) if fin.any() else math.nan,
                        "ci": bootstrap_ci(v[mask], n_boot=n_boot, seed=seed, groups=sid[mask]), "n": int(fin.sum())}
        return out

    everything = np.ones(sid.size, dtype=bool)
    return {"overall": block(everything), "per_family": {f: block(fam == f) for f in sorted(set(family))},
            "n_samples": int(sid.size), "n_scenarios": int(np.unique(sid).size)}


__all__ = ["OPENLOOP_KEYS", "model_inputs", "openloop_metrics", "openloop_samples",
           "plans_from_tokens", "score_outputs", "summarize_openloop"]
