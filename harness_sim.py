"""Test harness shared by the tests (test_sim.py, tests/), soak_sim.py and bench_sim.py: real server processes on
loopback, a raw protocol client, process helpers and LIBERO in-process as a reference.

Nothing here is product code; no product script imports it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import zmq
import zmq.utils.monitor

import sim_client

HERE = os.path.dirname(os.path.abspath(__file__))
# A bound on a hang, not a speed test: a server starts once it has read each simulator's catalog,
# which may take up to the server's own catalog limit (180 s; ManiSkill imports torch and probes
# Vulkan, and took over 60 s on a loaded 2-core machine).
START_TIMEOUT_S = 240
REPLY_TIMEOUT_MS = 120_000  # a bound on a hang: a busy machine makes a ManiSkill load take 45 s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RawClient:
    """A client written only from the protocol text: a DEALER, an empty delimiter, a msgpack map.

    `curve` is (server public key, client public key, client secret key) for a CURVE server;
    `monitor` records the socket's connection events for wait_for_event().
    """

    def __init__(self, address: str, socket_type: int = zmq.DEALER, delimiter: bool = True,
                 routing_id: Optional[bytes] = None, curve: Optional[tuple] = None, monitor: bool = False) -> None:
        self.socket = zmq.Context.instance().socket(socket_type)
        self.socket.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.socket.setsockopt(zmq.IDENTITY, routing_id)
        if curve is not None:
            self.socket.curve_serverkey, self.socket.curve_publickey, self.socket.curve_secretkey = curve
        self.monitor = self.socket.get_monitor_socket(addr=f"inproc://monitor-{uuid.uuid4().hex}") if monitor else None
        self.socket.connect(address)
        self.delimiter = delimiter and socket_type == zmq.DEALER

    def send_body(self, body: bytes) -> None:
        self.socket.send_multipart([b"", body] if self.delimiter else [body])

    def receive(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> dict:
        if not self.socket.poll(timeout_ms):
            raise AssertionError("no reply from the server")
        frames = self.socket.recv_multipart()
        return sim_client.decode(frames[-1])

    def request(self, method: str, timeout_ms: int = REPLY_TIMEOUT_MS, **fields) -> dict:
        self.send_body(sim_client.encode(dict(fields, method=method)))
        return self.receive(timeout_ms)

    def wait_for_event(self, events: int, timeout_s: float = 30.0) -> Optional[dict]:
        """The first socket event among `events` (zmq.EVENT_* flags) within `timeout_s`, or None:
        how a test sees the server refuse or drop this connection, rather than inferring it from silence.

        The monitor stops here: events nobody reads would fill its queue, and libzmq then blocks the
        context's I/O thread, stalling every socket of this process.
        """
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.monitor.poll(100):
                    event = zmq.utils.monitor.recv_monitor_message(self.monitor)
                    if event["event"] & events:
                        return event
            return None
        finally:
            self._stop_monitor()

    def _stop_monitor(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None

    def close(self) -> None:
        self._stop_monitor()
        self.socket.close(linger=0)


class ServerProcess:
    """`python sim_server.py` (or `command`) on a free loopback port, stopped with SIGTERM."""

    def __init__(self, simulator: str = "mock", *args: str, env: Optional[dict] = None,
                 address: Optional[str] = None, stderr=None, probe_keys: Optional[dict] = None,
                 command: Optional[List[str]] = None) -> None:
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [*(command or [sys.executable, os.path.join(HERE, "sim_server.py")]), "--simulator", simulator,
             "--bind", self.address.replace("127.0.0.1", "0.0.0.0") if address else self.address,
             "--log-level", "WARNING", *args],
            env={**os.environ, **(env or {})}, cwd=HERE, stderr=stderr)
        self._wait_until_serving(probe_keys)

    def _wait_until_serving(self, probe_keys: Optional[dict]) -> None:
        if probe_keys is not None:
            with sim_client.SimulatorClient(self.address, timeout_s=START_TIMEOUT_S, **probe_keys) as probe:
                probe.ping()
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = RawClient(self.address)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError("server exited during start-up")
                probe.send_body(sim_client.encode({"method": "ping"}))
                if probe.socket.poll(500):
                    probe.socket.recv_multipart()
                    probe.request("disconnect")
                    return
        finally:
            probe.close()
        raise AssertionError("server did not start")

    def client(self, **kwargs) -> RawClient:
        return RawClient(self.address, **kwargs)

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@contextmanager
def running_server(simulator: str = "mock", *args: str, env: Optional[dict] = None) -> Iterator[ServerProcess]:
    server = ServerProcess(simulator, *args, env=env)
    try:
        yield server
    finally:
        server.stop()


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.05) -> bool:
    """Whether `predicate` came true within `timeout_s` (asked every `interval_s`): a bound on a real
    hang, not a speed test."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def venv_made_once(folder: str, make: Callable[[], None]) -> str:
    """folder/bin/python, once `make()` has filled the venv: made once and kept, by whichever test worker
    asks first while the others wait; a make that failed half-way is made again."""
    import fcntl

    marker = os.path.join(folder, ".made")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(marker):
            make()
            with open(marker, "w"):
                pass
    return os.path.join(folder, "bin", "python")


