"""Custom LIBERO and robosuite tasks from a task folder: specs, generation, serving, the tools and the
dashboard's form."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import sim_client
from harness_sim import (
    HERE,
    free_port,
    libero_suite,
    running_server,
    wait_until,
)
from tests.shared import (
    CHUNK_POLICY,
    CUSTOM_SPEC,
    DASHBOARD_TOKEN,
    LIBERO_SUITE,
    SMALL_CAMERA,
    assert_error,
    http_get,
    http_request,
    run_eval_cli,
    write_npz,
)

# --- custom LIBERO tasks from a task folder -----------------------------------

@pytest.fixture(scope="module")
def custom_task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "plate_in_place.yaml").write_text(CUSTOM_SPEC)
    return folder


@pytest.fixture(scope="module")
def custom_libero_server(custom_task_dir):
    with running_server("libero", "--task-dir", str(custom_task_dir),
                        env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}) as server:
        yield server


@pytest.fixture(scope="module")
def second_libero_server(custom_task_dir):
    """Another server process on the same folder: what one server recorded, another must reproduce."""
    with running_server("libero", "--task-dir", str(custom_task_dir),
                        env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE}) as server:
        yield server


def first_reset(address: str, task: str) -> dict:
    with sim_client.SimulatorClient(address, timeout_s=300) as sim:
        sim.load_task(task, **SMALL_CAMERA)
        return sim.reset(init_state_index=1)[0]


@pytest.mark.libero
def test_custom_task_is_listed_served_reset_the_same_on_two_servers_and_succeeds_when_its_goal_holds(
        custom_libero_server, second_libero_server, custom_task_dir):
    client = custom_libero_server.client()
    try:
        assert client.request("list_tasks", suite="custom")["tasks"] == ["custom/plate_in_place"]
        (custom_task_dir / "broken.yaml").write_text(CUSTOM_SPEC.replace("[On, plate_1, plate_region]",
                                                                         "[Near, plate_1, plate_region]"))
        (custom_task_dir / "second.json").write_text(json.dumps({"language": "x", "objects": {"plate": 1}, "init": [
            ["On", "plate_1", "spot"]], "goal": [["On", "plate_1", "spot"]], "regions": {
            "spot": {"center": [0, 0], "half_size": 0.05}}}))
        tasks = client.request("list_tasks", suite="custom")["tasks"]  # no restart: the folder is read afresh
        assert tasks == ["custom/plate_in_place", "custom/second"], tasks
        problems = client.request("get_info")["task_folder"]["problems"]
        assert list(problems) == ["broken.yaml"] and "no predicate 'Near'; predicates: Close, In, On" in \
            problems["broken.yaml"]
        assert_error(client.request("load_task", task_name="custom/broken"), "invalid_params")
        assert_error(client.request("load_task", task_name="custom/plate_in_plaice"), "task_not_found")

        reply = client.request("load_task", task_name="custom/plate_in_place", **SMALL_CAMERA)
        assert reply["status"] == "ok", reply
        task_info = reply["task_info"]
        assert (task_info["suite"], task_info["language"], task_info["max_episode_steps"],
                task_info["num_init_states"]) == ("custom", "leave the plate where it is", 40, 2)
        first = client.request("reset", init_state_index=1)["observation"]
        again = client.request("reset", init_state_index=1)["observation"]
        assert all(np.array_equal(first[key], again[key]) for key in first)
        step = client.request("step", action=np.zeros(7))
        assert step["terminated"] and step["info"]["success"], step["info"]
    finally:
        client.request("disconnect")
        client.close()
    elsewhere = first_reset(second_libero_server.address, "custom/plate_in_place")
    assert all(np.array_equal(first[key], elsewhere[key]) for key in first)  # the stored init state, bit for bit


class BrowserPage:
    """A page in a real headless Chromium, driven over its DevTools protocol (a test clicks buttons)."""

    def __init__(self, url: str, profile: str) -> None:
        from websockets.sync.client import connect

        port = free_port()
        self.process = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", url],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = []

        def page_listed() -> bool:
            try:
                pages[:] = [p for p in json.loads(http_get(f"http://127.0.0.1:{port}/json")[1]) if p["type"] == "page"]
            except OSError:
                return False
            return bool(pages)

        assert wait_until(page_listed, 60)
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], open_timeout=30, max_size=None)
        self.calls = 0

    def evaluate(self, expression: str):
        """The expression's value in the page (awaited when it is a promise)."""
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": "Runtime.evaluate", "params": {
            "expression": expression, "returnByValue": True, "awaitPromise": True}}))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == self.calls:
                return reply["result"]["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait()


@pytest.mark.libero
@pytest.mark.browser
@pytest.mark.slow
def test_custom_task_builder_form_in_chromium_checks_saves_and_previews_a_task(tmp_path):
    folder, port = tmp_path / "tasks", free_port()
    folder.mkdir()
    with running_server("libero", "--task-dir", str(folder), "--dashboard", str(port), "--dashboard-admin",
                        env={"SIM_LIBERO_TASK_SUITE": LIBERO_SUITE, "SIM_DASHBOARD_TOKEN": DASHBOARD_TOKEN}) as server:
        form = f"http://127.0.0.1:{port}/tasks"
        assert http_request("POST", form.replace("/tasks", "/api/tasks/save"), {"spec": {}})[0] == 403  # no token
        page = BrowserPage(f"{form}?token={DASHBOARD_TOKEN}", str(tmp_path / "profile"))
        try:
            assert wait_until(lambda: page.evaluate("document.body.dataset.ready") == "yes", 60)
            assert "akita_black_bowl" in page.evaluate("document.getElementById('object_choices').innerText")
            message = "document.getElementById('message').textContent"
            page.evaluate("document.getElementById('goal').value = 'Near akita_black_bowl_1 plate_1';"
                          "document.getElementById('check').click()")
            assert wait_until(lambda: "no predicate 'Near'" in page.evaluate(message), 30), page.evaluate(message)
            page.evaluate("document.getElementById('goal').value = 'On akita_black_bowl_1 plate_1';"
                          "document.getElementById('name').value = 'from_browser';"
                          "document.getElementById('init_states').value = '2';"
                          "document.getElementById('save').click()")
            assert wait_until(lambda: page.evaluate(message) == "saved: custom/from_browser", 30), \
                page.evaluate(message)
            saved = json.loads((folder / "from_browser.json").read_text())
            assert saved["goal"] == [["On", "akita_black_bowl_1", "plate_1"]] and saved["init_states"] == 2
            page.evaluate("document.getElementById('save').click()")  # again: never over a task
            assert wait_until(lambda: "exists: pick another name" in page.evaluate(message), 30)
            page.evaluate("document.getElementById('preview').click()")
            assert wait_until(lambda: page.evaluate("document.getElementById('image').src").startswith(
                "data:image/png;base64,"), 300), page.evaluate(message)
        finally:
            page.close()
        with sim_client.SimulatorClient(server.address, timeout_s=60) as sim:
            assert sim.list_tasks(suite="custom") == ["custom/from_browser"]


BAD_SPECS = {
    "bad_workspace": ("workspace: kitchen_island\n", "workspace 'kitchen_island': close matches: kitchen_table"),
    "bad_object": ("objects: {akita_black_bowl: 1, plate: 1, porcelain_mugg: 1}\n",
                   "objects: no LIBERO object 'porcelain_mugg'; close matches: porcelain_mug"),
    "bad_fixture": ("fixtures: {wooden_cabinett: 1}\n", "fixtures: no LIBERO object 'wooden_cabinett'"),
    "bad_region": ("init:\n  - [On, akita_black_bowl_1, sofa_region]\n  - [On, plate_1, plate_region]\n"
                   "  - [On, wooden_cabinet_1, cabinet_region]\n",
                   "init: 'sofa_region' is not a region or object of the scene"),
    "bad_predicate": ("goal: [[Near, plate_1, plate_region]]\n", "goal: no predicate 'Near'; predicates: Close, In"),
    "bad_goal_object": ("goal: [[On, porcelain_mug_1, plate_1]]\n", "goal: 'porcelain_mug_1' is not in the scene"),
    "bad_name": ("name: ../../etc/evil\n", "task name '../../etc/evil': use letters, digits, _ and - only"),
    "bad_collision": ("name: pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate\n",
                      "is a shipped LIBERO task's: pick another"),
    "bad_placement": ("objects: {akita_black_bowl: 1, plate: 3}\ninit:\n  - [On, akita_black_bowl_1, bowl_region]\n"
                      "  - [On, plate_1, plate_region]\n  - [On, plate_2, plate_region]\n"
                      "  - [On, plate_3, plate_region]\n  - [On, wooden_cabinet_1, cabinet_region]\n",
                      "LIBERO could not place every object"),
}


@pytest.mark.libero
def test_custom_task_tools_validate_list_and_preview_and_every_bad_spec_gets_one_line(tmp_path):
    made = subprocess.run([sys.executable, "sim_tasks.py", "new", "demo", "--dir", str(tmp_path)], cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and (tmp_path / "demo.yaml").exists(), made.stderr
    spec = (tmp_path / "demo.yaml").read_text().replace("init_states: 50", "init_states: 2")
    (tmp_path / "demo.yaml").write_text(spec)
    for name, (change, _) in BAD_SPECS.items():  # each changes one field of the good spec (the last wins in YAML)
        (tmp_path / f"{name}.yaml").write_text(CUSTOM_SPEC + change)
    paths = [str(tmp_path / "demo.yaml")] + [str(tmp_path / f"{name}.yaml") for name in BAD_SPECS]
    checked = subprocess.run([sys.executable, "sim_tasks.py", "validate", *paths], cwd=HERE, capture_output=True,
                             text=True, timeout=600)
    assert checked.returncode == 2
    assert f'{paths[0]}: ok: custom/demo, "put the black bowl on the plate", 2 init states (seed 0)' in checked.stdout
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == len(BAD_SPECS), checked.stderr  # one line per bad spec, nothing else
    for line, (name, (_, message)) in zip(lines, BAD_SPECS.items()):
        assert line.startswith(str(tmp_path / f"{name}.yaml")) and message in line, line
    assert (tmp_path / "demo.generated.bddl").read_text().count("(On akita_black_bowl_1 plate_1)") == 1

    listed = subprocess.run([sys.executable, "sim_tasks.py", "list", "--dir", str(tmp_path)], cwd=HERE,
                            capture_output=True, text=True, timeout=300)
    assert "custom/demo  put the black bowl on the plate  (built)" in listed.stdout, listed.stdout
    assert "problem: bad_object.yaml: objects: no LIBERO object 'porcelain_mugg'" in listed.stdout
    shown = subprocess.run([sys.executable, "sim_tasks.py", "preview", paths[0], "--size", "64"], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "demo.preview.png"))
    assert grid.shape == (128, 128, 3) and grid[:64, :64].std() > 10  # init state 0 drawn, top left
    assert np.array_equal(grid[64:, 64:], np.zeros((64, 64, 3), np.uint8))  # two states: the last cell is empty


@pytest.mark.libero
def test_libero_run_verifies_on_a_second_server_its_replayed_video_is_the_same_and_another_convention_is_caught(
        custom_libero_server, second_libero_server, tmp_path):
    libero_server = custom_libero_server  # the custom tasks' group's servers: they serve the shipped tasks too
    (tmp_path / "chunky.py").write_text(CHUNK_POLICY)
    results, task = tmp_path / "run.json", libero_suite(LIBERO_SUITE).get_task_names()[0]
    options = ["max_episode_steps=14", "camera_width=64", "camera_height=64", 'convention="openpi"']
    run = run_eval_cli("--address", libero_server.address, "--tasks", task, "--episodes", "1", "--policy",
                       "chunky:act", "--results", str(results), "--videos", str(tmp_path / "run_videos"),
                       *[arg for option in options for arg in ("--load-option", option)], cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    verified = run_eval_cli("verify", str(results), "--address", second_libero_server.address, timeout=600)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    replayed = run_eval_cli("replay", str(results), "--episodes", "0", "--address", second_libero_server.address,
                            "--videos", str(tmp_path / "replay_videos"), timeout=600)
    assert replayed.returncode == 0 and f"#0 {task} init 0: verified" in replayed.stdout, replayed.stdout
    report = json.loads((tmp_path / "run.verified.json").read_text())
    assert report["all_verified"] and report["task_settings"][task]["simulator_stack"]["mujoco"] == "3.2.3"
    import imageio.v3 as iio

    original_video = json.loads(results.read_text())["episodes"][0]["video"]
    replayed_video, = (tmp_path / "replay_videos").iterdir()
    original_frames, replayed_frames = iio.imread(original_video), iio.imread(replayed_video)
    assert original_frames.shape[0] == 15 and np.array_equal(original_frames, replayed_frames)  # reset + 14 steps

    original = results.read_text()
    flipped = json.loads(original)
    flipped["episodes"][0]["success"] = True
    results.write_text(json.dumps(flipped))
    caught = run_eval_cli("verify", str(results), "--address", second_libero_server.address, timeout=600)
    assert caught.returncode == 1, caught.stdout
    assert f"#0 {task} init 0: diverged from step 14: success: recorded True, replayed False" in caught.stdout

    results.write_text(original)
    actions_file = tmp_path / "run.actions" / flipped["episodes"][0]["actions_file"]
    recorded_actions = actions_file.read_bytes()
    with np.load(actions_file) as recorded:
        arrays = dict(recorded)
    assert arrays["checks"].tolist() == [4, 8, 12, 14]  # a state digest after each of CHUNK_POLICY's round trips
    arrays["action.action"][[5, 6]] = arrays["action.action"][[6, 5]]  # two actions of the second chunk swapped
    write_npz(actions_file, **arrays)
    caught = run_eval_cli("replay", str(results), "--episodes", "0", "--address", second_libero_server.address,
                          timeout=600)
    assert caught.returncode == 1 and "the actions file does not match the record's digest" in caught.stdout
    assert "state after step 8 differs (equal after step 4)" in caught.stdout, caught.stdout

    actions_file.write_bytes(recorded_actions)
    content = json.loads(original)  # the same run claimed under another convention
    content["run"]["settings"]["load_options"]["convention"] = "standard"
    results.write_text(json.dumps(content))
    caught = run_eval_cli("verify", str(results), "--address", libero_server.address, timeout=600)
    assert caught.returncode == 1, caught.stdout
    assert f"note: recorded vs here: {task}: convention 'openpi' vs 'standard'" in caught.stdout, caught.stdout
    assert "final frames digest: recorded" in caught.stdout and "NOT verified: 0 verified, 1 diverged" in caught.stdout
