"""Backend registry: simulator name -> SimulatorBackend subclass.

Backend modules are imported only when their name is asked for, so serving
`mock` never imports LIBERO, robosuite or MuJoCo. A simulator is a module named
in SIMULATORS (its file name is the name it is found by) that registers itself
with `register_backend(name, cls)` at import time; the package's other modules
(the contract, the channel, the task builder's helpers) are not simulators.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Type

from backends.base import SimulatorBackend

SIMULATORS = ("gymnasium", "kitchen", "libero", "liberoplus", "maniskill", "metaworld", "mock", "robosuite")
_REGISTRY: Dict[str, Type[SimulatorBackend]] = {}


def register_backend(name: str, cls: Type[SimulatorBackend]) -> None:
    _REGISTRY[name] = cls


def available_backends() -> List[str]:
    return sorted(set(SIMULATORS) | set(_REGISTRY))


def get_backend(name: str) -> Type[SimulatorBackend]:
    """The class registered as `name`, importing backends/<name>.py on first use.

    Raises KeyError with the available names when there is no such backend.
    """
    if name not in _REGISTRY and name in available_backends():
        importlib.import_module(f"backends.{name}")
    if name not in _REGISTRY:
        raise KeyError(f"unknown simulator {name!r}; available: {', '.join(available_backends())}")
    return _REGISTRY[name]
