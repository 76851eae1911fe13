"""Typed configuration: dataclass schemas + YAML files + ``key=value`` overrides (OmegaConf).

Every trainer has a dataclass schema whose defaults are the default configuration; a YAML file
(``--config FILE``, e.g. the presets in ``roadloop/configs/``) and command-line overrides in
Hydra's dotted syntax (``lr=3e-4 model.preset=tiny``) are merged on top, type-checked by
OmegaConf.  The resolved configuration is saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

from roadloop.errors import ConfigError

T = TypeVar("T")
CONFIG_DIR = Path(__file__).parent / "configs"


def load_config(schema: type[T], overrides: list[str] | tuple[str, ...] = (), files: list[str | Path] = ()) -> T:
    """Instance of the dataclass ``schema``: defaults <- YAML ``files`` <- ``overrides`` (``a.b=value``).

    A bare file name without a directory is looked up in ``roadloop/configs/`` too.  Unknown keys,
    values of the wrong type and malformed overrides raise ``ConfigError`` naming the key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.structured(schema)
        for f in files:
            p = Path(f)
            if not p.is_file() and (CONFIG_DIR / p).is_file():
                p = CONFIG_DIR / p
            if not p.is_file():
                raise ConfigError(f"config file {f} not found (presets: {', '.join(list_presets())})")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        msg = str(e).split("\n")[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{schema.__name__} config: {msg}" + (f" (key '{key}')" if key else "")) from None
    validate = getattr(obj, "validate", None)
    return validate() if callable(validate) else obj


def to_dict(cfg) -> dict:
    """Plain nested dict of a dataclass config (for JSON / YAML / trackers)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def list_presets() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def resolve_device(name: str, where: str = "device") -> str:
    """Torch device string for ``name``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).

    Raises ``ConfigError`` naming ``where`` for an unknown name or a CUDA device this machine lacks, before
    any compute is spent (torch's own message would come from deep inside the first ``.to()``)."""
    import torch

    name = str(name).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: '{name}' requested but this machine has no usable CUDA device "
                              f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'}); "
                              f"use cpu or auto")
        idx = int(name[5:]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"{where}: '{name}' requested but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
        return name
    raise ConfigError(f"{where} must be cpu, cuda, cuda:N or auto, got {name!r}")


__all__ = ["CONFIG_DIR", "list_presets", "load_config", "resolve_device", "to_dict", "to_yaml"]
