"""The README's extension examples (``examples/``) run as written."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _unregister_example_family():
    """The examples register a family and a policy process-wide; leave the registries as found."""
    from roadloop.policies import _REGISTRY as POLICIES
    from roadloop.scenarios.families import FAMILIES

    fams, pols = dict(FAMILIES), dict(POLICIES)
    yield
    FAMILIES.clear()
    FAMILIES.update(fams)
    POLICIES.clear()
    POLICIES.update(pols)


def test_named_suites_keep_to_the_built_in_families():
    from roadloop.scenarios.families import BUILTIN
    from roadloop.scenarios.suites import suite_pairs

    runpy.run_path(str(EXAMPLES / "custom_family.py"))
    assert {f for f, _ in suite_pairs("smoke")} == set(BUILTIN)


@pytest.mark.parametrize("name, expect", [("custom_policy.py", "cruise on smoke: score"),
                                          ("custom_family.py", "expert on slow_queue: score 1.000")])
def test_example_runs(name, expect, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert expect in capsys.readouterr().out


def test_custom_family_is_deterministic_and_guarded():
    from roadloop.scenarios.families import FAMILIES, register_family
    from roadloop.scenarios.suites import content_hash

    ns = runpy.run_path(str(EXAMPLES / "custom_family.py"))
    a, b = ns["build_raw"](3), ns["build_raw"](3)
    assert content_hash([a]) == content_hash([b])
    assert "slow_queue" in FAMILIES
    with pytest.raises(ValueError, match="already exists"):
        register_family("cut_in", ns["build_raw"])
    with pytest.raises(ValueError, match="family name"):
        register_family("bad name", ns["build_raw"])
