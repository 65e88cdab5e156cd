"""What a run leaves behind: paired comparisons, replay and verification from the recorded actions,
openpi policy servers, and results people can look at (intervals, LeRobot's JSON, videos, the report)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading

import numpy as np
import pytest

import sim_client
import sim_server
from evaluation.compare import mcnemar_exact_p, paired_difference_interval
from evaluation.policies import Policy, PolicyBatcher, load_policy
from evaluation.runner import Evaluation, EvaluationSettings
from evaluation.stats import wilson_interval
from evaluation.videos import VideoWriter
from harness_sim import (
    HERE,
    free_port,
    libero_suite,
    running_server,
    wait_until,
)
from tests.shared import (
    CHUNK_POLICY,
    LIBERO_SUITE,
    assert_error,
    assert_one_line_exit_2,
    chromium,
    run_eval_cli,
    write_npz,
)

# --- comparing two runs pair by pair ------------------------------------------

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



# --- replaying and verifying runs from their recorded actions -----------------

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


PREFIX_LOGGING_SERVER = '''
import json, sys
import numpy as np
from openpi_client import base_policy
from openpi_server.websocket_policy_server import WebsocketPolicyServer

class PrefixLoggingPolicy(base_policy.BasePolicy):
    def infer(self, obs):
        prefix = obs.get("prefix_actions")
        said = None if prefix is None else [list(prefix.shape), str(prefix.dtype),
                                            [round(float(v), 6) for v in prefix[:, 0]]]
        with open(sys.argv[2], "a") as log:
            log.write(json.dumps({"keys": sorted(obs), "prefix": said}) + "\\n")
        actions = np.zeros((10, 7))
        actions[:, 0] = np.arange(10) / 1000.0  # the index in the chunk, to find in the prefix
        actions[:, 6] = -1.0
        return {"actions": actions}

WebsocketPolicyServer(PrefixLoggingPolicy(), host="127.0.0.1", port=int(sys.argv[1]), metadata={}).serve_forever()
'''


@pytest.mark.libero
@pytest.mark.slow
def test_an_openpi_server_gets_the_actions_that_run_during_its_delay_with_send_prefix(openpi_python, libero_server,
                                                                                       tmp_path):
    port, calls_log, script = free_port(), tmp_path / "calls.jsonl", tmp_path / "serve_prefix_policy.py"
    script.write_text(PREFIX_LOGGING_SERVER)
    policy_server = subprocess.Popen([openpi_python, str(script), str(port), str(calls_log)], stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: socket_accepts(port), 60)
        task = libero_suite(LIBERO_SUITE).get_task_names()[0]
        result = run_eval_cli("--address", libero_server.address, "--tasks", task, "--episodes", "1", "--policy",
                              f"openpi://127.0.0.1:{port}", "--replan-steps", "5", "--latency", "2", "--send-prefix",
                              "--load-option", "max_episode_steps=12", "--load-option", "camera_width=64",
                              "--load-option", "camera_height=64", "--results", str(tmp_path / "r.json"), timeout=600)
    finally:
        policy_server.kill()
        policy_server.wait()
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in calls_log.read_text().splitlines()]
    # the policy check, then the episode's calls at steps 0 (waited for), 5 and 10
    assert [call["prefix"] for call in calls] == [None, None, [[2, 7], "float32", [0.005, 0.006]],
                                                  [[2, 7], "float32", [0.005, 0.006]]]
    assert "prefix_actions" in calls[2]["keys"] and "prefix_actions" not in calls[1]["keys"]
    record = json.loads((tmp_path / "r.json").read_text())["episodes"][0]
    assert record["latency_steps"] == 2 and record["steps"] == 12


def socket_accepts(port: int) -> bool:

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
