"""Does the VLA policy compute the same thing on a GPU as on the CPU, and is it deterministic there?

Usage: python benchmarks/gpu_parity.py --data DEMOS [--device cuda] [--n 128] [--json OUT]

On ``n`` held-out decisions of ``DEMOS`` (seed-0 untrained model, or ``--policy CKPT``), compares the
``--device`` run with the float32 CPU reference:

* teacher-forced losses and per-token log-probabilities (relative error ``|dev - cpu| / |cpu|``; float32
  arithmetic should land far under 1e-3, tf32 near 3e-4, bf16 autocast 1e-3 to 1e-2),
* greedy decoding (text and action tokens: share identical to the CPU's),
* sampled decoding with per-row CPU generators (the same uniforms on both devices: a differing token
  can only come from a differing probability),
* determinism: the same sampled decoding twice on the device (must be bit-identical),
* the open-loop metrics (``openloop_metrics``, k = 6) on both devices.

Prints one JSON document (and writes it with ``--json``).  Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from roadloop.config import resolve_device
from roadloop.data.dataset import load_demos
from roadloop.eval.openloop import model_inputs, openloop_metrics
from roadloop.policies.vla.model import VLAConfig, VLAModel, load_checkpoint
from roadloop.train.il import TokenizedDemos


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def _sample(model: VLAModel, obs: dict, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(obs["bev"].shape[0])]
    text, acts, _, _ = model.sample(obs, temperature=temperature, top_p=0.95, generator=gens if temperature else None)
    return text.cpu(), acts.cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--policy", default=None, help="VLA checkpoint (default: untrained 'default', seed 0)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = resolve_device(a.device, "--device")
    if a.policy:
        cpu_model = load_checkpoint(a.policy)[0]
    else:
        torch.manual_seed(0)
        cpu_model = VLAModel(VLAConfig()).eval()
    dev_model = VLAModel(cpu_model.cfg).eval()
    dev_model.load_state_dict(cpu_model.state_dict())
    dev_model.to(dev)
    demos = load_demos(a.data, rasters="stream")
    idx = torch.randperm(len(demos), generator=torch.Generator().manual_seed(0))[: a.n].sort().values
    batch = TokenizedDemos.build(demos, cpu_model.cfg).batch(idx)
    obs = model_inputs(demos, idx)
    out: dict = {"device": dev, "torch": torch.__version__, "n": int(idx.numel()),
                 "gpu": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else None,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    with torch.no_grad():
        ref = cpu_model.loss(batch)
        got = dev_model.loss(batch)
        out["loss_rel_err"] = {k: _rel(got[k], ref[k]) for k in ref}
        lt_c, la_c, mask = cpu_model.token_logps(batch)
        lt_d, la_d, _ = dev_model.token_logps(batch)
        out["token_logp_rel_err"] = {"text": _rel(lt_d[mask.to(lt_d.device)], lt_c[mask]), "actions": _rel(la_d, la_c)}
        with torch.autocast(torch.device(dev).type, torch.bfloat16):
            bf = dev_model.loss(batch)
        out["bf16_loss_rel_err"] = {k: _rel(bf[k], ref[k]) for k in ref}
        for name, temp in (("greedy", 0.0), ("sampled", 1.0)):
            tc, ac = _sample(cpu_model, obs, temp, 7)
            td, ad = _sample(dev_model, obs, temp, 7)
            out[f"{name}_text_rows_identical"] = float((tc == td).all(1).float().mean())
            out[f"{name}_action_rows_identical"] = float((ac == ad).flatten(1).all(1).float().mean())
        td2, ad2 = _sample(dev_model, obs, 1.0, 7)
        out["device_repeat_bit_identical"] = bool(torch.equal(td, td2) and torch.equal(ad, ad2))
    t0 = time.perf_counter()
    m_cpu = openloop_metrics(cpu_model, demos, idx, k=6)
    t1 = time.perf_counter()
    m_dev = openloop_metrics(dev_model, demos, idx, k=6)
    t2 = time.perf_counter()
    out["openloop_cpu"], out["openloop_dev"] = m_cpu, m_dev
    out["openloop_seconds"] = {"cpu": round(t1 - t0, 2), "device": round(t2 - t1, 2)}
    fails = [k for k, v in out["loss_rel_err"].items() if not v < 1e-3]
    fails += [f"token_logp.{k}" for k, v in out["token_logp_rel_err"].items() if not v < 1e-3]
    if not out["device_repeat_bit_identical"]:
        fails.append("device_repeat_bit_identical")
    if out["greedy_action_rows_identical"] < 0.9:
        fails.append("greedy_action_rows_identical")
    out["failed"] = fails
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        from roadloop.io import atomic_write_text

        atomic_write_text(a.json, text)
    raise SystemExit(1 if fails else 0)


if __name__ == "__main__":
    main()
