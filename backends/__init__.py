"""Backend registry: simulator name -> SimulatorBackend subclass.

Backend modules are imported only when their name is asked for, so serving
`mock` never imports LIBERO, robosuite or MuJoCo. A module registers itself
with `register_backend(name, cls)` at import time; the module's file name is
the name it is found by.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Type

from backends.base import SimulatorBackend

_REGISTRY: Dict[str, Type[SimulatorBackend]] = {}
_NOT_BACKENDS = {"base", "catalog", "worker", "robosuite_frames"}  # the contract, process plumbing, helpers


def register_backend(name: str, cls: Type[SimulatorBackend]) -> None:
    _REGISTRY[name] = cls


def available_backends() -> List[str]:
    found = {info.name for info in pkgutil.iter_modules(__path__) if info.name not in _NOT_BACKENDS}
    return sorted(found | set(_REGISTRY))


def get_backend(name: str) -> Type[SimulatorBackend]:
    """The class registered as `name`, importing backends/<name>.py on first use.

    Raises KeyError with the available names when there is no such backend.
    """
    if name not in _REGISTRY and name in available_backends():
        importlib.import_module(f"backends.{name}")
    if name not in _REGISTRY:
        raise KeyError(f"unknown simulator {name!r}; available: {', '.join(available_backends())}")
    return _REGISTRY[name]
