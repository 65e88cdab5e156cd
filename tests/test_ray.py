"""Simulator servers placed and restarted by Ray (sim_eval.py --ray)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import sim_client
from harness_sim import (
    HERE,
    free_port,
    wait_until,
)
from tests.shared import (
    MOCK_EVAL_ENV,
    run_eval_cli,
)

# --- servers placed and restarted by Ray --------------------------------------

# Ray's switch for a single machine: every node address is 127.0.0.1, nothing binds elsewhere.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 only, in the foreground (--block), stopped afterwards by stopping that one
    process: `ray stop` would stop every Ray on the machine, another test worker's included."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port, env = free_port(), {**os.environ, **LOOPBACK_RAY}
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: ray_accepts(port), 120), "the Ray head did not start"
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()


def ray_accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


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
    # Episodes of at least 1 s (10 steps that sleep 0.1 s) and a 3 s call timeout: the killed server's
    # session gives up (three tries) while the surviving server still has episodes to run, so the
    # restarted server gets some (with 10 s and quick episodes the survivor could drain the run first).
    run = run_ray_eval(ray_head, tmp_path, "--episodes", "8", "--parallel", "2", "--load-option", "step_sleep_s=0.1",
                       "--timeout", "3")
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
