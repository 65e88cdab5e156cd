"""Simulator Inference Center server: robot simulators behind a ZMQ ROUTER socket.

    pip install -r requirements.txt
    python sim_server.py --simulator libero            # LIBERO on tcp://*:5555
    python sim_server.py --simulator mock --port 5556  # a fake simulator, for trying clients

Clients (see sim_client.py) send one msgpack map per request: list_tasks,
load_task, reset, step, get_info, ping, disconnect. Every client identity is
a session; each session's simulator runs in its own worker process, so a slow
step never stalls the poll loop or another session, and a simulator that
crashes or hangs ends only its own session.

Parts, in order: configuration, protocol codec, requests and replies,
simulator workers, session table, poll loop and dispatch, main().
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import msgpack
import numpy as np
import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from backends import available_backends, get_backend
from backends.base import (
    BackendError,
    InvalidParams,
    NoTaskLoaded,
    NotReset,
    ServerBusy,
    SimulatorBackend,
    SimulatorError,
    UnknownMethod,
)

log = logging.getLogger("sim_server")

# --- configuration -----------------------------------------------------------

SERVER_VERSION = "1.0.0"
# Requests are tiny (a [50, 7] float32 action chunk is 1.4 KB); a small cap
# bounds the memory a hostile frame can make msgpack allocate (THREATS.md).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Strict request/reply needs a handful of queued messages per peer, not 1000.
SOCKET_HWM = 16
# Seconds a closing worker gets to free its simulator before it is killed.
WORKER_CLOSE_GRACE_S = 5.0
# The longest the poll loop sleeps, so shutdown and reaping stay prompt.
POLL_INTERVAL_S = 0.25
# robosuite/LIBERO leak memory and GL contexts across env close (THREATS.md): a session that
# switches tasks gets a fresh simulator process after this many different tasks.
MAX_TASKS_PER_WORKER = 8
# Longest action chunk one step request may carry (openpi replans every 5 of 10 or 50).
MAX_CHUNK = 256
# Methods a session's worker process answers; everything else the loop answers.
SIMULATOR_METHODS = ("load_task", "reset", "step")
LOOP_METHODS = ("list_tasks", "get_info", "ping", "disconnect")
# What a backend's get_info may add to the server's: the simulator stack and renderer in use.
PROVENANCE_KEYS = ("simulator_stack", "renderer")
# ZMTP heartbeats free half-open connections (THREATS.md: a frozen peer).
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500


def default_max_sessions() -> int:
    """One LIBERO env takes about 2 GB: leave room for the OS and the server."""
    try:
        memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = 8.0
    return max(1, min(int(memory_gib // 2.5), 4 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class Config:
    simulator: str
    bind: str
    log_level: str
    session_timeout_s: float
    max_sessions: int
    step_timeout_s: float
    load_timeout_s: float
    max_request_bytes: int
    curve_secret_key: str = ""  # the server's .key_secret file; empty means CURVE off
    curve_clients: str = ""  # folder of allowed client .key files


# (flag, environment variable, default, type, help); --port is handled apart.
SETTINGS = [
    ("--simulator", "SIM_BACKEND", "libero", str, "simulator backend to serve"),
    ("--bind", "SIM_BIND_ADDRESS", "tcp://*:5555", str, "ZMQ address the ROUTER binds"),
    ("--log-level", "SIM_LOG_LEVEL", "INFO", str, "DEBUG logs every request"),
    ("--session-timeout", "SIM_SESSION_TIMEOUT_S", 300.0, float, "idle seconds before a session is reaped"),
    ("--max-sessions", "SIM_MAX_SESSIONS", default_max_sessions(), int, "concurrent simulator processes"),
    ("--step-timeout", "SIM_STEP_TIMEOUT_S", 60.0, float, "seconds a reset or step may run before it is killed"),
    ("--load-timeout", "SIM_LOAD_TIMEOUT_S", 300.0, float, "seconds a load_task may run before it is killed"),
    ("--max-request-bytes", "SIM_MAX_REQUEST_BYTES", MAX_REQUEST_BYTES, int, "largest request frame accepted"),
    ("--curve-secret-key", "SIM_CURVE_SECRET_KEY", "", str, "server's CURVE secret key file: turns on CURVE"),
    ("--curve-clients", "SIM_CURVE_CLIENTS", "", str, "folder of the client public keys CURVE lets in"),
]


def parse_config(argv: Optional[List[str]] = None) -> Config:
    """Flags override SIM_* environment variables, which override defaults."""
    parser = argparse.ArgumentParser(
        description="Serve robot simulators over ZMQ.",
        epilog=f"simulators: {', '.join(available_backends())}. "
        "Backend settings (SIM_LIBERO_*, SIM_MOCK_*) are read from the environment; see README.md.",
    )
    for flag, env_var, default, kind, text in SETTINGS:
        value = kind(os.environ.get(env_var, default))
        parser.add_argument(flag, type=kind, default=value, help=f"{text} (env {env_var}; now {value})")
    parser.add_argument("--port", type=int, default=None, help="shorthand for --bind tcp://*:PORT")
    parser.add_argument("--gen-keys", metavar="DIR", default=None,
                        help="write a server and a client CURVE key pair into DIR, then exit")
    args = parser.parse_args(argv)
    if args.gen_keys is not None:
        generate_keys(args.gen_keys)
        parser.exit(0)
    bind = f"tcp://*:{args.port}" if args.port is not None else args.bind
    return Config(
        simulator=args.simulator,
        bind=bind,
        log_level=args.log_level.upper(),
        session_timeout_s=args.session_timeout,
        max_sessions=args.max_sessions,
        step_timeout_s=args.step_timeout,
        load_timeout_s=args.load_timeout,
        max_request_bytes=args.max_request_bytes,
        curve_secret_key=args.curve_secret_key,
        curve_clients=args.curve_clients,
    )


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
    return msgpack.packb(message, default=_pack_extra, use_bin_type=True)


def _unpack_ndarray(obj: Dict[str, Any]) -> Any:
    """A map tagged ndarray as a read-only array, after checking every field (THREATS.md)."""
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


# --- requests and replies ----------------------------------------------------

REQUEST_ID_TYPES = (type(None), bool, int, float, str, bytes)


@dataclass
class Request:
    method: str
    fields: Dict[str, Any]
    request_id: Any = None


def parse_request(body: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """Method, fields (top level, or a nested "params" map) and request_id of a body."""
    message = decode(body, max_bytes)
    request_id = message.pop("request_id", None)
    if not isinstance(request_id, REQUEST_ID_TYPES):
        raise InvalidParams("request_id must be a scalar")
    method = message.pop("method", None)
    if not isinstance(method, str):
        raise InvalidParams("request needs a string 'method'")
    params = message.pop("params", {})
    if not isinstance(params, dict):
        raise InvalidParams("'params' must be a map")
    message.update(params)
    return Request(method, message, request_id)


def request_id_of(body: bytes) -> Any:
    """The request_id of a body that failed to parse, when one can still be read."""
    try:
        message = decode(body)
    except SimulatorError:
        return None
    request_id = message.get("request_id")
    return request_id if isinstance(request_id, REQUEST_ID_TYPES) else None


def ok_reply(request_id: Any, **fields: Any) -> bytes:
    reply = {"status": "ok", **fields}
    if request_id is not None:
        reply["request_id"] = request_id
    return encode(reply)


def error_reply(request_id: Any, error_type: str, message: str) -> bytes:
    reply = {"status": "error", "error_type": error_type, "message": message}
    if request_id is not None:
        reply["request_id"] = request_id
    return encode(reply)


# --- simulator workers -------------------------------------------------------

CLOSE_WORKER = b""  # a zero-length message on the worker pipe means "close and exit"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the server dies (THREATS.md: orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
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

    def handle(self, body: bytes) -> bytes:
        request_id = None
        try:
            request = parse_request(body)
            request_id = request.request_id
            return ok_reply(request_id, **self.dispatch(request))
        except SimulatorError as error:
            return error_reply(request_id, error.error_type, str(error))
        except Exception as error:  # the simulator's own failure, reported, not fatal
            log.error("simulator raised:\n%s", traceback.format_exc())
            return error_reply(request_id, "backend_error", f"{type(error).__name__}: {error}")

    def dispatch(self, request: Request) -> Dict[str, Any]:
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


def simulator_worker_main(conn, simulator: str, session_id: str, log_level: str) -> None:
    """Entry point of a worker process: answer request bodies from the pipe until closed."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes us
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker {session_id} %(levelname)s %(message)s")
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


