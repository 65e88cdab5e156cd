"""Simulator Inference Center server: robot simulators behind a ZMQ ROUTER socket.

    pip install -r requirements.txt
    python sim_server.py --simulator libero            # LIBERO on tcp://*:5555
    python sim_server.py --simulator mock --port 5556  # a fake simulator, for trying clients

Clients (sim_client.py) send one msgpack map per request. Every client is a session; each
session's simulator runs in its own process, so a slow step never stalls the poll loop or
another session, and a simulator that crashes or hangs ends only its session. That process is
this file's other mode, `python sim_server.py --simulator-process FD SIMULATOR SESSION_ID
LOG_LEVEL` (started by the server, never by hand): it decodes the loop's calls with the same
codec and answers them with backends/worker.py's episode logic.

This file is the spine, in order: configuration, protocol codec, requests and replies, session
table, the poll loop and dispatch, the simulator process, main(). Its parts live in server/
(simulator processes, catalogs, connections and CURVE, the dashboard) and backends/ (the
simulators, and the channel both ends frame their messages with).

Who is who: a client's ZMQ `routing_id` names its session; `session_key` is the session table's
key (the routing_id, plus the TCP connection for guessable ids); `session_id` is the short
public name in get_info and logs; `connection` names the TCP connection a message came on
("fd/host:port"); `curve_key` is the client's CURVE public key.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import msgpack
import numpy as np

from backends import available_backends
from backends.base import (
    PROVENANCE_KEYS,
    BackendError,
    InternalError,
    InvalidParams,
    NoSimulatorSelected,
    NoTaskLoaded,
    ServerBusy,
    SimulatorAlreadySelected,
    SimulatorError,
    UnknownMethod,
    UnknownSimulator,
)
from backends.channel import CLOSE_CALL, receive_message, send_message
from backends.task_specs import TASK_DIR_VARIABLE
from backends.worker import SessionSimulator
from server.catalogs import Catalog, CatalogError, open_catalogs
from server.process import die_with_parent, reuse_freed_memory
from server.settings import (
    SetupError,
    check_port,
    dashboard_address,
    egl_device_setting,
    folder_setting,
    interpreter_settings,
    render_threads_setting,
    simulator_names,
    task_dir_setting,
)
from server.workers import SIMULATOR_PROCESS_FLAG, SimulatorProcesses, Worker

try:
    import zmq
except ImportError:  # a simulator process under another Python (--python) needs only the codec and the channel
    zmq = None
if zmq is not None:
    from server.connections import BindError, ConnectionTracker, CurveAuth, bind_frontend, curve_problem, generate_keys

log = logging.getLogger("sim_server")

# --- configuration -----------------------------------------------------------

SERVER_VERSION = "1.1.0"
# Requests are tiny (a [50, 7] float32 action chunk is 1.4 KB); a small cap bounds the
# memory a hostile frame can make msgpack allocate (docs/security.md).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Strict request/reply needs a handful of queued messages per peer, not 1000.
SOCKET_HWM = 16
# The longest the poll loop sleeps, so shutdown and reaping stay prompt.
POLL_INTERVAL_S = 0.25
# How often the loop looks whether a dead simulator's exit and last words are in.
DEATH_POLL_S = 0.05
# Reaping, the request rate and the dashboard's snapshot run once per tick.
TICK_S = 1.0
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
    egl_devices: Tuple[str, ...] = ()  # EGL device ids given to simulator processes in turn
    dashboard: Optional[Tuple[str, int]] = None  # (host, port) of the dashboard; None: off
    dashboard_admin: bool = False  # whether the dashboard may end sessions
    dashboard_hosts: Tuple[str, ...] = ()  # Host names the dashboard answers besides loopback's and its own
    dashboard_token: str = ""  # the token its actions (and, beyond loopback, its pages) need; "": a new one
    curve_secret_key: str = ""  # the server's .key_secret file; empty means CURVE off
    curve_clients: str = ""  # folder of allowed client .key files
    interpreters: Dict[str, str] = field(default_factory=dict)  # simulator -> the Python its processes run
    task_dir: str = ""  # the operator's folder of custom tasks (custom/NAME); "" for none
    liberoplus_assets: str = ""  # LIBERO-plus's asset pack; "" for LIBERO's standard assets only


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
    ("--dashboard-hosts", "SIM_DASHBOARD_HOSTS", "", str,
     "names the dashboard answers to in the Host header besides loopback's, comma separated (e.g. sim.lab)"),
    ("--task-dir", "SIM_TASK_DIR", "", str,
     "folder of custom task specs and BDDL files, served as custom/NAME (LIBERO; docs/task_builder.md)"),
    ("--liberoplus-assets", "SIM_LIBEROPLUS_ASSETS", "", str,
     "folder of LIBERO-plus's unpacked asset pack, for its light, background and added-object tasks (docs/libero.md)"),
    ("--curve-secret-key", "SIM_CURVE_SECRET_KEY", "", str, "server's CURVE secret key file: turns on CURVE"),
    ("--curve-clients", "SIM_CURVE_CLIENTS", "", str, "folder of the client public keys CURVE lets in"),
]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


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
    parser = OneLineParser(
        prog="sim_server.py", description="Serve robot simulators over ZMQ.",
        epilog=f"simulators: {', '.join(available_backends())}. Backend settings (SIM_LIBERO_*, SIM_MOCK_*) are "
               "read from the environment; see docs/.")
    for flag, env_var, default, kind, text in SETTINGS:
        value = env_setting(env_var, default, kind)
        parser.add_argument(flag, type=kind, default=value, help=f"{text} (env {env_var}; now {value})")
    parser.add_argument("--port", type=int, default=None, help="shorthand for --bind tcp://*:PORT")
    parser.add_argument("--python", action="append", default=[], metavar="NAME=INTERPRETER",
                        help="run simulator NAME's processes under INTERPRETER, e.g. another venv's bin/python "
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
        simulators=simulators, interpreters=interpreter_settings(simulators, args.python), bind=bind,
        log_level=args.log_level.upper(), session_timeout_s=args.session_timeout, max_sessions=args.max_sessions,
        step_timeout_s=args.step_timeout, load_timeout_s=args.load_timeout,
        max_request_bytes=args.max_request_bytes, render_threads=render_threads_setting(args.render_threads),
        egl_devices=egl_device_setting(args.egl_devices), dashboard=dashboard_address(args.dashboard),
        dashboard_admin=args.dashboard_admin, curve_secret_key=args.curve_secret_key,
        dashboard_hosts=tuple(name.strip().lower() for name in args.dashboard_hosts.split(",") if name.strip()),
        dashboard_token=os.environ.get("SIM_DASHBOARD_TOKEN", ""),
        curve_clients=args.curve_clients, task_dir=task_dir_setting(args.task_dir),
        liberoplus_assets=folder_setting("--liberoplus-assets", args.liberoplus_assets))


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
# The loop's own calls to a simulator process are trusted: only memory bounds their size.
CALL_BYTES_LIMIT = 2**31 - 1


def _pack_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in SAFE_DTYPES:
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        array = obj if obj.flags.c_contiguous else obj.copy(order="C")  # ascontiguousarray makes 0-d 1-d
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
# Methods a session's simulator process answers; the loop answers the others.
SIMULATOR_METHODS = ("load_task", "reset", "step")
LOOP_METHODS = ("list_simulators", "select_simulator", "list_tasks", "get_info", "ping", "disconnect")
# What a session may ask before it has a simulator (with several served, it must select one).
METHODS_WITHOUT_SIMULATOR = ("list_simulators", "select_simulator", "ping", "disconnect")


@dataclass(frozen=True)
class Request:
    """A decoded request with its fields checked for its method: what the rest of the server trusts."""

    method: str
    request_id: Any
    fields: Dict[str, Any]


def read_request_id(message: Dict[str, Any]) -> Any:
    """The request_id to echo in the reply (None when absent); InvalidParams unless it is a scalar."""
    request_id = message.get("request_id")
    if not isinstance(request_id, REQUEST_ID_TYPES):
        raise InvalidParams("request_id must be a scalar")
    return request_id


def parse_request(message: Dict[str, Any], request_id: Any) -> Request:
    """The method and its checked fields (at the top level, or in a nested "params" map)."""
    fields = {key: value for key, value in message.items() if key not in ("request_id", "method", "params")}
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise InvalidParams("'params' must be a map")
    fields.update(params)
    method = message.get("method")
    if not isinstance(method, str):
        raise InvalidParams("request needs a string 'method'")
    if method not in SIMULATOR_METHODS + LOOP_METHODS:
        raise UnknownMethod(f"unknown method {method!r}; methods: {', '.join(LOOP_METHODS + SIMULATOR_METHODS)}")
    checks = {"load_task": load_task_fields, "reset": reset_fields, "step": step_fields,
              "list_tasks": lambda f: {"suite": optional_string(f, "suite")},
              "select_simulator": lambda f: {"simulator": required_string(f, "simulator", "select_simulator")}}
    return Request(method, request_id, checks[method](fields) if method in checks else {})


def required_string(fields: Dict[str, Any], name: str, method: str) -> str:
    if not isinstance(fields.get(name), str):
        raise InvalidParams(f"{method} needs a string {name!r}")
    return fields[name]


def optional_string(fields: Dict[str, Any], name: str) -> Optional[str]:
    if fields.get(name) is not None and not isinstance(fields[name], str):
        raise InvalidParams(f"{name} must be a string")
    return fields.get(name)


def optional_int(fields: Dict[str, Any], name: str) -> Optional[int]:
    if fields.get(name) is not None and type(fields[name]) is not int:
        raise InvalidParams(f"{name} must be an int")
    return fields.get(name)


def optional_bool(fields: Dict[str, Any], name: str, default: bool) -> bool:
    if fields.get(name) is not None and type(fields[name]) is not bool:
        raise InvalidParams(f"{name} must be true or false")
    return default if fields.get(name) is None else fields[name]


def load_task_fields(fields: Dict[str, Any]) -> Dict[str, Any]:
    """task_name, and the backend's options: an "options" map plus any other top-level field."""
    task_name = required_string(fields, "task_name", "load_task")
    options = fields.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidParams("'options' must be a map")
    extra = {key: value for key, value in fields.items() if key not in ("task_name", "options")}
    return {"task_name": task_name, "options": {**options, **extra}}


