"""Tests for the protocol and the core server: real server processes over real sockets (harness_sim.py),
method by method, every error type, hostile input, sessions and faults, identities and retries, CURVE,
action chunks, configuration, the client's errors and liveness, set-up mistakes, and a short soak.
The other areas have their files under tests/ (evaluation, results, dashboard, Ray, backends, benchmarks,
LIBERO, the task builder, packaging); conftest.py holds the fixtures they share.

    python -m pytest                                             # everything, LIBERO included (what CI runs)
    python -m pytest -m "not libero and not slow and not browser"   # the quick run

Markers (pytest.ini): `libero` needs LIBERO (and renders); `slow` starts other real simulators, a Ray
cluster, or builds a venv from PyPI; `browser` opens headless Chromium. Waits are for states
(wait_until with a generous bound), never for a fixed time or a count of events in a window.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim_client
import sim_server
from backends.base import InvalidParams
from harness_sim import (
    HERE,
    REPLY_TIMEOUT_MS,
    ServerProcess,
    children_of,
    free_port,
    pid_alive,
    running_server,
    wait_until,
)
from server.workers import MAX_TASKS_PER_WORKER
from tests.shared import (
    OLDEST_PYTHON,
    assert_error,
    assert_one_line_exit_2,
    assert_same_observations,
    python_version,
    run_server_cli,
)

# --- shared fixtures and assertions -------------------------------------------

ZERO_ACTION = np.zeros(7, dtype=np.float32)



# --- the protocol, method by method -------------------------------------------

def test_list_tasks_needs_no_simulator(raw):
    reply = raw.request("list_tasks")
    assert reply["status"] == "ok"
    assert reply["tasks"] == ["reach_center", "reach_corner", "reach_floor"]
    assert raw.request("get_info")["sim_pid"] is None


def test_full_lifecycle_from_seed_protocol(raw):
    task_info = raw.request("load_task", task_name="reach_corner")["task_info"]
    assert task_info["action_spec"]["action"]["shape"] == [7]
    assert task_info["observation_spec"]["image"] == {"shape": [64, 64, 3], "dtype": "|u1"}
    assert task_info["max_episode_steps"] == 100 and task_info["description"]
    reset = raw.request("reset")
    assert reset["observation"]["image"].shape == (64, 64, 3)
    step = raw.request("step", action={"action": np.full(7, 0.5)})
    assert step["status"] == "ok"
    assert isinstance(step["reward"], float)
    assert step["terminated"] is False and step["truncated"] is False
    assert step["info"]["step"] == 1
    assert step["observation"]["state"].dtype == np.float32
    info = raw.request("get_info")
    assert info["backend_name"] == "mock" and info["current_task"] == "reach_corner"
    assert pid_alive(info["sim_pid"]) and info["active_sessions"] >= 1 and info["uptime_s"] > 0
    assert raw.request("disconnect")["status"] == "ok"
    assert wait_until(lambda: not pid_alive(info["sim_pid"]))


def test_bare_array_and_list_actions_mean_action_key(raw):
    raw.request("load_task", task_name="reach_center")
    raw.request("reset")
    assert raw.request("step", action=np.zeros(7))["status"] == "ok"
    assert raw.request("step", action=[0.0] * 7)["status"] == "ok"


def test_nested_params_map_is_accepted(raw):
    reply = raw.request("load_task", params={"task_name": "reach_floor"})
    assert reply["task_info"]["task_name"] == "reach_floor"


def test_request_id_is_echoed(raw):
    for request_id in (7, "abc", None):
        reply = raw.request("get_info", request_id=request_id)
        assert reply.get("request_id") == request_id
    assert raw.request("nope", request_id=9)["request_id"] == 9


def test_req_socket_is_served(mock_server):
    client = mock_server.client(socket_type=zmq.REQ)
    assert client.request("list_tasks")["status"] == "ok"
    assert client.request("ping")["status"] == "ok"
    client.close()


def test_dealer_without_delimiter_gets_reply_in_same_shape(mock_server):
    client = mock_server.client(delimiter=False)
    client.send_body(sim_client.encode({"method": "list_tasks"}))
    assert client.socket.poll(REPLY_TIMEOUT_MS)
    frames = client.socket.recv_multipart()
    assert len(frames) == 1 and sim_client.decode(frames[0])["status"] == "ok"
    client.close()


def test_reply_with_delimiter_keeps_it(raw):
    raw.send_body(sim_client.encode({"method": "ping"}))
    assert raw.socket.poll(REPLY_TIMEOUT_MS)
    assert raw.socket.recv_multipart()[0] == b""



# --- every error type ---------------------------------------------------------

def test_unknown_method(raw):
    assert_error(raw.request("fly"), "unknown_method")


def test_missing_or_ill_typed_fields_are_invalid_params(raw):
    assert_error(raw.request("load_task"), "invalid_params")
    assert_error(raw.request("load_task", task_name=5), "invalid_params")
    raw.request("load_task", task_name="reach_center")
    assert_error(raw.request("reset", seed="x"), "invalid_params")
    assert_error(raw.request("reset", init_state_index=99), "invalid_params")
    raw.request("reset")
    assert_error(raw.request("step"), "invalid_params")
    assert_error(raw.request("step", action=np.zeros(3)), "invalid_params")
    assert_error(raw.request("step", action=np.array([np.nan] * 7)), "invalid_params")
    assert_error(raw.request("step", action={"wrong": np.zeros(7)}), "invalid_params")
    assert_error(raw.request("step", action=["a"] * 7), "invalid_params")
    assert raw.request("step", action=ZERO_ACTION)["status"] == "ok"  # the episode survived


def test_unknown_task_is_task_not_found(raw):
    reply = raw.request("load_task", task_name="reach_moon")
    assert_error(reply, "task_not_found")
    assert "reach_center" in reply["message"]


def test_reset_or_step_before_load_is_no_task_loaded(raw):
    assert_error(raw.request("reset"), "no_task_loaded")
    assert_error(raw.request("step", action=ZERO_ACTION), "no_task_loaded")


def test_step_before_reset_is_not_reset(raw):
    raw.request("load_task", task_name="reach_center")
    assert_error(raw.request("step", action=ZERO_ACTION), "not_reset")


def test_step_after_truncation_is_not_reset():
    with running_server("mock", env={"SIM_MOCK_EPISODE_STEPS": "3", "SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        client.request("reset")
        replies = [client.request("step", action=ZERO_ACTION) for _ in range(3)]
        assert [r["truncated"] for r in replies] == [False, False, True]
        assert_error(client.request("step", action=ZERO_ACTION), "not_reset")
        assert client.request("reset")["status"] == "ok"


def test_simulator_exception_is_backend_error_and_session_goes_on(raw):
    raw.request("load_task", task_name="reach_center", fail_at_step=2)
    raw.request("reset")
    assert raw.request("step", action=ZERO_ACTION)["status"] == "ok"
    assert_error(raw.request("step", action=ZERO_ACTION), "backend_error")
    assert raw.request("reset")["status"] == "ok"


def test_session_cap_answers_server_busy():
    with running_server("mock", "--max-sessions", "1", env={"SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        first, second = server.client(), server.client()
        assert first.request("load_task", task_name="reach_center")["status"] == "ok"
        assert_error(second.request("load_task", task_name="reach_center"), "server_busy")
        assert second.request("list_tasks")["status"] == "ok"  # no simulator needed
        first.request("disconnect")
        assert second.request("load_task", task_name="reach_center")["status"] == "ok"


def test_second_request_while_one_runs_is_server_busy(raw, tmp_path):
    gate = tmp_path / "gate"
    raw.request("load_task", task_name="reach_center", gate_file=str(gate))  # the step runs until the gate opens
    raw.request("reset")
    raw.send_body(sim_client.encode({"method": "step", "action": ZERO_ACTION, "request_id": 1}))
    busy = raw.request("reset", request_id=2)
    assert_error(busy, "server_busy")
    gate.touch()
    assert raw.receive()["request_id"] == 1



# --- hostile and malformed input ----------------------------------------------

def ndarray_map(**overrides):
    good = {"__type__": "ndarray", "shape": [7], "dtype": "<f8", "data": np.zeros(7).tobytes()}
    return {**good, **overrides}


MALFORMED_BODIES = {
    "garbage bytes": b"\xc1\xff\x00garbage",
    "empty body": b"",
    "not a map": msgpack.packb([1, 2, 3]),
    "a string": msgpack.packb("step"),
    "no method": msgpack.packb({"task_name": "x"}),
    "method not a string": msgpack.packb({"method": 3}),
    "params not a map": msgpack.packb({"method": "reset", "params": [1]}),
    "non-string map key": msgpack.packb({1: 2, "method": "ping"}),
    "ext type": msgpack.packb({"method": "ping", "x": msgpack.ExtType(5, b"abc")}),
    "object dtype": msgpack.packb({"method": "step", "action": ndarray_map(dtype="|O", data=b"\x00" * 56)}),
    "zero itemsize dtype": msgpack.packb({"method": "step", "action": ndarray_map(dtype="<0f", shape=[-1])}),
    "negative shape": msgpack.packb({"method": "step", "action": ndarray_map(shape=[-7])}),
    "bool in shape": msgpack.packb({"method": "step", "action": ndarray_map(shape=[True])}),
    "too many dims": msgpack.packb({"method": "step", "action": ndarray_map(shape=[1] * 9, data=b"")}),
    "data too short": msgpack.packb({"method": "step", "action": ndarray_map(data=b"\x00" * 8)}),
    "data not bytes": msgpack.packb({"method": "step", "action": ndarray_map(data="x" * 56)}),
    "huge shape": msgpack.packb({"method": "step", "action": ndarray_map(shape=[2**40, 2**40])}),
    "extra ndarray key": msgpack.packb({"method": "step", "action": {**ndarray_map(), "x": 1}}),
    "request_id a map": msgpack.packb({"method": "ping", "request_id": {"a": 1}}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_BODIES))
def test_malformed_body_gets_invalid_params(raw, name):
    raw.request("load_task", task_name="reach_center")
    raw.request("reset")
    raw.send_body(MALFORMED_BODIES[name])
    assert_error(raw.receive(), "invalid_params")
    assert raw.request("step", action=ZERO_ACTION)["status"] == "ok"


def test_odd_frame_shapes_get_an_error_and_server_goes_on(mock_server):
    client = mock_server.client(delimiter=False)
    client.socket.send_multipart([b"x", b"y", sim_client.encode({"method": "ping"})])
    assert_error(client.receive(), "invalid_params")
    client.socket.send_multipart([b""] * 5)
    assert_error(client.receive(), "invalid_params")
    client.socket.send_multipart([sim_client.encode({"method": "ping"})])
    assert client.receive()["status"] == "ok"
    client.close()


def test_oversize_request_is_dropped_without_harming_others():
    with running_server("mock", "--max-request-bytes", "100000", env={"SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        victim, attacker = server.client(), server.client(monitor=True)
        victim.request("load_task", task_name="reach_center")
        attacker.send_body(b"\x00" * 200_000)
        assert attacker.wait_for_event(zmq.EVENT_DISCONNECTED), "libzmq drops the sender's connection"
        assert not attacker.socket.poll(0)  # and no reply came
        assert victim.request("reset")["status"] == "ok"
        attacker.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_is_a_map_or_invalid_params(body):
    try:
        assert isinstance(sim_server.decode(body), dict)
    except InvalidParams:
        pass


@pytest.mark.parametrize("array", [np.array(True), np.full((), 2.5, np.float32), np.arange(6.0).reshape(2, 3).T,
                                   np.zeros((0, 3), np.uint8), np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, ::2]])
def test_codecs_keep_every_arrays_shape_dtype_and_values_both_ways(array):
    """0-d, empty and non-contiguous arrays too (np.ascontiguousarray turns a 0-d array into 1-d)."""
    for encode, decode in ((sim_server.encode, sim_client.decode), (sim_client.encode, sim_server.decode)):
        sent = decode(encode({"value": array}))["value"]
        assert sent.shape == array.shape and sent.dtype == array.dtype and np.array_equal(sent, array)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["list_tasks", "load_task", "reset", "step", "get_info", "ping", "x"]),
       fields=st.dictionaries(st.sampled_from(["task_name", "action", "seed", "init_state_index", "params",
                                               "request_id", "options"]), msgpack_values, max_size=4))
def test_dispatcher_answers_any_request_exactly_once(mock_server, method, fields):
    client = mock_server.client()
    try:
        client.send_body(msgpack.packb({**fields, "method": method}, use_bin_type=True))
        reply = client.receive()
        assert reply["status"] in ("ok", "error")
        if reply["status"] == "error":
            assert reply["error_type"] in sim_client.ERROR_CLASSES
        # exactly one reply: a session answers in order, so the next reply it sends is the ping's
        assert client.request("ping", request_id="after")["request_id"] == "after"
    finally:
        client.request("disconnect")
        client.close()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=5))
def test_any_frames_leave_the_server_serving(mock_server, frames):
    client = mock_server.client(delimiter=False)
    try:
        client.socket.send_multipart(frames)
        if client.socket.poll(2000):
            client.socket.recv_multipart()
        assert client.request("ping")["status"] == "ok"
    finally:
        client.close()



# --- sessions, isolation and faults -------------------------------------------

def test_each_client_gets_its_own_simulator(mock_server):
    first, second = mock_server.client(), mock_server.client()
    first.request("load_task", task_name="reach_center")
    second.request("load_task", task_name="reach_floor")
    first_info, second_info = first.request("get_info"), second.request("get_info")
    assert first_info["session_id"] != second_info["session_id"]
    assert first_info["sim_pid"] != second_info["sim_pid"]
    assert (first_info["current_task"], second_info["current_task"]) == ("reach_center", "reach_floor")
    first.request("reset", init_state_index=3)
    second.request("reset", init_state_index=3)
    for _ in range(3):
        moved = first.request("step", action=np.ones(7))
    still = second.request("step", action=np.zeros(7))
    assert moved["info"]["step"] == 3 and still["info"]["step"] == 1
    assert not np.array_equal(moved["observation"]["state"][:3], still["observation"]["state"][:3])
    for client in (first, second):
        client.request("disconnect")
        client.close()


def test_killed_simulator_ends_only_its_session(mock_server):
    victim, bystander = mock_server.client(), mock_server.client()
    for client in (victim, bystander):
        client.request("load_task", task_name="reach_center")
        client.request("reset")
    victim_pid = victim.request("get_info")["sim_pid"]
    os.kill(victim_pid, signal.SIGKILL)
    assert_error(victim.request("step", action=ZERO_ACTION), "backend_error")
    assert_error(victim.request("reset"), "backend_error")
    assert bystander.request("step", action=ZERO_ACTION)["status"] == "ok"
    assert victim.request("load_task", task_name="reach_center")["status"] == "ok"
    assert victim.request("get_info")["sim_pid"] != victim_pid
    for client in (victim, bystander):
        client.request("disconnect")


def test_simulator_crash_mid_step_answers_the_pending_request(raw):
    raw.request("load_task", task_name="reach_center", crash_at_step=1)
    raw.request("reset")
    reply = raw.request("step", action=ZERO_ACTION)
    assert_error(reply, "backend_error")
    assert "SIGKILL" in reply["message"]
    assert raw.request("ping")["status"] == "ok"


def test_slow_step_does_not_stall_other_sessions(mock_server, tmp_path):
    gate = tmp_path / "gate"
    slow, other = mock_server.client(), mock_server.client()
    slow.request("load_task", task_name="reach_center", gate_file=str(gate))  # its step runs until the gate opens
    slow.request("reset")
    other.request("load_task", task_name="reach_center")
    other.request("reset")
    slow.send_body(sim_client.encode({"method": "step", "action": ZERO_ACTION}))
    assert other.request("get_info")["status"] == "ok"  # served while the slow step is held open
    assert other.request("step", action=ZERO_ACTION)["status"] == "ok"
    gate.touch()
    assert slow.receive()["status"] == "ok"
    for client in (slow, other):
        client.request("disconnect")


def test_hung_simulator_is_killed_after_step_timeout():
    with running_server("mock", "--step-timeout", "0.5", env={"SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        hung, bystander = server.client(), server.client()
        hung.request("load_task", task_name="reach_center", hang_at_step=1)
        hung.request("reset")
        bystander.request("load_task", task_name="reach_center")
        pid = hung.request("get_info")["sim_pid"]
        reply = hung.request("step", action=ZERO_ACTION)
        assert_error(reply, "backend_error")
        assert "SIM_STEP_TIMEOUT_S" in reply["message"]
        assert wait_until(lambda: not pid_alive(pid))
        assert bystander.request("reset")["status"] == "ok"


# x86-64's write, sendto and sendmsg: a process in one of them is writing its reply.
WRITE_SYSCALLS = {"1", "44", "46"}


def writing(pid: int) -> bool:
    """Whether the process sits in a write system call now (/proc/PID/syscall)."""
    try:
        with open(f"/proc/{pid}/syscall") as syscall:
            return syscall.read().split(" ", 1)[0] in WRITE_SYSCALLS
    except OSError:
        return False


def step_stopped_midway(stopped, bystander, pid: int, latest_s: float):
    """`stopped` steps and its simulator gets SIGSTOP while it writes its reply (or at `latest_s`);
    `bystander` steps meanwhile: (the stopped step's reply, the bystander's reply statuses)."""
    statuses = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(stopped.request, "step", action=ZERO_ACTION)
        wait_until(lambda: writing(pid), latest_s, interval_s=0.0005)
        os.kill(pid, signal.SIGSTOP)
        while not pending.done():  # the other session is served all along (a frozen loop never answers)
            reply = bystander.request("step", action=ZERO_ACTION, timeout_ms=60_000)
            statuses.append(reply["status"])
            if reply.get("truncated") or reply.get("terminated"):
                statuses.append(bystander.request("reset", timeout_ms=60_000)["status"])
        return pending.result(), statuses


@pytest.mark.slow
def test_a_simulator_stopped_while_it_writes_a_large_reply_stalls_only_its_own_session():
    """SIGSTOP while the simulator writes a reply (two 2048x2048 images, 25 MB) larger than the channel's
    buffers, or at a random moment of the step when the write is missed: the loop reads replies as they
    come, so the other session keeps stepping, the stopped step ends in its timeout error, the stopped
    process is killed and gone, the server serves on."""
    rng = np.random.default_rng(11)
    with running_server("mock", "--step-timeout", "4", env={"SIM_MOCK_IMAGE_SIZE": "2048"}) as server:
        stopped, bystander = server.client(), server.client()
        assert bystander.request("load_task", task_name="reach_floor")["status"] == "ok"
        assert bystander.request("reset")["status"] == "ok"
        timeouts = 0
        for _ in range(4):
            assert stopped.request("load_task", task_name="reach_center")["status"] == "ok"
            assert stopped.request("reset")["status"] == "ok"
            pid = stopped.request("get_info")["sim_pid"]
            started = time.monotonic()
            assert stopped.request("step", action=ZERO_ACTION)["status"] == "ok"
            latest_s = rng.uniform(0.5, 1.0) * (time.monotonic() - started)
            reply, statuses = step_stopped_midway(stopped, bystander, pid, latest_s)
            assert statuses and set(statuses) == {"ok"}, statuses
            if reply["status"] == "ok":  # it had written its whole reply before the stop
                os.kill(pid, signal.SIGCONT)
                continue
            timeouts += 1
            assert_error(reply, "backend_error")
            assert "SIM_STEP_TIMEOUT_S" in reply["message"]
            assert wait_until(lambda gone=pid: not pid_alive(gone)), f"stopped simulator {pid} is still there"
        assert timeouts >= 1, "no stop landed before the end of a reply"
        assert bystander.request("ping")["status"] == "ok"


def test_idle_session_is_reaped_with_its_process():
    with running_server("mock", "--session-timeout", "1", env={"SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        client = server.client()
        first = client.request("get_info")["session_id"]
        assert client.request("load_task", task_name="reach_center")["status"] == "ok"
        simulators = children_of(server.process.pid)  # read from the OS: the session may be reaped already
        assert len(simulators) == 1
        assert wait_until(lambda: not pid_alive(simulators[0]))
        after = client.request("get_info")
        assert after["session_id"] != first and after["sim_pid"] is None


def test_a_session_that_keeps_switching_tasks_gets_a_fresh_simulator_process(raw):
    raw.request("load_task", task_name="reach_center")
    first_pid = raw.request("get_info")["sim_pid"]
    pids = []
    for switch in range(MAX_TASKS_PER_WORKER + 1):
        assert raw.request("load_task", task_name=["reach_corner", "reach_floor"][switch % 2])["status"] == "ok"
        pids.append(raw.request("get_info")["sim_pid"])
    assert pids[:-1] == [first_pid] * MAX_TASKS_PER_WORKER
    assert pids[-1] != first_pid
    assert wait_until(lambda: not pid_alive(first_pid))
    assert raw.request("reset")["status"] == "ok"


def test_sigterm_closes_every_simulator_and_exits_zero():
    server = ServerProcess("mock", env={"SIM_MOCK_IMAGE_SIZE": "8"})
    try:
        clients = [server.client() for _ in range(3)]
        for client in clients:
            client.request("load_task", task_name="reach_center")
        pids = [client.request("get_info")["sim_pid"] for client in clients]
        children = children_of(server.process.pid)  # the simulator processes
        assert set(pids) <= set(children)
    finally:
        exit_code = server.stop()
    assert exit_code == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert wait_until(lambda: not any(pid_alive(pid) for pid in children))


def test_server_sigkill_takes_its_simulators_with_it():
    server = ServerProcess("mock", env={"SIM_MOCK_IMAGE_SIZE": "8"})
    try:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        pid = client.request("get_info")["sim_pid"]
    finally:
        server.process.kill()
    server.process.wait()
    assert wait_until(lambda: not pid_alive(pid))



# --- session identity, reconnects and exactly-once steps ----------------------

def test_retried_request_id_does_not_step_twice(raw):
    raw.request("load_task", task_name="reach_center")
    raw.request("reset")
    first = raw.request("step", action=np.ones(7), request_id="step-1")
    again = raw.request("step", action=np.ones(7), request_id="step-1")
    assert first["info"]["step"] == again["info"]["step"] == 1
    assert raw.request("step", action=np.ones(7), request_id="step-2")["info"]["step"] == 2


def test_client_resumes_its_session_across_dropped_connections_without_losing_a_step(mock_server):
    actions = np.random.default_rng(8).uniform(-1, 1, (3, 7))
    with sim_client.SimulatorClient(mock_server.address, timeout_s=30) as reference:
        reference.load_task("reach_corner")
        reference.reset(init_state_index=3)
        expected = [reference.step(a) for a in actions]
    sim = sim_client.SimulatorClient(mock_server.address, timeout_s=0.25, retries=40)
    try:
        sim.load_task("reach_corner", step_sleep_s=0.6)  # every step outlasts a timeout: the socket is rebuilt
        sim.reset(init_state_index=3)
        session_id = sim.get_info()["session_id"]
        results = [sim.step(a) for a in actions]
        assert [r["info"]["step"] for r in results] == [1, 2, 3]  # none lost, none repeated
        assert_same_observations([r["observation"] for r in results], [e["observation"] for e in expected])
        assert sim.get_info()["session_id"] == session_id
    finally:
        sim.disconnect()


def test_a_second_connection_presenting_a_live_sessions_identity_gets_nothing(mock_server):
    identity = sim_client.new_identity()
    victim = mock_server.client(routing_id=identity)
    thief = mock_server.client(routing_id=identity, monitor=True)
    try:
        victim.request("load_task", task_name="reach_center")
        sessions = victim.request("get_info")["active_sessions"]
        assert thief.wait_for_event(zmq.EVENT_HANDSHAKE_SUCCEEDED), "the thief's connection is up"
        thief.send_body(sim_client.encode({"method": "load_task", "task_name": "reach_floor"}))
        for _ in range(3):  # the loop has served the victim since: the thief's request was held, not slow
            info = victim.request("get_info")
        # libzmq ignores a duplicate routing id (the server leaves ROUTER_HANDOVER off): no reply, no session
        assert not thief.socket.poll(0) and info["active_sessions"] == sessions
        assert info["current_task"] == "reach_center"
    finally:
        victim.request("disconnect")
        victim.close()
        thief.close()


@pytest.mark.parametrize("identity", [b"victim-1", b"\x00\x12\x34\x56\x78"])
def test_guessable_identities_are_not_resumable_by_another_connection(mock_server, identity):
    """Short client-chosen ids and libzmq-style ids (leading zero) live and die with their connection."""
    victim = mock_server.client(routing_id=identity)
    victim.request("load_task", task_name="reach_center")
    victim_info = victim.request("get_info")
    victim.close()
    assert wait_until(lambda: not pid_alive(victim_info["sim_pid"]))  # its session ended with the connection
    attacker = mock_server.client(routing_id=identity)
    info = attacker.request("get_info")
    assert info["session_id"] != victim_info["session_id"] and info["current_task"] is None
    attacker.request("disconnect")
    attacker.close()



# --- authentication (CURVE) ---------------------------------------------------

@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    assert run_server_cli("--gen-keys", str(folder)).returncode == 0
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((folder / "client.key").read_bytes())
    stranger = folder / "stranger"
    assert run_server_cli("--gen-keys", str(stranger)).returncode == 0
    return folder, allowed, stranger


def test_curve_admits_only_listed_client_keys(curve_keys):
    folder, allowed, stranger = curve_keys
    keys = {"server_key": str(folder / "server.key"), "client_key": str(folder / "client.key_secret")}
    server = ServerProcess("mock", "--curve-secret-key", str(folder / "server.key_secret"),
                           "--curve-clients", str(allowed), env={"SIM_MOCK_IMAGE_SIZE": "8"}, probe_keys=keys)
    try:
        with sim_client.SimulatorClient(server.address, timeout_s=30, **keys) as sim:
            sim.load_task("reach_center")
            assert sim.reset()[0]["state"].shape == (4,)
            sessions_before = sim.get_info()["active_sessions"]
            plain = server.client(monitor=True)  # no CURVE at all
            plain.send_body(sim_client.encode({"method": "load_task", "task_name": "reach_center"}))
            failed = plain.wait_for_event(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            assert failed is not None, "a client without CURVE fails the handshake"
            plain.close()
            intruder = server.client(curve=curve_triple(folder / "server.key", stranger / "client.key_secret"),
                                     monitor=True)
            intruder.send_body(sim_client.encode({"method": "load_task", "task_name": "reach_center"}))
            refused = intruder.wait_for_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            assert refused is not None and refused["value"] == 400, "ZAP refuses a key it does not list"
            intruder.close()
            stranger_client = sim_client.SimulatorClient(server.address, timeout_s=0.8, retries=0,
                                                         server_key=keys["server_key"],
                                                         client_key=str(stranger / "client.key_secret"))
            with pytest.raises(sim_client.ServerTimeout, match="CURVE keys"):  # refusals are silent: say keys
                stranger_client.load_task("reach_center")
            stranger_client.disconnect()
            info = sim.get_info()
            assert info["active_sessions"] == sessions_before and info["simulator_sessions"] == 1
    finally:
        assert server.stop() == 0


def test_bad_curve_settings_exit_with_a_message(tmp_path):
    result = run_server_cli("--simulator", "mock", "--curve-secret-key", str(tmp_path / "missing"),
                            "--curve-clients", str(tmp_path))
    assert result.returncode == 2 and "--gen-keys" in result.stderr


def test_binding_beyond_loopback_without_curve_warns(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = ServerProcess("mock", address=f"tcp://127.0.0.1:{free_port()}", stderr=log_file)
        server.stop()
    assert "without CURVE" in log_path.read_text()


def curve_triple(server_key, client_secret_key) -> tuple:
    """(server public, client public, client secret) for a RawClient, from key files."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(str(server_key))
    return (server_public, *zmq.auth.load_certificate(str(client_secret_key)))


