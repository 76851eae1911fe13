"""A procedural scenario family of your own: a slow IDM queue on a two-lane road.

Run it:  python examples/custom_family.py   (prints the expert's score on five scenarios)
"""

from __future__ import annotations

from roadloop.scenarios.families import _common as c
from roadloop.scenarios.families import register_family
from roadloop.sim.datatypes import Scenario

NAME = "slow_queue"


def build_raw(seed: int) -> Scenario:
    """Same seed, same scenario: every random draw comes from ``c.rng_for(NAME, seed)``."""
    rng = c.rng_for(NAME, seed)
    v_lim = float(rng.uniform(12.0, 16.0))
    length = 40.0 + c.route_need(v_lim) + 150.0
    ref = c.centerline(rng, length, curved=bool(rng.random() < 0.5), kappa_max=1 / 200)
    b = c.new_builder()
    lanes, _ = c.add_road(b, ref, 2, 0, 3.5, v_lim)  # two lanes one way, 3.5 m wide
    ego = c.chain(b, [lanes[0]])
    c.add_ego(b, [lanes[0]], ego.cut(40.0, 40.0 + c.route_need(v_lim) + 20.0), 0.8 * v_lim, v_lim)
    s = 40.0 + float(rng.uniform(25.0, 45.0))
    for _ in range(int(rng.integers(3, 6))):  # the queue ahead, crawling at 3-5 m/s
        v = float(rng.uniform(3.0, 5.0))
        c.add_idm(b, ego, s, v, v)
        s += float(rng.uniform(9.0, 14.0))
    return c.finish(b, NAME, seed)


register_family(NAME, build_raw, "a slow IDM queue ahead in the ego lane of a two-lane road")

if __name__ == "__main__":
    from roadloop.eval.evaluate import evaluate
    from roadloop.policies import get_policy
    from roadloop.scenarios.generate import generate_many

    scenarios = generate_many([(NAME, seed) for seed in range(5)])  # logged by the expert, like the built-ins
    report, _ = evaluate(get_policy("expert"), scenarios, suite_name=NAME)
    print(f"expert on {NAME}: score {report.overall['score'].mean:.3f}, "
          f"at-fault collisions {report.overall['collision_at_fault'].mean:.0%}")