def reset_fields(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {"seed": optional_int(fields, "seed"), "init_state_index": optional_int(fields, "init_state_index")}


def step_fields(fields: Dict[str, Any]) -> Dict[str, Any]:
    """The action as {name: numeric array}, finite (a bare array or list means {"action": it}), the
    observation key whose frame of every step the reply should carry, if any, and whether the
    reply's camera images are wanted (render=false: nobody looks at them, so none is rendered)."""
    if "action" not in fields:
        raise InvalidParams("step needs an 'action'")
    action = fields["action"]
    named = action if isinstance(action, dict) else {"action": action}
    return {"action": {str(name): numeric_action(str(name), value) for name, value in named.items()},
            "frame_key": optional_string(fields, "frame_key"), "render": optional_bool(fields, "render", True)}


def numeric_action(name: str, value: Any) -> np.ndarray:
    """A numeric array, with no NaN or Inf: MuJoCo takes those silently and goes on from a changed state."""
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise InvalidParams(f"action {name!r} must be a numeric array or list") from None
    if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
        raise InvalidParams(f"action {name!r} contains NaN or Inf")
    return value


def reply_body(request_id: Any, outcome: Union[Dict[str, Any], SimulatorError]) -> bytes:
    """The reply to a request: its fields, or its typed error (the error's class names the type).

    Every reply, the loop's and a simulator process's, is made here.
    """
    if isinstance(outcome, SimulatorError):
        reply = {"status": "error", "error_type": outcome.error_type, "message": str(outcome)}
    else:
        reply = {"status": "ok", **outcome}
    if request_id is not None:
        reply["request_id"] = request_id
    return encode(reply)


def call_body(request: Request) -> bytes:
    """A checked simulator request as the call its simulator process reads (backends/worker.py)."""
    return encode({"method": request.method, "request_id": request.request_id, **request.fields})


def decode_call(call: bytes) -> Dict[str, Any]:
    """A call from the loop, in the simulator process: already checked, so only memory bounds it."""
    return decode(call, CALL_BYTES_LIMIT)


# --- session table -----------------------------------------------------------

@dataclass
class Pending:
    """The one request a session's simulator process is running."""

    envelope: List[bytes]
    request: Request
    deadline: float


@dataclass
class Session:
    session_key: bytes
    routing_id: bytes
    session_id: str
    connection: Optional[str] = None  # the TCP connection that opened it, "fd/host:port"
    curve_key: Optional[str] = None  # the CURVE public key that opened it
    simulator: Optional[str] = None  # the one it selected (or the only one served)
    last_active: float = field(default_factory=time.monotonic)
    worker: Optional[Worker] = None
    current_task: Optional[str] = None
    pending: Optional[Pending] = None
    crash: Optional[str] = None  # why the last simulator died; answered until load_task
    last_reply: Optional[Tuple[Any, bytes]] = None  # (request_id, body) of the last simulator reply


# A client-chosen routing id this long is an unguessable bearer capability, so its session
# survives reconnects. Shorter ids, and libzmq's own 5-byte ids (leading zero byte), could be
# guessed or claimed: their sessions live and die with the connection that opened them.
RESUMABLE_ID_BYTES = 16


def is_resumable(routing_id: bytes) -> bool:
    return len(routing_id) >= RESUMABLE_ID_BYTES and routing_id[0] != 0


class SessionTable:
    """The sessions by key, and by the file descriptor of their simulator process's pipe."""

    def __init__(self) -> None:
        self.sessions: Dict[bytes, Session] = {}
        self.by_worker_fd: Dict[int, Session] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self):
        return iter(list(self.sessions.values()))

    @staticmethod
    def key(routing_id: bytes, connection: Optional[str]) -> bytes:
        return routing_id if is_resumable(routing_id) else routing_id + b"#" + str(connection).encode()

    def session_for(self, routing_id: bytes, connection: Optional[str], curve_key: Optional[str],
                    simulator: Optional[str]) -> Session:
        """The session of this routing id (and connection, for guessable ids), opened on first contact
        with `simulator` selected; InvalidParams when another CURVE key presents it."""
        key = self.key(routing_id, connection)
        session = self.sessions.get(key)
        if session is None:
            session = Session(session_key=key, routing_id=routing_id, session_id=uuid.uuid4().hex[:12],
                              connection=connection, curve_key=curve_key, simulator=simulator)
            self.sessions[key] = session
            log.info("session %s started", session.session_id)
        elif session.curve_key != curve_key:
            log.warning("session %s: refused a request from another CURVE key", session.session_id)
            raise InvalidParams("this session was opened by another client key")
        session.last_active = time.monotonic()
        return session

    def remove(self, session: Session) -> None:
        self.sessions.pop(session.session_key, None)

    def of_worker(self, fd: int) -> Optional[Session]:
        return self.by_worker_fd.get(fd)

    def attach(self, session: Session, worker: Worker) -> None:
        session.worker = worker
        self.by_worker_fd[worker.fileno()] = session

    def detach(self, session: Session) -> Worker:
        worker, session.worker = session.worker, None
        del self.by_worker_fd[worker.fileno()]
        return worker

    def with_simulator(self) -> int:
        return len(self.by_worker_fd)

    def idle_since(self, cutoff: float) -> List[Session]:
        return [s for s in self.sessions.values() if s.pending is None and s.last_active < cutoff]

    def bound_to_connections(self) -> List[Session]:
        """The sessions that live and die with the TCP connection that opened them."""
        return [s for s in self.sessions.values() if s.connection is not None and not is_resumable(s.routing_id)]