class Worker:
    """The server's handle on one simulator process and its pipe."""

    def __init__(self, simulator: str, session_id: str, log_level: str) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: EGL state must not be inherited
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=simulator_worker_main, args=(child_conn, simulator, session_id, log_level),
            name=f"sim-{session_id}", daemon=True)
        self.process.start()
        child_conn.close()  # so the worker's death reads as EOF here
        self.pid = self.process.pid
        self.close_deadline: Optional[float] = None
        self.tasks_loaded = 0  # distinct task switches served, for MAX_TASKS_PER_WORKER

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, body: bytes) -> None:
        self.conn.send_bytes(body)

    def receive(self) -> bytes:
        """The next reply; EOFError or OSError when the worker died."""
        return self.conn.recv_bytes()

    def begin_close(self) -> None:
        """Ask the worker to close its simulator; kill_if_overdue() enforces the grace period."""
        self.close_deadline = time.monotonic() + WORKER_CLOSE_GRACE_S
        try:
            self.conn.send_bytes(CLOSE_WORKER)
        except OSError:
            pass  # already gone

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def finished(self) -> bool:
        """True once the worker exited (reaped) or was killed after its grace period."""
        if not self.process.is_alive():
            self.process.join(timeout=0)
            self.conn.close()
            return True
        if self.close_deadline is not None and time.monotonic() > self.close_deadline:
            log.warning("worker %s did not close in %.0f s; killing it", self.pid, WORKER_CLOSE_GRACE_S)
            self.kill()
            return True
        return False

    def exit_description(self) -> str:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exit code {code}"


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
    key: bytes  # the session table's key: see session_key()
    identity: bytes
    session_id: str
    connection: Optional[int] = None  # number of the TCP connection that opened it
    client_key: Optional[str] = None  # the CURVE public key that opened it
    last_active: float = field(default_factory=time.monotonic)
    worker: Optional[Worker] = None
    current_task: Optional[str] = None
    pending: Optional[Pending] = None
    crash: Optional[str] = None  # why the last simulator died; answered until load_task
    last_reply: Optional[Tuple[Any, bytes]] = None  # (request_id, body) for retried requests


