"""The values of sim_server.py's settings that need more than a type: each parser returns the value
or raises SetupError, which the server says in one line before it exits 2."""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Tuple

from backends import available_backends

# Where `bash .ci/setup --simulator NAME` makes a simulator's own environment.
SIMULATOR_ENVIRONMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venvs")


class SetupError(Exception):
    """The server cannot start as configured; main() says why in one line and exits 2."""


def simulator_names(text: str) -> Tuple[str, ...]:
    """The served simulators of "mock,libero", in order, each once; SetupError for an unknown name."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise SetupError("--simulator names no simulator")
    available = available_backends()
    for name in names:
        if name not in available:
            raise SetupError(f"unknown simulator {name!r}; available: {', '.join(available)}")
    return names


def interpreter_settings(simulators: Tuple[str, ...], flags: List[str]) -> Dict[str, str]:
    """simulator -> interpreter: the simulator's own environment `.venvs/<NAME>` when
    `bash .ci/setup --simulator NAME` made one, else SIM_PYTHON_<NAME>, else --python NAME=INTERPRETER
    (each later one wins). A simulator with none runs under the server's own Python."""
    interpreters = {name: os.path.join(SIMULATOR_ENVIRONMENTS, name, "bin", "python") for name in simulators
                    if os.path.exists(os.path.join(SIMULATOR_ENVIRONMENTS, name, "bin", "python"))}
    interpreters.update({name: os.environ[f"SIM_PYTHON_{name.upper()}"] for name in simulators
                         if os.environ.get(f"SIM_PYTHON_{name.upper()}")})
    for flag in flags:
        name, equals, interpreter = flag.partition("=")
        if not (equals and name and interpreter):
            raise SetupError(f"--python {flag!r}: expected NAME=INTERPRETER, e.g. robosuite=/opt/rs15/bin/python")
        if name not in simulators:
            raise SetupError(f"--python {flag!r}: {name!r} is not among the served simulators "
                             f"({', '.join(simulators)})")
        interpreters[name] = interpreter
    return interpreters


def render_threads_setting(text: str) -> Optional[int]:
    if text == "auto":
        return None
    if not (text.isdigit() and int(text) >= 1):
        raise SetupError(f"--render-threads {text!r}: expected auto or a positive number of threads")
    return int(text)


def egl_device_setting(text: str) -> Tuple[str, ...]:
    """"auto": the NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else the driver's list)."""
    if text == "none":
        return ()
    if text != "auto":
        devices = tuple(device.strip() for device in text.split(","))
        if not all(device.isdigit() for device in devices):
            raise SetupError(f"--egl-devices {text!r}: expected auto, none or device numbers such as 0,1")
        return devices
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(device.strip() for device in visible.split(",") if device.strip().isdigit())
    return tuple(str(index) for index in range(len(glob.glob("/proc/driver/nvidia/gpus/*"))))


def folder_setting(flag: str, text: str, hint: str = "") -> str:
    """A folder flag's value as an absolute path, or "" for none; SetupError when it is not a folder."""
    if text and not os.path.isdir(text):
        raise SetupError(f"{flag} {text!r} is not a folder{hint}")
    return os.path.abspath(text) if text else ""


def task_dir_setting(text: str) -> str:
    """--task-dir as an absolute path, or "" for none; SetupError when it is not a folder."""
    return folder_setting("--task-dir", text, " (create it, then add task specs to it)")


def dashboard_address(text: str) -> Optional[Tuple[str, int]]:
    """"8080" -> ("127.0.0.1", 8080); "0.0.0.0:8080" as written; "" -> None (off)."""
    if not text:
        return None
    host, _, port = text.rpartition(":")
    if not (port.isdigit() and 0 <= int(port) <= 65535):
        raise SetupError(f"--dashboard {text!r}: expected PORT or HOST:PORT, e.g. 8080 or 0.0.0.0:8080")
    return (host.strip("[]") or "127.0.0.1", int(port))


def check_port(bind: str) -> None:
    """A tcp:// address needs a port in 1-65535 or *: libzmq would quietly bind some other port."""
    if not bind.startswith("tcp://"):
        return
    port = bind.rsplit(":", 1)[-1] if bind.count(":") >= 2 else ""
    if port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise SetupError(f"cannot listen on {bind}: the port must be 1-65535 or *; --bind takes a ZMQ address "
                         "such as tcp://*:5555 or tcp://127.0.0.1:5555")
