"""A policy of your own, evaluated in closed loop like the built-in ones.

Run it:  python examples/custom_policy.py   (then `roadloop eval --policy cruise` works in this process)
"""

from __future__ import annotations

import torch

from roadloop.policies import Policy, PolicyOutput, register_policy
from roadloop.policies.route_idm import route_points


class Cruise(Policy):
    """Follows the route at a constant 8 m/s, whatever is in the way (a deliberately bad driver)."""

    name = "cruise"
    replan_every = 5  # decide at 2 Hz (the rollout executes the first 0.5 s of each 6.4 s plan)
    writes_coc = True  # its reasoning follows the CoC grammar (docs/reasoning.md): graded in evaluations

    def act(self, obs):
        st = obs.state
        t = torch.arange(1, 65) * 0.1  # 64 waypoints at 10 Hz
        s = st.route_s.unsqueeze(-1) + 8.0 * t  # (B, 64) m along the route
        xy, yaw = route_points(st.static.scenario.route.xy, st.static.route_ds, st.static.route_len, s)
        return PolicyOutput(plan_xy=xy, plan_yaw=yaw,
                            reasoning=["The lane ahead is clear, so keep lane and keep speed."] * obs.batch_size)


register_policy("cruise", Cruise)

if __name__ == "__main__":
    from roadloop.eval.evaluate import evaluate
    from roadloop.policies import get_policy
    from roadloop.rollout import RolloutConfig
    from roadloop.scenarios.suites import load_suite

    pol = get_policy("cruise")
    report, _ = evaluate(pol, load_suite("smoke").scenarios, suite_name="smoke",
                         cfg=RolloutConfig(replan_every=pol.replan_every))
    o = report.overall
    print(f"cruise on smoke: score {o['score'].mean:.3f}, at-fault collisions {o['collision_at_fault'].mean:.0%}, "
          f"reasoning grounded {o['reasoning_grounding'].mean:.0%}, consistent {o['reasoning_consistency'].mean:.0%}")
