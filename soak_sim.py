"""Soak: many sessions created and abandoned, episodes from several clients and hostile
frames, against one mock server on loopback, for a bounded time.

    python soak_sim.py --seconds 180 --clients 4

Prints sessions, requests, failures, the server's RSS after warm-up and at the end, and
the simulator processes left once abandoned sessions are reaped (should be 0).
"""

from __future__ import annotations

import os
import random
import threading
import time

import msgpack
import numpy as np

import sim_client
from harness_sim import RawClient, ServerProcess, children_of, wait_until

SESSION_TIMEOUT_S = 1
HOSTILE_REPLY_TIMEOUT_MS = 30_000


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"sessions": 0, "requests": 0, "busy": 0, "failures": 0, "hostile": 0, "hostile_replies": 0}
        self.errors: list = []

    def add(self, key: str, amount: int = 1) -> None:
        with self.lock:
            self.counts[key] += amount


def run_episodes(address: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Sessions that load, reset, step, and then either disconnect or simply vanish."""
    rng = random.Random(seed)
    while not stop.is_set():
        sim = sim_client.SimulatorClient(address, timeout_s=30)
        tally.add("sessions")
        try:
            task_info = sim.load_task(rng.choice(["reach_center", "reach_corner", "reach_floor"]))
            sim.reset(init_state_index=rng.randrange(50))
            tally.add("requests", 2)
            for _ in range(rng.randrange(1, 40)):
                result = sim.step(np.random.default_rng(rng.randrange(2**32)).uniform(-1, 1, 7))
                tally.add("requests")
                if result["info"]["step"] > task_info["max_episode_steps"]:
                    raise AssertionError("step counter passed the horizon")
                if result["truncated"] or result["terminated"]:
                    sim.reset()
        except sim_client.ServerBusy:
            tally.add("busy")  # every simulator slot taken, some by vanished sessions: back off
            time.sleep(0.2)
        except (sim_client.SimulatorClientError, AssertionError, KeyError) as error:
            tally.add("failures")
            tally.errors.append(repr(error))
        if rng.random() < 0.5:
            sim.new_session()  # vanish without a word: the server must reap the session and its simulator
        sim.disconnect()


def random_value(rng: random.Random, depth: int = 0):
    leaves = [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randrange(-2**40, 2**40),
              lambda: rng.random(), lambda: os.urandom(rng.randrange(20)), lambda: "x" * rng.randrange(5)]
    branches = [
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {str(rng.randrange(9)): random_value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: {"__type__": "ndarray", "shape": [rng.randrange(-2, 5) for _ in range(rng.randrange(4))],
                 "dtype": rng.choice(["|O", "<0f", "<f4", "|u1", "V8", "x"]), "data": os.urandom(rng.randrange(40))},
    ]
    return rng.choice(leaves + (branches if depth < 3 else []))()


def hostile_message(rng: random.Random) -> list:
    kind = rng.randrange(3)
    if kind == 0:
        return [os.urandom(rng.randrange(60)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:
        fields = {key: random_value(rng) for key in rng.sample(
            ["task_name", "action", "seed", "init_state_index", "params", "request_id"], rng.randrange(4))}
        method = rng.choice(["load_task", "reset", "step", "get_info", "list_tasks", "nope"])
        return [b"", msgpack.packb({**fields, "method": method}, use_bin_type=True)]
    return [b"", os.urandom(rng.randrange(200))]


def run_hostile(address: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Hostile messages, each from a new connection; each must be answered (the wait only bounds a hang)."""
    rng = random.Random(seed)
    while not stop.is_set():
        client = RawClient(address, delimiter=False)
        client.socket.send_multipart(hostile_message(rng))
        tally.add("hostile")
        if client.socket.poll(HOSTILE_REPLY_TIMEOUT_MS):
            client.socket.recv_multipart()
            tally.add("hostile_replies")
        client.close()


def run_soak(seconds: float, clients: int) -> dict:
    server = ServerProcess("mock", "--session-timeout", str(SESSION_TIMEOUT_S), "--max-sessions", "16",
                           env={"SIM_MOCK_IMAGE_SIZE": "64", "SIM_MOCK_EPISODE_STEPS": "30"})
    try:
        stop, tally = threading.Event(), Tally()
        threads = [threading.Thread(target=run_episodes, args=(server.address, stop, tally, i)) for i in range(clients)]
        threads.append(threading.Thread(target=run_hostile, args=(server.address, stop, tally, 99)))
        for thread in threads:
            thread.start()
        time.sleep(min(5.0, seconds / 4))
        rss_warm = rss_kib(server.process.pid)
        time.sleep(max(0.0, seconds - min(5.0, seconds / 4)))
        stop.set()
        for thread in threads:
            thread.join()
        reaped = wait_until(lambda: not children_of(server.process.pid), SESSION_TIMEOUT_S + 10)
        return {**tally.counts, "errors": tally.errors[:5], "rss_warm_kib": rss_warm,
                "rss_end_kib": rss_kib(server.process.pid), "server_alive": server.process.poll() is None,
                "simulators_left": len(children_of(server.process.pid)), "reaped": reaped,
                "exit_code": server.stop()}
    finally:
        if server.process.poll() is None:
            server.process.kill()


def main() -> int:
    parser = sim_client.OneLineParser(prog="soak_sim.py",
                                      description="Loopback soak of the server with the mock backend.")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    result = run_soak(args.seconds, args.clients)
    for key, value in result.items():
        print(f"{key:16s} {value}")
    healthy = result["failures"] == 0 and result["simulators_left"] == 0 and result["exit_code"] == 0
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
