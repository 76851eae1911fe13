"""Where the model runs: ``cpu`` / ``cuda`` / ``cuda:N`` / ``auto``, checked before any compute, and the
same numbers on a GPU as on the CPU (that part runs only where CUDA is; ``benchmarks/gpu.sh`` is the full
check)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from roadloop.cli import app
from roadloop.config import resolve_device
from roadloop.errors import ConfigError
from roadloop.policies import get_policy
from roadloop.policies.vla.model import PRESETS, VLAModel, save_checkpoint
from roadloop.policies.vla.observe import CHANNELS
from roadloop.train.grpo import GRPOConfig
from roadloop.train.il import ILConfig
from roadloop.train.road import RoaDConfig

CUDA = torch.cuda.is_available()


def _obs(B: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"bev": torch.rand(B, 4, len(CHANNELS), 64, 64, generator=g), "history": torch.randn(B, 16, 5, generator=g),
            "command": torch.arange(B) % 7}


def test_resolve_device_names_and_errors():
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    for bad in ("gpu", "cuda:x", "mps0", ""):
        with pytest.raises(ConfigError, match="il.device must be cpu, cuda, cuda:N or auto"):
            resolve_device(bad, "il.device")
    if not CUDA:
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match=f"grpo.device: '{name}' requested but this machine has no usable"):
                resolve_device(name, "grpo.device")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=f"has {n} CUDA device"):
            resolve_device(f"cuda:{n}")


def test_trainer_configs_check_the_device_before_any_compute():
    for cfg, key in ((ILConfig(device="gpu"), "il.device"), (GRPOConfig(init="x", device="gpu"), "grpo.device"),
                     (RoaDConfig(init="x", device="gpu"), "road.device")):
        with pytest.raises(ConfigError, match=key):
            cfg.validate()
    assert ILConfig(device="auto").validate().device == "auto"  # kept as written: a resumed run may move


def test_cli_device_option(tmp_path):
    """``--device`` on eval / eval-openloop / bench vla / bench grpo: a learned policy is placed there; a
    device this machine lacks, or a name that is none, is a one-line error (exit 2) before any work."""
    torch.manual_seed(0)
    save_checkpoint(VLAModel(PRESETS["tiny"]), tmp_path / "ck")
    pol = get_policy(str(tmp_path / "ck"), device="auto")
    assert pol.model.device.type == ("cuda" if CUDA else "cpu")
    assert get_policy("route-idm", device="cpu").name == "route-idm"
    r = CliRunner().invoke(app, ["--threads", "1", "bench", "vla", "--policy", str(tmp_path / "ck"), "--batch", "1",
                                 "--repeats", "1", "--device", "auto"])
    assert r.exit_code == 0, r.output
    assert ("on cuda" if CUDA else "on cpu") in " ".join(r.output.split())  # the title wraps with the path's length
    bad = [["bench", "vla", "--preset", "tiny", "--device", "tpu"],
           ["eval", "--policy", str(tmp_path / "ck"), "--suite", "smoke", "--device", "tpu"],
           ["eval-openloop", "--policy", str(tmp_path / "ck"), "--data", str(tmp_path), "--device", "tpu"],
           ["bench", "grpo", "--preset", "tiny", "--device", "tpu"]]
    for args in bad:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "--device must be cpu, cuda, cuda:N or auto" in r.output.replace("\n", " "), \
            (args, r.output)
    if not CUDA:
        r = CliRunner().invoke(app, ["eval", "--policy", str(tmp_path / "ck"), "--suite", "smoke", "--device", "cuda"])
        assert r.exit_code == 2 and "no usable CUDA device" in r.output.replace("\n", " "), r.output


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_computes_what_the_cpu_computes():
    """Same weights on both devices: teacher-forced log-probabilities within float32 rounding, the same
    greedy and seeded samples (CPU generators draw the uniforms on both), repeatable on the GPU."""
    torch.manual_seed(0)
    cpu = VLAModel(PRESETS["tiny"]).eval()
    gpu = VLAModel(PRESETS["tiny"]).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    obs = _obs()
    a = cpu.sample(obs, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    b = gpu.sample(obs, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    c = gpu.sample(obs, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    for x, y in zip(b, c, strict=True):
        assert torch.equal(x, y)
    with torch.no_grad():
        lc, la = cpu.log_prob(obs, a[0], a[1])
        gc, ga = gpu.log_prob(obs, a[0], a[1])
    torch.testing.assert_close(gc.cpu(), lc, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ga.cpu(), la, rtol=1e-4, atol=1e-3)
