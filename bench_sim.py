"""Benchmarks: the server's overhead as ratios measured side by side in one run.

    python bench_sim.py            # mock transport figures and LIBERO step/reset figures
    python bench_sim.py --no-libero

Every figure is a ratio of two things timed in the same run on the same
machine, so a shared, noisy machine moves both sides together.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import zmq

import sim_client
import sim_server
from evaluation.policies import Policy, PolicyBatcher
from evaluation.runner import Evaluation, EvaluationSettings
from evaluation.videos import VideoWriter
from harness_sim import ServerProcess, free_port, libero_suite

LIBERO_SIZE_OBSERVATION = {
    "agentview_image": np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8),
    "robot0_eye_in_hand_image": np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8),
    "state": np.zeros(8, dtype=np.float32),
}


def median_time(function, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def row(name: str, measured: float, baseline: float, unit_scale: float = 1e3, goal: str = "") -> tuple:
    ratio = f"{measured / baseline:.2f}x"
    return (name, f"{measured * unit_scale:.3f} ms", f"{baseline * unit_scale:.3f} ms", ratio, goal)


# --- codec -------------------------------------------------------------------

def bench_codec() -> list:
    message = {"status": "ok", "observation": LIBERO_SIZE_OBSERVATION, "reward": 0.0}
    body = sim_server.encode(message)
    raw = b"".join(bytes(v) for v in LIBERO_SIZE_OBSERVATION.values())
    memcpy = median_time(lambda: bytearray(raw), 200)
    return [
        row("encode observation vs memcpy", median_time(lambda: sim_server.encode(message), 200), memcpy),
        row("decode observation vs memcpy", median_time(lambda: sim_client.decode(body), 200), memcpy),
    ]


# --- transport ---------------------------------------------------------------

def raw_echo_server(address: str, reply: bytes, stop: threading.Event) -> None:
    """A bare ROUTER answering every request with the same precomputed body."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(address)
    while not stop.is_set():
        if router.poll(100):
            frames = router.recv_multipart()
            router.send_multipart(frames[:-1] + [reply], copy=False)
    router.close(linger=0)


def bench_round_trip() -> list:
    env = {"SIM_MOCK_IMAGE_SIZE": "256", "SIM_MOCK_EPISODE_STEPS": "100000"}
    os.environ.update(env)
    server = ServerProcess("mock", env=env)
    try:
        with sim_client.SimulatorClient(server.address) as sim:
            sim.load_task("reach_center")
            sim.reset()
            action = np.zeros(7)
            sim.step(action)
            reply = sim.call("step", action=action)
            body = sim_server.encode(reply)
            server_step = median_time(lambda: sim.step(action), 300)
    finally:
        server.stop()
    from backends.mock import MockBackend

    backend = MockBackend()
    backend.load_task("reach_center")
    backend.reset()
    in_process = median_time(lambda: backend.step({"action": action}), 300)
    address = "tcp://127.0.0.1:%d" % free_port()
    stop = threading.Event()
    thread = threading.Thread(target=raw_echo_server, args=(address, body, stop), daemon=True)
    thread.start()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(address)
    request = sim_client.encode({"method": "step", "action": action})

    def raw_round_trip():
        dealer.send_multipart([b"", request])
        sim_client.decode(dealer.recv_multipart()[-1])

    raw = median_time(raw_round_trip, 300)
    stop.set()
    dealer.close(linger=0)
    return [
        row(f"mock step round trip ({len(body) // 1024} KiB reply) vs raw ZMQ + decode", server_step, raw,
            goal="<= 1.5x"),
        row("mock step round trip vs raw ZMQ + in-process mock step", server_step, raw + in_process),
    ]


