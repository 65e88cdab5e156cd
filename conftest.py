"""The fixtures test_sim.py and tests/ share: servers started once per test worker (session scope; the
harness groups each shared server's tests on one worker), the openpi and oldest-Python venvs, Chromium."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness_sim import (
    libero_suite,
    running_server,
    venv_made_once,
)
from tests.shared import (
    LIBERO_SUITE,
    MOCK_EVAL_ENV,
    OLDEST_PYTHON,
    OLDEST_PYTHON_VENV,
    OPENPI_VENV,
    SMALL_CAMERA,
    find_python,
    run_eval_cli,
)


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def long_mock_server():
    """Mock episodes of 30 steps: room for several policy calls (the real-time tests)."""
    with running_server("mock", env={"SIM_MOCK_IMAGE_SIZE": "8", "SIM_MOCK_EPISODE_STEPS": "30"}) as server:
        yield server


@pytest.fixture(scope="session")
def short_mock_server():
    with running_server("mock", env=MOCK_EVAL_ENV) as server:
        yield server


@pytest.fixture(scope="session")
def one_episode_results(short_mock_server, tmp_path_factory):
    """A results file of one mock episode, with its actions, for the tests that only read it."""
    results = tmp_path_factory.mktemp("one_episode") / "one.json"
    assert run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "1",
                        "--policy", "zero", "--results", str(results)).returncode == 0
    return results


@pytest.fixture(scope="session")
def openpi_python():
    """The Python of a venv holding the real openpi-server package (numpy<2), made once and kept."""
    def make() -> None:
        subprocess.run([sys.executable, "-m", "venv", OPENPI_VENV], check=True)
        subprocess.run([os.path.join(OPENPI_VENV, "bin", "python"), "-m", "pip", "install", "-q",
                        "openpi-server==0.1.0", "openpi-client==0.1.2", "typing_extensions", "pyzmq"], check=True,
                       timeout=600)

    return venv_made_once(OPENPI_VENV, make)


@pytest.fixture(scope="session")
def libero_server():
    env = {"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}
    with running_server("libero", "--max-sessions", "3", env=env) as server:
        yield server


@pytest.fixture(scope="session")
def libero_session(libero_server):
    """One small-camera session on the first spatial task, shared by the cheap tests."""
    client = libero_server.client()
    reply = client.request("load_task", task_name=libero_suite(LIBERO_SUITE).get_task_names()[0], **SMALL_CAMERA)
    assert reply["status"] == "ok", reply
    yield client, reply["task_info"]
    client.request("disconnect")
    client.close()
