"""Fill in a raw scenario's log by simulating it with a careful driver.

Procedural families describe the initial scene, scripted agents (full log tracks) and
reactive agents (initial state + path).  ``record_logs`` simulates the batch with a careful
driver as the ego from step 0 (no warm-up): by default the privileged ``expert``, which plays
the role of the human driver of a recorded log.  Every agent's simulated track is written into
the log, so the log is physically consistent: log-replay agents react to the logged ego as IDM
agents would.  The report says whether the careful driver got through cleanly; families retry
with another seed when it did not (a scenario a careful driver cannot complete is invalid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from roadloop.policies.base import Policy
from roadloop.policies.expert import Expert
from roadloop.rollout import RolloutConfig, rollout
from roadloop.sim.batching import collate
from roadloop.sim.config import SimConfig
from roadloop.sim.datatypes import Scenario, TrafficModel

MIN_TRAVEL = 30.0  # m a careful driver must cover for a scenario to count as completable


@dataclass(frozen=True)
class RecordReport:
    collision: bool  # the careful ego collided (any fault)
    offroad: bool
    agent_collision: bool  # two non-ego agents collided
    completed: bool  # ego travelled >= MIN_TRAVEL m or reached the route end
    travelled: float  # m
    reason: str  # "" if valid

    @property
    def valid(self) -> bool:
        return not self.reason


def record_logs(raws: list[Scenario], sim: SimConfig | None = None, driver: Policy | None = None,
                batch_size: int = 64) -> list[tuple[Scenario, RecordReport]]:
    """Simulate raw scenarios (batched) and return them with full logs plus a validity report."""
    out: list[tuple[Scenario, RecordReport]] = []
    for i in range(0, len(raws), batch_size):
        out += _record_batch(raws[i:i + batch_size], sim or SimConfig(), driver or Expert())
    return out


def _record_batch(raws: list[Scenario], sim: SimConfig, driver: Policy) -> list[tuple[Scenario, RecordReport]]:
    batch = collate(raws)
    T = batch.num_steps
    with torch.inference_mode():
        ro = rollout(driver, batch, cfg=RolloutConfig(max_steps=T - 1, warmup=0, sim=sim))
    out = []
    for b, raw in enumerate(raws):
        A, Tb = raw.agents.num_agents, raw.num_steps
        ag = raw.agents
        keep = (ag.model == TrafficModel.LOG).clone()
        keep[0] = False  # the ego's log is what the careful driver did
        keep_t = keep.view(A, 1)
        xy = torch.where(keep_t.unsqueeze(-1), ag.xy, ro.xy[:Tb, b, :A].transpose(0, 1))
        yaw = torch.where(keep_t, ag.yaw, ro.yaw[:Tb, b, :A].transpose(0, 1))
        speed = torch.where(keep_t, ag.speed, ro.speed[:Tb, b, :A].transpose(0, 1))
        valid = torch.where(keep_t, ag.valid, ro.present[:Tb, b, :A].transpose(0, 1))
        xy = torch.where(valid.unsqueeze(-1), xy, torch.zeros_like(xy))
        new = Scenario(map=raw.map, agents=ag.replace(xy=xy.contiguous(), yaw=yaw.contiguous(),
                                                      speed=speed.contiguous(), valid=valid.contiguous()),
                       route=raw.route, light_states=raw.light_states, light_xy=raw.light_xy, meta=raw.meta)
        c = ro.checks
        coll = bool(c.collision[:Tb - 1, b].any())
        off = bool(c.offroad[:Tb - 1, b].any())
        agc = bool((c.agent_collision[:Tb - 1, b] > 0).any())
        travelled = float(c.progress[Tb - 2, b] - ro.checks.progress[0, b])
        done = travelled >= MIN_TRAVEL or float(c.progress[Tb - 2, b]) >= float(raw.route.length) - 5.0
        why = []
        if coll:
            t = int(c.collision[:, b].nonzero()[0])
            why.append(f"careful ego collided with agent {int(c.collision_agent[t, b])} at step {t + 1}")
        if off:
            why.append(f"careful ego went off-road at step {int(c.offroad[:, b].nonzero()[0]) + 1}")
        if agc:
            why.append(f"background agents collided at step {int((c.agent_collision[:, b] > 0).nonzero()[0]) + 1}")
        if not done:
            why.append(f"careful ego travelled only {travelled:.1f} m")
        out.append((new, RecordReport(coll, off, agc, done, travelled, "; ".join(why))))
    return out
