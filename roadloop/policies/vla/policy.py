"""``VLAPolicy``: drives the simulator with a ``VLAModel`` (BEV + ego history + route command ->
CoC text + 64 (accel, curvature) controls).

The BEV needs the last ``frames`` states; the rollout only passes the current one, so the policy
keeps its own buffer of the states it was shown (reset in ``reset``).  With ``replan_every=1``
these are the last 4 steps at 10 Hz; with slower replanning they are the last 4 decision states
(documented limitation).  Sampling uses one ``torch.Generator`` per batch row seeded from the
rollout seed, so a rollout's samples do not depend on the batch it runs in (up to float rounding).
"""

from __future__ import annotations

from pathlib import Path

import torch

from roadloop.policies.base import Observation, Policy, PolicyOutput
from roadloop.policies.vla import tokenizer as tok
from roadloop.policies.vla.model import VLAModel, load_checkpoint, state_hash
from roadloop.policies.vla.observe import RasterConfig, command_index, ego_history_features, render_bev, route_command
from roadloop.sim import dynamics
from roadloop.sim.datatypes import SimState

_SEED_SALT = 0x5EED_F00D


def observation_tensors(history: list[SimState], obs: Observation, raster: RasterConfig) -> dict[str, torch.Tensor]:
    """Model inputs from a state history (oldest first, last = now) and the observation."""
    return {"bev": render_bev(history, raster), "history": ego_history_features(obs),
            "command": command_index(route_command(obs.state))}


class VLAPolicy(Policy):
    name = "vla"

    def __init__(self, model: VLAModel, temperature: float = 1.0, top_p: float = 0.95, version: str | None = None):
        self.model = model.eval()
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.version = version or state_hash(model)[:12]
        cfg = model.cfg
        self.raster = RasterConfig(size=cfg.raster_size, frames=cfg.frames)
        self._states: list[SimState] = []
        self._gens: list[torch.Generator] | None = None

    @classmethod
    def from_checkpoint(cls, path_dir: str | Path, device: str | torch.device = "cpu", **kw) -> VLAPolicy:
        model, meta = load_checkpoint(path_dir, device)
        return cls(model, version=meta["weights_sha256"][:12], **kw)

    def reset(self, state: SimState, seeds: torch.Tensor) -> None:
        self._states = []
        self._gens = [torch.Generator().manual_seed((int(s) * 1_000_003 + _SEED_SALT) % (2 ** 63))
                      for s in seeds.tolist()]

    def act(self, obs: Observation) -> PolicyOutput:
        state = obs.state
        B = state.batch_size
        if self._gens is None or len(self._gens) != B:
            self.reset(state, torch.zeros(B, dtype=torch.int64))
        if not self._states or self._states[-1] is not state:
            self._states = (self._states + [state])[-self.raster.frames:]
        inputs = observation_tensors(self._states, obs, self.raster)
        text, acts, lp_text, lp_act = self.model.sample(inputs, self.temperature, self.top_p, self._gens)
        controls = tok.dequantize(acts.cpu())
        xy, yaw, speed = dynamics.unicycle_rollout(state.xy[:, 0], state.yaw[:, 0], state.speed[:, 0], controls)
        return PolicyOutput(plan_xy=xy, plan_yaw=yaw, plan_speed=speed, controls=controls,
                            reasoning=tok.decode_batch(text.cpu()), logp=(lp_text + lp_act).float().cpu())


__all__ = ["VLAPolicy", "observation_tensors"]