# --- the poll loop and dispatch ----------------------------------------------

class SimulatorServer:
    """The ROUTER frontend's poll loop: requests in, simulator calls out, replies back.

    It alone owns the sockets and the poller. Every request goes through handle_frames(), where
    it is decoded and checked once and where its errors become its error reply; every reply goes
    out through reply().
    """

    def __init__(self, config: Config, catalogs: Dict[str, Catalog]) -> None:
        self.config = config
        self.catalogs = catalogs
        self.started = time.monotonic()
        self.stopping = False
        self.sessions = SessionTable()
        self.requests_seen = 0
        self.requests_counted = 0  # requests_seen at the last tick
        self.requests_per_s = 0.0
        self.context = zmq.Context()
        self.curve = (CurveAuth(self.context, config.curve_secret_key, config.curve_clients)
                      if config.curve_secret_key else None)
        self.frontend = None
        options = {zmq.SNDHWM: SOCKET_HWM, zmq.RCVHWM: SOCKET_HWM, zmq.MAXMSGSIZE: config.max_request_bytes,
                   zmq.HEARTBEAT_IVL: HEARTBEAT_IVL_MS, zmq.HEARTBEAT_TIMEOUT: HEARTBEAT_TIMEOUT_MS}
        try:
            self.frontend = bind_frontend(self.context, config.bind, options, self.curve)
        except BindError as error:
            self._close_sockets()
            raise SetupError(str(error)) from None
        self.connections = ConnectionTracker(self.frontend)
        self.poller = zmq.Poller()
        for polled in (self.frontend, self.connections.monitor):
            self.poller.register(polled, zmq.POLLIN)
        self.dashboard = self._start_dashboard() if config.dashboard is not None else None
        self.dispatcher = Dispatcher(config, catalogs, self.sessions, self.started)
        if self.dashboard is not None:
            self.dashboard.publish(self.facts())  # a page opened before the first tick sees the server

    def _start_dashboard(self):
        from server.dashboard import Dashboard  # only when asked for: nothing of it runs otherwise

        host, port = self.config.dashboard
        try:
            return Dashboard(host, port, self.config.dashboard_admin, lambda body: decode(body, CALL_BYTES_LIMIT),
                             self.config.dashboard_hosts, self.config.dashboard_token, self._task_form())
        except OSError as error:
            self.shutdown()
            raise SetupError(f"cannot serve the dashboard on {host}:{port}: {error.strerror or error}") from None

    def _task_form(self):
        """The dashboard's task builder over LIBERO's task folder, when LIBERO serves one."""
        from server.task_form import TaskForm

        for catalog in self.catalogs.values():
            if catalog.task_folder is not None and catalog.task_folder.registry.simulator == "libero":
                return TaskForm(catalog.task_folder, catalog.interpreter)
        return None

    @property
    def endpoint(self) -> str:
        return self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve_forever(self) -> None:
        """The poll loop, until `stopping`; whatever ends it, every simulator is closed on the way out."""
        log.info("serving %s on %s (max %d simulator sessions)", ", ".join(self.catalogs), self.endpoint,
                 self.config.max_sessions)
        try:
            next_tick = time.monotonic()
            while not self.stopping:
                self._serve_ready(dict(self.poller.poll(self._poll_timeout_ms())))
                self.dispatcher.expire_overdue_requests()
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + TICK_S
                self._apply(self.dispatcher.outbox.take())
        except BaseException:
            log.exception("the poll loop stopped on an error; shutting down")
            raise
        finally:
            self.shutdown()

    def _serve_ready(self, ready: Dict[Any, int]) -> None:
        """One wake-up: closed connections, client requests, and each ready simulator channel."""
        if ready.get(self.connections.monitor) and self.connections.some_closed():
            self._end_closed_connections()
        if ready.get(self.frontend):
            self._drain_frontend()
        for fd, events in ready.items():
            session = self.sessions.of_worker(fd) if isinstance(fd, int) else None
            if session is None:
                continue
            if events & zmq.POLLOUT:
                self.dispatcher.write_call(session)
            if events & zmq.POLLIN and session.worker is not None:
                self.dispatcher.forward_reply(session)

    def _apply(self, effects: List[Tuple[str, tuple]]) -> None:
        """Carry out what the dispatcher asked for (its Outbox), in order."""
        for kind, arguments in effects:
            if kind == "reply":
                self.reply(*arguments)
            elif kind == "watch":
                self._watch(*arguments)
            elif kind == "unwatch":
                self._unwatch(*arguments)
            elif self.dashboard is not None:  # "replied"
                self.dashboard.replied(*arguments)

    def _watch(self, worker: Worker, writing: bool) -> None:
        """Poll a simulator process's channel for its replies (and, while a call is half written, for room)."""
        self.poller.register(worker.fileno(), zmq.POLLIN | (zmq.POLLOUT if writing else 0))
        worker.watched = True

    def _unwatch(self, worker: Worker) -> None:
        if worker.watched:
            self.poller.unregister(worker.fileno())
            worker.watched = False

    def _poll_timeout_ms(self) -> int:
        deadlines = [s.pending.deadline for s in self.sessions if s.pending is not None]
        longest = DEATH_POLL_S if self.dispatcher.simulators.dying() else POLL_INTERVAL_S
        timeout = min([longest] + [deadline - time.monotonic() for deadline in deadlines])
        return int(max(0.0, timeout) * 1000) + 1

    def _tick(self) -> None:
        """Once a second: reap idle sessions and closed processes, count requests, feed the dashboard."""
        for session in self.sessions.idle_since(time.monotonic() - self.config.session_timeout_s):
            self.dispatcher.end_session(session, "reaped after idling")
        self._end_closed_connections()  # whatever the monitor's events said, or did not yet
        self.dispatcher.simulators.finish_closing()
        self.requests_per_s, self.requests_counted = self.requests_seen - self.requests_counted, self.requests_seen
        if self.dashboard is not None:
            for session_id in self.dashboard.take_end_requests():
                for session in self.sessions:
                    if session.session_id == session_id:
                        self.dispatcher.end_session(session, "ended from the dashboard")
            self.dashboard.publish(self.facts())

    def facts(self) -> Dict[str, Any]:
        """The server and its sessions as plain values, for the dashboard (which sees nothing else)."""
        now = time.monotonic()
        return {
            "simulators": {name: {"info": catalog.info, "problem": catalog.problem}
                           for name, catalog in self.catalogs.items()},
            "uptime_s": round(now - self.started, 1), "sessions": [self._session_facts(s, now) for s in self.sessions],
            "simulator_sessions": self.sessions.with_simulator(), "max_sessions": self.config.max_sessions,
            "requests_total": self.requests_seen, "requests_per_s": round(self.requests_per_s, 1),
            "curve": self.curve is not None, "admin": self.config.dashboard_admin,
        }

    def _session_facts(self, session: Session, now: float) -> Dict[str, Any]:
        worker = session.worker
        return {"session_id": session.session_id, "peer": self.connections.peer(session.connection),
                "simulator": session.simulator, "task": session.current_task,
                "busy": session.pending.request.method if session.pending else None,
                "idle_s": round(now - session.last_active, 1), "worker_pid": worker.pid if worker else None,
                "crash": session.crash, "stderr_lines": list(worker.stderr.lines) if worker else []}

    def _end_closed_connections(self) -> None:
        for session in self.sessions.bound_to_connections():
            if not self.connections.is_open(session.connection):
                self.dispatcher.end_session(session, "its connection closed")

    def _drain_frontend(self) -> None:
        """Handle every queued request, but yield to simulator replies after a bounded batch."""
        for _ in range(FRONTEND_BATCH):
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            last = frames[-1]
            self.handle_frames([frame.bytes for frame in frames], self.connections.connection_of(last),
                               self.curve.key_of(last) if self.curve is not None else None)

    def handle_frames(self, frames: List[bytes], connection: Optional[str] = None,
                      curve_key: Optional[str] = None) -> None:
        """Decode and check the request once, answer it, and turn any error into its reply."""
        self.requests_seen += 1
        envelope, body = split_envelope(frames)
        request_id = None
        try:
            if body is None:
                raise InvalidParams("a request is one body frame, optionally after one empty delimiter frame")
            message = decode(body, self.config.max_request_bytes)
            request_id = read_request_id(message)
            request = parse_request(message, request_id)
            only = next(iter(self.catalogs)) if len(self.catalogs) == 1 else None
            session = self.sessions.session_for(frames[0], connection, curve_key, only)
            log.debug("session %s: %s %r", session.session_id, request.method, request_id)
            self.dispatcher.dispatch(session, envelope, request)
        except SimulatorError as error:
            self.reply(envelope, reply_body(request_id, error))
        except Exception:
            log.exception("internal error answering a request")
            self.reply(envelope, reply_body(request_id, InternalError("the server failed; see its log")))
        finally:
            self._apply(self.dispatcher.outbox.take())

    def reply(self, envelope: List[bytes], body: bytes) -> None:
        """Never blocks: a client that vanished or stopped reading loses its reply, not our loop."""
        try:
            self.frontend.send_multipart(envelope + [body], flags=zmq.NOBLOCK, copy=len(body) < 65536)
        except zmq.ZMQError as error:
            log.debug("reply to %r dropped: %s", envelope[0], error)

    def shutdown(self) -> None:
        """Close every simulator (killing those that will not close), then the sockets."""
        log.info("shutting down %d sessions", len(self.sessions))
        if getattr(self, "dashboard", None) is not None:
            self.dashboard.stop()
        if getattr(self, "dispatcher", None) is not None:
            for session in self.sessions:
                self.dispatcher.end_session(session, "server shutting down")
            self._apply(self.dispatcher.outbox.take())
            self.dispatcher.simulators.close_all()
        if getattr(self, "connections", None) is not None:
            self.connections.close()
        self._close_sockets()
        log.info("stopped")

    def _close_sockets(self) -> None:
        if self.frontend is not None:
            self.frontend.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.context.term()


