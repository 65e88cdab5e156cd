"""Simulator Inference Center client: copy this one file into your policy repo.

Needs only pyzmq, msgpack and numpy; runs on Python 3.8+.

    from sim_client import SimulatorClient

    with SimulatorClient("tcp://sim-host:5555") as sim:
        task_info = sim.load_task(sim.list_tasks()[0])
        observation, info = sim.reset()
        while True:
            result = sim.step(my_policy(observation))
            observation = result["observation"]
            if result["terminated"] or result["truncated"]:
                break

    python sim_client.py --address tcp://localhost:5555 --steps 50   # try a server

sim_eval.py, beside it, runs whole evaluations.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import msgpack
import numpy as np
import zmq
import zmq.auth

CLIENT_VERSION = "1.1.0"
DEFAULT_ADDRESS = "tcp://localhost:5555"
# Loading a LIBERO task builds a MuJoCo model and GL context: seconds, not milliseconds.
DEFAULT_TIMEOUT_S = 120.0
# A reply can carry two camera images and more; the client trusts its server, within reason.
MAX_REPLY_BYTES = 1024 * 1024 * 1024
# A timed-out call is re-sent (same request_id, same session) this many times.
DEFAULT_RETRIES = 2
# When nothing has ever answered at the address, say so this soon (or within timeout_s, if shorter)
# instead of waiting out every retry of a long timeout; a server that once answered is not rushed.
FIRST_CONTACT_TIMEOUT_S = 10.0
# While nothing has answered yet, a ping goes out this often: a live server answers at once, even
# while it runs a long first load_task, which tells it apart from an empty address.
FIRST_CONTACT_PING_S = 1.0


def new_identity() -> bytes:
    """A routing identity the server lets survive reconnects: 128 random bits, never a leading zero."""
    return b"sic-" + os.urandom(16)


# --- errors ------------------------------------------------------------------


class SimulatorClientError(Exception):
    """Base of everything this client raises."""


class ServerError(SimulatorClientError):
    """The server answered with an error; `error_type` is the protocol's name for it. Each known
    type has its subclass below; a type this client does not know raises ServerError itself."""

    error_type = ""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        if error_type:
            self.error_type = error_type


class UnknownMethod(ServerError):
    """The server has no such method."""

    error_type = "unknown_method"


class InvalidParams(ServerError):
    """A missing or ill-typed field, a wrong action shape, NaN/Inf, a malformed body."""

    error_type = "invalid_params"


class TaskNotFound(ServerError):
    """load_task named no such task; the message lists close matches."""

    error_type = "task_not_found"


class NoTaskLoaded(ServerError):
    """reset or step before a successful load_task."""

    error_type = "no_task_loaded"


class NotReset(ServerError):
    """step before reset, or after the episode ended."""

    error_type = "not_reset"


class BackendError(ServerError):
    """The simulator raised, died or overran its time limit; load_task starts a new one."""

    error_type = "backend_error"


class InternalError(ServerError):
    """A bug in the server (its log has the traceback)."""

    error_type = "internal_error"


class ServerBusy(ServerError):
    """Every simulator slot is taken, or this session already has a request running."""

    error_type = "server_busy"


class NoSimulatorSelected(ServerError):
    """The server serves several simulators and this session has not called select_simulator."""

    error_type = "no_simulator_selected"


class UnknownSimulator(ServerError):
    """select_simulator named a simulator the server does not serve; the message lists them."""

    error_type = "unknown_simulator"


class SimulatorAlreadySelected(ServerError):
    """The session already selected another simulator; disconnect() first to switch."""

    error_type = "simulator_already_selected"


class AssetsMissing(ServerError):
    """The task needs assets the server lacks (LIBERO-plus's asset pack); the message says which."""

    error_type = "assets_missing"


class ServerTimeout(SimulatorClientError):
    """No reply in time: the server is gone, overloaded, or refused us (CURVE keys)."""


class ServerUnreachable(ServerTimeout):
    """Nothing has ever answered at this address: no server, a wrong address or port, a
    firewall, or CURVE keys the server refuses."""


ERROR_CLASSES = {cls.error_type: cls for cls in (
    UnknownMethod, InvalidParams, TaskNotFound, NoTaskLoaded, NotReset, BackendError, InternalError, ServerBusy,
    NoSimulatorSelected, UnknownSimulator, SimulatorAlreadySelected, AssetsMissing)}

# --- codec (the server's ndarray map) ---------------------------------------


def _pack_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        array = obj if obj.flags.c_contiguous else obj.copy(order="C")  # ascontiguousarray makes 0-d 1-d
        return {"__type__": "ndarray", "shape": list(array.shape), "dtype": array.dtype.str,
                "data": array.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _unpack_ndarray(obj: Dict[str, Any]) -> Any:
    if obj.get("__type__") != "ndarray":
        return obj
    dtype = np.dtype(obj["dtype"])
    if dtype.kind not in "biuf":
        raise SimulatorClientError("server sent an array of dtype {!r}".format(obj["dtype"]))
    return np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"])


def encode(message: Dict[str, Any]) -> bytes:
    """A request map as a msgpack body; numpy arrays become the protocol's ndarray maps."""
    return msgpack.packb(message, default=_pack_extra, use_bin_type=True)


def decode(body: bytes) -> Dict[str, Any]:
    """A reply body as a map; ndarray maps become read-only numpy arrays."""
    return msgpack.unpackb(body, raw=False, object_hook=_unpack_ndarray, max_bin_len=MAX_REPLY_BYTES,
                           max_str_len=MAX_REPLY_BYTES, max_ext_len=0)


# --- client ------------------------------------------------------------------


class SimulatorClient:
    """One session on a simulator server: numpy in, numpy out.

    The session is named by a random 128-bit routing identity chosen here, which
    the server treats as a capability: whoever presents it owns the session (and,
    with CURVE, only with the same client key). When a call gets no reply within
    `timeout_s` (load_task: `load_timeout_s`), the socket is closed and reopened
    with the same identity (zguide's Lazy Pirate pattern) and the same request,
    with the same request_id, is sent again, up to `retries` times. The server
    answers a repeated request_id from its reply cache, or once the running one
    ends, so a retried step never runs twice and the session survives the
    reconnect. After the last retry the call raises ServerTimeout; the session is
    still there if the server is. `new_session()` starts afresh. Replies to older
    requests are dropped, so a late reply is never taken for a newer one.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 load_timeout_s: Optional[float] = None, server_key: Optional[str] = None,
                 client_key: Optional[str] = None, retries: int = DEFAULT_RETRIES,
                 first_contact_timeout_s: Optional[float] = None, simulator: Optional[str] = None) -> None:
        """`simulator`: the simulator to use on a server that serves several, selected before the
        first call and again whenever the server has forgotten the session (a server that serves
        one checks the name). `server_key`: the server's public key file (server.key) when it runs CURVE;
        `client_key`: this client's secret key file (client.key_secret), whose public half
        the server must list. `sim_server.py --gen-keys DIR` writes both. When nothing at all
        answers within `first_contact_timeout_s` (default: 10 s, or timeout_s if shorter) of
        the first call, that call raises ServerUnreachable."""
        self.address = address
        self.timeout_s = timeout_s
        self.first_contact_timeout_s = (min(FIRST_CONTACT_TIMEOUT_S, timeout_s) if first_contact_timeout_s is None
                                        else first_contact_timeout_s)
        self._first_contact: Optional[float] = None  # when the first call went out
        self._answered = False  # whether anything ever came back from the address
        self._connected = False  # whether a TCP connection to it was ever made (the socket monitor's word)
        self._monitor: Optional[zmq.Socket] = None
        self.load_timeout_s = load_timeout_s if load_timeout_s is not None else max(timeout_s, 300.0)
        self._curve = _load_curve_keys(server_key, client_key)
        self.retries = retries
        self.simulator = simulator
        self._selected = False
        self.identity = new_identity()
        self.task_info: Optional[Dict[str, Any]] = None
        self._request_ids = itertools.count(int.from_bytes(os.urandom(4), "big"))
        self._context = zmq.Context.instance()
        self._socket: Optional[zmq.Socket] = None
        self._connect()

    # Transport --------------------------------------------------------------

    def _connect(self) -> None:
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IDENTITY, self.identity)
        # A DEALER with no live connection blocks on send (e.g. after a refused CURVE handshake).
        self._socket.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        if self._curve is not None:
            server_public, client_public, client_secret = self._curve
            self._socket.curve_serverkey = server_public
            self._socket.curve_publickey = client_public
            self._socket.curve_secretkey = client_secret
        if not self._connected:  # until a connection is seen, the monitor tells "nobody there" from "flaky"
            self._monitor = self._socket.get_monitor_socket(zmq.EVENT_CONNECTED)
        self._socket.connect(self.address)

    def _reconnect(self) -> None:
        self._stop_monitor()
        self._socket.close(linger=0)
        self._connect()

    def _seen_connected(self) -> bool:
        """Whether a connection was ever made; the monitor is read here and closed once it said so."""
        if not self._connected and self._monitor is not None and self._monitor.poll(0):
            self._connected = True
            self._stop_monitor()
        return self._connected

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def new_session(self) -> None:
        """Leave the current session to the server's reaper and start a new one."""
        self.identity = new_identity()
        self.task_info = None
        self._selected = False
        self._reconnect()

    def call(self, method: str, timeout_s: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
        """Send one request and return the reply's fields, or raise its typed error. With
        `simulator` set, the session selects it first, and again when the server forgot the session."""
        if self.simulator is not None and not self._selected and method != "select_simulator":
            self._select()
        try:
            return self._call_once(method, timeout_s, fields)
        except NoSimulatorSelected:
            if self.simulator is None:
                raise
            self._select()  # the server forgot this session (reaped, or restarted)
            return self._call_once(method, timeout_s, fields)

    def _select(self) -> None:
        self._call_once("select_simulator", None, {"simulator": self.simulator})
        self._selected = True

    def _call_once(self, method: str, timeout_s: Optional[float], fields: Dict[str, Any],
                   retries: Optional[int] = None) -> Dict[str, Any]:
        request_id = next(self._request_ids)
        body = encode(dict(fields, method=method, request_id=request_id))
        if self._first_contact is None:
            self._first_contact = time.monotonic()
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                self._send(body, method)
                reply = self._wait_for_reply(request_id, timeout_s or self.timeout_s, method)
                break
            except ServerUnreachable:
                raise
            except ServerTimeout:
                if attempt == retries:
                    if not self._answered:  # every retry spent, and nothing ever answered
                        self._unreachable()
                    raise
        if reply.get("status") != "ok":
            error_type = str(reply.get("error_type", ""))
            raise ERROR_CLASSES.get(error_type, ServerError)(str(reply.get("message", "no message")), error_type)
        return reply

    def _wait_for_reply(self, request_id: int, timeout_s: float, method: str) -> Dict[str, Any]:
        """The reply to `request_id`, by three rules: first contact (when nothing has ever answered,
        say so soon), liveness (while a long call runs, a ping every `timeout_s` tells a busy server,
        which answers it, from a dead one, so only `load_timeout_s` bounds a load) and stale replies
        (replies to earlier requests and to pings are dropped)."""
        deadline = time.monotonic() + timeout_s
        unanswered_ping = None if self._answered else self._send_ping(method)  # answered even during a load
        while True:
            self._check_first_contact()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                self._give_up(method, timeout_s, "")
            slice_s = min(timeout_s, self.timeout_s) if self._answered else FIRST_CONTACT_PING_S
            reply = self._receive(min(remaining_s, slice_s))
            if reply is None:
                unanswered_ping = self._check_liveness(method, unanswered_ping, slice_s, deadline)
            elif reply.get("request_id") == request_id:
                return reply
            elif reply.get("request_id") == unanswered_ping:
                unanswered_ping = None

    def _check_first_contact(self) -> None:
        """Nothing ever answered: "unreachable" at once when no connection was ever made either; a
        connection that was made but cut (a flaky link) gets the retries asked for instead."""
        if self._answered or time.monotonic() < self._first_contact + self.first_contact_timeout_s:
            return
        if not self._seen_connected():
            self._unreachable()

    def _receive(self, wait_s: float) -> Optional[Dict[str, Any]]:
        """The next reply to arrive within `wait_s`, or None after silence."""
        if not self._socket.poll(int(wait_s * 1000) + 1, zmq.POLLIN):
            return None
        reply = decode(self._socket.recv_multipart()[-1])
        if not self._answered:
            self._answered = self._connected = True
            self._stop_monitor()
        return reply if isinstance(reply, dict) else {}

    def _check_liveness(self, method: str, unanswered_ping: Optional[int], waited_s: float,
                        deadline: float) -> Optional[int]:
        """After a silent slice: a server that let a ping go unanswered is gone; else ping it again."""
        if unanswered_ping is not None and self._answered:
            self._give_up(method, waited_s, " (nor to a ping)")
        return self._send_ping(method) if time.monotonic() < deadline else unanswered_ping

    def _send_ping(self, method: str) -> int:
        request_id = next(self._request_ids)
        self._send(encode({"method": "ping", "request_id": request_id}), method)
        return request_id

    def _send(self, body: bytes, method: str) -> None:
        try:
            self._socket.send_multipart([b"", body])
        except zmq.Again:
            self._give_up(method, self.timeout_s, " (could not even send it)")

    def _unreachable(self) -> None:
        how = (f"in {self.retries + 1} tries of {self.timeout_s:g} s (connections were made, then cut or "
               "refused)" if self._connected else f"in {self.first_contact_timeout_s:g} s")
        self._reconnect()
        keys = (", or does the server refuse our CURVE keys (server_key, and is our public key listed there)"
                if self._curve is not None else "")
        raise ServerUnreachable(
            f"nothing has answered at {self.address} {how}: is sim_server.py running there, are the host and "
            f"port right (tcp://HOST:PORT), does a firewall block the port{keys}?")

    def _give_up(self, method: str, waited_s: float, detail: str) -> None:
        self._seen_connected()
        self._reconnect()
        keys = (" or it refused our CURVE keys (check server_key, and that the server lists our public key)"
                if self._curve is not None else "")
        raise ServerTimeout(
            f"no reply to {method}{detail} from {self.address} within {waited_s:.1f} s (try {self.retries + 1} "
            f"times in all): the server is down, overloaded or unreachable{keys}")

    # The protocol's methods -------------------------------------------------

    def list_simulators(self) -> List[str]:
        """The simulators the server serves (one, unless it was started with several)."""
        return self.call("list_simulators")["simulators"]

    def select_simulator(self, simulator: str) -> str:
        """Use `simulator` for this session; needed only when the server serves several."""
        return self.call("select_simulator", simulator=simulator)["simulator"]

    def list_tasks(self, suite: Optional[str] = None) -> List[str]:
        """The server's task names; with `suite` (LIBERO), that suite's as "suite/task"."""
        return self.call("list_tasks", **({"suite": suite} if suite else {}))["tasks"]

    def list_suites(self) -> Dict[str, int]:
        """The server's task suites, name -> task count ({} for a simulator without suites)."""
        return self.call("list_tasks").get("suites", {})

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        """Load a task; `options` are the backend's load options (e.g. LIBERO's camera size)."""
        self.task_info = self.call("load_task", timeout_s=self.load_timeout_s, task_name=task_name,
                                   **options)["task_info"]
        return self.task_info

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """Start an episode: (observation, info). LIBERO: `init_state_index` picks the fixed init
        state (successive resets walk 0, 1, 2, ...); `seed` defaults to the task's convention."""
        fields: Dict[str, Any] = {}
        if seed is not None:
            fields["seed"] = int(seed)
        if init_state_index is not None:
            fields["init_state_index"] = int(init_state_index)
        reply = self.call("reset", **fields)
        return reply["observation"], reply["info"]

    def step(self, action: Any, frame_key: Optional[str] = None, render: bool = True) -> Dict[str, Any]:
        """One step; `action` is an array (sent as {"action": it}) or a map of name -> array, and an
        array with one more leading axis is a chunk of K actions, run in one round trip.

        Returns the reply: observation, reward, terminated, truncated, info (a chunk adds steps_run,
        rewards and successes). With `frame_key` (an observation key, e.g. a camera's), the reply's
        `frames` holds that key's observation after every step run: a chunk renders its other
        cameras for its last step only. `render=False` leaves every camera image unrendered (blank),
        but for `frame_key`'s: for a client that reads only the state (a replay).
        """
        if isinstance(action, dict):
            action = {name: np.asarray(value) for name, value in action.items()}
        else:
            action = np.asarray(action)
        fields: Dict[str, Any] = {} if frame_key is None else {"frame_key": frame_key}
        if not render:
            fields["render"] = False
        return self.call("step", action=action, **fields)

    def get_info(self) -> Dict[str, Any]:
        """The server's and this session's facts: backend, versions, simulator stack, current task,
        session_id, sim_pid, session counts, uptime."""
        reply = self.call("get_info")
        reply.pop("status", None)
        reply.pop("request_id", None)
        return reply

    def ping(self, timeout_s: Optional[float] = None) -> float:
        """The round trip in seconds; raises ServerTimeout when nobody answers. Needs no
        simulator and is answered even while this session's load_task runs."""
        started = time.monotonic()
        self.call("ping", timeout_s=timeout_s)
        return time.monotonic() - started

    def disconnect(self) -> None:
        """End the session on the server (its simulator is closed) and close the socket. One try:
        a server that does not answer within min(timeout_s, 5 s) reaps the idle session anyway."""
        if self._socket is None:
            return
        try:
            self._call_once("disconnect", min(self.timeout_s, 5.0), {}, retries=0)
        except SimulatorClientError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket without a word to the server, which reaps the session when it idles;
        for a server that stopped answering. Safe to call twice."""
        if self._socket is not None:
            self._stop_monitor()
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> SimulatorClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.disconnect()


def _load_curve_keys(server_key: Optional[str], client_key: Optional[str]):
    """(server public, client public, client secret) from key files, or None without CURVE."""
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise SimulatorClientError("CURVE needs both server_key (server.key) and client_key (client.key_secret)")
    if not zmq.has("curve"):
        raise SimulatorClientError("this pyzmq has no CURVE support; install pyzmq from PyPI")

    try:
        server_public, _ = zmq.auth.load_certificate(server_key)
        client_public, client_secret = zmq.auth.load_certificate(client_key)
    except (OSError, ValueError) as error:
        raise SimulatorClientError(f"cannot read a CURVE key file: {error}") from None
    if client_secret is None:
        raise SimulatorClientError(f"{client_key} holds no secret key: pass the client.key_secret file")
    return server_public, client_public, client_secret


# --- command line ------------------------------------------------------------


def zero_action(task_info: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """An all-zero action matching the task's action_spec."""
    return {name: np.zeros(spec["shape"], dtype=np.dtype(spec["dtype"]))
            for name, spec in task_info["action_spec"].items()}


def upright(image: np.ndarray, task_info: Dict[str, Any]) -> np.ndarray:
    """A camera frame the right way up, for people: turned when the task says its images are rotated."""
    return image[::-1, ::-1] if task_info.get("images_rotated_180") else image


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line and exit status 2, and whose --help shows every default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def describe_array(value: Any) -> str:
    """"[shape] dtype" of an array, else the value's type name."""
    if isinstance(value, np.ndarray):
        return f"{list(value.shape)} {value.dtype}"
    return type(value).__name__


def run_demo(address: str, task: Optional[str], steps: int, timeout_s: float, **keys: Optional[str]) -> None:
    """The whole lifecycle once, printed: the smoke test for a new server."""
    print(f"connecting to {address} ...", flush=True)
    with SimulatorClient(address, timeout_s=timeout_s, **keys) as sim:
        info = sim.get_info()
        print("server: %s %s, %d session(s); simulators: %s" % (
            info["backend_name"], info["backend_version"], info["active_sessions"],
            ", ".join(info.get("simulators", [info["backend_name"]]))))
        tasks = sim.list_tasks()
        task_name = task or tasks[0]
        print("tasks: %d, loading %s" % (len(tasks), task_name))
        started = time.monotonic()
        task_info = sim.load_task(task_name)
        print("loaded in {:.1f} s: {}".format(time.monotonic() - started, task_info.get("description", "")))
        observation, _ = sim.reset()
        for key, value in sorted(observation.items()):
            print("  %-40s %s" % (key, describe_array(value)))
        total_reward, ran, started = 0.0, 0, time.monotonic()
        for _ in range(steps):
            result = sim.step(zero_action(task_info))
            total_reward += result["reward"]
            ran += 1
            if result["terminated"] or result["truncated"]:
                break
        elapsed = time.monotonic() - started
        print("steps: %d, total reward %.3f, %.1f ms per step" % (ran, total_reward, 1000 * elapsed / max(ran, 1)))


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: a one-episode smoke test of a server."""
    parser = OneLineParser(prog="sim_client.py", description="Run one episode against a simulator server; "
                           "`python sim_eval.py --help` evaluates a policy on many.")
    parser.add_argument("--address", default=os.environ.get("SIM_ADDRESS", DEFAULT_ADDRESS))
    parser.add_argument("--task", default=None, help="task to load (default: the first listed)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call")
    parser.add_argument("--simulator", default=None,
                        help="simulator to select on a server that serves several (see list_simulators)")
    parser.add_argument("--server-key", default=None, help="server's CURVE public key file (server.key)")
    parser.add_argument("--client-key", default=None, help="this client's CURVE secret key file (client.key_secret)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.address, args.task, args.steps, args.timeout, server_key=args.server_key,
                 client_key=args.client_key, simulator=args.simulator)
    except SimulatorClientError as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
