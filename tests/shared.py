"""Helpers the test files share: assertions, the backend contract every backend's test class runs,
the command lines under test, and the constants of the shared servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from backends.base import CONTRACT_STEP_INFO_KEYS, CONTRACT_TASK_INFO_KEYS
from harness_sim import (
    HERE,
    RawClient,
    simulator_python,
    wait_until,
)


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


def run_server_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sim_server.py", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


OLDEST_PYTHON = "3.8"  # the oldest Python sim_client.py claims


OLDEST_PYTHON_VENV = os.path.join(HERE, ".test_venvs", f"client-{OLDEST_PYTHON}")


def find_python(version: str):
    """An interpreter of `version`: pyenv's newest patch release, else pythonX.Y on PATH, else None."""
    import glob

    found = sorted(glob.glob(os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                                          "versions", f"{version}.*", "bin", "python")))
    return found[-1] if found else shutil.which(f"python{version}")


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import platform; print(platform.python_version())"], capture_output=True,
                          text=True, timeout=60).stdout.strip()


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_eval_cli(*args: str, cwd=HERE, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(HERE, "sim_eval.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


MOCK_EVAL_ENV = {"SIM_MOCK_IMAGE_SIZE": "16", "SIM_MOCK_EPISODE_STEPS": "6"}


CHUNK_POLICY = ("import numpy as np\n"
                "rng = np.random.default_rng(0)\n"
                "def act(observation, task_info):  # chunks of 4: the last one of a 6-step episode is cut\n"
                "    return rng.uniform(-1, 1, (4, 7)).astype(np.float32)\n")


def write_npz(path, **arrays) -> None:
    with open(path, "wb") as npz_file:
        np.savez_compressed(npz_file, **arrays)


OPENPI_VENV = os.path.join(HERE, ".test_venvs", "openpi")


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


DASHBOARD_TOKEN = "test-dashboard-token"


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
        assert set(CONTRACT_STEP_INFO_KEYS) <= set(step["info"]), step["info"]
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


LIBERO_SUITE = "libero_spatial"


SMALL_CAMERA = {"camera_width": 64, "camera_height": 64}


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