def split_envelope(frames: List[bytes]) -> Tuple[List[bytes], Optional[bytes]]:
    """(envelope, body) of [id, body] (DEALER) or [id, b"", body] (REQ); body None for other shapes."""
    if len(frames) == 2:
        return frames[:1], frames[1]
    if len(frames) == 3 and frames[1] == b"":
        return frames[:2], frames[2]
    return [frames[0], b""], None


@dataclass
class Outbox:
    """What the dispatcher asks of the loop, in order: replies to send, simulator channels to poll (and
    whether for room to write) or to stop polling, and replies the dashboard should see. The loop
    owns the sockets and the poller and applies these after each call (zguide's ppqueue: helpers
    say what to register, the loop registers it)."""

    effects: List[Tuple[str, tuple]] = field(default_factory=list)

    def reply(self, envelope: List[bytes], body: bytes) -> None:
        self.effects.append(("reply", (envelope, body)))

    def watch(self, worker: Worker, writing: bool = False) -> None:
        self.effects.append(("watch", (worker, writing)))

    def unwatch(self, worker: Worker) -> None:
        self.effects.append(("unwatch", (worker,)))

    def replied(self, session_id: str, method: str, body: bytes, ok: bool) -> None:
        self.effects.append(("replied", (session_id, method, body, ok)))

    def take(self) -> List[Tuple[str, tuple]]:
        effects, self.effects = self.effects, []
        return effects


