"""Deterministic toy policies for tests: constant controls, constant speed along the route, and
deliberately broken ones (NaN, wrong shape, raising)."""

from __future__ import annotations

import torch

from roadloop.policies.base import PLAN_STEPS, Observation, Policy, PolicyOutput
from roadloop.policies.route_idm import route_points


class ConstantControls(Policy):
    name = "constant-controls"

    def __init__(self, accel: float = 0.0, curvature: float = 0.0):
        self.c = torch.tensor([accel, curvature])

    def act(self, obs: Observation) -> PolicyOutput:
        B = obs.batch_size
        st = obs.state
        ctrl = self.c.expand(B, PLAN_STEPS, 2).clone()
        xy = st.xy[:, :1] + torch.zeros(B, PLAN_STEPS, 2)
        return PolicyOutput(plan_xy=xy, controls=ctrl, reasoning=["constant"] * B)


class RouteSpeed(Policy):
    """Follow the route centreline at a constant target speed (m/s)."""

    name = "route-speed"

    def __init__(self, speed: float):
        self.v = speed

    def act(self, obs: Observation) -> PolicyOutput:
        st = obs.state
        B = obs.batch_size
        t = torch.arange(1, PLAN_STEPS + 1, dtype=torch.float32) * 0.1
        s = st.route_s.unsqueeze(-1) + self.v * t
        xy, yaw = route_points(st.static.scenario.route.xy, st.static.route_ds, st.static.route_len, s)
        return PolicyOutput(plan_xy=xy, plan_yaw=yaw, plan_speed=torch.full((B, PLAN_STEPS), self.v))


class NaNOnScenario(RouteSpeed):
    """Returns NaN plans for batch row ``bad`` from step ``at`` on."""

    name = "nan-policy"

    def __init__(self, bad: int = 0, at: int = 15, speed: float = 8.0):
        super().__init__(speed)
        self.bad, self.at = bad, at

    def act(self, obs: Observation) -> PolicyOutput:
        out = super().act(obs)
        if obs.step >= self.at:
            out.plan_xy[self.bad] = float("nan")
        return out


class WrongLength(RouteSpeed):
    name = "wrong-length"

    def act(self, obs: Observation) -> PolicyOutput:
        out = super().act(obs)
        return PolicyOutput(plan_xy=out.plan_xy[:, :10])


class Raising(Policy):
    name = "raising"

    def act(self, obs: Observation) -> PolicyOutput:
        raise RuntimeError("model exploded")