def new_session_id() -> str:
    return uuid.uuid4().hex[:12]


# A client-chosen routing id this long is an unguessable bearer capability (THREATS.md), so its
# session survives reconnects. Shorter ids, and libzmq's own 5-byte ids (leading zero byte),
# could be guessed or claimed: their sessions live and die with the connection that opened them.
RESUMABLE_ID_BYTES = 16


def is_resumable(identity: bytes) -> bool:
    return len(identity) >= RESUMABLE_ID_BYTES and identity[0] != 0


def session_key(identity: bytes, connection: Optional[int]) -> bytes:
    return identity if is_resumable(identity) else identity + b"#" + str(connection).encode()



# --- poll loop and dispatch --------------------------------------------------

class SimulatorServer:
    """The ROUTER frontend, the session table and the workers behind it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalog = get_backend(config.simulator)()  # answers list_tasks and get_info without a simulator
        self.backend_info = self.catalog.get_info()  # static: read once, not per get_info
        self.sessions: Dict[bytes, Session] = {}
        self.closing_workers: List[Worker] = []
        self.started = time.monotonic()
        self.stopping = False
        self.context = zmq.Context()
        self.authenticator = self._start_authenticator()
        self.frontend = self._bind_frontend()
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        # Which TCP connection each message came on. libzmq reuses fds, so every accepted
        # connection gets a number; events are read before each message, which keeps them in order.
        self.monitor = self.frontend.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.connections: Dict[int, int] = {}  # fd -> connection number
        self.connection_numbers = itertools.count(1)
        self.worker_sessions: Dict[int, Session] = {}  # pipe fd -> session

    def _bind_frontend(self) -> zmq.Socket:
        frontend = self.context.socket(zmq.ROUTER)
        frontend.setsockopt(zmq.LINGER, 0)
        frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        frontend.setsockopt(zmq.SNDHWM, SOCKET_HWM)
        frontend.setsockopt(zmq.RCVHWM, SOCKET_HWM)
        frontend.setsockopt(zmq.MAXMSGSIZE, self.config.max_request_bytes)
        frontend.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        frontend.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self.authenticator is not None:
            frontend.curve_publickey, frontend.curve_secretkey = zmq.auth.load_certificate(
                self.config.curve_secret_key)
            frontend.curve_server = True
        elif not is_loopback(self.config.bind):
            log.warning("listening on %s without CURVE: anyone who can reach it can run simulators; "
                        "see README 'Security and limits'", self.config.bind)
        frontend.bind(self.config.bind)
        return frontend

    def _start_authenticator(self) -> Optional[ThreadAuthenticator]:
        """ZAP handler that admits only the client keys in --curve-clients (started before bind)."""
        if not self.config.curve_secret_key:
            return None
        authenticator = ThreadAuthenticator(self.context)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=self.config.curve_clients)
        log.info("CURVE on: admitting the %d client keys in %s", len(glob.glob(
            os.path.join(self.config.curve_clients, "*.key"))), self.config.curve_clients)
        return authenticator

    @property
    def endpoint(self) -> str:
        return self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)

    # The loop ---------------------------------------------------------------

    def serve_forever(self) -> None:
        log.info("serving %s on %s (max %d simulator sessions)", self.config.simulator, self.endpoint,
                 self.config.max_sessions)
        next_reap = time.monotonic()
        while not self.stopping:
            ready = dict(self.poller.poll(self._poll_timeout_ms()))
            if ready.get(self.monitor):
                self._read_connection_events()
            if ready.get(self.frontend):
                self._drain_frontend()
            for fd in [fd for fd in ready if isinstance(fd, int)]:
                session = self.worker_sessions.get(fd)
                if session is not None:
                    self._forward_worker_reply(session)
            self._expire_overdue_requests()
            if time.monotonic() >= next_reap:
                self.reap_idle_sessions()
                self._finish_closing_workers()
                next_reap = time.monotonic() + 1.0
        self.shutdown()

    def _poll_timeout_ms(self) -> int:
        timeout = POLL_INTERVAL_S
        now = time.monotonic()
        for session in self.sessions.values():
            if session.pending is not None:
                timeout = min(timeout, max(0.0, session.pending.deadline - now))
        return int(timeout * 1000) + 1

    def _drain_frontend(self) -> None:
        """Handle every queued request, but yield to workers after a bounded batch."""
        for _ in range(100):
            try:
                frames = self.frontend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle_frames([frame.bytes for frame in frames], self._connection_of(frames[-1]),
                               self._client_key_of(frames[-1]))

    def _read_connection_events(self) -> None:
        """Number new connections, and end the sessions bound to a closed one."""
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.connections[fd] = next(self.connection_numbers)
            elif event["event"] == zmq.EVENT_DISCONNECTED and fd in self.connections:
                number = self.connections.pop(fd)
                for session in list(self.sessions.values()):
                    if session.connection == number and not is_resumable(session.identity):
                        self.end_session(session, "its connection closed")

    def _connection_of(self, frame: zmq.Frame) -> Optional[int]:
        """The number of the connection a message came on (its events are read first)."""
        self._read_connection_events()
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return None
        if fd not in self.connections:  # not seen in tests; number it rather than guess
            self.connections[fd] = next(self.connection_numbers)
        return self.connections[fd]

    def _client_key_of(self, frame: zmq.Frame) -> Optional[str]:
        """The CURVE public key of the client a message came from (None without CURVE)."""
        if self.authenticator is None:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return None

    # Requests ---------------------------------------------------------------

    def handle_frames(self, frames: List[bytes], connection: Optional[int] = None,
                      user_id: Optional[str] = None) -> None:
        """Split the ZMQ envelope from the body and answer the request, in every frame shape."""
        identity = frames[0]
        if len(frames) == 2:  # DEALER that sends no empty delimiter
            envelope, body = [identity], frames[1]
        elif len(frames) == 3 and frames[1] == b"":  # REQ, or DEALER with a delimiter
            envelope, body = [identity, b""], frames[2]
        else:
            log.debug("refusing a %d-frame message", len(frames))
            self.send([identity, b""], error_reply(None, "invalid_params", "a request is one body frame, "
                      "optionally after one empty delimiter frame"))
            return
        key = session_key(identity, connection)
        session = self.sessions.get(key)
        if session is None:
            session = self._open_session(key, identity, connection, user_id)
        elif session.client_key != user_id:
            log.warning("session %s: refused a request from another CURVE key", session.session_id)
            self.send(envelope, error_reply(request_id_of(body), "invalid_params",
                                            "this session was opened by another client key"))
            return
        session.last_active = time.monotonic()
        try:
            request = parse_request(body, self.config.max_request_bytes)
        except SimulatorError as error:
            self.send(envelope, error_reply(request_id_of(body), error.error_type, str(error)))
            return
        log.debug("session %s: %s %r", session.session_id, request.method, request.request_id)
        try:
            self.dispatch(session, envelope, request, body)
        except SimulatorError as error:
            self.send(envelope, error_reply(request.request_id, error.error_type, str(error)))
        except Exception:
            log.exception("internal error answering %s", request.method)
            self.send(envelope, error_reply(request.request_id, "internal_error", "the server failed; see its log"))

    def _open_session(self, key: bytes, identity: bytes, connection: Optional[int],
                      user_id: Optional[str]) -> Session:
        session = Session(key=key, identity=identity, session_id=new_session_id(), connection=connection,
                          client_key=user_id)
        self.sessions[key] = session
        log.info("session %s started", session.session_id)
        return session

    def dispatch(self, session: Session, envelope: List[bytes], request: Request, body: bytes) -> None:
        method = request.method
        if method in LOOP_METHODS:
            self.send(envelope, self.answer_in_loop(session, request))
        elif method in SIMULATOR_METHODS:
            self.forward_to_worker(session, envelope, request, body)
        else:
            raise UnknownMethod(f"unknown method {method!r}; methods: {', '.join(LOOP_METHODS + SIMULATOR_METHODS)}")

    def answer_in_loop(self, session: Session, request: Request) -> bytes:
        if request.method == "list_tasks":
            suite = request.fields.get("suite")
            if suite is None:
                return ok_reply(request.request_id, tasks=self.catalog.list_tasks())
            if not isinstance(suite, str):
                raise InvalidParams("suite must be a string")
            return ok_reply(request.request_id, tasks=self.catalog.list_suite(suite))
        if request.method == "get_info":
            return ok_reply(request.request_id, **self.session_info(session))
        if request.method == "ping":
            return ok_reply(request.request_id, server_version=SERVER_VERSION, busy=session.pending is not None)
        self.end_session(session, "disconnected")
        return ok_reply(request.request_id)

    def session_info(self, session: Session) -> Dict[str, Any]:
        backend = self.backend_info
        return {
            "backend_name": backend.get("backend_name", self.config.simulator),
            "backend_version": backend.get("backend_version", "unknown"),
            "server_version": SERVER_VERSION,
            "current_task": session.current_task,
            "session_id": session.session_id,
            "sim_pid": session.worker.pid if session.worker else None,
            "active_sessions": len(self.sessions),
            "simulator_sessions": self.simulator_session_count(),
            "max_sessions": self.config.max_sessions,
            "uptime_s": round(time.monotonic() - self.started, 3),
            **{key: backend[key] for key in PROVENANCE_KEYS if key in backend},
        }

    def simulator_session_count(self) -> int:
        return sum(1 for session in self.sessions.values() if session.worker is not None)

    def forward_to_worker(self, session: Session, envelope: List[bytes], request: Request, body: bytes) -> None:
        """Hand a simulator request to the session's worker; its reply comes back through the poller."""
        if session.pending is not None:
            if request.request_id is not None and request.request_id == session.pending.request_id:
                session.pending.envelope = envelope  # a retry of the running request: answer it once
                return
            raise ServerBusy("this session is already running a request; send one at a time")
        if session.last_reply is not None and request.request_id is not None \
                and session.last_reply[0] == request.request_id:
            self.send(envelope, session.last_reply[1])  # a retry of a finished request: never run twice
            return
        if request.method == "load_task":
            self._check_task_name(request.fields)
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
            session.worker.send(body)
        except OSError:
            self._worker_died(session)

    def _check_task_name(self, fields: Dict[str, Any]) -> None:
        """Refuse a bad task name here, so it never costs a simulator process."""
        task_name = fields.get("task_name")
        if not isinstance(task_name, str):
            raise InvalidParams("load_task needs a string 'task_name'")
        self.catalog.check_task(task_name)

    def _retire_worn_worker(self, session: Session, task_name: str) -> None:
        """Start a fresh process after MAX_TASKS_PER_WORKER different tasks: simulators leak on close."""
        worker = session.worker
        if worker is None or task_name == session.current_task:
            return
        worker.tasks_loaded += 1
        if worker.tasks_loaded > MAX_TASKS_PER_WORKER:
            log.info("session %s: simulator process %d loaded %d tasks; starting a fresh one",
                     session.session_id, worker.pid, MAX_TASKS_PER_WORKER)
            self._detach_worker(session).begin_close()
            self.closing_workers.append(worker)
            session.current_task = None

    def _ensure_worker(self, session: Session) -> None:
        if session.worker is not None:
            return
        if self.simulator_session_count() >= self.config.max_sessions:
            raise ServerBusy(f"all {self.config.max_sessions} simulator sessions are in use; try again later")
        session.crash = None
        session.worker = Worker(self.config.simulator, session.session_id, self.config.log_level)
        self.worker_sessions[session.worker.fileno()] = session
        self.poller.register(session.worker.fileno(), zmq.POLLIN)
        log.info("session %s: simulator process %d started", session.session_id, session.worker.pid)

    def _forward_worker_reply(self, session: Session) -> None:
        try:
            body = session.worker.receive()
        except (EOFError, OSError):
            self._worker_died(session)
            return
        pending, session.pending = session.pending, None
        if pending is None:
            log.warning("session %s: dropped an unexpected simulator reply", session.session_id)
            return
        if pending.method == "load_task" and pending.task_name is not None and reply_is_ok(body):
            session.current_task = pending.task_name
            log.info("session %s: loaded %s", session.session_id, pending.task_name)
        session.last_reply = (pending.request_id, body) if pending.request_id is not None else None
        session.last_active = time.monotonic()
        self.send(pending.envelope, body)

    def _worker_died(self, session: Session) -> None:
        reason = f"simulator process {session.worker.pid} died ({session.worker.exit_description()})"
        log.warning("session %s: %s", session.session_id, reason)
        self._detach_worker(session).kill()
        self._fail_session(session, reason)

    def _fail_session(self, session: Session, reason: str) -> None:
        """The simulator is gone: answer the running request, and the next ones until load_task."""
        session.crash = reason
        session.current_task = None
        pending, session.pending = session.pending, None
        if pending is not None:
            self.send(pending.envelope, error_reply(pending.request_id, "backend_error",
                                                    f"{reason}; call load_task to start a new simulator"))

    def _detach_worker(self, session: Session) -> Worker:
        worker, session.worker = session.worker, None
        self.poller.unregister(worker.fileno())
        del self.worker_sessions[worker.fileno()]
        return worker

    def _expire_overdue_requests(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            pending = session.pending
            if pending is not None and now > pending.deadline and session.worker is not None:
                limit = "SIM_LOAD_TIMEOUT_S" if pending.method == "load_task" else "SIM_STEP_TIMEOUT_S"
                reason = f"{pending.method} overran {limit}; simulator process {session.worker.pid} was killed"
                log.warning("session %s: %s", session.session_id, reason)
                self._detach_worker(session).kill()
                self._fail_session(session, reason)

    # Sessions ending --------------------------------------------------------

    def reap_idle_sessions(self) -> None:
        cutoff = time.monotonic() - self.config.session_timeout_s
        for session in list(self.sessions.values()):
            if session.pending is None and session.last_active < cutoff:
                self.end_session(session, "reaped after idling")

    def end_session(self, session: Session, why: str) -> None:
        if session.worker is not None:
            worker = self._detach_worker(session)
            if session.pending is not None:
                worker.kill()  # busy: it would not read a close request
            else:
                worker.begin_close()
                self.closing_workers.append(worker)
        self.sessions.pop(session.key, None)
        log.info("session %s ended: %s", session.session_id, why)

    def _finish_closing_workers(self) -> None:
        self.closing_workers = [worker for worker in self.closing_workers if not worker.finished()]

    def shutdown(self) -> None:
        """Close every simulator (killing those that will not close), then the socket."""
        log.info("shutting down %d sessions", len(self.sessions))
        for session in list(self.sessions.values()):
            self.end_session(session, "server shutting down")
        while self.closing_workers:
            self._finish_closing_workers()
            time.sleep(0.05)
        self.frontend.disable_monitor()
        self.monitor.close(linger=0)
        self.frontend.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()
        log.info("stopped")

    # Sending ----------------------------------------------------------------

    def send(self, envelope: List[bytes], body: bytes) -> None:
        """Never blocks: a client that vanished or stopped reading loses its reply, not our loop."""
        try:
            self.frontend.send_multipart(envelope + [body], flags=zmq.NOBLOCK, copy=len(body) < 65536)
        except zmq.ZMQError as error:
            log.debug("reply to %r dropped: %s", envelope[0], error)


def is_loopback(bind: str) -> bool:
    host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
    return bind.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]", "::1")


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
    return None


def reply_is_ok(body: bytes) -> bool:
    try:
        return decode(body, max_bytes=len(body) + 1).get("status") == "ok"
    except SimulatorError:
        return False


# --- main --------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        backend_class = get_backend(config.simulator)
    except KeyError as error:
        print(f"sim_server: {error.args[0]}", file=sys.stderr)
        return 2
    curve_problem = check_curve_config(config)
    if curve_problem:
        print(f"sim_server: {curve_problem}", file=sys.stderr)
        return 2
    try:
        backend_class.prepare_server()
    except BackendError as error:
        print(f"sim_server: cannot serve {config.simulator}: {error}", file=sys.stderr)
        return 2
    server = SimulatorServer(config)

    def stop(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
