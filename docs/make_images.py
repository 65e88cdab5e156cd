"""Remake the pictures in docs/images/ from real runs on this machine.

    .venv/bin/python docs/make_images.py        # needs `bash .ci/setup --simulator metaworld` and Chromium
    .venv/bin/python docs/make_images.py sweep  # only some: cameras (with the dashboard), report, preview, sweep

It serves LIBERO and Meta-World with the dashboard on, films one camera frame of each, takes a
screenshot of the dashboard while both sessions are live, runs the Meta-World reach example into
an HTML report and screenshots it, previews the task builder's worked example, and runs the chunked
reach example's latency sweep (docs/evaluation.md) into its chart. Every picture is written over;
nothing here is drawn by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sim_client import SimulatorClient  # noqa: E402

IMAGES = os.path.join(ROOT, "docs", "images")
PORT, DASHBOARD_PORT = 5591, 8591
TOKEN = "make-images"
LIBERO_TASK = "libero_spatial/pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
REACH_TASK = "metaworld/reach-v3"


def chromium_screenshot(url: str, path: str, size: str) -> None:
    """A headless Chromium screenshot of one page, with a throwaway profile, taken after the page's own
    fetches have had 8 s of its virtual time (the dashboard fills itself from /api/state)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--virtual-time-budget=8000", f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=180)
    print("wrote", os.path.relpath(path, ROOT))


def save_frame(observation: dict, task_info: dict, path: str) -> None:
    """The first camera image of an observation, upright, as a PNG."""
    from PIL import Image

    image = next(value for value in observation.values() if isinstance(value, np.ndarray) and value.ndim == 3)
    if task_info.get("images_rotated_180"):
        image = image[::-1, ::-1]
    Image.fromarray(np.ascontiguousarray(image)).save(path)
    print("wrote", os.path.relpath(path, ROOT))


def start_server() -> subprocess.Popen:
    env = dict(os.environ, SIM_DASHBOARD_TOKEN=TOKEN)
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "sim_server.py"), "--simulator", "libero,metaworld",
                               "--port", str(PORT), "--dashboard", str(DASHBOARD_PORT)], env=env, cwd=ROOT)
    with SimulatorClient(f"tcp://127.0.0.1:{PORT}", timeout_s=120) as probe:
        probe.ping()
    return server


def camera_frames_and_dashboard() -> None:
    """One session per simulator, a few steps each, then the dashboard while both are live."""
    libero = SimulatorClient(f"tcp://127.0.0.1:{PORT}", timeout_s=300)
    metaworld = SimulatorClient(f"tcp://127.0.0.1:{PORT}", timeout_s=300)
    libero.select_simulator("libero")
    metaworld.select_simulator("metaworld")
    libero_info = libero.load_task(LIBERO_TASK)
    reach_info = metaworld.load_task("metaworld/pick-place-v3")
    libero.reset(init_state_index=0)
    metaworld.reset(seed=0)
    for _ in range(10):
        libero_step = libero.step(np.zeros(7))
        reach_step = metaworld.step(np.zeros(4))
    save_frame(libero_step["observation"], libero_info, os.path.join(IMAGES, "libero_agentview.png"))
    save_frame(reach_step["observation"], reach_info, os.path.join(IMAGES, "metaworld_corner2.png"))
    chromium_screenshot(f"http://127.0.0.1:{DASHBOARD_PORT}/?token={TOKEN}", os.path.join(IMAGES, "dashboard.png"),
                        "1200,760")
    libero.disconnect()
    metaworld.disconnect()


def report(work: str) -> None:
    """The reach example on three Meta-World tasks, into an HTML report."""
    results, page = os.path.join(work, "reach.json"), os.path.join(work, "reach.html")
    subprocess.run([sys.executable, os.path.join(ROOT, "sim_eval.py"), "--address", f"tcp://127.0.0.1:{PORT}",
                    "--simulator", "metaworld", "--tasks", REACH_TASK, "metaworld/push-v3", "metaworld/window-open-v3",
                    "--policy", "examples.metaworld_reach:act", "--episodes", "6", "--parallel", "2",
                    "--results", results, "--report", page], check=True, cwd=ROOT, timeout=1200)
    chromium_screenshot(f"file://{page}", os.path.join(IMAGES, "report.png"), "1100,900")


def task_preview(work: str) -> None:
    """The task builder's worked example (docs/task_builder.md), previewed."""
    page = open(os.path.join(ROOT, "docs", "task_builder.md")).read()
    spec = re.search(r"```yaml\n(.*?)```", page, re.S).group(1)
    path = os.path.join(work, "spatial_bowl_with_mug.yaml")
    with open(path, "w") as handle:
        handle.write(spec)
    subprocess.run([sys.executable, os.path.join(ROOT, "sim_tasks.py"), "preview", path], check=True, cwd=ROOT,
                   timeout=1200)
    os.replace(path.replace(".yaml", ".preview.png"), os.path.join(IMAGES, "task_preview.png"))
    print("wrote docs/images/task_preview.png")


def latency_sweep(work: str) -> None:
    """The chunked reach example at latencies 0, 2 and 4 (50 paired episodes each), its report's chart."""
    from evaluation.records import records_of
    from evaluation.sweep import latency_rows, latency_section

    results = os.path.join(work, "sweep.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "sim_eval.py"), "--address", f"tcp://127.0.0.1:{PORT}",
                    "--simulator", "metaworld", "--tasks", REACH_TASK, "--policy", "examples.metaworld_reach:act_chunk",
                    "--replan-steps", "5", "--latency", "0,2,4", "--episodes", "50", "--parallel", "2",
                    "--load-option", "cameras=[]", "--results", results], check=True, cwd=ROOT, timeout=1200)
    with open(results) as results_file:
        section = latency_section(latency_rows(records_of(json.load(results_file))))
    page = os.path.join(work, "sweep.html")
    with open(page, "w") as page_file:
        page_file.write(f"<!DOCTYPE html><html><body style='font-family: sans-serif'>{section}</body></html>")
    chromium_screenshot(f"file://{page}", os.path.join(IMAGES, "latency_sweep.png"), "900,520")


PARTS = {"cameras": lambda work: camera_frames_and_dashboard(), "report": report, "preview": task_preview,
         "sweep": latency_sweep}


def main(argv: list) -> int:
    unknown = [part for part in argv if part not in PARTS]
    if unknown:
        print(f"make_images.py: no part {unknown[0]!r}; parts: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    os.makedirs(IMAGES, exist_ok=True)
    server = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="sim-images-") as work:
            for name in argv or list(PARTS):
                PARTS[name](work)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
