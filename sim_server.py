"""Simulator Inference Center server: robot simulators behind a ZMQ ROUTER socket.

    pip install -r requirements.txt
    python sim_server.py --simulator libero            # LIBERO on tcp://*:5555
    python sim_server.py --simulator mock --port 5556  # a fake simulator, for trying clients
    python sim_server.py --simulator libero,robosuite --python robosuite=/venvs/rs15/bin/python

Clients (see sim_client.py) send one msgpack map per request: list_simulators,
select_simulator, list_tasks, load_task, reset, step, get_info, ping,
disconnect. Every client is a
session; each session's simulator runs in its own worker process, so a slow
step never stalls the poll loop or another session, and a simulator that
crashes or hangs ends only its own session.

Parts, in order: configuration, protocol codec, requests and replies,
simulator catalogs, simulator workers (the code that runs in a worker process), worker handles,
session table, connections, CURVE, simulator requests (to a worker and back),
the poll loop and dispatch, main().

Who is who: a client's ZMQ `routing_id` names its session; `session_key` is
the session table's key (the routing_id, plus the TCP connection's number
for guessable ids); `session_id` is the short public name in get_info and
logs; `connection` is the number of the TCP connection a message came on;
`curve_key` is the client's CURVE public key.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import difflib
import glob
import io
import itertools
import logging
import multiprocessing.connection
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack
import numpy as np

try:
    import zmq
    import zmq.auth
    import zmq.utils.monitor
    from zmq.auth.thread import ThreadAuthenticator
except ImportError:  # a simulator worker under another interpreter (--python) needs only numpy and msgpack
    zmq = None

from backends import available_backends, get_backend
from backends.base import (
    BackendError,
    InternalError,
    InvalidParams,
    NoSimulatorSelected,
    NoTaskLoaded,
    NotReset,
    ServerBusy,
    SimulatorAlreadySelected,
    SimulatorBackend,
    SimulatorError,
    TaskNotFound,
    UnknownMethod,
    UnknownSimulator,
)

log = logging.getLogger("sim_server")

# --- configuration -----------------------------------------------------------

SERVER_VERSION = "1.0.0"
# Requests are tiny (a [50, 7] float32 action chunk is 1.4 KB); a small cap bounds the
# memory a hostile frame can make msgpack allocate (README "Security and limits").
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Strict request/reply needs a handful of queued messages per peer, not 1000.
SOCKET_HWM = 16
# Seconds a closing worker gets to free its simulator before it is killed.
WORKER_CLOSE_GRACE_S = 5.0
# The longest the poll loop sleeps, so shutdown and reaping stay prompt.
POLL_INTERVAL_S = 0.25
# robosuite/LIBERO leak memory and GL contexts across env close: a session that switches
# tasks gets a fresh simulator process after this many task switches.
MAX_TASKS_PER_WORKER = 8
# Longest action chunk one step request may carry (openpi replans every 5 of 10 or 50).
MAX_CHUNK = 256
# Methods a session's worker process answers; everything else the loop answers.
SIMULATOR_METHODS = ("load_task", "reset", "step")
LOOP_METHODS = ("list_simulators", "select_simulator", "list_tasks", "get_info", "ping", "disconnect")
# What a session may ask before it has a simulator (with several served, it must select one).
METHODS_WITHOUT_SIMULATOR = ("list_simulators", "select_simulator", "ping", "disconnect")
# What a backend's get_info may add to the server's: the simulator stack and renderer in use.
PROVENANCE_KEYS = ("simulator_stack", "renderer")
# ZMTP heartbeats free half-open connections: a frozen peer's routing id is released.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
# Requests the loop takes from the frontend in one go before it looks at the workers again.
FRONTEND_BATCH = 100


def default_max_sessions() -> int:
    """One LIBERO env takes about 2 GB: leave room for the OS and the server."""
    try:
        memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = 8.0
    return max(1, min(int(memory_gib // 2.5), 4 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class Config:
    simulators: Tuple[str, ...]
    bind: str
    log_level: str
    session_timeout_s: float
    max_sessions: int
    step_timeout_s: float
    load_timeout_s: float
    max_request_bytes: int
    render_threads: Optional[int] = None  # None: share the cores among the running simulators
    egl_devices: Tuple[str, ...] = ()  # EGL device ids given to workers in turn; () leaves MUJOCO_EGL_DEVICE_ID alone
    dashboard: Optional[Tuple[str, int]] = None  # (host, port) of the dashboard; None: off
    dashboard_admin: bool = False  # whether the dashboard may end sessions
    curve_secret_key: str = ""  # the server's .key_secret file; empty means CURVE off
    curve_clients: str = ""  # folder of allowed client .key files
    interpreters: Dict[str, str] = field(default_factory=dict)  # simulator -> the Python its workers run under


# (flag, environment variable, default, type, help); --port is handled apart.
SETTINGS = [
    ("--simulator", "SIM_BACKEND", "libero", str, "simulators to serve, comma separated (e.g. mock,libero)"),
    ("--bind", "SIM_BIND_ADDRESS", "tcp://*:5555", str, "ZMQ address the ROUTER binds"),
    ("--log-level", "SIM_LOG_LEVEL", "INFO", str, "DEBUG logs every request"),
    ("--session-timeout", "SIM_SESSION_TIMEOUT_S", 300.0, float, "idle seconds before a session is reaped"),
    ("--max-sessions", "SIM_MAX_SESSIONS", default_max_sessions(), int, "concurrent simulator processes"),
    ("--step-timeout", "SIM_STEP_TIMEOUT_S", 60.0, float, "seconds a reset or step may run before it is killed"),
    ("--load-timeout", "SIM_LOAD_TIMEOUT_S", 300.0, float, "seconds a load_task may run before it is killed"),
    ("--max-request-bytes", "SIM_MAX_REQUEST_BYTES", MAX_REQUEST_BYTES, int, "largest request frame accepted"),
    ("--render-threads", "SIM_RENDER_THREADS", "auto", str,
     "llvmpipe/OpenMP/BLAS threads per simulator process: auto (the cores shared by the running simulators) or N"),
    ("--egl-devices", "SIM_EGL_DEVICES", "auto", str,
     "EGL devices handed to simulator processes in turn: auto (the visible NVIDIA GPUs), none, or e.g. 0,1"),
    ("--dashboard", "SIM_DASHBOARD", "", str,
     "serve the live dashboard on PORT (127.0.0.1) or HOST:PORT; off when empty"),
    ("--curve-secret-key", "SIM_CURVE_SECRET_KEY", "", str, "server's CURVE secret key file: turns on CURVE"),
    ("--curve-clients", "SIM_CURVE_CLIENTS", "", str, "folder of the client public keys CURVE lets in"),
]


class SetupError(Exception):
    """The server cannot start as configured; main() says why in one line and exits 2."""


def env_setting(env_var: str, default: Any, kind: type) -> Any:
    """The SIM_* variable as `kind`, else the default; a value of the wrong type is a SetupError."""
    text = os.environ.get(env_var)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        raise SetupError(f"{env_var}={text!r} is not a valid {kind.__name__}") from None


def parse_config(argv: Optional[List[str]] = None) -> Config:
    """Flags override SIM_* environment variables, which override defaults."""
    parser = argparse.ArgumentParser(
        description="Serve robot simulators over ZMQ.",
        epilog=f"simulators: {', '.join(available_backends())}. "
        "Backend settings (SIM_LIBERO_*, SIM_MOCK_*) are read from the environment; see README.md.",
    )
    for flag, env_var, default, kind, text in SETTINGS:
        value = env_setting(env_var, default, kind)
        parser.add_argument(flag, type=kind, default=value, help=f"{text} (env {env_var}; now {value})")
    parser.add_argument("--port", type=int, default=None, help="shorthand for --bind tcp://*:PORT")
    parser.add_argument("--python", action="append", default=[], metavar="NAME=INTERPRETER",
                        help="run simulator NAME's workers under INTERPRETER, e.g. another venv's bin/python "
                             "(repeatable; env SIM_PYTHON_<NAME>)")
    parser.add_argument("--dashboard-admin", action="store_true",
                        default=os.environ.get("SIM_DASHBOARD_ADMIN", "") not in ("", "0"),
                        help="let the dashboard end sessions (env SIM_DASHBOARD_ADMIN=1)")
    parser.add_argument("--gen-keys", metavar="DIR", default=None,
                        help="write a server and a client CURVE key pair into DIR, then exit")
    args = parser.parse_args(argv)
    if args.gen_keys is not None:
        generate_keys(args.gen_keys)
        parser.exit(0)
    bind = f"tcp://*:{args.port}" if args.port is not None else args.bind
    check_port(bind)
    simulators = simulator_names(args.simulator)
    return Config(
        simulators=simulators,
        interpreters=interpreter_settings(simulators, args.python),
        bind=bind,
        log_level=args.log_level.upper(),
        session_timeout_s=args.session_timeout,
        max_sessions=args.max_sessions,
        step_timeout_s=args.step_timeout,
        load_timeout_s=args.load_timeout,
        max_request_bytes=args.max_request_bytes,
        render_threads=render_threads_setting(args.render_threads),
        egl_devices=egl_device_setting(args.egl_devices),
        dashboard=dashboard_address(args.dashboard),
        dashboard_admin=args.dashboard_admin,
        curve_secret_key=args.curve_secret_key,
        curve_clients=args.curve_clients,
    )


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
    """simulator -> interpreter from SIM_PYTHON_<NAME> and --python NAME=INTERPRETER (the flag wins)."""
    interpreters = {name: os.environ[f"SIM_PYTHON_{name.upper()}"] for name in simulators
                    if os.environ.get(f"SIM_PYTHON_{name.upper()}")}
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


def generate_keys(folder: str) -> None:
    """server.key(_secret) for the server, client.key(_secret) for a client; client.key goes in --curve-clients."""
    os.makedirs(folder, exist_ok=True)
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(folder, name)
        print(f"wrote {public} and {secret}")
    print(f"serve:  --curve-secret-key {folder}/server.key_secret --curve-clients DIR_WITH_client.key\n"
          f"client: --server-key {folder}/server.key --client-key {folder}/client.key_secret")


# --- protocol codec ----------------------------------------------------------

_SAFE_DTYPE_NAMES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                     "uint64", "float16", "float32", "float64"]


def _safe_dtypes() -> Dict[str, np.dtype]:
    """Every spelling of a numeric or bool dtype we accept, mapped to the dtype."""
    table = {}
    for name in _SAFE_DTYPE_NAMES:
        dtype = np.dtype(name)
        for spelling in (name, dtype.str, dtype.newbyteorder(">").str, dtype.newbyteorder("<").str):
            table[spelling] = np.dtype(spelling)
    return table


SAFE_DTYPES = _safe_dtypes()
MAX_NDIM = 8
NDARRAY_KEYS = {"__type__", "shape", "dtype", "data"}


def _pack_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in SAFE_DTYPES:
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        array = np.ascontiguousarray(obj)
        return {"__type__": "ndarray", "shape": list(array.shape), "dtype": array.dtype.str,
                "data": array.data if array.size else b""}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(message: Dict[str, Any]) -> bytes:
    """A map as a msgpack body; numpy arrays become ndarray maps."""
    return msgpack.packb(message, default=_pack_extra, use_bin_type=True)


def _unpack_ndarray(obj: Dict[str, Any]) -> Any:
    """A map tagged ndarray as a read-only array, after checking every field: numpy builds
    arrays from a hostile dtype or shape by crashing the process."""
    if obj.get("__type__") != "ndarray":
        return obj
    if set(obj) != NDARRAY_KEYS:
        raise InvalidParams(f"ndarray map needs exactly the keys {sorted(NDARRAY_KEYS)}")
    dtype = SAFE_DTYPES.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
    if dtype is None:
        raise InvalidParams(f"ndarray dtype {obj['dtype']!r} is not a numeric or bool dtype")
    shape = obj["shape"]
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(type(n) is int and n >= 0 for n in shape)):
        raise InvalidParams(f"ndarray shape must be a list of at most {MAX_NDIM} non-negative ints")
    data = obj["data"]
    expected = dtype.itemsize
    for n in shape:
        expected *= n
    if not isinstance(data, bytes) or len(data) != expected:
        raise InvalidParams(f"ndarray data must be {expected} bytes for shape {shape} and dtype {dtype.str}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode(body: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Dict[str, Any]:
    """A request body as a map, or InvalidParams; never pickle, never ext types."""
    try:
        message = msgpack.unpackb(
            body, raw=False, strict_map_key=True, object_hook=_unpack_ndarray,
            max_bin_len=max_bytes, max_str_len=max_bytes, max_ext_len=0,
            max_array_len=max(1024, max_bytes // 8), max_map_len=4096,
        )
    except InvalidParams:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        raise InvalidParams(f"malformed body: {type(error).__name__}: {error}") from None
    if not isinstance(message, dict):
        raise InvalidParams(f"body must be a msgpack map, got {type(message).__name__}")
    return message


def reply_status(body: bytes) -> Optional[str]:
    """A reply's status, read from its first entry without decoding the rest (images included)."""
    unpacker = msgpack.Unpacker(io.BytesIO(body), raw=False, read_size=64, max_buffer_size=len(body) + 64)
    try:
        if unpacker.read_map_header() and unpacker.unpack() == "status":  # our replies put it first
            return unpacker.unpack()
    except (ValueError, TypeError, msgpack.OutOfData):
        pass
    return None


