"""Real-time evaluation (--latency, --replan-steps, --latency-model, prefix=): the executed actions
follow the protocol exactly, runs repeat and verify, sweeps are paired and summarized."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.actions import ActionsSidecar
from tests.shared import run_eval_cli

# A policy whose every action says which call made it (the step of the observation it saw, from the
# mock's state[3]) and its index in the chunk; with prefix= it also says what it was given.
CODED_POLICY = """
import time
import numpy as np
HORIZON = {horizon}
SLEEP_S = {sleep_s}

def act(observation, task_info{prefix_parameter}):
    time.sleep(SLEEP_S)
    chunk = np.zeros((HORIZON, 7))
    chunk[:, 0] = float(observation["state"][3]) / 1000.0
    chunk[:, 1] = np.arange(HORIZON) / 100.0
    {prefix_code}
    return chunk
"""
PREFIX_CODE = ("given = prefix if prefix is not None else np.zeros((0, 7))  # None: the first call, waited for\n"
               "    chunk[:, 2] = given[0, 0] if len(given) else -0.001\n"
               "    chunk[:, 3] = len(given) / 100.0")


def write_policy(folder, horizon: int, sleep_s: float = 0.0, prefix: bool = False) -> None:
    (folder / "coded.py").write_text(CODED_POLICY.format(
        horizon=horizon, sleep_s=sleep_s, prefix_parameter=", prefix=None" if prefix else "",
        prefix_code=PREFIX_CODE if prefix else "pass"))


def run_realtime(server, folder, *flags: str, name: str = "run.json", episodes: int = 2):
    results = folder / name
    done = run_eval_cli("--address", server.address, "--tasks", "reach_center", "--episodes", str(episodes),
                        "--policy", "coded:act", "--results", str(results), *flags, cwd=folder)
    assert done.returncode == 0, done.stderr
    return json.loads(results.read_text()), done.stdout


def executed(folder, record: dict, name: str = "run.json"):
    """The (call step, chunk index) of every executed action, and the latency of every call."""
    recorded = np.load(str(ActionsSidecar(str(folder / name)).folder) + "/" + record["actions_file"])
    actions = recorded["action.action"]
    pairs = [(int(round(a[0] * 1000)), int(round(a[1] * 100))) for a in actions]
    return pairs, recorded["latency_steps"].tolist(), actions


def expected_schedule(replan: int, delay: int, horizon: int, steps: int):
    """The protocol, written out: the first call's actions 0..S-1; then, for the call at step t, the
    previous call's S..S+D-1 and this call's D..S-1 (an index past a chunk's end repeats its last)."""
    pairs, t = [], 0
    while len(pairs) < steps:
        if t == 0:
            pairs += [(0, min(k, horizon - 1)) for k in range(replan)]
        else:
            pairs += [(t - replan, min(replan + j, horizon - 1)) for j in range(delay)]
            pairs += [(t, min(k, horizon - 1)) for k in range(delay, replan)]
        t += replan
    return pairs[:steps]


def test_a_latency_sweep_executes_the_protocol_exactly_and_is_summarized_per_latency(long_mock_server, tmp_path):
    write_policy(tmp_path, horizon=10)
    content, stdout = run_realtime(long_mock_server, tmp_path, "--replan-steps", "5", "--latency", "0,2,5",
                                   "--report", str(tmp_path / "report.html"))
    records = content["episodes"]
    assert sorted((r["latency_steps"], r["init_state_index"]) for r in records) == \
        [(d, i) for d in (0, 2, 5) for i in (0, 1)]
    for record in records:
        pairs, latencies, _ = executed(tmp_path, record)
        assert record["steps"] == len(pairs) == 30
        assert pairs == expected_schedule(5, record["latency_steps"], 10, 30), record["latency_steps"]
        assert latencies == [0] + [record["latency_steps"]] * 5
    assert content["run"]["settings"]["latencies"] == [0, 2, 5]
    assert "reach_center @ latency 2" in content["summary"]
    assert "paired change" in stdout and "(baseline)" in stdout
    page = (tmp_path / "report.html").read_text()
    assert "Success against latency" in page and "<svg" in page and "McNemar p" in page
    verified = run_eval_cli("verify", str(tmp_path / "run.json"), "--address", long_mock_server.address, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_chunks_shorter_than_the_schedule_repeat_their_last_action(long_mock_server, tmp_path):
    write_policy(tmp_path, horizon=4)
    content, _ = run_realtime(long_mock_server, tmp_path, "--replan-steps", "5", "--latency", "3", episodes=1)
    pairs, latencies, _ = executed(tmp_path, content["episodes"][0])
    assert pairs == expected_schedule(5, 3, 4, 30)
    assert pairs[5:10] == [(0, 3), (0, 3), (0, 3), (5, 3), (5, 3)]
    assert latencies == [0, 3, 3, 3, 3, 3]


def test_a_policy_that_takes_prefix_gets_the_actions_that_run_during_its_delay(long_mock_server, tmp_path):
    write_policy(tmp_path, horizon=10, prefix=True)
    content, _ = run_realtime(long_mock_server, tmp_path, "--replan-steps", "5", "--latency", "2", episodes=1)
    _, _, actions = executed(tmp_path, content["episodes"][0])
    calls = actions[7::5]  # one action of each call after the first: index D of its chunk, at step 5k + 2
    for call, action in enumerate(calls, start=1):
        assert int(round(action[0] * 1000)) == 5 * call  # the call at step 5k ...
        assert int(round(action[2] * 1000)) == 5 * (call - 1)  # ... was given the previous call's actions
        assert int(round(action[3] * 100)) == 2  # ... two of them: its delay


def test_a_seeded_latency_model_repeats_exactly_and_verifies(long_mock_server, tmp_path):
    write_policy(tmp_path, horizon=10)
    flags = ("--replan-steps", "5", "--latency-model", "lognormal:120,0.6")
    first, _ = run_realtime(long_mock_server, tmp_path, *flags, name="first.json")
    second, _ = run_realtime(long_mock_server, tmp_path, *flags, name="second.json")
    for a, b in zip(first["episodes"], second["episodes"]):
        assert a["latency_steps"] == "lognormal:120,0.6"
        assert a["digests"]["actions"] == b["digests"]["actions"]
        assert executed(tmp_path, a, "first.json")[1] == executed(tmp_path, b, "second.json")[1]
    delays = executed(tmp_path, first["episodes"][0], "first.json")[1]
    assert delays[0] == 0 and all(0 <= d <= 5 for d in delays) and len(set(delays[1:])) > 1, delays
    assert run_eval_cli("verify", str(tmp_path / "first.json"), "--address", long_mock_server.address,
                        cwd=tmp_path).returncode == 0


def test_measured_latency_is_each_calls_own_time_in_control_steps(long_mock_server, tmp_path):
    write_policy(tmp_path, horizon=10, sleep_s=0.12)  # at the mock's 20 Hz: at least 3 steps
    content, _ = run_realtime(long_mock_server, tmp_path, "--replan-steps", "5", "--latency", "measured",
                              episodes=1)
    record = content["episodes"][0]
    pairs, delays, _ = executed(tmp_path, record)
    assert record["latency_steps"] == "measured"
    assert delays[0] == 0 and all(3 <= d <= 5 for d in delays[1:]), delays
    t, position = 0, 0
    for delay in delays:  # each call's actions follow the protocol with its own delay
        if t:
            assert pairs[position:position + delay] == [(t - 5, 5 + j) for j in range(delay)]
        t, position = t + 5, position + 5
    verified = run_eval_cli("verify", str(tmp_path / "run.json"), "--address", long_mock_server.address, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout


@pytest.mark.parametrize("flags, message", [
    (("--replan-steps", "5", "--latency", "6"), "more than --replan-steps"),
    (("--latency", "2"), "--latency needs --replan-steps"),
    (("--replan-steps", "5", "--latency", "2", "--latency-model", "fixed:100"), "not both"),
    (("--replan-steps", "5", "--latency", "two"), "--latency 'two'"),
    (("--replan-steps", "5", "--latency-model", "gamma:1"), "fixed:MS or lognormal"),
    (("--replan-steps", "0"), "--replan-steps must be at least 1"),
    (("--send-prefix",), "--send-prefix is for openpi://"),
    (("--replan-steps", "5", "--latency", "0,2", "--lerobot-json", "x.json"), "run one --latency at a time"),
])
def test_bad_real_time_flags_are_one_line_and_exit_2(long_mock_server, tmp_path, flags, message):
    write_policy(tmp_path, horizon=10)
    done = run_eval_cli("--address", long_mock_server.address, "--tasks", "reach_center", "--episodes", "1",
                        "--policy", "coded:act", *flags, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
