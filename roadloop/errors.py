"""Error types.  Messages name the thing that is wrong and what was expected."""


class RoadloopError(Exception):
    """Base class: a user-facing error with a clear message (no traceback needed)."""


class ScenarioError(RoadloopError):
    """A scenario or suite is malformed: names the scenario, the field and the expectation."""


class ConfigError(RoadloopError):
    """An impossible or inconsistent configuration."""


class ControlError(RoadloopError):
    """Controls or plans handed to the simulator are malformed (NaN, wrong shape...)."""


class UnknownNameError(RoadloopError):
    """An unknown policy, suite, family or metric name."""

    def __init__(self, what: str, name: str, known: list[str]):
        super().__init__(f"unknown {what} '{name}'; known: {', '.join(sorted(known))}")
        self.name = name
        self.known = known