# --- requests and replies ----------------------------------------------------

REQUEST_ID_TYPES = (type(None), bool, int, float, str, bytes)


@dataclass
class Request:
    method: str
    fields: Dict[str, Any]
    request_id: Any = None


def request_id_in(message: Dict[str, Any]) -> Any:
    """The message's request_id when it is a scalar (echoed in the reply), else None."""
    request_id = message.get("request_id")
    return request_id if isinstance(request_id, REQUEST_ID_TYPES) else None


def parse_request(message: Dict[str, Any]) -> Request:
    """Method, fields (top level, or a nested "params" map) and request_id of a decoded body."""
    fields = dict(message)
    request_id = fields.pop("request_id", None)
    if not isinstance(request_id, REQUEST_ID_TYPES):
        raise InvalidParams("request_id must be a scalar")
    method = fields.pop("method", None)
    if not isinstance(method, str):
        raise InvalidParams("request needs a string 'method'")
    params = fields.pop("params", {})
    if not isinstance(params, dict):
        raise InvalidParams("'params' must be a map")
    fields.update(params)
    return Request(method, fields, request_id)


def ok_reply(request_id: Any, **fields: Any) -> bytes:
    reply = {"status": "ok", **fields}
    if request_id is not None:
        reply["request_id"] = request_id
    return encode(reply)


