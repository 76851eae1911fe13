"""Policy registry: names -> constructors.  ``get_policy`` also accepts checkpoint paths."""

from __future__ import annotations

from collections.abc import Callable

from roadloop.errors import UnknownNameError
from roadloop.policies.base import Observation, Policy, PolicyOutput

_REGISTRY: dict[str, Callable[[], Policy]] = {}


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make ``factory`` available under ``name`` (for ``roadloop eval --policy NAME``)."""
    _REGISTRY[name] = factory


def policy_names() -> list[str]:
    _builtin()
    return sorted(_REGISTRY)


def _builtin() -> None:
    if "route-idm" not in _REGISTRY:
        from roadloop.policies.route_idm import RouteIDM

        register_policy("route-idm", RouteIDM)
    if "expert" not in _REGISTRY:
        try:
            from roadloop.policies.expert import Expert
        except ImportError:  # pragma: no cover - expert not installed
            return
        register_policy("expert", Expert)


def get_policy(name: str, device: str = "cpu") -> Policy:
    """A registered policy by name (``route-idm``, ``expert``, ...), a VLA checkpoint directory
    (``model.safetensors`` + ``config.json``, e.g. ``~/.roadloop/runs/il/final``), or a model from the
    release registry (``roadloop.registry``): ``champion`` (the default model's champion), ``champion:NAME``,
    ``registry:NAME@VERSION`` or ``registry:NAME@champion`` (artifacts verified against their manifest).
    ``device`` places a learned policy's model (``cpu``, ``cuda``, ``cuda:N``, ``auto``); rule-based policies
    run on the CPU whatever it says."""
    from pathlib import Path

    from roadloop.config import resolve_device

    device = resolve_device(device, "--device")  # checked for every policy, used by learned ones
    _builtin()
    if name in _REGISTRY:
        pol = _REGISTRY[name]()
        pol.source = name
        return pol
    if name == "champion" or name.startswith(("champion:", "registry:")):
        from roadloop.registry.store import resolve_policy

        return resolve_policy(name, device=device)
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        from roadloop.policies.vla.policy import VLAPolicy

        return VLAPolicy.from_checkpoint(p, device=device)
    if p.exists() or "/" in name:
        raise UnknownNameError("policy", name, list(_REGISTRY) + ["<checkpoint directory with config.json>"])
    raise UnknownNameError("policy", name, list(_REGISTRY) + ["champion", "registry:NAME@VERSION"])


__all__ = ["Observation", "Policy", "PolicyOutput", "get_policy", "policy_names", "register_policy"]
