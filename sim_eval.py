"""Evaluate a policy on simulator servers: whole suites, parallel sessions, openpi policy servers.

    python sim_eval.py --address tcp://sim-a:5555 --address tcp://sim-b:5555 --suite libero_spatial \\
        --episodes 50 --parallel 8 --policy my_policy:act --results spatial.json --videos videos/
    python sim_eval.py --address tcp://sim:5555 --suite libero_spatial --policy openpi://gpu-box:8000
    python sim_eval.py ... --policy my_policy:act_batch --batch-size 8     # one forward pass for 8 sessions
    python sim_eval.py compare old.json new.json     # the same episodes under two policies, pair by pair
    python sim_eval.py verify spatial.json --parallel 4   # every episode replayed from its actions, no policy
    python sim_eval.py replay spatial.json --episodes 3 --videos videos/   # a video after the fact

A policy is `module:function`, called `function(observation, task_info)` and returning an action
or an [K, A] chunk; with --batch-size B it is called with lists, `function(observations,
task_infos)`, and returns a list. A `reset(task_info)` function beside it (or a `.reset()` method
on a policy object) runs before every episode. `openpi://HOST:PORT` drives a policy served by
openpi's WebsocketPolicyServer, exactly as openpi's examples/libero/main.py does.

This file is the command line; the runner is the evaluation/ package beside it (docs/evaluation.md).
Copy both next to sim_client.py; websockets and Pillow only for openpi://, Ray only for --ray.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from evaluation import SetupError
from evaluation.compare import compare_runs, comparison_json, load_run, print_comparison
from evaluation.policies import DEFAULT_BATCH_WAIT_MS, DEFAULT_POLICY_TIMEOUT_S, Policy, load_policy
from evaluation.preflight import PolicyInputs, check_policy
from evaluation.realtime import Latency, check_latencies, parse_latencies, parse_model
from evaluation.records import lerobot_eval_info
from evaluation.replay import (
    ForkResults,
    RecordedRun,
    Replayer,
    fork_episode,
    print_verification,
    sampled,
    verification_json,
)
from evaluation.report import print_table, save_chart, summarize_run, write_report
from evaluation.robustness import print_robustness_table, robustness_rows
from evaluation.runner import (
    PREFLIGHT_TIMEOUT_S,
    Evaluation,
    EvaluationSettings,
    check_servers,
    resolve_tasks,
)
from evaluation.sweep import latency_rows, print_latency_table
from evaluation.videos import VideoWriter
from sim_client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, OneLineParser, SimulatorClient, SimulatorClientError

LOCAL_RAY = "local"  # --ray without an address


def parser(prog: str = "sim_eval.py") -> argparse.ArgumentParser:
    """The flags of sim_eval.py (and of `sim_eval.py check`, which takes the same)."""
    parser = OneLineParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Evaluate a policy on simulator servers. Say what to evaluate (--suite or "
                                       "--tasks) and with which policy (--policy): nothing is guessed. The policy is "
                                       "checked on the first task before the first episode.",
                           epilog="sim_eval.py check takes the same flags and does only the policy check; "
                                  "sim_eval.py compare A.json B.json compares two runs pair by pair; "
                                  "sim_eval.py verify RESULTS.json replays a run from its recorded actions; "
                                  "sim_eval.py replay RESULTS.json replays, films or forks episodes (each has --help). "
                                  "A run without --suite or --tasks lists the server's suites with their sizes.")
    add_server_flags(parser, "simulator to select on a server that serves several (see list_simulators)")
    parser.add_argument("--policy", default=None,
                        help="required: zero, random, module:function(observation, task_info), or openpi://HOST:PORT")
    parser.add_argument("--suite", default=None, help="evaluate this suite's tasks (LIBERO: libero_spatial, ...)")
    parser.add_argument("--tasks", nargs="*", default=None,
                        help="task names as list_tasks gives them (e.g. metaworld/reach-v3)")
    parser.add_argument("--convention", default=None,
                        help="the simulator's observation convention the policy gets (LIBERO: standard, openpi, "
                             "lerobot, raw); default: the policy module's CONVENTION, openpi:// gets openpi's, "
                             "else the simulator's own")
    parser.add_argument("--clip-actions", action="store_true",
                        help="clip every action into the action spec's bounds, as openpi and LeRobot do")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task (init states 0..N-1)")
    parser.add_argument("--parallel", type=int, default=1, help="episodes at once, one session each")
    parser.add_argument("--results", default="eval_results.json", help="JSON results; rerunning resumes it")
    parser.add_argument("--videos", default=None, help="folder for one video per episode (MP4 with imageio-ffmpeg)")
    parser.add_argument("--video-camera", default=None, help="observation key the videos show (default: first image)")
    parser.add_argument("--videos-failed-only", action="store_true", help="keep videos of failed episodes only")
    parser.add_argument("--chart", default=None, help="PNG bar chart of success rates with 95%% intervals")
    parser.add_argument("--report", default=None, help="self-contained HTML report of the run")
    parser.add_argument("--compare-with", default=None, metavar="OTHER.json",
                        help="add a pair-by-pair comparison with this earlier run to the report (needs --report)")
    parser.add_argument("--lerobot-json", default=None, help="also write LeRobot's eval_info.json shape here")
    parser.add_argument("--force", action="store_true", help="resume a results file made with other settings")
    parser.add_argument("--no-actions", action="store_true",
                        help="do not keep each episode's actions beside the results (RESULTS.actions/): "
                             "the run then cannot be replayed or verified")
    parser.add_argument("--load-option", action="append", default=[], metavar="KEY=VALUE",
                        help="load_task option, e.g. camera_width=224 or flip_images=true (JSON, else a string)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="call the policy with lists of up to this many sessions' observations")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                        help="how long a batch waits for stragglers")
    parser.add_argument("--replan-steps", type=int, default=None, metavar="S",
                        help="actions of each returned chunk that run before the policy is asked again "
                             "(default: 5 for openpi://, else the whole chunk)")
    realtime = parser.add_argument_group("real time: the world moves on while the policy thinks (docs/evaluation.md)")
    realtime.add_argument("--latency", default=None, metavar="D[,D...]|measured",
                          help="control steps each policy call takes (0 <= D <= --replan-steps); a list sweeps, "
                               "every episode at each; 'measured' uses each call's own time at the task's control_hz")
    realtime.add_argument("--latency-model", default=None, metavar="fixed:MS|lognormal:MEAN_MS,SIGMA",
                          help="draw each call's latency from this seeded model (milliseconds, at control_hz)")
    realtime.add_argument("--send-prefix", action="store_true",
                          help="openpi://: send the actions that run during the call's delay as prefix_actions "
                               "(a module policy that takes prefix= always gets them)")
    robustness = parser.add_argument_group("robustness: perturbed episodes against their unperturbed twins "
                                           "(LIBERO-plus; docs/evaluation.md)")
    robustness.add_argument("--paired-baseline", action="store_true",
                            help="also run each perturbed episode's base task from its base init state (same seed, "
                                 "same policy) and report the paired drop per perturbation")
    robustness.add_argument("--baseline-results", default=None, metavar="FILE",
                            help="take the unperturbed twins from this earlier run instead of running them")
    parser.add_argument("--policy-timeout", type=float, default=DEFAULT_POLICY_TIMEOUT_S,
                        help="seconds an episode waits for the policy's action (or its reset) before it fails "
                             "as policy_timeout")
    ray_flags = parser.add_argument_group("servers started by Ray (pip install -r requirements-ray.txt)")
    ray_flags.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                           help="start the servers as Ray actors on this cluster (auto, HOST:PORT of the head, "
                                "or nothing: a local Ray on loopback); replaces --address")
    ray_flags.add_argument("--servers", type=int, default=1, help="simulator servers to start")
    ray_flags.add_argument("--server-cpus", type=float, default=1.0, help="Ray CPUs each server takes")
    ray_flags.add_argument("--server-gpus", type=float, default=0.0,
                           help="Ray GPUs each server takes (its EGL device is the one Ray gives it)")
    ray_flags.add_argument("--server-args", default="", help='sim_server.py flags, e.g. "--simulator libero"')
    ray_flags.add_argument("--server-restarts", type=int, default=5, help="times Ray restarts a dead server")
    ray_flags.add_argument("--serve-only", action="store_true",
                           help="start the servers, print their addresses and keep them up until interrupted")
    ray_flags.add_argument("--addresses-file", default=None, help="write the servers' addresses here, one a line")
    return parser


def compare_parser() -> argparse.ArgumentParser:
    """The flags of `sim_eval.py compare`."""
    parser = OneLineParser(prog="sim_eval.py compare",
                           description="Compare two results files episode by episode (pairs: task, init state, "
                                       "seed): both success rates, B - A with a 95% interval for paired "
                                       "proportions, McNemar's exact p-value.")
    parser.add_argument("results_a", metavar="A.json", help="the first run's results file")
    parser.add_argument("results_b", metavar="B.json", help="the second run's results file")
    parser.add_argument("--force", action="store_true",
                        help="compare runs whose score-deciding settings differ (stack, convention, horizon, ...)")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    return parser


def compare(argv: List[str]) -> int:
    """sim_eval.py compare: print the paired comparison of two results files."""
    args = compare_parser().parse_args(argv)
    comparison = compare_runs(args.results_a, args.results_b, args.force)
    if args.json:
        print(json.dumps(comparison_json(comparison), indent=1))
    else:
        print_comparison(comparison)
    return 0


def add_server_flags(parser: argparse.ArgumentParser, simulator_help: str) -> None:
    """Where the servers are and how to reach them (a run's, a replay's and a verification's)."""
    parser.add_argument("--address", action="append", help="server address; repeat to spread over servers")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per simulator call")
    parser.add_argument("--simulator", default=None, help=simulator_help)
    parser.add_argument("--server-key", default=None, help="server's CURVE public key file (server.key)")
    parser.add_argument("--client-key", default=None, help="this client's CURVE secret key file (client.key_secret)")


REPLAY_SIMULATOR_HELP = "simulator to select (default: the one the run used, as its results file says)"


def replay_parser() -> argparse.ArgumentParser:
    """The flags of `sim_eval.py replay`."""
    parser = OneLineParser(prog="sim_eval.py replay",
                           description="Re-run recorded episodes from their actions, with no policy, and check "
                                       "them against the record; videos after the fact; fork an episode at a step.")
    parser.add_argument("results", metavar="RESULTS.json", help="a results file with its RESULTS.actions/ folder")
    parser.add_argument("--episodes", default=None, metavar="I,J",
                        help="positions in the results file (default: all)")
    parser.add_argument("--videos", default=None, help="folder for one video per replayed episode")
    parser.add_argument("--video-camera", default=None, help="observation key the videos show (default: first image)")
    parser.add_argument("--until-step", type=int, default=None, metavar="K",
                        help="fork: replay the first K actions, then let --policy act")
    parser.add_argument("--policy", default=None, help="fork: the policy that takes over at --until-step")
    parser.add_argument("--fork-results", default=None, help="results file of the forks (default RESULTS.forks.json)")
    parser.add_argument("--replan-steps", type=int, default=None, metavar="S",
                        help="actions of each returned chunk that run before the policy is asked again "
                             "(default: 5 for openpi://, else the whole chunk)")
    parser.add_argument("--policy-timeout", type=float, default=DEFAULT_POLICY_TIMEOUT_S,
                        help="seconds to wait for an openpi:// policy's action")
    add_server_flags(parser, REPLAY_SIMULATOR_HELP)
    return parser


def verify_parser() -> argparse.ArgumentParser:
    """The flags of `sim_eval.py verify`."""
    parser = OneLineParser(prog="sim_eval.py verify",
                           description="Replay every episode of a run (or a seeded sample) and say, per task, "
                                       "which verified; exit 0 only when all did.")
    parser.add_argument("results", metavar="RESULTS.json", help="a results file with its RESULTS.actions/ folder")
    parser.add_argument("--parallel", type=int, default=1, help="episodes at once, one session each")
    parser.add_argument("--sample", type=int, default=None, metavar="N", help="verify N episodes drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="the seed that draws --sample")
    parser.add_argument("--output", default=None,
                        help="where the verification JSON goes (default RESULTS.verified.json)")
    add_server_flags(parser, REPLAY_SIMULATOR_HELP)
    return parser


def client_options_of(args: argparse.Namespace) -> Dict[str, Optional[str]]:
    return {"server_key": args.server_key, "client_key": args.client_key, "simulator": args.simulator}


def replay(argv: List[str]) -> int:
    """sim_eval.py replay: each episode checked against its record (or forked); 0 when all equal."""
    args = replay_parser().parse_args(argv)
    if (args.until_step is None) != (args.policy is None):
        raise SetupError("a fork needs both --until-step K and --policy P")
    run_record = RecordedRun(args.results)
    indices = run_record.indices(args.episodes)
    addresses = args.address or [DEFAULT_ADDRESS]
    check_servers(addresses, client_options_of(args), min(PREFLIGHT_TIMEOUT_S, args.timeout))
    videos = VideoWriter(args.videos, args.video_camera) if args.videos else None
    replayer = Replayer(run_record, addresses, 1, client_options_of(args), args.timeout, videos)
    if args.policy is not None:
        return fork(args, replayer, indices)
    outcomes = replayer.replay(indices)
    return 0 if all(outcome.status == "verified" for outcome in outcomes) else 1


def fork(args: argparse.Namespace, replayer: Replayer, indices: List[int]) -> int:
    """replay --until-step K --policy P: each episode's first K actions, then P; kept as new episodes."""
    policy = load_policy(args.policy, 1, DEFAULT_BATCH_WAIT_MS, args.policy_timeout, args.replan_steps)
    run_record = replayer.run
    forks = ForkResults(args.fork_results or os.path.splitext(args.results)[0] + ".forks.json", run_record, policy)
    try:
        with replayer.open(replayer.addresses[0]) as sim:
            for index in indices:
                task_info = replayer.load(sim, run_record.episodes[index].task)
                record = forks.add(fork_episode(sim, task_info, run_record, index, args.until_step, policy), index,
                                   args.until_step, replayer)
                print(f"#{index} {record.task} init {record.init_state_index}: forked at step {args.until_step} to "
                      f"{policy.name}: success {record.success} after {record.steps} steps "
                      f"(recorded: {run_record.episodes[index].success})")
    finally:
        policy.close()
    print(f"forks written to {forks.file.path}")
    return 0


def verify(argv: List[str]) -> int:
    """sim_eval.py verify: replay a run (or a sample), print per task, write the JSON; 0 when all verified."""
    args = verify_parser().parse_args(argv)
    if args.parallel < 1:
        raise SetupError("--parallel must be at least 1")
    run_record = RecordedRun(args.results)
    indices = sampled(run_record.indices(None), args.sample, args.seed)
    addresses = args.address or [DEFAULT_ADDRESS]
    check_servers(addresses, client_options_of(args), min(PREFLIGHT_TIMEOUT_S, args.timeout))
    replayer = Replayer(run_record, addresses, args.parallel, client_options_of(args), args.timeout)
    outcomes = replayer.replay(indices, show=False)
    for outcome in outcomes:
        if outcome.status != "verified":
            print(outcome.line())
    sample = {"n": len(indices), "of": len(run_record.episodes), "seed": args.seed} if args.sample else None
    report = verification_json(replayer, outcomes, sample)
    print_verification(report)
    output = args.output or os.path.splitext(args.results)[0] + ".verified.json"
    with open(output, "w") as output_file:
        json.dump(report, output_file, indent=1)
    print(f"verification written to {output}")
    return 0 if report["all_verified"] else 1


SUBCOMMANDS = {"compare": compare, "replay": replay, "verify": verify}


def parse_load_options(options: List[str]) -> Dict[str, Any]:
    """KEY=VALUE pairs: VALUE as JSON (224, true, ["agentview"]) where it is JSON, else as a string."""
    parsed = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or not key:
            raise SetupError(f"--load-option {option!r}: write KEY=VALUE")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def chosen_convention(args: argparse.Namespace, load_options: Dict[str, Any], policy: Policy) -> Optional[str]:
    """--convention, else --load-option convention=..., else the policy's own; SetupError when the two
    flags disagree."""
    from_option = load_options.get("convention")
    if args.convention and from_option is not None and from_option != args.convention:
        raise SetupError(f"--convention {args.convention} and --load-option convention={from_option} disagree")
    return args.convention or from_option or policy.convention


def check_outputs_can_be_made(args: argparse.Namespace) -> None:
    """Videos and a chart need packages the core does not: say so before the first episode."""
    needs = {"--videos": ("imageio", "imageio imageio-ffmpeg"), "--chart": ("matplotlib", "matplotlib")}
    for flag, (module, packages) in needs.items():
        if getattr(args, flag[2:]) and importlib.util.find_spec(module) is None:
            raise SetupError(f"{flag} needs {module}: pip install {packages} (or pip install "
                             "'simulator-inference-center[eval]')")


def run_with_ray(args: argparse.Namespace, check_only: bool = False) -> int:
    """--ray: start the servers as Ray actors, run (or only serve) on them, then stop them all."""
    if args.servers < 1 or args.server_cpus <= 0 or args.server_gpus < 0 or args.server_restarts < 0:
        raise SetupError("--servers must be at least 1, --server-cpus above 0, --server-gpus and "
                             "--server-restarts at least 0")
    if args.ray == LOCAL_RAY or args.ray.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        # Ray's single-machine switch, read when Ray is imported: without it Ray swaps 127.0.0.1 for
        # this machine's network address, where a loopback head does not listen.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from evaluation import ray_fleet
    except ImportError:
        raise SetupError("--ray needs Ray: pip install -r requirements-ray.txt") from None
    fleet, started_ray = None, False
    try:
        started_ray = ray_fleet.connect(None if args.ray == LOCAL_RAY else args.ray)
        fleet = ray_fleet.ServerFleet(args.servers, args.server_cpus, args.server_gpus, args.server_args,
                                    args.server_restarts)
        write_addresses(args.addresses_file, fleet.addresses)
        if args.serve_only:
            return serve_until_interrupted(fleet, args.addresses_file)
        return run(args, address_source=lambda: fleet.addresses, check_only=check_only)
    except ray_fleet.FleetError as error:
        raise SetupError(str(error)) from None
    finally:
        if fleet is not None:
            print(f"stopping {args.servers} server(s); Ray restarted {fleet.restarts}", file=sys.stderr)
            fleet.stop()
        if started_ray:
            ray_fleet.ray.shutdown()


def write_addresses(path: Optional[str], addresses: List[str]) -> None:
    if path:
        with open(path, "w") as addresses_file:
            addresses_file.write("".join(f"{address}\n" for address in addresses))


def serve_until_interrupted(fleet, addresses_file: Optional[str]) -> int:
    """Print the addresses (again whenever Ray restarts a server) until Ctrl-C or SIGTERM. The signals
    only set a flag: whatever Ray does with them, the fleet is then stopped the usual way."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    shown: List[str] = []
    while not stop.is_set():
        if fleet.addresses != shown:
            shown = fleet.addresses
            write_addresses(addresses_file, shown)
            print("serving: " + " ".join(shown), flush=True)
        stop.wait(1.0)
    return 0


def run(args: argparse.Namespace, address_source: Optional[Callable[[], List[str]]] = None,
        check_only: bool = False) -> int:
    """Check the set-up and the policy, run, print the table, save what was asked; 0 when every episode
    ran. `address_source` (--ray) gives the servers' addresses as they change; else --address does.
    With `check_only` (sim_eval.py check) it stops after the policy check."""
    client_options = {"server_key": args.server_key, "client_key": args.client_key, "simulator": args.simulator}
    addresses = address_source() if address_source is not None else args.address or [DEFAULT_ADDRESS]
    if args.policy is None:
        raise SetupError("say which policy to evaluate: --policy zero, random, module:function or openpi://HOST:PORT")
    load_options = parse_load_options(args.load_option)
    if args.batch_size < 1 or args.parallel < 1 or args.episodes < 1 or args.policy_timeout <= 0:
        raise SetupError("--batch-size, --parallel and --episodes must be at least 1, --policy-timeout above 0")
    if args.compare_with and not args.report:
        raise SetupError("--compare-with adds a section to the report: give --report too")
    if args.compare_with:
        load_run(args.compare_with)
    baseline = baseline_run(args)
    check_outputs_can_be_made(args)
    policy = load_policy(args.policy, args.batch_size, args.batch_wait_ms, args.policy_timeout, args.replan_steps,
                         args.send_prefix)
    try:
        args.latencies = chosen_latencies(args, policy)
        policy.convention = chosen_convention(args, load_options, policy)
        policy.clip_actions = args.clip_actions
        load_options = {**load_options, **policy.load_options}
        check_servers(addresses, client_options, min(PREFLIGHT_TIMEOUT_S, args.timeout))
        tasks = resolve_tasks(addresses[0], args.tasks, args.suite, client_options)
        inputs = checked_policy(addresses[0], tasks[0], policy, load_options, client_options, args)
        if check_only:
            print(f"the policy fits {tasks[0]}: one reset, one policy call and one step passed")
            return 0
        return evaluate(args, policy, tasks, load_options, inputs, address_source, baseline)
    finally:
        policy.close()


def baseline_run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """--baseline-results as compare.load_run reads it; None without it."""
    if args.paired_baseline and args.baseline_results:
        raise SetupError("give --paired-baseline (run the twins) or --baseline-results FILE (take them), not both")
    return load_run(args.baseline_results) if args.baseline_results else None


def chosen_latencies(args: argparse.Namespace, policy: Policy) -> List[Optional[Latency]]:
    """--latency or --latency-model as the Latency of each arm ([None]: not a real-time run)."""
    if args.latency is not None and args.latency_model is not None:
        raise SetupError("give --latency or --latency-model, not both")
    if args.latency is None and args.latency_model is None:
        return [None]
    latencies = parse_latencies(args.latency) if args.latency is not None else [parse_model(args.latency_model)]
    check_latencies(latencies, policy.replan_steps)
    if len(latencies) > 1 and getattr(args, "lerobot_json", None):
        raise SetupError("--lerobot-json holds one condition and a latency sweep has several: run one --latency "
                         "at a time for it")
    return latencies


def checked_policy(address: str, task: str, policy: Policy, load_options: Dict[str, Any],
                   client_options: Dict[str, Optional[str]], args: argparse.Namespace) -> PolicyInputs:
    """The policy check on the first task (preflight.py), its line printed, its warnings said."""
    with SimulatorClient(address, timeout_s=args.timeout, **client_options) as sim:
        info = sim.get_info()
        inputs = check_policy(sim, info.get("simulator") or info["backend_name"], task, policy, load_options,
                              args.clip_actions)
        declared = sim.task_info.get("base_task") and sim.task_info.get("base_init_states")
        if (args.paired_baseline or args.baseline_results) and not declared:
            raise SetupError(f"{task} names no unperturbed base task and init states, so it has no twin to pair with: "
                             "--paired-baseline and --baseline-results take perturbed tasks (LIBERO-plus's "
                             "libero_plus/<dimension> suites)")
    print(inputs.line(), flush=True)
    for warning in inputs.warnings:
        print(f"sim_eval: warning: {warning}", file=sys.stderr)
    return inputs


def evaluate(args: argparse.Namespace, policy: Policy, tasks: List[str], load_options: Dict[str, Any],
             inputs: PolicyInputs, address_source: Optional[Callable[[], List[str]]],
             baseline: Optional[Dict[str, Any]] = None) -> int:
    """The run itself, once the policy check passed."""
    client_options = {"server_key": args.server_key, "client_key": args.client_key, "simulator": args.simulator}
    addresses = address_source() if address_source is not None else args.address or [DEFAULT_ADDRESS]
    videos = VideoWriter(args.videos, args.video_camera, args.videos_failed_only) if args.videos else None
    settings = EvaluationSettings(
        addresses=addresses, tasks=tasks, episodes=args.episodes, parallel=args.parallel, results_path=args.results,
        load_options=load_options, timeout_s=args.timeout, videos=videos, keep_thumbnails=bool(args.report),
        force=args.force, client_options=client_options, record_actions=not args.no_actions,
        policy_inputs=inputs.as_json(), policy_timeout_s=args.policy_timeout, latencies=args.latencies,
        paired_baseline=args.paired_baseline, baseline_records=baseline["episodes"] if baseline else None)
    started = time.monotonic()
    evaluation = Evaluation(settings, policy, address_source)
    results = evaluation.run()
    write_outputs(args, evaluation, tasks, time.monotonic() - started)
    asked = [r for r in results if r.task in set(tasks)]  # twins (--paired-baseline) come on top
    lost = sum(r.failure == "server_lost" for r in results)
    return 0 if len(asked) == len(tasks) * args.episodes * len(args.latencies) and not lost else 1


def write_outputs(args: argparse.Namespace, evaluation: Evaluation, tasks: List[str], elapsed_s: float) -> None:
    """The table on stdout, and the chart, LeRobot JSON and report that were asked for."""
    rows = summarize_run(evaluation.results)
    print_table(rows)
    sweep = latency_rows(evaluation.results)
    if sweep:
        print_latency_table(sweep)
    robustness = robustness_rows(evaluation.results, evaluation.settings.baseline_records)
    if robustness:
        print_robustness_table(robustness)
    if evaluation.retried:
        print(f"retried {len(evaluation.retried)} episode attempt(s); see 'retried' in the results file")
    if args.chart:
        save_chart(rows, args.chart)
    if args.lerobot_json:
        with open(args.lerobot_json, "w") as lerobot_file:
            json.dump(lerobot_eval_info(evaluation.results, tasks, elapsed_s), lerobot_file, indent=1)
    if args.report:
        write_report(args.report, evaluation, report_comparison(args))


def report_comparison(args: argparse.Namespace):
    """--compare-with: the comparison of that run (A) with this one (B), or why it was refused."""
    if not args.compare_with:
        return None
    try:
        return compare_runs(args.compare_with, args.results, args.force)
    except SetupError as error:
        print(f"sim_eval: --compare-with: {error}", file=sys.stderr)
        return str(error)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        try:
            return SUBCOMMANDS[argv[0]](argv[1:])
        except SetupError as error:
            print(f"sim_eval {argv[0]}: {error}", file=sys.stderr)
            return 2
        except SimulatorClientError as error:
            print(f"sim_eval {argv[0]}: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
    check_only = argv[:1] == ["check"]
    args = parser("sim_eval.py check" if check_only else "sim_eval.py").parse_args(argv[1:] if check_only else argv)
    try:
        if args.ray is not None:
            return run_with_ray(args, check_only)
        return run(args, check_only=check_only)
    except SetupError as error:
        print(f"sim_eval: {error}", file=sys.stderr)
        return 2
    except SimulatorClientError as error:
        print(f"sim_eval: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