def error_reply(request_id: Any, error: SimulatorError) -> bytes:
    """The typed error reply for `error`; its class names the error_type."""
    reply = {"status": "error", "error_type": error.error_type, "message": str(error)}
    if request_id is not None:
        reply["request_id"] = request_id
    return encode(reply)


# --- simulator catalogs: what the loop knows of a simulator without running it --

SERVER_FILE = os.path.abspath(__file__)
# Hidden first arguments that make `python sim_server.py` a worker or a catalog reader, under
# whichever interpreter serves that simulator (--python).
WORKER_ENTRY = "--simulator-worker"
CATALOG_ENTRY = "--simulator-catalog"
# Reading a catalog imports the simulator and probes its renderer: seconds, not minutes.
CATALOG_TIMEOUT_S = 180.0
# How much of a failed interpreter's stderr an error reply quotes.
STDERR_TAIL_CHARS = 1500


def catalog_snapshot(simulator: str) -> Dict[str, Any]:
    """What the loop needs of `simulator`, read in this interpreter: tasks, suites, static info, and
    the environment its prepare_server set for the workers (e.g. MUJOCO_GL).

    Raises BackendError when the simulator cannot run here.
    """
    backend_class = get_backend(simulator)
    before = dict(os.environ)
    backend_class.prepare_server()
    worker_env = {name: value for name, value in os.environ.items() if before.get(name) != value}
    backend = backend_class()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints a line per suite it opens
            return {"tasks": backend.list_tasks(), "suites": backend.suites(),
                    "unavailable_suites": backend.unavailable_suites(), "info": backend.get_info(),
                    "worker_env": worker_env}
    finally:
        backend.close()


class Catalog:
    """One served simulator as the loop knows it: its tasks and info, read once, and how to start
    its workers. A simulator that could not be read answers backend_error with the reason."""

    def __init__(self, simulator: str, snapshot: Optional[Dict[str, Any]], interpreter: str,
                 problem: Optional[str] = None) -> None:
        self.simulator = simulator
        self.interpreter = interpreter
        self.problem = problem
        snapshot = snapshot or {}
        self.tasks: List[str] = snapshot.get("tasks", [])
        self.suites: Dict[str, List[str]] = snapshot.get("suites", {})
        self.unavailable_suites: Dict[str, str] = snapshot.get("unavailable_suites", {})
        self.info: Dict[str, Any] = snapshot.get("info", {"backend_name": simulator, "backend_version": "unknown"})
        self.worker_env: Dict[str, str] = snapshot.get("worker_env", {})
        self.known = set(self.tasks).union(*self.suites.values())

    def _check_usable(self) -> None:
        if self.problem is not None:
            raise BackendError(self.problem)

    def list_tasks(self, suite: Optional[str] = None) -> List[str]:
        """The default task list, or a suite's tasks; TaskNotFound for a suite that cannot load here."""
        self._check_usable()
        if suite is None:
            return self.tasks
        if suite in self.suites:
            return self.suites[suite]
        raise TaskNotFound(self._no_suite(suite))

    def check_task(self, task_name: str) -> None:
        """TaskNotFound unless load_task can find `task_name`: checked before any simulator starts."""
        self._check_usable()
        if task_name in self.known:
            return
        suite = task_name.rpartition("/")[0]
        if suite and suite not in self.suites:
            raise TaskNotFound(self._no_suite(suite))
        choices = self.suites.get(suite, self.tasks)
        close = difflib.get_close_matches(task_name, choices, n=5, cutoff=0.3)
        raise TaskNotFound(f"no {self.simulator} task {task_name!r}; close matches: {close or choices[:5]}")

    def _no_suite(self, suite: str) -> str:
        if suite in self.unavailable_suites:
            return self.unavailable_suites[suite]
        if not self.suites:
            return f"the {self.simulator} simulator has no task suites; call list_tasks without 'suite'"
        close = difflib.get_close_matches(suite, list(self.suites), n=5)
        return f"no {self.simulator} suite {suite!r}; close matches: {close or list(self.suites)[:5]}"


def stderr_tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= STDERR_TAIL_CHARS else "..." + text[-STDERR_TAIL_CHARS:]


def read_catalog(simulator: str, interpreter: Optional[str]) -> Catalog:
    """The catalog of `simulator`: read here, or by `interpreter` in a child process so this one never
    imports a simulator another Python serves. Only this interpreter's failures are a SetupError."""
    if interpreter is None:
        try:
            return Catalog(simulator, catalog_snapshot(simulator), sys.executable)
        except BackendError as error:
            raise SetupError(f"cannot serve {simulator}: {error}") from None
    with tempfile.TemporaryDirectory(prefix="sim-catalog-") as folder:
        path = os.path.join(folder, "catalog.msgpack")
        try:
            result = subprocess.run([interpreter, SERVER_FILE, CATALOG_ENTRY, simulator, path],
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    errors="replace", timeout=CATALOG_TIMEOUT_S)
        except OSError as error:
            return Catalog(simulator, None, interpreter, f"cannot run {interpreter} for {simulator}: {error}")
        except subprocess.TimeoutExpired:
            return Catalog(simulator, None, interpreter, f"{interpreter} did not list {simulator}'s tasks in "
                           f"{CATALOG_TIMEOUT_S:.0f} s")
        if result.returncode != 0 or not os.path.exists(path):
            return Catalog(simulator, None, interpreter, f"{interpreter} cannot serve {simulator} (exit code "
                           f"{result.returncode}); its stderr ends: {stderr_tail(result.stderr)}")
        with open(path, "rb") as snapshot_file:
            return Catalog(simulator, decode(snapshot_file.read(), max_bytes=2**30), interpreter)


def open_catalogs(config: Config) -> Dict[str, Catalog]:
    """A catalog per served simulator, in --simulator order; a broken --python interpreter is logged
    here and answered as backend_error to the sessions that select its simulator."""
    catalogs = {}
    for simulator in config.simulators:
        catalog = read_catalog(simulator, config.interpreters.get(simulator))
        if catalog.problem is not None:
            log.error("%s is not available: %s", simulator, catalog.problem)
        catalogs[simulator] = catalog
    return catalogs


def catalog_main(simulator: str, path: str) -> int:
    """`sim_server.py --simulator-catalog NAME PATH`: write NAME's catalog snapshot to PATH."""
    logging.basicConfig(level="WARNING", format=f"%(asctime)s catalog {simulator} %(levelname)s %(message)s")
    try:
        snapshot = catalog_snapshot(simulator)
    except BackendError as error:
        print(f"cannot serve {simulator}: {error}", file=sys.stderr)
        return 3
    with open(path, "wb") as snapshot_file:
        snapshot_file.write(encode(snapshot))
    return 0


# --- simulator workers: this part runs in the worker process -----------------

CLOSE_WORKER = b""
PIPE_BUFFER_BYTES = 4 * 1024 * 1024  # a zero-length message on the worker pipe means "close and exit"


# glibc serves allocations above 128 KiB with fresh mmaps and unmaps them on free, so every
# observation-sized buffer (encode, pipe read) faulted its pages in anew: 3.8x the mock's
# worker time. Up to these sizes, freed memory is kept for the next reply instead.
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def reuse_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds for this process (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD_BYTES)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _die_with_parent(how: signal.Signals = signal.SIGKILL) -> None:
    """Ask Linux to send `how` to this process when its parent dies, so nothing outlives it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, how)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pipe's EOF below still ends an idle worker


def _int_field(fields: Dict[str, Any], name: str) -> Optional[int]:
    value = fields.get(name)
    if value is not None and type(value) is not int:
        raise InvalidParams(f"{name} must be an int")
    return value


def _as_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        array = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise InvalidParams(f"action {name!r} must be a numeric array or list") from None
    return array


def action_from_fields(fields: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The step request's action as {name: array}; a bare array or list means {"action": it}."""
    if "action" not in fields:
        raise InvalidParams("step needs an 'action'")
    action = fields["action"]
    if isinstance(action, dict):
        return {str(name): _as_array(str(name), value) for name, value in action.items()}
    return {"action": _as_array("action", action)}