def request_once_admitted(server, identity: bytes, curve: tuple, method: str, **fields) -> dict:
    """One request on a new connection that presents `identity`, sent again on a fresh connection until
    the server has let the previous holder's connection go (it does so when it sees it close)."""
    replies = []

    def answered() -> bool:
        client = server.client(routing_id=identity, curve=curve)
        try:
            client.send_body(sim_client.encode(dict(fields, method=method)))
            if client.socket.poll(2000):
                replies.append(client.receive())
        finally:
            client.close()
        return bool(replies)

    assert wait_until(answered), f"no connection presenting the identity was answered ({method})"
    return replies[0]


def test_curve_session_stays_with_the_key_that_opened_it(curve_keys, tmp_path):
    folder, allowed, stranger = curve_keys
    both = tmp_path / "both"
    both.mkdir()
    (both / "client.key").write_bytes((folder / "client.key").read_bytes())
    (both / "stranger.key").write_bytes((stranger / "client.key").read_bytes())
    victim_keys = {"server_key": str(folder / "server.key"), "client_key": str(folder / "client.key_secret")}
    server = ServerProcess("mock", "--curve-secret-key", str(folder / "server.key_secret"), "--curve-clients",
                           str(both), env={"SIM_MOCK_IMAGE_SIZE": "8"}, probe_keys=victim_keys)
    victim_curve = curve_triple(folder / "server.key", folder / "client.key_secret")
    thief_curve = curve_triple(folder / "server.key", stranger / "client.key_secret")
    identity = sim_client.new_identity()
    try:
        victim = server.client(routing_id=identity, curve=victim_curve)
        assert victim.request("load_task", task_name="reach_center")["status"] == "ok"
        victim.close()
        # the victim's capability presented with another listed key: refused, the session untouched
        reply = request_once_admitted(server, identity, thief_curve, "get_info")
        assert_error(reply, "invalid_params")
        assert "another client key" in reply["message"]
        assert request_once_admitted(server, identity, victim_curve, "get_info")["current_task"] == "reach_center"
    finally:
        server.stop()



