"""sim_eval.py's runner: episodes over sessions and servers with failover, policies and batching, and a
score you can trust (the episode contract, conventions chosen, the policy checked before the first episode)."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import sim_server
from evaluation.actions import ActionsSidecar
from evaluation.policies import Policy, PolicyBatcher, load_policy
from evaluation.report import summarize
from evaluation.runner import Evaluation, EvaluationSettings, Progress
from evaluation.stats import mean_interval, student_t_quantile
from evaluation.videos import VideoWriter
from harness_sim import (
    HERE,
    ServerProcess,
    wait_until,
)
from tests.shared import (
    run_eval_cli,
)

# --- evaluation runner --------------------------------------------------------

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



# --- sim_eval.py: policies, batching, openpi policy servers -------------------

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



# --- a score you can trust: the episode contract, conventions, the policy checked first ---

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


def test_a_plain_policy_that_hangs_fails_its_episode_with_policy_timeout_and_the_run_goes_on(short_mock_server,
                                                                                             tmp_path):
    (tmp_path / "sleepy.py").write_text("import time\nimport numpy as np\ncalls = 0\n"
                                        "def act(observation, task_info):\n"
                                        "    global calls\n    calls += 1\n"
                                        "    if calls == 9:  # the check's, episode 0's six, episode 1's second\n"
                                        "        time.sleep(3600)\n"
                                        "    return np.zeros(7)\n")
    results = tmp_path / "results.json"
    run = run_eval_cli("--address", short_mock_server.address, "--tasks", "reach_center", "--episodes", "3",
                       "--policy", "sleepy:act", "--policy-timeout", "2", "--results", str(results), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    episodes = sorted(json.loads(results.read_text())["episodes"], key=lambda e: e["init_state_index"])
    assert [e["failure"] for e in episodes] == ["horizon", "policy_timeout", "horizon"]
    assert "--policy-timeout" in episodes[1]["error"] and episodes[1]["steps"] == 1


def test_progress_in_a_file_is_a_plain_line_every_ten_episodes_with_the_running_success_and_time_left():
    stream = io.StringIO()
    progress = Progress(25, stream)
    for index in range(25):
        progress.update(None if index >= 20 else index % 2 == 0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue(), lines
    assert lines[0].startswith("sim_eval: 10/25 episodes, success 5/10 (0.50), ")
    assert lines[2].startswith("sim_eval: 25/25 episodes, success 10/20 (0.50), ")
    assert lines[2].endswith("about 0s left")