def run_on_threads(function, count: int) -> None:
    """function(0) ... function(count - 1) at once, one thread each; returns when all are done."""
    threads = [threading.Thread(target=function, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def steps_per_second(address: str, clients: int, seconds: float) -> float:
    counts = [0] * clients

    def run(index: int) -> None:
        with sim_client.SimulatorClient(address) as sim:
            sim.load_task("reach_center")
            sim.reset()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                result = sim.step(np.zeros(7))
                counts[index] += 1
                if result["truncated"] or result["terminated"]:
                    sim.reset()

    run_on_threads(run, clients)
    return sum(counts) / seconds


def get_info_latencies(address: str, stop: threading.Event, latencies: list) -> None:
    """An idle third client asking get_info every 10 ms while others step."""
    with sim_client.SimulatorClient(address) as sim:
        while not stop.is_set():
            started = time.perf_counter()
            sim.get_info()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)


def bench_parallel_sessions() -> list:
    env = {"SIM_MOCK_IMAGE_SIZE": "64", "SIM_MOCK_STEP_MS": "100", "SIM_MOCK_EPISODE_STEPS": "1000"}
    server = ServerProcess("mock", env=env)
    rows = []
    try:
        one = steps_per_second(server.address, 1, 5.0)
        for clients in (2, 4):
            stop, latencies = threading.Event(), []
            prober = threading.Thread(target=get_info_latencies, args=(server.address, stop, latencies))
            prober.start()
            many = steps_per_second(server.address, clients, 5.0)
            stop.set()
            prober.join()
            rows.append((f"mock 100 ms steps, {clients} clients vs 1 (steps/s)", f"{many:.1f}/s", f"{one:.1f}/s",
                         f"{many / one:.2f}x", f"cores: {os.cpu_count()}"))
            rows.append((f"  idle client's get_info meanwhile: worst of {len(latencies)}",
                         f"{max(latencies) * 1e3:.1f} ms", "", "", "< 50 ms"))
    finally:
        server.stop()
    return rows


# --- batched policies --------------------------------------------------------

POLICY_CALL_S = 0.1  # one forward pass on one GPU, whatever the batch


def bench_batching() -> list:
    """8 parallel mock sessions and a policy that serves one call at a time: batched vs one by one."""
    env = {"SIM_MOCK_IMAGE_SIZE": "64", "SIM_MOCK_EPISODE_STEPS": "20"}
    server = ServerProcess("mock", env=env)
    gpu = threading.Lock()

    def one_observation(observation, task_info):
        with gpu:
            time.sleep(POLICY_CALL_S)
        return np.zeros(7)

    def many_observations(observations, task_infos):
        with gpu:
            time.sleep(POLICY_CALL_S)
        return [np.zeros(7) for _ in observations]

    def seconds_for(policy) -> float:
        started = time.perf_counter()
        try:
            Evaluation(EvaluationSettings(addresses=[server.address], tasks=["reach_center"], episodes=8,
                                          parallel=8), policy).run()
        finally:
            policy.close()
        return time.perf_counter() - started

    try:
        one_by_one = seconds_for(Policy(one_observation))
        batched = seconds_for(Policy(PolicyBatcher(many_observations, 8, 10.0)))
    finally:
        server.stop()
    return [("8 sessions x 20 steps, 100 ms policy: batched (B=8) vs one call at a time", f"{batched:.2f} s",
             f"{one_by_one:.2f} s", f"{one_by_one / batched:.1f}x faster", ">= 5x")]


# --- LIBERO ------------------------------------------------------------------

def bench_libero() -> list:
    from backends.base import choose_renderer

    choose_renderer()  # sets MUJOCO_GL for the in-process env, as the server does for its workers
    from harness_sim import in_process_env

    suite = "libero_spatial"
    env, task_name, init_states = in_process_env(suite, 0, 256)
    server = ServerProcess("libero", env={"SIM_LIBERO_TASK_SUITE": suite})
    rng = np.random.default_rng(0)
    try:
        with sim_client.SimulatorClient(server.address) as sim:
            sim.load_task(task_name)
            sim.reset()
            env.seed(7)
            env.reset()
            env.set_init_state(init_states[0])
            remote, local = [], []
            for _ in range(30):  # interleaved, so both sides see the same machine load
                action = rng.uniform(-0.2, 0.2, 7)
                started = time.perf_counter()
                sim.step(action)
                remote.append(time.perf_counter() - started)
                started = time.perf_counter()
                env.step(action)
                local.append(time.perf_counter() - started)
            seeds = iter(range(100, 200))
            same_seed = median_time(lambda: sim.reset(seed=7), 5)
            new_seed = median_time(lambda: sim.reset(seed=next(seeds)), 3)
            sim.load_task(task_name, settle_steps=0)  # the same env, kept: only the reset itself is timed
            same_seed_bare = median_time(lambda: sim.reset(seed=7), 5)
            new_seed_bare = median_time(lambda: sim.reset(seed=next(seeds)), 3)
    finally:
        server.stop()
        env.close()
    return [
        row("LIBERO step, remote vs in-process (256x256, 2 cameras)", statistics.median(remote),
            statistics.median(local), goal="<= 1.02x"),
        row("LIBERO reset, same task and seed vs hard reset (incl. 10 settle steps)", same_seed, new_seed,
            goal="<= 0.10x"),
        row("LIBERO reset, same task and seed vs hard reset (settle_steps=0)", same_seed_bare, new_seed_bare,
            goal="<= 0.10x"),
    ]


def libero_steps_per_second(address: str, sessions: int, seconds: float, **load_options) -> float:
    """Total steps/s of `sessions` clients stepping one libero_spatial task with small random actions."""
    task = libero_suite("libero_spatial").get_task_names()[0]
    counts = [0] * sessions
    ready = threading.Barrier(sessions)

    def run(index: int) -> None:
        rng = np.random.default_rng(index)
        with sim_client.SimulatorClient(address, timeout_s=120) as sim:
            sim.load_task(task, **load_options)
            sim.reset()
            sim.step(np.zeros(7))  # the first rendered frame builds the renderer's state
            ready.wait()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                sim.step(rng.uniform(-0.2, 0.2, 7))
                counts[index] += 1

    run_on_threads(run, sessions)
    return sum(counts) / seconds


def bench_libero_cameras() -> list:
    """A session that reads one camera renders one: the step against one that renders both."""
    server = ServerProcess("libero", env={"SIM_LIBERO_TASK_SUITE": "libero_spatial"})
    try:
        both = libero_steps_per_second(server.address, 1, 10.0)
        one = libero_steps_per_second(server.address, 1, 10.0, cameras=["agentview"])
    finally:
        server.stop()
    return [row("LIBERO step, cameras=[agentview] vs both cameras (256x256)", 1 / one, 1 / both, goal="<= 0.6x")]


def bench_render_threads() -> list:
    """Steps/s of 1, 2 and 4 LIBERO sessions: llvmpipe's own thread count (one per core in every
    process) against --render-threads auto (the cores shared by the running simulators) and 1."""
    cores = os.cpu_count() or 1
    rows = []
    for sessions in (1, 2, 4):
        rates = {}
        for threads in (str(cores), "auto", "1"):
            server = ServerProcess("libero", "--render-threads", threads, "--max-sessions", "4",
                                   env={"SIM_LIBERO_TASK_SUITE": "libero_spatial"})
            try:
                rates[threads] = libero_steps_per_second(server.address, sessions, 15.0)
            finally:
                server.stop()
        for threads in ("auto", "1"):
            rows.append((f"LIBERO {sessions} session(s), total steps/s: --render-threads {threads} vs {cores} "
                         "per process", f"{rates[threads]:.2f}/s", f"{rates[str(cores)]:.2f}/s",
                         f"{rates[threads] / rates[str(cores)]:.2f}x", f"cores: {cores}"))
    return rows


def bench_libero_chunks() -> list:
    """A chunk of 5 actions against 5 single steps, per executed action: a chunk renders its last step
    only. Zero actions on libero_spatial, interleaved so both sides see the same machine load."""
    server = ServerProcess("libero", env={"SIM_LIBERO_TASK_SUITE": "libero_spatial"})
    task = libero_suite("libero_spatial").get_task_names()[0]
    singles, chunks = [], []
    try:
        with sim_client.SimulatorClient(server.address, timeout_s=120) as sim:
            sim.load_task(task)
            for _ in range(6):
                sim.reset(init_state_index=0)
                started = time.perf_counter()
                for _ in range(5):
                    sim.step(np.zeros(7))
                singles.append((time.perf_counter() - started) / 5)
                sim.reset(init_state_index=0)
                started = time.perf_counter()
                sim.step(np.zeros((5, 7)))
                chunks.append((time.perf_counter() - started) / 5)
    finally:
        server.stop()
    return [row("LIBERO chunk of 5 vs 5 single steps, per action (256x256, 2 cameras)", statistics.median(chunks),
                statistics.median(singles), goal="<= 0.35x")]


def libero_episodes_per_hour(chunk: int, videos: bool = False, **load_options) -> float:
    """Episodes per hour of a zero policy on libero_spatial under the openpi convention, as many sessions
    as cores, two episodes each, loading included: every episode runs the 220-step horizon."""
    import tempfile

    cores = os.cpu_count() or 1
    server = ServerProcess("libero", env={"SIM_LIBERO_TASK_SUITE": "libero_spatial"})
    tasks = [f"libero_spatial/{task}" for task in libero_suite("libero_spatial").get_task_names()[:cores]]
    action = np.zeros((chunk, 7)) if chunk > 1 else np.zeros(7)
    try:
        with tempfile.TemporaryDirectory() as folder:
            settings = EvaluationSettings(addresses=[server.address], tasks=tasks, episodes=2, parallel=cores,
                                          load_options={"convention": "openpi", **load_options},
                                          videos=VideoWriter(folder, "agentview_image") if videos else None)
            started = time.perf_counter()
            results = Evaluation(settings, Policy(lambda observation, task_info: action)).run()
            elapsed = time.perf_counter() - started
    finally:
        server.stop()
    assert all(record.steps == 220 for record in results), "every episode runs its whole horizon"
    return len(results) * 3600 / elapsed


def bench_libero_episodes_per_hour() -> list:
    """LIBERO episodes per hour as openpi's loop runs them (chunks of 5, `--replan-steps 5`) against
    single steps, side by side; with videos on, and with one camera."""
    cores = os.cpu_count() or 1
    single = libero_episodes_per_hour(1)
    rows = []
    for label, rate in (("chunks of 5", libero_episodes_per_hour(5)),
                        ("chunks of 5, --videos on", libero_episodes_per_hour(5, videos=True)),
                        ("chunks of 5, cameras=[agentview]", libero_episodes_per_hour(5, cameras=["agentview"]))):
        rows.append((f"LIBERO episodes/hour, openpi convention, {label} vs single steps ({cores} sessions)",
                     f"{rate:.0f}/h", f"{single:.0f}/h", f"{rate / single:.2f}x", ">= 3x"))
    return rows


def bench_libero_replay() -> list:
    """A replay from recorded actions (no policy, nothing rendered until the last step) against the
    episode that recorded them, each timed from its reset to its last step (loading apart): a 60-step libero_spatial
    episode, 256x256, openpi convention, random actions, sent one at a time and in chunks of 5.
    Interleaved, median of 2."""
    import tempfile

    from evaluation.replay import RecordedRun, Replayer

    server = ServerProcess("libero", env={"SIM_LIBERO_TASK_SUITE": "libero_spatial"})
    task = f"libero_spatial/{libero_suite('libero_spatial').get_task_names()[0]}"
    rng = np.random.default_rng(0)
    timings = {1: ([], []), 5: ([], [])}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for repeat in range(2):
                for chunk, (originals, replays) in timings.items():
                    results = os.path.join(folder, f"chunk{chunk}_{repeat}.json")
                    shape = (chunk, 7) if chunk > 1 else (7,)
                    policy = Policy(lambda observation, task_info, shape=shape:
                                    rng.uniform(-0.5, 0.5, shape).astype(np.float32))
                    settings = EvaluationSettings(addresses=[server.address], tasks=[task], episodes=1,
                                                  results_path=results, load_options={
                                                      "convention": "openpi", "max_episode_steps": 60})
                    record, = Evaluation(settings, policy).run()
                    originals.append(record.seconds)  # reset and steps, as the replay's
                    outcome, = Replayer(RecordedRun(results), [server.address], 1, {}, 120).replay([0], show=False)
                    assert outcome.status == "verified", outcome.line()
                    replays.append(outcome.seconds)
    finally:
        server.stop()
    return [row(f"LIBERO replay without video vs its original episode ({label}; 60 steps, 256x256, 2 cameras)",
                statistics.median(replays), statistics.median(originals), goal=goal)
            for label, (originals, replays), goal in (("single steps", timings[1], "<= 0.2x"),
                                                      ("chunks of 5", timings[5], ""))]


# --- simulators in their own environments ------------------------------------

# The same backend stepped in its own interpreter, with no server: the in-process side of a ratio.
STEP_TIMER = """
import json, sys, time
import numpy as np
from backends import get_backend
backend_class = get_backend(sys.argv[1])
backend_class.prepare_server()  # as the server does before its simulator processes start (renderer, ...)
backend = backend_class()
backend.load_task(sys.argv[2], **json.loads(sys.argv[3]))
backend.reset()
action = {"action": np.zeros(int(sys.argv[4]))}
for line in sys.stdin:
    steps, started = int(line), time.perf_counter()
    for _ in range(steps):
        if any(backend.step(action)[2:4]):
            backend.reset()
    print((time.perf_counter() - started) / steps, flush=True)
"""


def remote_vs_in_process(simulator: str, task: str, action_dim: int, load_options: dict, chunk: int = 1,
                         blocks: int = 6, steps: int = 40) -> tuple:
    """(remote, in-process) seconds per executed action, medians over interleaved blocks of `steps`."""
    import json

    from backends.base import choose_renderer
    from harness_sim import simulator_python

    choose_renderer()  # MUJOCO_GL for the in-process side, as the server sets it for its processes
    server = ServerProcess(simulator)
    timer = subprocess.Popen([simulator_python(simulator), "-c", STEP_TIMER, simulator, task, json.dumps(load_options),
                              str(action_dim)], cwd=os.path.dirname(os.path.abspath(__file__)), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    remote, local = [], []
    action = np.zeros((chunk, action_dim)) if chunk > 1 else np.zeros(action_dim)
    try:
        with sim_client.SimulatorClient(server.address, timeout_s=120) as sim:
            sim.load_task(task, **load_options)
            sim.reset()
            for _ in range(blocks):
                started = time.perf_counter()
                for _ in range(steps // chunk):
                    result = sim.step(action)
                    if result["terminated"] or result["truncated"]:
                        sim.reset()
                remote.append((time.perf_counter() - started) / steps)
                timer.stdin.write(f"{steps}\n")
                timer.stdin.flush()
                local.append(float(timer.stdout.readline()))
    finally:
        timer.kill()
        server.stop()
    return statistics.median(remote), statistics.median(local)


def episodes_per_hour(simulator: str, task: str, action_dim: int, load_options: dict, episodes: int = 2) -> tuple:
    """(episodes per hour, steps per episode) of a zero policy over as many sessions as cores, loading included."""
    cores = os.cpu_count() or 1
    server = ServerProcess(simulator)
    try:
        settings = EvaluationSettings(addresses=[server.address], tasks=[task], episodes=episodes * cores,
                                      parallel=cores, load_options=load_options)
        started = time.perf_counter()
        results = Evaluation(settings, Policy(lambda observation, task_info: np.zeros(action_dim))).run()
        elapsed = time.perf_counter() - started
    finally:
        server.stop()
    return len(results) * 3600 / elapsed, results[0].steps


def bench_metaworld() -> list:
    """Meta-World's step through the server against the same backend in its own Python: state only
    (1-2 ms of physics, where the server's round trip shows), a chunk of 10, and with its camera."""
    rows = []
    for label, options, chunk in (("state only", {"cameras": []}, 1), ("state only, chunks of 10", {"cameras": []}, 10),
                                  ("corner2 256x256", {}, 1)):
        remote, local = remote_vs_in_process("metaworld", "metaworld/reach-v3", 4, options, chunk)
        rows.append(row(f"Meta-World step, remote vs in-process ({label})", remote, local, goal="<= 1.05x"))
    rate, steps = episodes_per_hour("metaworld", "metaworld/reach-v3", 4, {})
    rows.append((f"Meta-World episodes/hour, zero policy, reach-v3, corner2 256x256 ({steps} steps)",
                 f"{rate:.0f}/h", "", "", f"cores: {os.cpu_count()}"))
    return rows


def bench_kitchen() -> list:
    """Franka Kitchen's step through the server against the same backend in its own Python."""
    rows = []
    for label, options in (("state only", {}), ("image 128x128", {"render": True})):
        remote, local = remote_vs_in_process("kitchen", "kitchen/complete", 9, options)
        rows.append(row(f"Franka Kitchen step, remote vs in-process ({label})", remote, local, goal="<= 1.05x"))
    rate, steps = episodes_per_hour("kitchen", "kitchen/complete", 9, {"render": True})
    rows.append((f"Franka Kitchen episodes/hour, zero policy, kitchen/complete, image 128x128 ({steps} steps)",
                 f"{rate:.0f}/h", "", "", f"cores: {os.cpu_count()}"))
    return rows


def bench_maniskill() -> list:
    """ManiSkill3's step through the server against the same backend in its own Python (lavapipe renders)."""
    rows = []
    for label, options in (("state only", {"cameras": False}), ("camera 128x128", {})):
        remote, local = remote_vs_in_process("maniskill", "maniskill/PickCube-v1", 7, options)
        rows.append(row(f"ManiSkill3 step, remote vs in-process ({label})", remote, local, goal="<= 1.05x"))
    rate, steps = episodes_per_hour("maniskill", "maniskill/PickCube-v1", 7, {})
    rows.append((f"ManiSkill3 episodes/hour, zero policy, PickCube-v1, camera 128x128 ({steps} steps)",
                 f"{rate:.0f}/h", "", "", f"cores: {os.cpu_count()}"))
    return rows


def bench_liberoplus() -> list:
    """A LIBERO-plus step (a camera-viewpoint task, LIBERO's two cameras at 256x256) through the
    server against the same backend in its own Python, single steps and a chunk of 10."""
    task = ("libero_plus/camera/pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
            "_view_11_15_100_0_0_initstate_0")
    rows = []
    for label, chunk in (("single steps", 1), ("chunks of 10", 10)):
        remote, local = remote_vs_in_process("liberoplus", task, 7, {}, chunk, blocks=4, steps=20)
        rows.append(row(f"LIBERO-plus step, remote vs in-process ({label})", remote, local, goal="<= 1.05x"))
    return rows


def page_viewer(url: str, stop: threading.Event) -> None:
    """What an open dashboard page asks for: status and thumbnails, once a second."""
    import urllib.request

    while not stop.wait(1.0):
        for route in ("api/status", "api/thumbnails"):
            with urllib.request.urlopen(url + route, timeout=10) as response:
                response.read()


def dashboard_overhead(simulator: str, task: str, action, env: dict, rounds: int, block_s: float) -> tuple:
    """Median step round trip on a server whose dashboard a page is viewing, against a server
    without a dashboard: blocks alternate between the two, so both see the same machine load."""
    port = free_port()
    plain = ServerProcess(simulator, env=env)
    watched = ServerProcess(simulator, "--dashboard", str(port), env=env)
    samples: dict = {"plain": [], "watched": []}
    try:
        with sim_client.SimulatorClient(plain.address, timeout_s=120) as a, \
                sim_client.SimulatorClient(watched.address, timeout_s=120) as b:
            for sim in (a, b):
                sim.load_task(task)
                sim.reset()
            for _ in range(rounds):
                for label, sim in (("plain", a), ("watched", b)):
                    stop = threading.Event()
                    viewer = threading.Thread(target=page_viewer, args=(f"http://127.0.0.1:{port}/", stop))
                    if label == "watched":
                        viewer.start()
                    deadline = time.monotonic() + block_s
                    while time.monotonic() < deadline:
                        started = time.perf_counter()
                        sim.step(action)
                        samples[label].append(time.perf_counter() - started)
                    stop.set()
                    if viewer.is_alive():
                        viewer.join()
    finally:
        plain.stop()
        watched.stop()
    return statistics.median(samples["watched"]), statistics.median(samples["plain"])


def bench_dashboard() -> list:
    env = {"SIM_MOCK_IMAGE_SIZE": "256", "SIM_MOCK_EPISODE_STEPS": "1000000"}
    watched, plain = dashboard_overhead("mock", "reach_center", np.zeros(7), env, rounds=6, block_s=2.0)
    return [row("mock step round trip, dashboard page open vs no dashboard", watched, plain, goal="<= 1.10x")]


def bench_libero_dashboard() -> list:
    env = {"SIM_LIBERO_TASK_SUITE": "libero_spatial", "SIM_LIBERO_MAX_EPISODE_STEPS": "100000"}
    task = libero_suite("libero_spatial").get_task_names()[0]
    watched, plain = dashboard_overhead("libero", task, np.zeros(7), env, rounds=4, block_s=4.0)
    return [row("LIBERO step round trip, dashboard page open vs no dashboard", watched, plain, goal="<= 1.02x")]


TRANSPORT = ("codec", "round_trip", "dashboard", "parallel_sessions", "batching")
LIBERO = ("libero", "libero_dashboard", "libero_cameras", "render_threads", "libero_chunks", "libero_episodes_per_hour",
          "libero_replay")
# made by .ci/setup --simulator NAME when missing
OWN_ENVIRONMENTS = ("metaworld", "kitchen", "maniskill", "liberoplus")


def main() -> int:
    parser = sim_client.OneLineParser(prog="bench_sim.py", description=__doc__.splitlines()[0])
    parser.add_argument("--no-libero", action="store_true", help="skip the LIBERO figures")
    parser.add_argument("--only", default=None, metavar="NAME,...",
                        help=f"only these groups of rows: {', '.join(TRANSPORT + LIBERO + OWN_ENVIRONMENTS)}")
    args = parser.parse_args()
    names = TRANSPORT if args.no_libero else TRANSPORT + LIBERO + OWN_ENVIRONMENTS
    if args.only:
        names = tuple(name.strip() for name in args.only.split(","))
        unknown = sorted(set(names) - set(TRANSPORT + LIBERO + OWN_ENVIRONMENTS))
        if unknown:
            parser.error(f"--only {', '.join(unknown)}: no such rows")
    rows = [line for name in names for line in globals()[f"bench_{name}"]()]
    header = ("measure", "ours", "baseline", "ratio", "goal")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"{subprocess.run(['uname', '-m'], capture_output=True, text=True).stdout.strip()}")
    for line in [header, tuple("-" * w for w in widths)] + rows:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