class Dispatcher:
    """Answers a session's checked request: the loop's own methods at once, simulator methods by
    handing the call to the session's process and its reply back to the client when it comes. It
    owns the sessions' simulator processes and changes sessions; what it wants of the sockets goes
    into its `outbox`, which the loop applies."""

    def __init__(self, config: Config, catalogs: Dict[str, Catalog], sessions: SessionTable, started: float) -> None:
        self.config, self.catalogs, self.sessions, self.started = config, catalogs, sessions, started
        self.simulators = SimulatorProcesses(config, catalogs)
        self.outbox = Outbox()

    def dispatch(self, session: Session, envelope: List[bytes], request: Request) -> None:
        if session.simulator is None and request.method not in METHODS_WITHOUT_SIMULATOR:
            raise NoSimulatorSelected(f"{request.method} needs a simulator: call select_simulator with one of "
                                      f"{', '.join(self.catalogs)}")
        if request.method in SIMULATOR_METHODS:
            self._forward(session, envelope, request)
        elif request.method == "disconnect":
            self.end_session(session, "disconnected")
            self.outbox.reply(envelope, reply_body(request.request_id, {}))
        else:
            self.outbox.reply(envelope, reply_body(request.request_id, self._answer(session, request)))

    def _answer(self, session: Session, request: Request) -> Dict[str, Any]:
        if request.method == "list_simulators":
            return {"simulators": list(self.catalogs)}
        if request.method == "select_simulator":
            return {"simulator": self._select_simulator(session, request.fields["simulator"])}
        if request.method == "list_tasks":
            catalog, suite = self.catalogs[session.simulator], request.fields["suite"]
            tasks = catalog.list_tasks(suite)
            listing = {"tasks": tasks} if suite is not None else {"tasks": tasks, "suites": catalog.suite_sizes()}
            needing_assets = catalog.needing_assets(tasks)
            return {**listing, "needs_assets": needing_assets} if needing_assets else listing
        if request.method == "get_info":
            return self._session_info(session)
        return {"server_version": SERVER_VERSION, "busy": session.pending is not None}  # ping

    def _select_simulator(self, session: Session, name: str) -> str:
        """The session's simulator, chosen once; with one served, naming it again is fine."""
        if name not in self.catalogs:
            raise UnknownSimulator(f"no simulator {name!r} here; available: {', '.join(self.catalogs)}")
        if session.simulator is not None and not (len(self.catalogs) == 1 and name == session.simulator):
            raise SimulatorAlreadySelected(f"this session already uses {session.simulator}; disconnect to "
                                           "switch simulators")
        session.simulator = name
        log.info("session %s selected %s", session.session_id, name)
        return name

    def _session_info(self, session: Session) -> Dict[str, Any]:
        backend = self.catalogs[session.simulator].info
        return {
            "simulator": session.simulator, "simulators": list(self.catalogs),
            "backend_name": backend.get("backend_name", session.simulator),
            "backend_version": backend.get("backend_version", "unknown"), "server_version": SERVER_VERSION,
            "current_task": session.current_task, "session_id": session.session_id,
            "sim_pid": session.worker.pid if session.worker else None, "active_sessions": len(self.sessions),
            "simulator_sessions": self.sessions.with_simulator(), "max_sessions": self.config.max_sessions,
            "uptime_s": round(time.monotonic() - self.started, 3),
            **{key: backend[key] for key in PROVENANCE_KEYS if key in backend},
            **self.catalogs[session.simulator].task_folder_info(),
        }

    def _forward(self, session: Session, envelope: List[bytes], request: Request) -> None:
        """Hand a simulator request to the session's process; its reply comes back through the poller."""
        if self._answered_as_a_retry(session, envelope, request):
            return
        if request.method == "load_task":
            self.catalogs[session.simulator].check_task(request.fields["task_name"])
            self._start_simulator(session, request.fields["task_name"])
        elif session.crash is not None:
            raise BackendError(f"{session.crash}; call load_task to start a new simulator")
        elif session.worker is None:
            raise NoTaskLoaded(f"{request.method} needs a task: call load_task first")
        session.pending = Pending(envelope, request, time.monotonic() + self.simulators.timeout_s(request.method))
        try:
            if not session.worker.submit(call_body(request)):
                self.outbox.watch(session.worker, writing=True)  # the rest when the channel has room
        except OSError:
            self._simulator_gone(session)

    def write_call(self, session: Session) -> None:
        """The channel has room: more of the call in hand; once it is all written, only replies are polled."""
        try:
            if session.worker.write_more():
                self.outbox.watch(session.worker)
        except OSError:
            self._simulator_gone(session)

    def _simulator_gone(self, session: Session) -> None:
        """The session's channel broke: a death, answered once its description is known
        (expire_overdue_requests), without waiting here."""
        session.worker.died_at = time.monotonic()
        self.outbox.unwatch(session.worker)

    def _answered_as_a_retry(self, session: Session, envelope: List[bytes], request: Request) -> bool:
        """A re-sent request_id is answered once, from the running or the last reply: never run twice."""
        request_id = request.request_id
        if session.pending is not None:
            if request_id is not None and request_id == session.pending.request.request_id:
                session.pending.envelope = envelope
                return True
            raise ServerBusy("this session is already running a request; send one at a time")
        if request_id is not None and session.last_reply is not None and session.last_reply[0] == request_id:
            self.outbox.reply(envelope, session.last_reply[1])
            return True
        return False

    def _start_simulator(self, session: Session, task_name: str) -> None:
        """Give the session a simulator process for `task_name`: its own, or a fresh one."""
        if session.worker is not None:
            if task_name == session.current_task or not self.simulators.worn_out(session.worker):
                return
            self._release_simulator(session, busy=False)
            session.current_task = None
        worker = self.simulators.start(session.simulator, session.session_id)
        session.crash = None
        self.sessions.attach(session, worker)
        self.outbox.watch(worker)

    def forward_reply(self, session: Session) -> None:
        """The session's channel has bytes: once its process's whole reply is in, it goes to the
        client as it is."""
        try:
            body = session.worker.read_reply()
        except (EOFError, OSError):
            self._simulator_gone(session)
            return
        if body is None:
            return
        pending, session.pending = session.pending, None
        if pending is None:
            log.warning("session %s: dropped an unexpected simulator reply", session.session_id)
            return
        request = pending.request
        if request.method == "load_task" and reply_status(body) == "ok":
            session.current_task = request.fields["task_name"]
            log.info("session %s: loaded %s", session.session_id, session.current_task)
        session.last_reply = (request.request_id, body)
        session.last_active = time.monotonic()
        self.outbox.replied(session.session_id, request.method, body, reply_status(body) == "ok")
        self.outbox.reply(pending.envelope, body)

    def expire_overdue_requests(self) -> None:
        for session in [s for s in self.sessions if s.worker is not None]:
            pending = session.pending
            error = self.simulators.overdue(session.worker, pending.request.method if pending else None,
                                            pending.deadline if pending else None)
            if error is not None:
                self.fail_simulator(session, error)

    def fail_simulator(self, session: Session, error: BackendError) -> None:
        """The session's simulator is gone: answer its running request, and the next ones until load_task."""
        log.warning("session %s: %s", session.session_id, error)
        self._release_simulator(session, busy=True)
        session.crash, session.current_task = str(error), None
        pending, session.pending = session.pending, None
        if pending is not None:
            self.outbox.reply(pending.envelope, reply_body(pending.request.request_id, BackendError(
                f"{error}; call load_task to start a new simulator")))

    def _release_simulator(self, session: Session, busy: bool) -> None:
        """Stop polling the session's process and close it (kill it when `busy`: it would not read)."""
        worker = self.sessions.detach(session)
        self.outbox.unwatch(worker)
        self.simulators.retire(worker, kill=busy)

    def end_session(self, session: Session, why: str) -> None:
        if session.worker is not None:
            self._release_simulator(session, busy=session.pending is not None)
        self.sessions.remove(session)
        log.info("session %s ended: %s", session.session_id, why)


