"""Simulator configuration: one frozen dataclass per component (units in comments)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from roadloop.errors import ConfigError
from roadloop.sim.datatypes import DT


@dataclass(frozen=True)
class IDMParams:
    """Intelligent Driver Model parameters (defaults follow Waymax / Treiber)."""

    a_max: float = 2.0  # m/s^2, maximum acceleration
    b_comf: float = 4.0  # m/s^2, comfortable deceleration
    b_max: float = 9.0  # m/s^2, hardest braking allowed
    s0: float = 2.0  # m, standstill gap
    T: float = 1.5  # s, desired time headway
    delta: float = 4.0  # free-road exponent
    lookahead: float = 60.0  # m, leaders farther than this are ignored
    lateral_margin: float = 0.3  # m, extra half-width of the corridor in which leaders count

    def validate(self, name: str) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"sim.{name}.{f.name} must be a positive finite number, got {v}")


@dataclass(frozen=True)
class SimConfig:
    """Simulator configuration.

    ``checks`` selects the per-step checks; the expert's lookahead turns the costly ones off.
    """

    dt: float = DT  # s
    accel_min: float = -9.8  # m/s^2, ego action bound (Alpamayo-R1 action space)
    accel_max: float = 9.8  # m/s^2
    curvature_max: float = 0.2  # 1/m
    vehicle_idm: IDMParams = field(default_factory=IDMParams)
    pedestrian_idm: IDMParams = field(
        default_factory=lambda: IDMParams(a_max=1.0, b_comf=1.5, b_max=4.0, s0=0.5, T=0.5, lookahead=15.0,
                                          lateral_margin=0.2))
    check_collision: bool = True  # all agent pairs (broad + narrow phase), ego at-fault
    check_offroad: bool = True  # ego footprint vs lane union (spatial index), wrong way
    check_ttc: bool = True  # ego time-to-collision at constant velocity
    ttc_horizon: float = 3.0  # s
    lane_index_cell: float = 8.0  # m, spatial index cell size

    def validate(self) -> SimConfig:
        if abs(self.dt - DT) > 1e-9:
            raise ConfigError(f"sim.dt must be {DT} s (logs are recorded at 10 Hz), got {self.dt}")
        if not (self.accel_min < 0 < self.accel_max):
            raise ConfigError(f"sim.accel_min < 0 < sim.accel_max required, got {self.accel_min}, {self.accel_max}")
        if not (self.curvature_max > 0 and math.isfinite(self.curvature_max)):
            raise ConfigError(f"sim.curvature_max must be > 0, got {self.curvature_max}")
        if self.ttc_horizon <= 0 or self.lane_index_cell <= 0:
            raise ConfigError("sim.ttc_horizon and sim.lane_index_cell must be > 0")
        self.vehicle_idm.validate("vehicle_idm")
        self.pedestrian_idm.validate("pedestrian_idm")
        return self