class SessionSimulator:
    """One backend plus the episode lifecycle the protocol promises (runs in the worker)."""

    def __init__(self, backend: SimulatorBackend) -> None:
        self.backend = backend
        self.task_loaded = False
        self.episode_running = False
        self.action_ndims: Dict[str, int] = {}  # from the task's action_spec, to tell a chunk from one action
        self.provenance: Optional[Dict[str, Any]] = None  # this worker's versions, read at the first load_task

    def handle(self, body: bytes) -> bytes:
        """The reply body to one request body (the worker's own decode: it is another process)."""
        request_id = None
        try:
            message = decode(body)
            request_id = request_id_in(message)
            return ok_reply(request_id, **self.answer(parse_request(message)))
        except SimulatorError as error:
            return error_reply(request_id, error)
        except Exception as error:  # the simulator's own failure, reported, not fatal
            log.error("simulator raised:\n%s", traceback.format_exc())
            return error_reply(request_id, BackendError(f"{type(error).__name__}: {error}"))

    def answer(self, request: Request) -> Dict[str, Any]:
        fields = request.fields
        if request.method == "load_task":
            return {"task_info": self.load_task(fields)}
        if not self.task_loaded:
            raise NoTaskLoaded(f"{request.method} needs a task: call load_task first")
        if request.method == "reset":
            observation, info = self.backend.reset(
                seed=_int_field(fields, "seed"), init_state_index=_int_field(fields, "init_state_index"))
            self.episode_running = True
            return {"observation": observation, "info": info}
        if request.method == "step":
            return self.step(fields)
        raise InvalidParams(f"the simulator does not answer {request.method!r}")

    def load_task(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        task_name = fields.pop("task_name", None)
        if not isinstance(task_name, str):
            raise InvalidParams("load_task needs a string 'task_name'")
        options = fields.pop("options", None) or {}
        if not isinstance(options, dict):
            raise InvalidParams("'options' must be a map")
        options.update(fields)
        self.episode_running = False
        task_info = self.backend.load_task(task_name, **options)
        if self.provenance is None:  # the versions this worker's own interpreter runs
            static = self.backend.get_info()
            self.provenance = {key: static[key] for key in PROVENANCE_KEYS if key in static}
        for key, value in self.provenance.items():
            task_info.setdefault(key, value)
        self.task_loaded = True
        self.action_ndims = {name: len(spec["shape"]) for name, spec in task_info["action_spec"].items()}
        return task_info

    def step(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        """One action, or a chunk of K actions (one more leading axis) run until the episode ends."""
        if not self.episode_running:
            raise NotReset("step needs a running episode: call reset first")
        action = action_from_fields(fields)
        chunk = self.chunk_length(action)
        if chunk is None:
            return self.step_once(action)
        replies = []
        for index in range(chunk):
            replies.append(self.step_once({name: value[index] for name, value in action.items()}))
            if not self.episode_running:
                break
        last = replies[-1]
        return {**last, "reward": float(sum(r["reward"] for r in replies)), "steps_run": len(replies),
                "rewards": [r["reward"] for r in replies],
                "successes": [bool(r["info"].get("success", r["terminated"])) for r in replies]}

    def chunk_length(self, action: Dict[str, np.ndarray]) -> Optional[int]:
        """K when every action array has one axis more than its spec (a [K, ...] chunk), else None."""
        extra = {value.ndim - self.action_ndims.get(name, value.ndim) for name, value in action.items()}
        if extra != {1}:
            return None
        lengths = {value.shape[0] for value in action.values()}
        if len(lengths) != 1 or not 1 <= next(iter(lengths)) <= MAX_CHUNK:
            raise InvalidParams(f"an action chunk needs the same length K in 1..{MAX_CHUNK} for every action")
        for name, value in action.items():
            if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
                raise InvalidParams(f"action {name!r} contains NaN or Inf")  # refuse before any step runs
        return lengths.pop()

    def step_once(self, action: Dict[str, np.ndarray]) -> Dict[str, Any]:
        observation, reward, terminated, truncated, info = self.backend.step(action)
        self.episode_running = not (terminated or truncated)
        return {"observation": observation, "reward": float(reward), "terminated": bool(terminated),
                "truncated": bool(truncated), "info": info}


def simulator_worker_main(fd: int, simulator: str, session_id: str, log_level: str) -> int:
    """`sim_server.py --simulator-worker FD NAME SESSION LEVEL`: answer request bodies from the
    socket FD until the server closes it or says CLOSE_WORKER."""
    _die_with_parent()
    reuse_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes us
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker {session_id} %(levelname)s %(message)s")
    conn = multiprocessing.connection.Connection(fd)
    simulator_session = SessionSimulator(get_backend(simulator)())
    try:
        while True:
            try:
                body = conn.recv_bytes()
            except (EOFError, OSError):
                break  # the server is gone
            if body == CLOSE_WORKER:
                break
            conn.send_bytes(simulator_session.handle(body))
    finally:
        simulator_session.backend.close()
    return 0


# --- worker handles: the server's side of a worker process -------------------

def frame_header(size: int) -> bytes:
    """multiprocessing.connection's length prefix, so a worker reads requests with Connection."""
    return struct.pack("!i", size) if size < 0x7FFFFFFF else struct.pack("!iQ", -1, size)


class StderrRelay:
    """Copies a worker's stderr to the server's, line by line, keeping the last lines so that a
    worker that dies can be explained to its client."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.lines: deque = deque(maxlen=30)
        self.thread = threading.Thread(target=self._relay, name="worker-stderr", daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        with self.pipe:
            for raw in iter(self.pipe.readline, b""):
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                sys.stderr.write(line)

    def tail(self) -> str:
        self.thread.join(timeout=1.0)  # the rest of a dead worker's output
        return stderr_tail("".join(self.lines))


class Worker:
    """The server's handle on one simulator process: its pipe, its stderr and its exit.

    The process is `python sim_server.py --simulator-worker ...` under the simulator's interpreter,
    started fresh (no fork: EGL state must not be inherited) and given the project's folder.
    """

    def __init__(self, catalog: Catalog, session_id: str, log_level: str, env: Dict[str, str]) -> None:
        parent_end, worker_end = socket.socketpair()
        for end in (parent_end, worker_end):  # a whole reply fits: no ping-pong between worker and loop
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
        try:
            self.process = subprocess.Popen(
                [catalog.interpreter, SERVER_FILE, WORKER_ENTRY, str(worker_end.fileno()), catalog.simulator,
                 session_id, log_level],
                pass_fds=[worker_end.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=env, cwd=os.path.dirname(SERVER_FILE))
        except OSError as error:
            parent_end.close()
            raise BackendError(f"cannot start a {catalog.simulator} simulator with {catalog.interpreter}: "
                               f"{error}") from None
        finally:
            worker_end.close()  # so the worker's death reads as EOF here
        self.pipe = parent_end  # multiprocessing.connection's framing, which the worker's Connection speaks
        self.stderr = StderrRelay(self.process.stderr)
        self.pid = self.process.pid
        self.close_deadline: Optional[float] = None
        self.task_switches = 0  # for MAX_TASKS_PER_WORKER

    def fileno(self) -> int:
        return self.pipe.fileno()

    def submit(self, body: bytes) -> None:
        """Hand a request body to the simulator; OSError when the worker is gone."""
        self.pipe.sendall(frame_header(len(body)) + body)

    def read_reply(self) -> bytearray:
        """The simulator's reply body, read straight into one buffer (multiprocessing's reader
        copies a reply three times); EOFError or OSError when the worker died."""
        size = struct.unpack("!i", self._read_exactly(4))[0]
        if size == -1:
            size = struct.unpack("!Q", self._read_exactly(8))[0]
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            count = self.pipe.recv_into(view[got:])
            if count == 0:
                raise EOFError("the simulator process closed its pipe")
            got += count
        return buffer

    def begin_close(self) -> None:
        """Ask the worker to close its simulator; finished() enforces the grace period."""
        self.close_deadline = time.monotonic() + WORKER_CLOSE_GRACE_S
        try:
            self.submit(CLOSE_WORKER)
        except OSError:
            pass  # already gone

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        self.pipe.close()

    def finished(self) -> bool:
        """True once the worker exited (reaped) or was killed after its grace period."""
        if self.process.poll() is not None:
            self.pipe.close()
            return True
        if self.close_deadline is not None and time.monotonic() > self.close_deadline:
            log.warning("worker %s did not close in %.0f s; killing it", self.pid, WORKER_CLOSE_GRACE_S)
            self.kill()
            return True
        return False

    def death_description(self) -> str:
        """How the process ended, and the last lines it wrote to stderr."""
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        tail = self.stderr.tail()
        return f"{how}; its stderr ends: {tail}" if tail else how


class WorkerEnvironment:
    """The environment a new simulator process starts with: its simulator's settings (e.g.
    MUJOCO_GL), renderer and math threads that fit the machine, and the next EGL device.

    llvmpipe, OpenMP and BLAS each start a thread per core in every process, so N simulators
    on N cores would run N*N threads. A worker gets the cores shared among the simulators
    running when it starts (all of them when it is alone); a variable the operator set wins.
    """

    THREAD_VARIABLES = ("LP_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, render_threads: Optional[int], egl_devices: Tuple[str, ...]) -> None:
        self.render_threads = render_threads
        self.egl_devices = egl_devices
        self.started = 0  # workers started so far: the EGL round-robin's position

    def for_worker(self, catalog: Catalog, running: int) -> Dict[str, str]:
        """The environment for a worker of `catalog` started while `running` others run."""
        env = {**os.environ, **catalog.worker_env}
        threads = self.render_threads or max(1, (os.cpu_count() or 1) // (running + 1))
        for name in self.THREAD_VARIABLES:
            env.setdefault(name, str(threads))
        if self.egl_devices and env.get("MUJOCO_GL") == "egl" and "MUJOCO_EGL_DEVICE_ID" not in os.environ:
            env["MUJOCO_EGL_DEVICE_ID"] = self.egl_devices[self.started % len(self.egl_devices)]
        self.started += 1
        return env


# --- session table -----------------------------------------------------------

@dataclass
class Pending:
    """The one request a session's worker is running."""

    envelope: List[bytes]
    method: str
    request_id: Any
    deadline: float
    task_name: Optional[str] = None


