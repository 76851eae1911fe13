"""Release discipline: a model registry with lineage and verified artifacts, safety gates, promotion and
rollback with an append-only audit log (docs/registry.md).

* ``store``: ``Registry`` (MLflow model registry + roadloop's SQLite state tables), ``register_candidate``
  (called by trainers), ``resolve_policy`` (``get_policy('champion')``).
* ``gates``: ``GateConfig`` (``roadloop/configs/gates.yaml``), the pure gate functions, ``run_gates``.
* ``matrix``: the validation matrix (suites x seeds) evaluated into one ``EvalReport``.
* ``lineage``: code version, lineage dict, SHA-256 manifests.
"""

from roadloop.registry.errors import (
    ConcurrentChangeError,
    GateFailedError,
    IntegrityError,
    RegistryDatabaseError,
    RegistryError,
    RegistryLockedError,
    StaleGateReportError,
    UnknownModelError,
)
from roadloop.registry.gates import GateConfig, GateResult, GateSummary, load_gate_config, run_gates
from roadloop.registry.lineage import code_version
from roadloop.registry.store import (
    CHAMPION,
    DEFAULT_NAME,
    GateRun,
    ModelVersion,
    Promotion,
    Registry,
    is_registry_policy,
    parse_ref,
    register_candidate,
    resolve_policy,
)

__all__ = ["CHAMPION", "DEFAULT_NAME", "ConcurrentChangeError", "GateConfig", "GateFailedError", "GateResult",
           "GateRun", "GateSummary", "IntegrityError", "ModelVersion", "Promotion", "Registry", "RegistryDatabaseError",
           "RegistryError", "RegistryLockedError", "StaleGateReportError", "UnknownModelError", "code_version",
           "is_registry_policy", "load_gate_config", "parse_ref", "register_candidate", "resolve_policy", "run_gates"]