# --- action chunks ------------------------------------------------------------

def test_action_chunk_equals_single_steps_in_one_round_trip(raw):
    chunk = np.random.default_rng(3).uniform(-1, 1, (5, 7))
    raw.request("load_task", task_name="reach_corner")
    raw.request("reset", init_state_index=4)
    singles = [raw.request("step", action=row) for row in chunk]
    raw.request("reset", init_state_index=4)
    reply = raw.request("step", action=chunk)
    assert reply["steps_run"] == 5 and reply["info"]["step"] == 5
    assert_same_observations([reply["observation"]], [singles[-1]["observation"]])
    assert reply["rewards"] == [s["reward"] for s in singles]
    assert reply["reward"] == pytest.approx(sum(s["reward"] for s in singles))
    assert reply["successes"] == [False] * 5


def test_action_chunk_stops_at_the_end_of_the_episode():
    with running_server("mock", env={"SIM_MOCK_EPISODE_STEPS": "3", "SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        client.request("reset", init_state_index=1)
        singles = [client.request("step", action=np.full(7, 0.2)) for _ in range(3)]
        client.request("reset", init_state_index=1)
        reply = client.request("step", action=np.full((5, 7), 0.2))
        assert reply["steps_run"] == 3 and reply["truncated"] is True
        # its last step skipped rendering, and ended the episode: its frames are rendered after all
        assert_same_observations([reply["observation"]], [singles[-1]["observation"]])
        assert_error(client.request("step", action=np.zeros((2, 7))), "not_reset")


def test_a_chunk_can_carry_every_steps_frame_of_one_camera(raw):
    chunk = np.random.default_rng(6).uniform(-1, 1, (4, 7))
    raw.request("load_task", task_name="reach_corner")
    raw.request("reset", init_state_index=2)
    singles = [raw.request("step", action=row)["observation"] for row in chunk]
    raw.request("reset", init_state_index=2)
    reply = raw.request("step", action=chunk, frame_key="wrist_image")
    assert reply["frames"].shape == (4, 64, 64, 3)
    assert all(np.array_equal(frame, single["wrist_image"]) for frame, single in zip(reply["frames"], singles))
    assert_same_observations([reply["observation"]], [singles[-1]])
    one = raw.request("step", action=chunk[0], frame_key="image")
    assert one["frames"].shape == (1, 64, 64, 3) and np.array_equal(one["frames"][0], one["observation"]["image"])
    assert_error(raw.request("step", action=chunk, frame_key="nope"), "invalid_params")
    assert_error(raw.request("step", action=chunk, frame_key=3), "invalid_params")
    assert raw.request("step", action=chunk[0])["info"]["step"] == 6  # the refused ones ran nothing


def test_bad_action_chunks_are_refused_before_any_step(raw):
    raw.request("load_task", task_name="reach_center")
    raw.request("reset")
    bad = np.zeros((4, 7))
    bad[2, 0] = np.nan
    assert_error(raw.request("step", action=bad), "invalid_params")
    assert_error(raw.request("step", action=np.zeros((0, 7))), "invalid_params")
    assert_error(raw.request("step", action=np.zeros((300, 7))), "invalid_params")
    assert raw.request("step", action=ZERO_ACTION)["info"]["step"] == 1



# --- configuration and registry -----------------------------------------------

def test_help_documents_every_setting_with_its_env_var():
    out = run_server_cli("--help", env={"SIM_SESSION_TIMEOUT_S": "42"}).stdout
    for _flag, env_var, *_ in sim_server.SETTINGS:
        assert env_var in out
    assert "now 42.0" in out


SCRIPTS = ["sim_server.py", "sim_client.py", "sim_eval.py", "parity_sim.py", "bench_sim.py", "soak_sim.py",
           "sim_eval.py compare", "sim_eval.py replay", "sim_eval.py verify", "sim_eval.py check", "sim_tasks.py",
           "sim_gym.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_help_exits_0_and_describes_it(script):
    result = subprocess.run([sys.executable, *script.split(), "--help"], cwd=HERE, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}") and "--help" in result.stdout and not result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_bad_flag_is_one_line_and_exit_2(script):
    # argparse reports a missing choice or argument first
    required = {"parity_sim.py": ["--in-process"], "sim_eval.py compare": ["a.json", "b.json"],
                "sim_eval.py replay": ["a.json"], "sim_eval.py verify": ["a.json"],
                "sim_tasks.py": ["list"], "sim_gym.py": ["--task", "reach_center"]}.get(script, [])
    result = subprocess.run([sys.executable, *script.split(), *required, "--no-such-flag"], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert_one_line_exit_2(result, f"{script}: ", "--no-such-flag", "--help")


def test_flags_override_env_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("SIM_SESSION_TIMEOUT_S", "12")
    monkeypatch.setenv("SIM_BIND_ADDRESS", "tcp://127.0.0.1:7000")
    config = sim_server.parse_config(["--max-sessions", "3"])
    assert (config.session_timeout_s, config.max_sessions, config.bind) == (12.0, 3, "tcp://127.0.0.1:7000")
    assert sim_server.parse_config(["--port", "6000"]).bind == "tcp://*:6000"
    assert sim_server.parse_config(["--session-timeout", "5"]).session_timeout_s == 5.0


@pytest.mark.parametrize("helper", ["task_specs", "libero_tasks", "channel", "worker", "base"])
def test_a_helper_module_of_backends_is_no_simulator(helper):
    result = run_server_cli("--simulator", helper)
    from backends import SIMULATORS

    assert_one_line_exit_2(result, f"unknown simulator {helper!r}; available: {', '.join(sorted(SIMULATORS))}")


def test_unknown_simulator_exits_listing_available_ones():
    result = run_server_cli("--simulator", "warp_drive")
    assert result.returncode == 2
    assert "mock" in result.stderr and "libero" in result.stderr


def test_mock_server_never_imports_a_heavy_simulator():
    code = ("import sys, sim_server; from backends import get_backend; get_backend('mock')().list_tasks(); "
            "sys.exit(any(m in sys.modules for m in ('robosuite', 'mujoco', 'libero')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE).returncode == 0



# --- sim_client.py: errors, timeouts, liveness --------------------------------

def test_client_raises_typed_errors(mock_server):
    with sim_client.SimulatorClient(mock_server.address, timeout_s=30) as sim:
        with pytest.raises(sim_client.TaskNotFound, match="reach_center"):
            sim.load_task("nowhere")
        with pytest.raises(sim_client.NoTaskLoaded):
            sim.reset()
        sim.load_task("reach_center")
        with pytest.raises(sim_client.NotReset):
            sim.step(ZERO_ACTION)
        observation, info = sim.reset(init_state_index=2)
        with pytest.raises(sim_client.InvalidParams):
            sim.step(np.zeros(2))
        result = sim.step(ZERO_ACTION)
        assert result["info"]["step"] == 1 and observation["image"].dtype == np.uint8
        with pytest.raises(sim_client.UnknownMethod):
            sim.call("teleport")


def test_ping_returns_the_round_trip_and_every_server_error_type_has_its_own_exception(mock_server):
    from backends.base import SimulatorError

    with sim_client.SimulatorClient(mock_server.address, timeout_s=30) as sim:
        assert 0 < sim.ping() < 30
    server_types = {cls.error_type for cls in SimulatorError.__subclasses__()}
    assert server_types == set(sim_client.ERROR_CLASSES)
    assert len(set(sim_client.ERROR_CLASSES.values())) == len(server_types)
    unknown = sim_client.ServerError("new kind", "a_future_error")
    assert unknown.error_type == "a_future_error" and sim_client.InternalError("x").error_type == "internal_error"


def test_client_says_soon_and_clearly_when_nothing_ever_answered():
    address = f"tcp://127.0.0.1:{free_port()}"
    sim = sim_client.SimulatorClient(address, timeout_s=120, first_contact_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(sim_client.ServerUnreachable, match="is sim_server.py running there") as raised:
        sim.list_tasks()
    assert time.monotonic() - started < 60  # not 3 tries of a 120 s timeout
    assert address in str(raised.value) and "firewall" in str(raised.value)
    with pytest.raises(sim_client.ServerTimeout):  # ServerUnreachable is a ServerTimeout
        sim.ping()
    sim.disconnect()


class CuttingProxy:
    """A TCP proxy on loopback that cuts the first `cuts` connections as soon as they are made (a flaky
    link), then forwards every later one to `target`."""

    def __init__(self, target: str, cuts: int) -> None:
        self.target = urlsplit(target.replace("tcp://", "http://"))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts, self.cut = cuts, 0
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut < self.cuts:
                self.cut += 1
                client.close()
                continue
            server = socket.create_connection((self.target.hostname, self.target.port))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.running = False
        self.listener.close()


def test_first_contact_through_a_link_that_cuts_its_first_connections_honours_the_retries(mock_server):
    """The link cuts connections for longer than the first-contact bound: since connections were made,
    that is no "unreachable", and the call rides through on its retries."""
    proxy = CuttingProxy(mock_server.address, cuts=25)
    sim = sim_client.SimulatorClient(proxy.address, timeout_s=1.0, retries=8)
    try:
        assert sim.load_task("reach_center")["max_episode_steps"] > 0
        assert proxy.cut == 25
    finally:
        sim.close()
        proxy.close()


def test_a_link_that_cuts_every_connection_is_unreachable_once_the_retries_are_spent(mock_server):
    proxy = CuttingProxy(mock_server.address, cuts=10**9)
    sim = sim_client.SimulatorClient(proxy.address, timeout_s=1.0, retries=2)
    try:
        with pytest.raises(sim_client.ServerUnreachable, match=r"in 3 tries of 1 s \(connections were made"):
            sim.ping()
        assert proxy.cut > 0
    finally:
        sim.close()
        proxy.close()


def test_a_server_that_answered_once_keeps_the_liveness_rules(mock_server):
    sim = sim_client.SimulatorClient(mock_server.address, timeout_s=1.0, first_contact_timeout_s=1.5)
    try:
        sim.ping()
        sim.load_task("reach_center", load_sleep_s=3.0)  # longer than first contact: pings keep it alive
        assert sim.reset()[1]["step"] == 0
    finally:
        sim.disconnect()


def test_client_drops_a_late_reply_to_a_timed_out_request(mock_server, tmp_path):
    gate = tmp_path / "gate"
    sim = sim_client.SimulatorClient(mock_server.address, timeout_s=0.5)
    sim.load_task("reach_center", gate_file=str(gate))  # the step outlasts all three tries: its reply comes late
    sim.reset()
    with pytest.raises(sim_client.ServerTimeout):
        sim.step(ZERO_ACTION)
    gate.touch()
    assert wait_until(lambda: not sim.call("ping")["busy"])  # the step has ended: its reply is on its way or here
    tasks = sim.list_tasks()  # the step's late reply reaches this socket and is dropped
    assert tasks == ["reach_center", "reach_corner", "reach_floor"]
    sim.disconnect()


def test_client_cli_runs_the_lifecycle(mock_server):
    result = subprocess.run([sys.executable, "sim_client.py", "--address", mock_server.address, "--steps", "5"],
                            cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "steps: 5" in result.stdout and "image" in result.stdout


def test_client_runs_on_python_38_syntax():
    import ast
    with open(os.path.join(HERE, "sim_client.py")) as client_file:
        source = client_file.read()
    tree = ast.parse(source, feature_version=(3, 8))
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
                 for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert top_level - set(sys.stdlib_module_names) - {"__future__"} == {"msgpack", "numpy", "zmq"}
    everywhere = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names}
    everywhere |= {node.module.split(".")[0] for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and node.module}
    optional = everywhere - top_level - set(sys.stdlib_module_names)
    assert optional == set()  # the client needs nothing beyond pyzmq, msgpack and numpy


@pytest.mark.slow
def test_the_client_runs_a_whole_lifecycle_on_the_oldest_python_it_claims(mock_server, oldest_python):
    assert python_version(oldest_python).startswith(OLDEST_PYTHON + ".")
    result = subprocess.run([oldest_python, "sim_client.py", "--address", mock_server.address, "--steps", "3"],
                            cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "steps: 3" in result.stdout and "image" in result.stdout


def test_readme_set_up_and_test_commands_are_the_ones_ci_runs():
    with open(os.path.join(HERE, "README.md")) as readme_file:
        readme = readme_file.read()
    with open(os.path.join(HERE, ".ci", "run")) as ci_file:
        ci = ci_file.read()
    block = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and all(command.startswith(("bash .ci/setup && ", "bash .ci/setup --tests && "))
                                      for command in commands)
    assert commands[1] in ci.splitlines()


def documented_commands() -> list:
    """(file, command) for every line of a bash block in README.md and docs/*.md, continuations joined."""
    import glob
    import re

    commands = []
    for path in [os.path.join(HERE, "README.md")] + sorted(glob.glob(os.path.join(HERE, "docs", "*.md"))):
        with open(path) as page:
            text = page.read()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#.*$", "", line).strip()
                if command and not command.startswith("#"):
                    commands.append((os.path.basename(path), command))
    return commands


def test_every_documented_command_runs_a_script_of_ours_with_flags_it_has():
    import shlex

    helps = {}
    checked = 0
    for page, command in documented_commands():
        words = shlex.split(command.replace("$HOME", "~"))
        for index, word in enumerate(words):
            if not (word.endswith(".py") and index and words[index - 1].endswith("python")):
                continue
            script = os.path.join(HERE, word)
            assert os.path.exists(script), f"{page}: {command!r} runs {word}, which is not here"
            subcommand = words[index + 1:index + 2] if words[index + 1:] and words[index + 1].isidentifier() else []
            key = " ".join([word, *subcommand])
            if key not in helps:
                helps[key] = subprocess.run([sys.executable, script, *subcommand, "--help"], cwd=HERE,
                                            capture_output=True, text=True, timeout=60).stdout
            for flag in [w.split("=")[0] for w in words[index + 1:] if w.startswith("--") and " " not in w]:
                assert flag in helps[key], f"{page}: {command!r}: {key} has no {flag}"
            checked += 1
    assert checked >= 20  # the README and the docs are full of them


def test_client_recovers_after_server_restart():
    address = f"tcp://127.0.0.1:{free_port()}"
    server = ServerProcess("mock", env={"SIM_MOCK_IMAGE_SIZE": "8"}, address=address)
    sim = sim_client.SimulatorClient(address, timeout_s=1.0, retries=1)
    try:
        sim.load_task("reach_center")
        sim.reset()
        server.process.kill()
        server.process.wait()
        with pytest.raises(sim_client.ServerTimeout, match="no reply to step"):
            sim.step(ZERO_ACTION)
        server = ServerProcess("mock", env={"SIM_MOCK_IMAGE_SIZE": "8"}, address=address)
        with pytest.raises(sim_client.NoTaskLoaded):  # a new server, a new session
            sim.reset()
        sim.load_task("reach_center")
        assert sim.reset()[1]["step"] == 0
    finally:
        sim.disconnect()
        server.stop()


def test_long_load_is_not_mistaken_for_a_dead_server(mock_server):
    """The first call, so also not for an empty address: first contact is min(10 s, timeout_s) here."""
    sim = sim_client.SimulatorClient(mock_server.address, timeout_s=1.0, load_timeout_s=30)
    try:
        assert sim.load_task("reach_center", load_sleep_s=2.5)["task_name"] == "reach_center"
    finally:
        sim.disconnect()


def test_frozen_server_is_detected_during_a_long_load():
    server = ServerProcess("mock", env={"SIM_MOCK_IMAGE_SIZE": "8"})
    sim = sim_client.SimulatorClient(server.address, timeout_s=0.5, load_timeout_s=60, retries=0)
    try:
        sim.ping(timeout_s=60)  # answered, however busy the machine: from now on the server is known alive
        server.process.send_signal(signal.SIGSTOP)
        with pytest.raises(sim_client.ServerTimeout, match="nor to a ping"):
            sim.load_task("reach_center", load_sleep_s=10.0)
    finally:
        server.process.send_signal(signal.SIGCONT)
        sim.disconnect()
        server.stop()



# --- the first ten minutes: set-up mistakes get one clear line ----------------

@pytest.mark.slow
def test_missing_simulator_packages_are_named_not_the_renderer(openpi_python):
    """The openpi test venv has numpy, msgpack and pyzmq but no MuJoCo, robosuite or LIBERO."""
    for simulator, missing in (("libero", "mujoco==3.2.3"), ("robosuite", "robosuite==1.4.0")):
        result = subprocess.run([openpi_python, "sim_server.py", "--simulator", simulator, "--port", str(free_port())],
                                cwd=HERE, capture_output=True, text=True, timeout=60)
        assert_one_line_exit_2(result, missing, "pip install -r requirements.txt")
        assert "renderer" not in result.stderr


def test_busy_port_is_one_line_naming_the_address_and_port(mock_server):
    result = run_server_cli("--simulator", "mock", "--bind", mock_server.address)
    assert_one_line_exit_2(result, mock_server.address, "already in use", "--port")


@pytest.mark.parametrize("bind", ["tcp://localhost", "udp://*:5555", "tcp://*:99999"])
def test_bad_bind_address_is_one_line(bind):
    assert_one_line_exit_2(run_server_cli("--simulator", "mock", "--bind", bind), bind, "tcp://*:5555")


def test_unreadable_or_wrong_curve_key_files_are_one_line(tmp_path, curve_keys):
    folder, allowed, _ = curve_keys
    garbage = tmp_path / "server.key_secret"
    garbage.write_text("not a key\n")
    result = run_server_cli("--simulator", "mock", "--curve-secret-key", str(garbage), "--curve-clients", str(allowed))
    assert_one_line_exit_2(result, "cannot read the CURVE key file")
    public_only = run_server_cli("--simulator", "mock", "--curve-secret-key", str(folder / "server.key"),
                                 "--curve-clients", str(allowed))
    assert_one_line_exit_2(public_only, "holds no secret key")
    with pytest.raises(sim_client.SimulatorClientError, match="cannot read a CURVE key file"):
        sim_client.SimulatorClient("tcp://127.0.0.1:1", server_key=str(garbage), client_key=str(garbage))


def test_a_bad_sim_environment_value_is_one_line():
    result = run_server_cli("--simulator", "mock", env={"SIM_SESSION_TIMEOUT_S": "five minutes"})
    assert_one_line_exit_2(result, "SIM_SESSION_TIMEOUT_S='five minutes'", "float")


def test_client_cli_says_whom_it_calls_and_one_line_when_nobody_answers():
    address = f"tcp://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "sim_client.py", "--address", address, "--timeout", "1"], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout.startswith(f"connecting to {address}")
    assert len(result.stderr.strip().splitlines()) == 1 and "ServerUnreachable" in result.stderr



# --- soak ---------------------------------------------------------------------

@pytest.mark.slow
def test_short_soak_leaves_the_server_healthy_and_flat():
    from soak_sim import run_soak

    result = run_soak(seconds=3, clients=2)
    assert result["failures"] == 0, result["errors"]  # however many ran on this machine, none failed
    assert result["sessions"] > 0 and result["hostile"] > 0
    assert result["hostile_replies"] == result["hostile"]  # every hostile message answered, once
    assert result["server_alive"] and result["exit_code"] == 0
    assert result["simulators_left"] == 0
    assert result["rss_end_kib"] < result["rss_warm_kib"] + 20 * 1024