# --- the simulator process ----------------------------------------------------

def simulator_reply(session: SessionSimulator, call: bytes) -> bytes:
    """The reply body to one call from the loop: its result, or the typed error it raised."""
    message = decode_call(call)
    try:
        return reply_body(message["request_id"], session.answer(message))
    except SimulatorError as error:
        return reply_body(message["request_id"], error)
    except Exception as error:  # the simulator's own failure, reported, not fatal
        log.error("simulator raised:\n%s", traceback.format_exc())
        return reply_body(message["request_id"], BackendError(f"{type(error).__name__}: {error}"))


def serve_simulator_process(argv: List[str]) -> int:
    """`--simulator-process FD SIMULATOR SESSION_ID LOG_LEVEL`: answer the loop's calls on the channel
    FD until the server closes it or sends CLOSE_CALL; die with the server."""
    fd, simulator, session_id, log_level = argv
    die_with_parent()
    reuse_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes us
    logging.basicConfig(level=log_level, format=f"%(asctime)s simulator {session_id} %(levelname)s %(message)s")
    channel = socket.socket(fileno=int(fd))
    session = SessionSimulator.of(simulator)
    try:
        while True:
            try:
                call = receive_message(channel)
            except (EOFError, OSError):
                break  # the server is gone
            if call == CLOSE_CALL:
                break
            send_message(channel, simulator_reply(session, call))
    finally:
        session.close()
    return 0


# --- main --------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SIMULATOR_PROCESS_FLAG]:
        return serve_simulator_process(argv[1:])
    if zmq is None:
        print(f"sim_server: {sys.executable} has no pyzmq: pip install -r requirements.txt", file=sys.stderr)
        return 2
    reuse_freed_memory()
    try:
        config = parse_config(argv)
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        problem = curve_problem(config.curve_secret_key, config.curve_clients)
        if problem:
            raise SetupError(problem)
        if config.task_dir:  # the catalogs and simulator processes read it from there
            os.environ[TASK_DIR_VARIABLE] = config.task_dir
        if config.liberoplus_assets:  # as the task folder
            os.environ["SIM_LIBEROPLUS_ASSETS"] = config.liberoplus_assets
        server = SimulatorServer(config, open_catalogs(config.simulators, config.interpreters))
    except (SetupError, CatalogError) as error:
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
