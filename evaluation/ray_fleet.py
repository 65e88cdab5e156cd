"""Simulator servers as Ray actors (sim_eval.py --ray): placed by Ray across a cluster's nodes,
restarted when they die.

    python sim_eval.py --ray auto --servers 8 --server-cpus 4 --server-args "--simulator libero" \
        --suite libero_spatial --parallel 32 --policy openpi://gpu-box:8000
    python sim_eval.py --ray auto --servers 8 --serve-only --addresses-file servers.txt

Each actor starts `sim_server.py` on its node, on a free port of that node's Ray address, with the
flags given and the SIM_*/MUJOCO_* environment of the process that asked. It waits until the server
answers, then reports its tcp address. When the server process dies, its actor exits too, so
that Ray restarts it (`max_restarts`) with a new server; `ServerFleet` keeps the list of
addresses current for the runner. Stopping the fleet stops every server and actor.

Ray is imported only here, and only sim_eval.py's --ray imports this module; the server itself
knows nothing of Ray.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import ray

import sim_client
from server.process import StderrRelay

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_START_TIMEOUT_S = 300.0  # a LIBERO server imports and probes its renderer first
ADDRESS_REFRESH_S = 1.0
# Stopping: every server gets SIGTERM at once and this long to close its simulators, then is killed.
STOP_WAIT_S = 20.0
# A server dies with its actor (Linux's parent-death signal, set before sim_server.py runs), and the
# actor with its server, so that Ray restarts both.
SERVE_UNTIL_PARENT_DIES = ("import runpy, signal, sys; from server.process import die_with_parent; "
                           "die_with_parent(signal.SIGTERM, int(sys.argv[1])); sys.argv = sys.argv[2:]; "
                           "runpy.run_path(sys.argv[0], run_name='__main__')")
# What a server inherits from the process that started the fleet (a hand-started one reads the same).
PASSED_ENVIRONMENT_PREFIXES = ("SIM_", "MUJOCO_", "PYOPENGL_", "LP_NUM_THREADS")

log = logging.getLogger("evaluation.ray_fleet")


class FleetError(Exception):
    """The servers could not be started; the message says why in one line."""


def passed_environment() -> Dict[str, str]:
    return {name: value for name, value in os.environ.items() if name.startswith(PASSED_ENVIRONMENT_PREFIXES)}


def node_address() -> str:
    """This node's address as Ray knows it (127.0.0.1 on a loopback-only instance)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class SimServerActor:
    """One sim_server.py on this actor's node. Made a Ray actor by ServerFleet, with its resources."""

    def __init__(self, server_args: List[str], env: Dict[str, str]) -> None:
        host = node_address()
        self.address = f"tcp://{host}:{free_port(host)}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE_UNTIL_PARENT_DIES, str(os.getpid()), os.path.join(HERE, "sim_server.py"),
             "--bind", self.address, *server_args],
            cwd=HERE, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **env})
        self.stderr = StderrRelay(self.process.stderr)  # to Ray's worker log, and why a start failed
        self.stopping = False
        self._wait_until_serving()
        threading.Thread(target=self._exit_with_server, daemon=True).start()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stderr.thread.join(timeout=1.0)  # its last lines
                last_line = (self.stderr.tail().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"sim_server.py exited with code {self.process.returncode} while starting: "
                                   f"{last_line}")
            probe = sim_client.SimulatorClient(self.address, timeout_s=2.0, retries=0,
                                               first_contact_timeout_s=2.0)
            try:
                probe.ping()
                return
            except sim_client.SimulatorClientError:
                time.sleep(0.5)
            finally:
                probe.disconnect()
        raise RuntimeError(f"sim_server.py did not answer on {self.address} in {SERVER_START_TIMEOUT_S:.0f} s")

    def _exit_with_server(self) -> None:
        self.process.wait()
        if not self.stopping:
            os._exit(1)  # Ray sees this actor die and restarts it, with a new server

    def server(self) -> Dict[str, object]:
        """The server's address and process id."""
        return {"address": self.address, "pid": self.process.pid}

    def stop(self) -> None:
        """Ask the server to stop (it closes its simulators); ServerFleet then ends the actor."""
        self.stopping = True
        self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float) -> bool:
        """Whether the server exited within `timeout_s`; it is killed when it did not."""
        try:
            self.process.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            self.process.kill()
            return False


def connect(address: Optional[str]) -> bool:
    """ray.init for `--ray [ADDRESS]`; True when this call started a local Ray (stopped at the end).

    Without an address a local instance starts; it keeps to 127.0.0.1 when the process set
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing Ray, as sim_eval.py does.
    """
    if address is None:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never an existing one
        return True
    if address != "auto":
        check_reachable(address)
    ray.init(address=address, log_to_driver=False)
    return False


def check_reachable(address: str) -> None:
    """FleetError unless something listens at HOST:PORT (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise FleetError(f"--ray {address!r}: expected auto or the head's HOST:PORT, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise FleetError(f"nothing answers at {address} ({error.strerror or error}): is the Ray head running "
                         "there (ray start --head --port PORT)?") from None


class ServerFleet:
    """N simulator servers as Ray actors, and the current list of their addresses."""

    def __init__(self, count: int, cpus: float, gpus: float, server_args: str, max_restarts: int) -> None:
        actor_class = ray.remote(SimServerActor).options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts,
                                                         max_task_retries=-1)
        self.actors = [actor_class.remote(shlex.split(server_args), passed_environment()) for _ in range(count)]
        try:
            self.servers: List[Dict[str, object]] = ray.get([actor.server.remote() for actor in self.actors])
        except ray.exceptions.RayActorError as error:
            self._kill_actors()
            why = str(error).strip().splitlines()[-1]  # the creation task's own exception, e.g. RuntimeError: ...
            raise FleetError(f"a simulator server could not start: {why}") from None
        self.restarts = 0  # servers Ray brought back
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="server-fleet", daemon=True)
        self.watcher.start()

    @property
    def addresses(self) -> List[str]:
        """The address of each server now (one per actor; a restarted server has a new one)."""
        with self.lock:
            return [str(server["address"]) for server in self.servers]

    def server_pids(self) -> List[int]:
        with self.lock:
            return [int(server["pid"]) for server in self.servers]

    def _watch(self) -> None:
        while not self.stopping.wait(ADDRESS_REFRESH_S):
            for index, actor in enumerate(self.actors):
                ready, _ = ray.wait([actor.server.remote()], timeout=ADDRESS_REFRESH_S)
                if not ready:
                    continue  # restarting: asked again next round
                try:
                    server = ray.get(ready[0])
                except ray.exceptions.RayActorError:
                    continue
                with self.lock:
                    if server != self.servers[index]:
                        self.servers[index] = server
                        self.restarts += 1
                        log.warning("a server was restarted by Ray; it now answers on %s", server["address"])

    def stop(self) -> None:
        """Stop every server at once, wait at most STOP_WAIT_S, then end every actor; safe to call twice.

        The calls go to all actors together and are waited for together: an actor that Ray is
        restarting, or a server slow to close, costs the wait once, not once per actor.
        """
        self.stopping.set()
        self.watcher.join(timeout=ADDRESS_REFRESH_S * 5)
        calls = []
        for actor in self.actors:
            try:
                actor.stop.remote()
                calls.append(actor.wait_stopped.remote(STOP_WAIT_S))
            except ray.exceptions.RayError:
                pass  # already gone
        if calls:
            ray.wait(calls, num_returns=len(calls), timeout=STOP_WAIT_S + 5)
        self._kill_actors()

    def _kill_actors(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