@dataclass
class Session:
    session_key: bytes
    routing_id: bytes
    session_id: str
    connection: Optional[int] = None  # number of the TCP connection that opened it
    curve_key: Optional[str] = None  # the CURVE public key that opened it
    simulator: Optional[str] = None  # the one it selected (or the only one served)
    peer: Optional[str] = None  # "host:port" of the TCP connection that opened it
    episodes: int = 0  # resets answered
    episode_steps: int = 0  # step requests answered since the last reset
    last_frame_body: Any = None  # the last reset or step reply, for the dashboard to decode when asked
    task_info_body: Any = None  # the last load_task reply, likewise
    last_active: float = field(default_factory=time.monotonic)
    worker: Optional[Worker] = None
    current_task: Optional[str] = None
    pending: Optional[Pending] = None
    crash: Optional[str] = None  # why the last simulator died; answered until load_task
    last_reply: Optional[Tuple[Any, bytes]] = None  # (request_id, body) for retried requests


# A client-chosen routing id this long is an unguessable bearer capability, so its session
# survives reconnects. Shorter ids, and libzmq's own 5-byte ids (leading zero byte), could be
# guessed or claimed: their sessions live and die with the connection that opened them.
RESUMABLE_ID_BYTES = 16


def is_resumable(routing_id: bytes) -> bool:
    return len(routing_id) >= RESUMABLE_ID_BYTES and routing_id[0] != 0


def session_key(routing_id: bytes, connection: Optional[int]) -> bytes:
    return routing_id if is_resumable(routing_id) else routing_id + b"#" + str(connection).encode()


class SessionTable:
    """The sessions, the workers they own, and the workers still closing."""

    def __init__(self, poller: zmq.Poller) -> None:
        self.poller = poller  # worker pipes are polled beside the frontend
        self.sessions: Dict[bytes, Session] = {}
        self.by_worker_fd: Dict[int, Session] = {}
        self.closing_workers: List[Worker] = []

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self):
        return iter(list(self.sessions.values()))

    def get(self, key: bytes) -> Optional[Session]:
        return self.sessions.get(key)

    def open(self, key: bytes, routing_id: bytes, connection: Optional[int], curve_key: Optional[str],
             simulator: Optional[str], peer: Optional[str]) -> Session:
        session = Session(session_key=key, routing_id=routing_id, session_id=uuid.uuid4().hex[:12],
                          connection=connection, curve_key=curve_key, simulator=simulator, peer=peer)
        self.sessions[key] = session
        log.info("session %s started", session.session_id)
        return session

    def with_simulator(self) -> int:
        return sum(1 for session in self.sessions.values() if session.worker is not None)

    def attach_worker(self, session: Session, worker: Worker) -> None:
        session.worker = worker
        self.by_worker_fd[worker.fileno()] = session
        self.poller.register(worker.fileno(), zmq.POLLIN)

    def detach_worker(self, session: Session) -> Worker:
        worker, session.worker = session.worker, None
        self.poller.unregister(worker.fileno())
        del self.by_worker_fd[worker.fileno()]
        return worker

    def retire(self, worker: Worker) -> None:
        """Let a detached worker close its simulator in its own time."""
        worker.begin_close()
        self.closing_workers.append(worker)

    def end(self, session: Session, why: str) -> None:
        if session.worker is not None:
            worker = self.detach_worker(session)
            if session.pending is not None:
                worker.kill()  # busy: it would not read a close request
            else:
                self.retire(worker)
        self.sessions.pop(session.session_key, None)
        log.info("session %s ended: %s", session.session_id, why)

    def reap_idle(self, timeout_s: float) -> None:
        cutoff = time.monotonic() - timeout_s
        for session in self:
            if session.pending is None and session.last_active < cutoff:
                self.end(session, "reaped after idling")

    def end_connection(self, connection: int) -> None:
        """End the sessions bound to a TCP connection that closed."""
        for session in self:
            if session.connection == connection and not is_resumable(session.routing_id):
                self.end(session, "its connection closed")

    def finish_closing(self) -> None:
        self.closing_workers = [worker for worker in self.closing_workers if not worker.finished()]

    def close_all(self) -> None:
        """End every session, then wait for (or kill) every worker."""
        for session in self:
            self.end(session, "server shutting down")
        while self.closing_workers:
            self.finish_closing()
            time.sleep(0.05)