def simulator_python(simulator: str) -> str:
    """The Python of the simulator's own environment, .venvs/NAME, made by `bash .ci/setup --simulator
    NAME` (from PyPI) when it is not there yet; the server finds it there by itself."""
    folder = os.path.join(HERE, ".venvs", simulator)
    return venv_made_once(folder, lambda: subprocess.run(["bash", ".ci/setup", "--simulator", simulator], cwd=HERE,
                                                         check=True, timeout=1800, stdout=subprocess.DEVNULL))


def children_of(pid: int) -> List[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


# --- pytest plugin (pytest.ini loads this module with -p) --------------------

# Module-scoped servers of simulators in their own environments: their tests share one per run.
SHARED_SERVERS = ("metaworld_server", "kitchen_server", "maniskill_server", "liberoplus_server")


def pytest_collection_modifyitems(config, items) -> None:
    """Every LIBERO test in one xdist group (they share a server and a session) but the custom
    tasks' (their own server and folder, beside it), every Ray test in another (they share a Ray
    head), and the tests of each shared server in one more (it starts once, not on each worker):
    each group runs on one worker, one test after another."""
    import pytest

    for item in items:
        shared = [name for name in SHARED_SERVERS if name in getattr(item, "fixturenames", ())]
        if item.name.startswith("test_custom_task") or "custom_libero_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("libero_custom"))
        elif item.get_closest_marker("libero"):
            item.add_marker(pytest.mark.xdist_group("libero"))
        elif item.name.startswith("test_ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


# --- LIBERO in-process, as the reference a server is compared with ------------

def libero_suite(name: str):
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[name]()


def in_process_env(suite_name: str, task_index: int, size: int):
    """(OffScreenRenderEnv, task name, init states) as an in-process evaluation builds them (set MUJOCO_GL
    first: egl or osmesa)."""
    from libero.libero import get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = libero_suite(suite_name)
    task = suite.get_task(task_index)
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                                         task.bddl_file), camera_heights=size, camera_widths=size)
    return env, task.name, suite.get_task_init_states(task_index)


def in_process_rollout(suite_name: str, task_index: int, init_state_index: int, actions, size: int,
                       seed: int = 7, settle_steps: int = 10) -> List[Dict]:
    """LIBERO exactly as an in-process evaluation runs it: fresh env, seed, reset, init state, settle, steps."""
    env, _, init_states = in_process_env(suite_name, task_index, size)
    try:
        env.seed(seed)
        env.reset()
        observation = env.set_init_state(init_states[init_state_index])
        for _ in range(settle_steps):
            observation, _, _, _ = env.step([0.0] * 6 + [-1.0])
        observations = [observation]
        for action in actions:
            observation, _, _, _ = env.step(action)
            observations.append(observation)
        return observations
    finally:
        env.close()
