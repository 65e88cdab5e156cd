"""The backend contract every simulator keeps, and the Gymnasium and robosuite backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness_sim import (
    running_server,
)
from tests.shared import (
    CUSTOM_SPEC,
    BackendContract,
    assert_error,
    assert_same_observations,
    check_protocol_conformance,
    run_eval_cli,
)

# --- every backend keeps the same contract ------------------------------------

class TestMockContract(BackendContract):
    simulator, task, action, bad_action = "mock", "reach_center", np.zeros(7), np.zeros(5)

    @pytest.fixture
    def server(self, mock_server):
        return mock_server



# --- Gymnasium backend --------------------------------------------------------

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



# --- robosuite backend --------------------------------------------------------

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