# --- connections -------------------------------------------------------------

def peer_of(fd: int) -> str:
    """"host:port" of the TCP peer on socket `fd`, or "" when it is not a TCP socket."""
    try:
        with socket.socket(fileno=os.dup(fd)) as connection:
            host, port = connection.getpeername()[:2]
    except (OSError, ValueError):
        return ""
    return f"{host}:{port}"


class ConnectionTracker:
    """Which TCP connection each message came on, from the ROUTER's monitor events.

    libzmq reuses file descriptors, so every accepted connection gets a number of its own.
    Events are read before each message: read once per batch, they lag and split sessions.
    """

    def __init__(self, frontend: zmq.Socket, poller: zmq.Poller) -> None:
        self.frontend = frontend
        self.monitor = frontend.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        poller.register(self.monitor, zmq.POLLIN)
        self.numbers: Dict[int, int] = {}  # fd -> connection number
        self.peers: Dict[int, str] = {}  # connection number -> "host:port"
        self.next_number = itertools.count(1)

    def read_events(self) -> List[int]:
        """Number new connections; the numbers of those that closed since the last call."""
        closed = []
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return closed
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.numbers[fd] = next(self.next_number)
                self.peers[self.numbers[fd]] = peer_of(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED and fd in self.numbers:
                closed.append(self.numbers.pop(fd))
                self.peers.pop(closed[-1], None)

    def connection_of(self, frame: zmq.Frame) -> Optional[int]:
        """The number of the connection a frame came on (call read_events first)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return None
        if fd not in self.numbers:  # not seen in tests; number it rather than guess
            self.numbers[fd] = next(self.next_number)
        return self.numbers[fd]

    def close(self) -> None:
        self.frontend.disable_monitor()
        self.monitor.close(linger=0)


# --- CURVE -------------------------------------------------------------------

class CurveAuth:
    """CURVE encryption plus an allow-list of client keys (a ZAP handler started before bind)."""

    def __init__(self, context: zmq.Context, secret_key_file: str, clients_folder: str) -> None:
        self.secret_key_file = secret_key_file
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=clients_folder)
        log.info("CURVE on: admitting the %d client keys in %s",
                 len(glob.glob(os.path.join(clients_folder, "*.key"))), clients_folder)

    def configure(self, socket: zmq.Socket) -> None:
        socket.curve_publickey, socket.curve_secretkey = zmq.auth.load_certificate(self.secret_key_file)
        socket.curve_server = True

    @staticmethod
    def key_of(frame: zmq.Frame) -> Optional[str]:
        """The CURVE public key of the client a frame came from."""
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return None

    def stop(self) -> None:
        self.authenticator.stop()


def check_curve_config(config: Config) -> Optional[str]:
    """Why the CURVE settings cannot work, or None."""
    if not config.curve_secret_key and not config.curve_clients:
        return None
    if not zmq.has("curve"):
        return "this libzmq has no CURVE support; install pyzmq from PyPI (its wheels bundle libsodium)"
    if not os.path.isfile(config.curve_secret_key):
        return f"--curve-secret-key {config.curve_secret_key!r} is not a file (make one with --gen-keys DIR)"
    if not os.path.isdir(config.curve_clients):
        return f"--curve-clients {config.curve_clients!r} must be a folder of allowed client .key files"
    try:
        _, secret = zmq.auth.load_certificate(config.curve_secret_key)
    except (OSError, ValueError) as error:
        return f"cannot read the CURVE key file {config.curve_secret_key!r}: {error}"
    if secret is None:
        return f"{config.curve_secret_key!r} holds no secret key: pass the server.key_secret file"
    return None


def bind_problem(bind: str, error: zmq.ZMQError) -> str:
    if error.errno == zmq.EADDRINUSE:
        return (f"cannot listen on {bind}: the address is already in use (another sim_server?); "
                "pick another port with --port N")
    return (f"cannot listen on {bind}: {error.strerror}; --bind takes a ZMQ address such as tcp://*:5555 "
            "or tcp://127.0.0.1:5555")


def is_loopback(bind: str) -> bool:
    host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
    return bind.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]", "::1")


# --- simulator requests: to the session's worker, and its reply back ----------

class WorkerRouter:
    """Simulator requests to each session's worker process, and their replies back to the client.

    It starts and retires workers, answers retried request_ids once, enforces the step and load
    deadlines, and turns a dead or hung simulator into backend_error for its session alone.
    """

    def __init__(self, config: Config, catalogs: Dict[str, Catalog], sessions: SessionTable,
                 reply: Callable[[List[bytes], bytes], None]) -> None:
        self.config = config
        self.catalogs = catalogs
        self.worker_environment = WorkerEnvironment(config.render_threads, config.egl_devices)
        self.sessions = sessions
        self.reply = reply

    def forward(self, session: Session, envelope: List[bytes], request: Request, body: bytes) -> None:
        """Hand a simulator request to the session's worker; its reply comes back through the poller."""
        if self._answered_as_a_retry(session, envelope, request):
            return
        if request.method == "load_task":
            self._check_task_name(session, request.fields)
            self._retire_worn_worker(session, request.fields["task_name"])
            self._ensure_worker(session)
        elif session.crash is not None:
            raise BackendError(f"{session.crash}; call load_task to start a new simulator")
        elif session.worker is None:
            raise NoTaskLoaded(f"{request.method} needs a task: call load_task first")
        timeout = self.config.load_timeout_s if request.method == "load_task" else self.config.step_timeout_s
        task_name = request.fields.get("task_name")
        session.pending = Pending(envelope, request.method, request.request_id, time.monotonic() + timeout,
                                  task_name if isinstance(task_name, str) else None)
        try:
            session.worker.submit(body)
        except OSError:
            self._worker_died(session)

    def _answered_as_a_retry(self, session: Session, envelope: List[bytes], request: Request) -> bool:
        """A re-sent request_id is answered once, from the running or the last reply: never run twice."""
        request_id = request.request_id
        if session.pending is not None:
            if request_id is not None and request_id == session.pending.request_id:
                session.pending.envelope = envelope
                return True
            raise ServerBusy("this session is already running a request; send one at a time")
        if request_id is not None and session.last_reply is not None and session.last_reply[0] == request_id:
            self.reply(envelope, session.last_reply[1])
            return True
        return False

    def _check_task_name(self, session: Session, fields: Dict[str, Any]) -> None:
        """Refuse a bad task name here, so it never costs a simulator process."""
        task_name = fields.get("task_name")
        if not isinstance(task_name, str):
            raise InvalidParams("load_task needs a string 'task_name'")
        self.catalogs[session.simulator].check_task(task_name)

    def _retire_worn_worker(self, session: Session, task_name: str) -> None:
        """Start a fresh process after MAX_TASKS_PER_WORKER task switches: simulators leak on close."""
        worker = session.worker
        if worker is None or task_name == session.current_task:
            return
        worker.task_switches += 1
        if worker.task_switches > MAX_TASKS_PER_WORKER:
            log.info("session %s: simulator process %d switched tasks %d times; starting a fresh one",
                     session.session_id, worker.pid, MAX_TASKS_PER_WORKER)
            self.sessions.retire(self.sessions.detach_worker(session))
            session.current_task = None

    def _ensure_worker(self, session: Session) -> None:
        if session.worker is not None:
            return
        if self.sessions.with_simulator() >= self.config.max_sessions:
            raise ServerBusy(f"all {self.config.max_sessions} simulator sessions are in use; try again later")
        catalog = self.catalogs[session.simulator]
        env = self.worker_environment.for_worker(catalog, self.sessions.with_simulator())
        worker = Worker(catalog, session.session_id, self.config.log_level, env)
        session.crash = None
        self.sessions.attach_worker(session, worker)
        log.info("session %s: simulator process %d started", session.session_id, session.worker.pid)

    def forward_reply(self, session: Session) -> None:
        try:
            body = session.worker.read_reply()
        except (EOFError, OSError):
            self._worker_died(session)
            return
        pending, session.pending = session.pending, None
        if pending is None:
            log.warning("session %s: dropped an unexpected simulator reply", session.session_id)
            return
        if pending.method == "load_task" and pending.task_name is not None and reply_status(body) == "ok":
            session.current_task = pending.task_name
            log.info("session %s: loaded %s", session.session_id, pending.task_name)
        if self.config.dashboard is not None:
            self._note_for_dashboard(session, pending.method, body)
        session.last_reply = (pending.request_id, body) if pending.request_id is not None else None
        session.last_active = time.monotonic()
        self.reply(pending.envelope, body)

    @staticmethod
    def _note_for_dashboard(session: Session, method: str, body: bytes) -> None:
        """Keep what the dashboard decodes when a page asks; only with --dashboard."""
        if method == "load_task":
            session.task_info_body = body
            return
        session.last_frame_body = body
        if method == "step":
            session.episode_steps += 1
        elif reply_status(body) == "ok":
            session.episodes += 1
            session.episode_steps = 0

    def _worker_died(self, session: Session) -> None:
        reason = f"simulator process {session.worker.pid} died ({session.worker.death_description()})"
        log.warning("session %s: %s", session.session_id, reason)
        self.sessions.detach_worker(session).kill()
        self._fail_session(session, reason)

    def _fail_session(self, session: Session, reason: str) -> None:
        """The simulator is gone: answer the running request, and the next ones until load_task."""
        session.crash = reason
        session.current_task = None
        pending, session.pending = session.pending, None
        if pending is not None:
            self.reply(pending.envelope, error_reply(pending.request_id, BackendError(
                f"{reason}; call load_task to start a new simulator")))

    def expire_overdue_requests(self) -> None:
        now = time.monotonic()
        for session in self.sessions:
            pending = session.pending
            if pending is not None and now > pending.deadline and session.worker is not None:
                limit = "SIM_LOAD_TIMEOUT_S" if pending.method == "load_task" else "SIM_STEP_TIMEOUT_S"
                reason = f"{pending.method} overran {limit}; simulator process {session.worker.pid} was killed"
                log.warning("session %s: %s", session.session_id, reason)
                self.sessions.detach_worker(session).kill()
                self._fail_session(session, reason)


# --- the poll loop and dispatch ----------------------------------------------

class SimulatorServer:
    """The ROUTER frontend's poll loop: requests in, simulator work out to workers, replies back."""

    def __init__(self, config: Config, catalogs: Dict[str, Catalog]) -> None:
        self.config = config
        self.catalogs = catalogs  # answer list_tasks and get_info without a simulator
        self.started = time.monotonic()
        self.stopping = False
        self.context = zmq.Context()
        self.curve = (CurveAuth(self.context, config.curve_secret_key, config.curve_clients)
                      if config.curve_secret_key else None)
        try:
            self.frontend = self._bind_frontend()
        except SetupError:
            if self.curve is not None:
                self.curve.stop()
            self.context.term()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.connections = ConnectionTracker(self.frontend, self.poller)
        self.sessions = SessionTable(self.poller)
        self.router = WorkerRouter(config, catalogs, self.sessions, self.reply)
        self.requests_seen = 0
        self.requests_per_s = 0.0  # over the last second, for the dashboard
        self.dashboard = None
        if config.dashboard is not None:
            self.dashboard = self._start_dashboard()

    def _start_dashboard(self):
        import sim_dashboard  # only when asked for: nothing of it runs otherwise

        host, port = self.config.dashboard
        try:
            dashboard = sim_dashboard.Dashboard(host, port, self, lambda body: decode(body, 2**31),
                                                self.config.dashboard_admin)
        except OSError as error:
            self.shutdown()
            raise SetupError(f"cannot serve the dashboard on {host}:{port}: {error.strerror or error}") from None
        if not is_loopback(f"tcp://{host}:{port}"):
            log.warning("the dashboard listens on %s:%d, beyond loopback: anyone who can reach it sees every "
                        "session%s", host, port, " and can end them" if self.config.dashboard_admin else "")
        log.info("dashboard on %s", dashboard.url)
        return dashboard

    def _bind_frontend(self) -> zmq.Socket:
        frontend = self.context.socket(zmq.ROUTER)
        for option, value in ((zmq.LINGER, 0), (zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, SOCKET_HWM),
                              (zmq.RCVHWM, SOCKET_HWM), (zmq.MAXMSGSIZE, self.config.max_request_bytes),
                              (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS), (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)):
            frontend.setsockopt(option, value)
        if self.curve is not None:
            self.curve.configure(frontend)
        try:
            frontend.bind(self.config.bind)
        except zmq.ZMQError as error:
            frontend.close(linger=0)
            raise SetupError(bind_problem(self.config.bind, error)) from None
        if self.curve is None and not is_loopback(self.config.bind):
            log.warning("listening on %s without CURVE: anyone who can reach it can run simulators; "
                        "see README 'Security and limits'", self.config.bind)
        return frontend

    @property
    def endpoint(self) -> str:
        return self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)

    # The loop ---------------------------------------------------------------

    def serve_forever(self) -> None:
        log.info("serving %s on %s (max %d simulator sessions)", ", ".join(self.catalogs), self.endpoint,
                 self.config.max_sessions)
        next_reap = time.monotonic()
        counted = 0  # requests_seen at the last once-a-second tick
        while not self.stopping:
            ready = dict(self.poller.poll(self._poll_timeout_ms()))
            if ready.get(self.connections.monitor):
                self._end_closed_connections()
            if ready.get(self.frontend):
                self._drain_frontend()
            for fd in [fd for fd in ready if isinstance(fd, int)]:
                session = self.sessions.by_worker_fd.get(fd)
                if session is not None:
                    self.router.forward_reply(session)
            self.router.expire_overdue_requests()
            if self.dashboard is not None:
                self._end_sessions_from_dashboard()
            if time.monotonic() >= next_reap:
                self.sessions.reap_idle(self.config.session_timeout_s)
                self.sessions.finish_closing()
                self.requests_per_s, counted = self.requests_seen - counted, self.requests_seen
                next_reap = time.monotonic() + 1.0
        self.shutdown()

    def _end_sessions_from_dashboard(self) -> None:
        while not self.dashboard.end_requests.empty():
            session_id = self.dashboard.end_requests.get_nowait()
            for session in self.sessions:
                if session.session_id == session_id:
                    self.sessions.end(session, "ended from the dashboard")

    def _poll_timeout_ms(self) -> int:
        timeout = POLL_INTERVAL_S
        now = time.monotonic()
        for session in self.sessions:
            if session.pending is not None:
                timeout = min(timeout, max(0.0, session.pending.deadline - now))
        return int(timeout * 1000) + 1

    def _end_closed_connections(self) -> None:
        for connection in self.connections.read_events():
            self.sessions.end_connection(connection)

    def _drain_frontend(self) -> None:
        """Handle every queued request, but yield to workers after a bounded batch."""
        for _ in range(FRONTEND_BATCH):
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._end_closed_connections()  # this message's connection events come first
            last = frames[-1]
            self.handle_frames([frame.bytes for frame in frames], self.connections.connection_of(last),
                               self.curve.key_of(last) if self.curve is not None else None)

    # Requests ---------------------------------------------------------------

    def handle_frames(self, frames: List[bytes], connection: Optional[int] = None,
                      curve_key: Optional[str] = None) -> None:
        """Split the ZMQ envelope from the body and answer the request, in every frame shape."""
        routing_id = frames[0]
        self.requests_seen += 1
        if len(frames) == 2:  # DEALER that sends no empty delimiter
            envelope, body = [routing_id], frames[1]
        elif len(frames) == 3 and frames[1] == b"":  # REQ, or DEALER with a delimiter
            envelope, body = [routing_id, b""], frames[2]
        else:
            log.debug("refusing a %d-frame message", len(frames))
            self.reply([routing_id, b""], error_reply(None, InvalidParams(
                "a request is one body frame, optionally after one empty delimiter frame")))
            return
        try:
            message = decode(body, self.config.max_request_bytes)
        except SimulatorError as error:
            self.reply(envelope, error_reply(None, error))
            return
        request_id = request_id_in(message)
        try:
            session = self._session_for(routing_id, connection, curve_key)
            session.last_active = time.monotonic()
            request = parse_request(message)
            log.debug("session %s: %s %r", session.session_id, request.method, request_id)
            self.dispatch(session, envelope, request, body)
        except SimulatorError as error:
            self.reply(envelope, error_reply(request_id, error))
        except Exception:
            log.exception("internal error answering %r", message.get("method"))
            self.reply(envelope, error_reply(request_id, InternalError("the server failed; see its log")))

    def _session_for(self, routing_id: bytes, connection: Optional[int], curve_key: Optional[str]) -> Session:
        key = session_key(routing_id, connection)
        session = self.sessions.get(key)
        if session is None:
            only = next(iter(self.catalogs)) if len(self.catalogs) == 1 else None
            return self.sessions.open(key, routing_id, connection, curve_key, only,
                                      self.connections.peers.get(connection))
        if session.curve_key != curve_key:
            log.warning("session %s: refused a request from another CURVE key", session.session_id)
            raise InvalidParams("this session was opened by another client key")
        return session

    def dispatch(self, session: Session, envelope: List[bytes], request: Request, body: bytes) -> None:
        method = request.method
        if method not in LOOP_METHODS + SIMULATOR_METHODS:
            raise UnknownMethod(f"unknown method {method!r}; methods: {', '.join(LOOP_METHODS + SIMULATOR_METHODS)}")
        if session.simulator is None and method not in METHODS_WITHOUT_SIMULATOR:
            raise NoSimulatorSelected(f"{method} needs a simulator: call select_simulator with one of "
                                      f"{', '.join(self.catalogs)}")
        if method in LOOP_METHODS:
            self.reply(envelope, self.answer_in_loop(session, request))
        else:
            self.router.forward(session, envelope, request, body)

    def answer_in_loop(self, session: Session, request: Request) -> bytes:
        if request.method == "list_simulators":
            return ok_reply(request.request_id, simulators=list(self.catalogs))
        if request.method == "select_simulator":
            return ok_reply(request.request_id, simulator=self.select_simulator(session, request.fields))
        if request.method == "list_tasks":
            suite = request.fields.get("suite")
            if suite is not None and not isinstance(suite, str):
                raise InvalidParams("suite must be a string")
            return ok_reply(request.request_id, tasks=self.catalogs[session.simulator].list_tasks(suite))
        if request.method == "get_info":
            return ok_reply(request.request_id, **self.session_info(session))
        if request.method == "ping":
            return ok_reply(request.request_id, server_version=SERVER_VERSION, busy=session.pending is not None)
        self.sessions.end(session, "disconnected")
        return ok_reply(request.request_id)

    def select_simulator(self, session: Session, fields: Dict[str, Any]) -> str:
        """The session's simulator, chosen once; with one served, naming it again is fine."""
        name = fields.get("simulator")
        if not isinstance(name, str):
            raise InvalidParams("select_simulator needs a string 'simulator'")
        if name not in self.catalogs:
            raise UnknownSimulator(f"no simulator {name!r} here; available: {', '.join(self.catalogs)}")
        if session.simulator is not None and not (len(self.catalogs) == 1 and name == session.simulator):
            raise SimulatorAlreadySelected(f"this session already uses {session.simulator}; disconnect to "
                                           "switch simulators")
        session.simulator = name
        log.info("session %s selected %s", session.session_id, name)
        return name

    def session_info(self, session: Session) -> Dict[str, Any]:
        backend = self.catalogs[session.simulator].info
        return {
            "simulator": session.simulator,
            "simulators": list(self.catalogs),
            "backend_name": backend.get("backend_name", session.simulator),
            "backend_version": backend.get("backend_version", "unknown"),
            "server_version": SERVER_VERSION,
            "current_task": session.current_task,
            "session_id": session.session_id,
            "sim_pid": session.worker.pid if session.worker else None,
            "active_sessions": len(self.sessions),
            "simulator_sessions": self.sessions.with_simulator(),
            "max_sessions": self.config.max_sessions,
            "uptime_s": round(time.monotonic() - self.started, 3),
            **{key: backend[key] for key in PROVENANCE_KEYS if key in backend},
        }

    # Replies and shutdown ---------------------------------------------------

    def reply(self, envelope: List[bytes], body: bytes) -> None:
        """Never blocks: a client that vanished or stopped reading loses its reply, not our loop."""
        try:
            self.frontend.send_multipart(envelope + [body], flags=zmq.NOBLOCK, copy=len(body) < 65536)
        except zmq.ZMQError as error:
            log.debug("reply to %r dropped: %s", envelope[0], error)

    def shutdown(self) -> None:
        """Close every simulator (killing those that will not close), then the sockets."""
        log.info("shutting down %d sessions", len(self.sessions))
        if self.dashboard is not None:
            self.dashboard.stop()
        self.sessions.close_all()
        self.connections.close()
        self.frontend.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.context.term()
        log.info("stopped")


# --- main --------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_ENTRY]:
        fd, simulator, session_id, log_level = argv[1:]
        return simulator_worker_main(int(fd), simulator, session_id, log_level)
    if argv[:1] == [CATALOG_ENTRY]:
        return catalog_main(*argv[1:])
    reuse_freed_memory()
    parent = os.environ.get("SIM_EXIT_WITH_PARENT")  # set by sim_ray.py's actors: a server dies with its actor
    if parent:
        _die_with_parent(signal.SIGTERM)
        if str(os.getppid()) != parent:
            return 0  # the parent is already gone
    if zmq is None:
        print(f"sim_server: {sys.executable} has no pyzmq: pip install -r requirements.txt", file=sys.stderr)
        return 2
    try:
        config = parse_config(argv)
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        problem = check_curve_config(config)
        if problem:
            raise SetupError(problem)
        server = SimulatorServer(config, open_catalogs(config))
    except SetupError as error:
        print(f"sim_server: {error}", file=sys.stderr)
        return 2

    def stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
