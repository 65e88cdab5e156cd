"""Installed with pip rather than cloned, and several simulators in one server, each in its own Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import sim_client
import sim_server
from harness_sim import (
    HERE,
    ServerProcess,
    running_server,
    venv_made_once,
)
from tests.shared import (
    OLDEST_PYTHON,
    assert_error,
    newest_example_flow,
    python_version,
    run_server_cli,
)

# --- installed with pip rather than cloned ------------------------------------

PACKAGED = ["pyproject.toml", "README.md", "sim_server.py", "sim_client.py", "sim_eval.py", "sim_gym.py",
            "sim_tasks.py", "parity_sim.py", "backends", "server", "evaluation"]


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
        assert "backends/libero_parity_reference.json" in archive.namelist()
    assert tops == {"sim_server.py", "sim_client.py", "sim_eval.py", "sim_gym.py", "sim_tasks.py", "parity_sim.py",
                    "backends", "server", "evaluation"}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(tmp_path / "venv")], check=True, timeout=300)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(tmp_path / "venv" / "bin" / "python"), str(wheel)],
                   check=True, timeout=600, capture_output=True)
    bin_folder = tmp_path / "venv" / "bin"
    for command in ("sim-server", "sim-eval", "sim-client", "sim-tasks", "sim-parity"):
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
