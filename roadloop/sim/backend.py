"""External traffic backends for the rollout engine, and the choice of agent models.

``roadloop.rollout.rollout(..., traffic=backend)`` lets an external simulator move the non-ego
agents (AlpaSim's optional "traffic sim" service, here in-process): after roadloop has moved the
ego for a step, ``backend.step(prev, nxt)`` returns ``nxt`` with the other agents' poses,
speeds and presence replaced by the external simulator's.  The per-step checks, the metrics
and the policy interface are unchanged.  ``roadloop.sumo.cosim.SumoCosim`` is the SUMO backend.

``with_agent_model`` switches the non-ego agents of scenarios between log replay and IDM
(``roadloop eval --agents log|idm``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from roadloop.errors import ConfigError
from roadloop.sim.datatypes import DT, AgentType, Scenario, SimState, TrafficModel
from roadloop.sim.geometry import wrap_angle


@runtime_checkable
class TrafficBackend(Protocol):
    """Moves the non-ego agents of a batch in lock-step with roadloop (10 Hz)."""

    def reset(self, state: SimState) -> None:
        """Start a run for the batch in ``state`` (step 0 of its scenarios)."""

    def step(self, prev: SimState, nxt: SimState) -> SimState:
        """``nxt`` (roadloop's state at t+1, ego already moved) with the agents 1..A-1's
        ``xy`` (B, A, 2) m, ``yaw`` (B, A) rad, ``speed`` (B, A) m/s and ``present`` (B, A)
        replaced by the external simulator's after it has advanced from t to t+1 with the ego
        at ``nxt``'s pose.  ``accel`` and ``yaw_rate`` are recomputed from ``prev``."""

    def close(self) -> None:
        """Release the external simulator(s)."""


def replace_agents(prev: SimState, nxt: SimState, xy: torch.Tensor, yaw: torch.Tensor, speed: torch.Tensor,
                   present: torch.Tensor) -> SimState:
    """``nxt`` with agents 1.. taken from (xy (B, A, 2), yaw (B, A), speed (B, A), present (B, A));
    the ego (agent 0) stays roadloop's.  Absent agents keep roadloop's pose (masked anyway), speed 0."""
    ego = torch.zeros_like(present)
    ego[:, 0] = True
    pres = torch.where(ego, nxt.present, present)
    keep = ego | ~present
    xy = torch.where(keep.unsqueeze(-1), nxt.xy, xy.to(nxt.xy.dtype))
    yaw = torch.where(keep, nxt.yaw, yaw.to(nxt.yaw.dtype))
    speed = torch.where(ego, nxt.speed, torch.where(present, speed.to(nxt.speed.dtype), torch.zeros_like(nxt.speed)))
    return nxt.replace(xy=xy, yaw=yaw, speed=speed, present=pres, accel=(speed - prev.speed) / DT,
                       yaw_rate=wrap_angle(yaw - prev.yaw) / DT)


AGENT_MODES = ("log", "idm")


def with_agent_model(scenario: Scenario, mode: str) -> Scenario:
    """The scenario with its non-ego agents' default traffic model set by ``mode``.

    ``log``: unchanged (each agent keeps the model its scenario gives it, log replay for
    recorded traffic); ``idm``: vehicles and cyclists that have a path become IDM agents (they
    follow their logged path and react to the ego and each other), the rest keep their model.
    """
    if mode not in AGENT_MODES:
        raise ConfigError(f"agent mode must be one of {', '.join(AGENT_MODES)}, got {mode!r}")
    if mode == "log":
        return scenario
    a = scenario.agents
    moving = (a.kind == AgentType.VEHICLE) | (a.kind == AgentType.CYCLIST)
    has_path = a.path_valid.sum(-1) >= 2
    idx = torch.arange(a.num_agents)
    sel = moving & has_path & (idx > 0 if not scenario.batched else (idx > 0).unsqueeze(0))
    model = torch.where(sel, torch.full_like(a.model, int(TrafficModel.IDM)), a.model)
    return scenario.replace(agents=a.replace(model=model))


__all__ = ["AGENT_MODES", "TrafficBackend", "replace_agents", "with_agent_model"]
