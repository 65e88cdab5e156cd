"""Episodes of several tasks over parallel sessions on one or more servers, with failover.

An episode follows the standard protocol (episode i starts from init state i, or seed i where a
task has no init states; the task's horizon). Each session thread runs one episode at a time;
an episode whose server stops answering or whose simulator dies is put back and retried on
another session (another server when there is one).
"""

from __future__ import annotations

import difflib
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from evaluation import PolicyError, SetupError
from evaluation.actions import ActionsSidecar, EpisodeTrace, image_keys, named_actions
from evaluation.policies import DEFAULT_POLICY_TIMEOUT_S, Policy
from evaluation.pool import SessionPool
from evaluation.realtime import ChunkSchedule, Latency, episode_generator
from evaluation.records import EpisodeRecord, ResultsFile, utc_now
from evaluation.report import summary_json
from evaluation.robustness import robustness_rows, twin_jobs
from evaluation.videos import VideoWriter, png_base64
from sim_client import (
    CLIENT_VERSION,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    BackendError,
    ServerBusy,
    ServerError,
    ServerTimeout,
    SimulatorClient,
    upright,
)

# A horizon for environments that set no episode limit.
MAX_UNLIMITED_STEPS = 10000
# An episode whose server died is retried elsewhere at most this often.
MAX_ATTEMPTS = 3
# The task_info fields that decide a score, kept in the results file beside the episodes.
TASK_PROVENANCE = ("convention", "max_episode_steps", "settle_steps", "seed", "flip_images", "state_vector",
                   "image_size", "simulator_stack", "renderer")
# A session told server_busy waits this long before its episode is tried again.
BUSY_BACKOFF_S = 1.0
# How long a run whose servers are all down waits for Ray to restart one (--ray).
RESTART_WAIT_S = 300.0
# Progress in a file (not a terminal): a line every this many episodes, or this many seconds.
PROGRESS_EVERY = 10
PROGRESS_LINE_S = 30.0
# How long a server may take to answer its first ping before the run stops with a clear line.
PREFLIGHT_TIMEOUT_S = 10.0


@dataclass
class EvaluationSettings:
    """What to run, where, and what to keep."""

    addresses: List[str]
    tasks: List[str]
    episodes: int  # per task: init states (or seeds) 0..episodes-1
    parallel: int = 1  # episodes at once, one session each
    results_path: Optional[str] = None
    load_options: Dict[str, Any] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S  # per simulator call
    videos: Optional[VideoWriter] = None
    keep_thumbnails: bool = False  # first and last frames for the report
    force: bool = False  # resume a results file made with other settings
    client_options: Dict[str, Optional[str]] = field(default_factory=dict)  # CURVE keys, simulator
    record_actions: bool = True  # keep every episode's actions beside the results file (replay, verify)
    policy_inputs: Optional[Dict[str, Any]] = None  # what the policy check found the policy gets (preflight.py)
    policy_timeout_s: float = DEFAULT_POLICY_TIMEOUT_S  # what bounds one policy call (--policy-timeout)
    latencies: List[Optional[Latency]] = field(default_factory=lambda: [None])  # each episode runs at each
    paired_baseline: bool = False  # also run each perturbed episode's unperturbed twin (robustness.py)
    baseline_records: Optional[List[EpisodeRecord]] = None  # or take the twins from another run's records


def reset_episode(sim: SimulatorClient, task_info: Dict[str, Any], index: int
                  ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Episode `index`'s start: init state `index` where the task has them, else seed `index`."""
    if "num_init_states" in task_info:
        return sim.reset(init_state_index=index % task_info["num_init_states"])
    return sim.reset(seed=index)


class Episode:
    """One episode as it runs: its trace (actions, rewards, state checks), the frames of the
    `record_key` camera (upright: after every step with `every_frame`, for videos, else after every
    round trip), and how it ended. The runner drives it with a policy; a replay with the recorded
    actions, and a fork with both."""

    def __init__(self, task: str, task_info: Dict[str, Any], index: int, reset: Tuple[Dict[str, Any], Dict[str, Any]],
                 record_key: Optional[str] = None, every_frame: bool = False, started: Optional[float] = None) -> None:
        self.task, self.task_info, self.index = task, task_info, index
        self.observation, self.info = reset
        self.record_key, self.every_frame = record_key, every_frame
        self.started = time.monotonic() if started is None else started  # before the reset
        self.trace = EpisodeTrace(image_keys(task_info))
        self.frames = [upright(self.observation[record_key], task_info)] if record_key else []
        self.steps, self.ended, self.failure, self.error = 0, False, "horizon", None
        # None for a task without a success criterion: scored by its return, never by a made-up rate
        self.success: Optional[bool] = False if task_info.get("has_success", True) else None
        self.horizon = task_info.get("max_episode_steps") or MAX_UNLIMITED_STEPS
        self.latency: Optional[Latency] = None  # a real-time episode's latency (run_policy)

    def step(self, sim: SimulatorClient, action: Any, render: bool = True) -> Dict[str, Any]:
        """Send one action or chunk, keep what came back; the reply."""
        sent = named_actions(action)
        wants_frames = self.record_key if self.every_frame else None
        result = sim.step(sent if isinstance(action, dict) else sent["action"], frame_key=wants_frames, render=render)
        self.trace.add(sent, result)
        self.observation = result["observation"]
        self.steps = int(result["info"].get("step", self.steps + result.get("steps_run", 1)))
        if self.record_key:
            new_frames = result["frames"] if self.every_frame else [self.observation[self.record_key]]
            self.frames += [upright(frame, self.task_info) for frame in new_frames]
        if result["terminated"] or result["truncated"]:
            self.ended = True
            if self.success is not None:  # a missing success is a failure, whatever `terminated` says
                self.success = bool(result["info"].get("success", False))
            self.failure = None if self.success else ("horizon" if result["truncated"] else "terminated")
        return result

    def run_policy(self, sim: SimulatorClient, policy: Policy, latency: Optional[Latency] = None) -> None:
        """The policy acts until the episode ends or reaches its horizon; a policy failure fails it.
        With `policy.replan_steps` (or a `latency`) its chunks run as realtime.ChunkSchedule says."""
        schedule = None
        if policy.replan_steps is not None or latency is not None:
            schedule = ChunkSchedule(policy, policy.replan_steps, latency, self.task_info,
                                     episode_generator(self.task, self.index))
            self.latency = latency
        try:
            policy.reset(self.task_info)
            while self.steps < self.horizon and not self.ended:
                if schedule is None:
                    self.step(sim, policy.act(self.observation, self.task_info))
                else:
                    self.step(sim, schedule.next_actions(self.observation))
        except PolicyError as policy_error:
            self.failure, self.error = policy_error.failure, str(policy_error)[-4000:]
        if latency is not None:
            self.trace.latency_steps = schedule.latency_steps

    def record(self) -> EpisodeRecord:
        """The finished episode's record, with its digests."""
        rewards = self.trace.rewards
        seed = self.info.get("seed", None if "num_init_states" in self.task_info else self.index)
        return EpisodeRecord(task=self.task, init_state_index=self.index, seed=seed, success=self.success,
                             steps=self.steps, failure=self.failure, error=self.error, sum_reward=float(sum(rewards)),
                             max_reward=float(max(rewards)) if rewards else 0.0,
                             seconds=round(time.monotonic() - self.started, 3),
                             digests=self.trace.digests(self.observation),
                             latency_steps=self.latency.label if self.latency is not None else None,
                             **base_of(self.task_info, self.info.get("init_state_index", self.index)))


def base_of(task_info: Dict[str, Any], init_state_index: int) -> Dict[str, Any]:
    """The unperturbed twin a perturbed task names (LIBERO-plus): base_task and base_init_state;
    nothing unless the task declares both its base task and its base init states."""
    if not (task_info.get("base_task") and task_info.get("base_init_states")):
        return {}
    states = task_info["base_init_states"]
    return {"base_task": task_info["base_task"], "base_init_state": int(states[init_state_index % len(states)])}


def run_episode(sim: SimulatorClient, task: str, task_info: Dict[str, Any], policy: Policy, index: int,
                record_key: Optional[str] = None, every_frame: bool = False,
                latency: Optional[Latency] = None) -> Episode:
    """One episode from init state `index` (or seed `index`) to the task's horizon, driven by
    `policy` (in real time when a `latency` is given); see Episode for what it keeps."""
    started = time.monotonic()
    episode = Episode(task, task_info, index, reset_episode(sim, task_info, index), record_key, every_frame, started)
    episode.run_policy(sim, policy, latency)
    return episode


def client_stack() -> Dict[str, str]:
    """The runner's own Python and numpy, beside the servers' stacks."""
    return {"python": platform.python_version(), "numpy": np.__version__}


def server_facts(sim: SimulatorClient) -> Dict[str, Any]:
    """The server's get_info without what belongs to this session: its versions and stack."""
    info = sim.get_info()
    for key in ("session_id", "current_task", "sim_pid", "active_sessions", "simulator_sessions"):
        info.pop(key, None)
    return info


@dataclass
class Job:
    """One episode to run: a task, the init state (or seed) index, and the attempts made so far."""

    task: str
    index: int
    latency: Optional[Latency] = None
    attempts: int = 0

    @property
    def key(self) -> Tuple[str, int, Any]:
        return self.task, self.index, self.latency.label if self.latency is not None else None


class Evaluation:
    """The episodes of a run over `settings.parallel` sessions; see the module docstring.

    Each finished episode is written to the results file at once, so a rerun with the same file
    skips what is done. `address_source`, when given, is asked for the servers' addresses as the
    run goes (servers that Ray restarts come back on new ones).
    """

    def __init__(self, settings: EvaluationSettings, policy: Policy,
                 address_source: Optional[Callable[[], List[str]]] = None) -> None:
        self.settings, self.policy, self.address_source = settings, policy, address_source
        self.addresses = list(settings.addresses)
        self.load_options = {**policy.load_options, **settings.load_options}
        self.run_settings = {"policy": policy.name, "load_options": self.load_options}
        if policy.replan_steps is not None:
            self.run_settings["replan_steps"] = policy.replan_steps
        if settings.latencies != [None]:
            self.run_settings["latencies"] = [latency.label for latency in settings.latencies]
        self.results_file = ResultsFile(settings.results_path)
        self.sidecar = ActionsSidecar(settings.results_path) if settings.record_actions and settings.results_path \
            else None
        self.results = self.results_file.finished_episodes(self.run_settings, settings.force, self._consistent)
        done = {(r.task, r.init_state_index, r.latency_steps) for r in self.results}
        self.jobs = [job for latency in settings.latencies for task in settings.tasks
                     for job in [Job(task, index, latency) for index in range(settings.episodes)]
                     if job.key not in done]
        self.started_at, self.finished_at = utc_now(), None
        self.earlier_invocations = self.results_file.earlier_invocations()
        self.thumbnails: Dict[Tuple[str, int], List[str]] = {}  # (task, index) -> first and last frame, PNG base64
        self.retried: List[Dict[str, Any]] = []
        self.dead_addresses: set = set()
        # address -> its get_info, task -> its TASK_PROVENANCE fields: a resumed run keeps the earlier ones
        self.servers: Dict[str, Dict[str, Any]] = dict(self.results_file.earlier.get("servers", {}))
        self.task_settings: Dict[str, Dict[str, Any]] = dict(self.results_file.earlier.get("task_settings", {}))
        self.servers_asked: set = set()
        self.lock = threading.Lock()
        self.progress = Progress(len(self.jobs))

    def _consistent(self, record: EpisodeRecord) -> bool:
        """Whether a resumed episode keeps its record: with actions recorded, only when its actions
        file holds what its digest names (else it runs again); a failure before any step always."""
        return self.sidecar is None or record.digests is None or self.sidecar.matches(record.actions_file,
                                                                                       record.digests)

    def run(self) -> List[EpisodeRecord]:
        """Run every job on the parallel session threads, then (--paired-baseline) the twins of the
        perturbed episodes; the finished episode records."""
        self._run_jobs()
        if self.settings.paired_baseline:
            done = {(r.task, r.init_state_index, r.latency_steps) for r in self.results}
            twins = [Job(task, index, self._latency_of(label)) for task, index, label in twin_jobs(self.results)]
            self.jobs = [job for job in twins if job.key not in done]
            if self.jobs:
                self.progress = Progress(len(self.jobs))
                self.progress.note(f"running {len(self.jobs)} unperturbed twin episode(s) for the robustness report")
                self._run_jobs()
        with self.lock:
            self.finished_at = utc_now()
            self._save()
        return self.results

    def _latency_of(self, label: Any) -> Optional[Latency]:
        return next((latency for latency in self.settings.latencies
                     if (latency.label if latency is not None else None) == label), None)

    def _run_jobs(self) -> None:
        stuck = SessionPool(self.settings.parallel, self._work, "episodes").run(self.worst_case_s())
        if stuck:
            self.progress.note(f"{len(stuck)} session thread(s) outlived every bound; their episodes are left out")
        self.progress.close()

    def worst_case_s(self) -> float:
        """How long the run can take when every call runs to its bound: a bound on a broken one."""
        per_step = self.settings.timeout_s * (DEFAULT_RETRIES + 1) + self.settings.policy_timeout_s
        episodes = len(self.jobs) * MAX_ATTEMPTS / max(1, self.settings.parallel) + 1
        return episodes * MAX_UNLIMITED_STEPS * per_step

    def run_info(self) -> Dict[str, Any]:
        """How this run was made: its first command, policy, settings, client version, and the times
        from its first invocation's start to its last one's end (every invocation: invocations())."""
        first = self.invocations()[0]
        return {"command": first["command"], "policy": self.policy.name, "settings": self.run_settings,
                "client_version": CLIENT_VERSION, "started_at": first["started_at"], "finished_at": self.finished_at}

    def invocations(self) -> List[Dict[str, Any]]:
        """Every invocation that wrote the results file, this one last: command, client stack, times."""
        this = {"command": sys.argv, "client_version": CLIENT_VERSION, "client_stack": client_stack(),
                "started_at": self.started_at, "finished_at": self.finished_at}
        return self.earlier_invocations + [this]

    def _work(self, slot: int) -> None:
        """One session at a time on this slot's server; it ends (freeing its simulator) when the
        thread moves to another server and when the jobs run out."""
        session = SessionSlot(self)
        try:
            while True:
                job = self._next_job()
                if job is None:
                    break
                address = self._address_for(slot)
                if address is None:
                    self._give_back(job, "every server is down")
                    break
                self._run_job(session, job, address)
        finally:
            session.end()

    def _run_job(self, session: SessionSlot, job: Job, address: str) -> None:
        try:
            task_info = session.ready(address, job.task)
            episode = run_episode(session.sim, job.task, task_info, self.policy, job.index,
                                  self._record_key(task_info), every_frame=self.settings.videos is not None,
                                  latency=job.latency)
        except (ServerTimeout, BackendError, ServerBusy) as error:
            if isinstance(error, ServerTimeout):  # gone: not asked again, its session left to be reaped
                with self.lock:
                    self.dead_addresses.add(address)
                session.abandon()
            else:  # the server is there: free the slot now
                session.end()
            if isinstance(error, ServerBusy):
                time.sleep(BUSY_BACKOFF_S)
            self._give_back(job, f"{type(error).__name__} on {address}: {error}")
            return
        except ServerError as error:  # the server refused an action or a reset: a failed episode
            record = EpisodeRecord.failed(job.task, job.index, "simulator_error", f"{type(error).__name__}: {error}",
                                          latency_steps=job.key[2])
            record.success = False if session.task_info.get("has_success", True) else None
            record.address, record.attempts = address, job.attempts + 1
            self._finish(record, [])
            return
        record = episode.record()
        record.address, record.attempts = address, job.attempts + 1
        if self.sidecar is not None:
            record.actions_file = self.sidecar.save(record.task, record.init_state_index, episode.trace,
                                                    record.latency_steps)
        self._finish(record, episode.frames)

    def _next_job(self) -> Optional[Job]:
        with self.lock:
            return self.jobs.pop(0) if self.jobs else None

    def _live_addresses(self) -> List[str]:
        if self.address_source is not None:
            addresses = self.address_source()
            with self.lock:
                self.addresses = addresses
        with self.lock:
            return [a for a in self.addresses if a not in self.dead_addresses]

    def _address_for(self, slot: int) -> Optional[str]:
        live = self._live_addresses()
        deadline = time.monotonic() + RESTART_WAIT_S
        while not live and self.address_source is not None and time.monotonic() < deadline:
            time.sleep(1.0)  # a restarting server comes back on a new address
            live = self._live_addresses()
        return live[slot % len(live)] if live else None

    def note_server(self, address: str, sim: SimulatorClient) -> None:
        """The server's facts, asked once per run (a resumed run's earlier servers stay listed)."""
        with self.lock:
            if address in self.servers_asked:
                return
            self.servers_asked.add(address)
        info = server_facts(sim)
        with self.lock:
            self.servers[address] = info

    def note_task(self, task: str, task_info: Dict[str, Any]) -> None:
        with self.lock:
            self.task_settings[task] = {key: task_info[key] for key in TASK_PROVENANCE if key in task_info}

    def _give_back(self, job: Job, why: str) -> None:
        job.attempts += 1
        live = self._live_addresses() or self.address_source is not None  # a fleet's servers come back
        with self.lock:
            self.retried.append({"task": job.task, "init_state_index": job.index, "why": why[:200]})
            retry = job.attempts < MAX_ATTEMPTS and bool(live)
            if retry:
                self.jobs.append(job)
        if not retry:
            self.progress.note(f"gave up on {job.task} #{job.index}: {why[:120]}")
            self._finish(EpisodeRecord.failed(job.task, job.index, "server_lost", why[:2000], attempts=job.attempts,
                                              latency_steps=job.key[2]), [])

    def _record_key(self, task_info: Dict[str, Any]) -> Optional[str]:
        videos = self.settings.videos
        if videos is None and not self.settings.keep_thumbnails:
            return None
        images = [key for key, spec in task_info["observation_spec"].items() if len(spec["shape"]) == 3]
        wanted = videos.camera if videos is not None else None
        return wanted if wanted in images else (images[0] if images else None)

    def _finish(self, record: EpisodeRecord, frames: List[np.ndarray]) -> None:
        if frames and self.settings.keep_thumbnails:
            self.thumbnails[(record.task, record.init_state_index)] = [png_base64(frames[0]), png_base64(frames[-1])]
        if frames and self.settings.videos is not None:
            record.video = self.settings.videos.save(frames, record)
        if record.failure in ("policy_error", "policy_timeout"):
            self.progress.note(f"policy failed in {record.task} #{record.init_state_index}: "
                               f"{record.error.strip().splitlines()[-1]}")
        with self.lock:
            self.results.append(record)
            self._save()
            self.progress.update(record.success)

    def _save(self) -> None:
        self.results_file.save({
            "run": self.run_info(), "invocations": self.invocations(), "policy_inputs": self.settings.policy_inputs,
            "addresses": self.addresses, "servers": self.servers,
            "tasks": self.settings.tasks, "task_settings": self.task_settings, "summary": summary_json(self.results),
            **self._robustness(), "retried": self.retried, "episodes": [record.as_json() for record in self.results]})


    def _robustness(self) -> Dict[str, Any]:
        rows = robustness_rows(self.results, self.settings.baseline_records)
        return {"robustness": [row.as_json() for row in rows]} if rows else {}


class SessionSlot:
    """A session thread's one session: opened on the job's server, its task loaded once, ended when
    the thread moves on."""

    def __init__(self, evaluation: Evaluation) -> None:
        self.evaluation = evaluation
        self.sim: Optional[SimulatorClient] = None
        self.task: Optional[str] = None
        self.task_info: Dict[str, Any] = {}

    def ready(self, address: str, task: str) -> Dict[str, Any]:
        """A session on `address` with `task` loaded: the task_info."""
        evaluation = self.evaluation
        if self.sim is None or self.sim.address != address:
            self.end()
            self.sim = SimulatorClient(address, timeout_s=evaluation.settings.timeout_s,
                                       **evaluation.settings.client_options)
            evaluation.note_server(address, self.sim)
        if task != self.task:
            self.task_info, self.task = self.sim.load_task(task, **evaluation.load_options), task
            evaluation.note_task(task, self.task_info)
        return self.task_info

    def end(self) -> None:
        """End the session on its server (its simulator is freed)."""
        if self.sim is not None:
            self.sim.disconnect()
        self.sim, self.task = None, None

    def abandon(self) -> None:
        """Drop the session of a server that stopped answering, without waiting on it again."""
        if self.sim is not None:
            self.sim.close()
        self.sim, self.task = None, None


class Progress:
    """How far a run is, for people: on a terminal, tqdm's bar (elapsed, ETA) with the running success
    rate; in a file (Slurm, CI), a plain line every PROGRESS_EVERY episodes or PROGRESS_LINE_S seconds."""

    def __init__(self, total: int, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done, self.scored, self.successes = total, 0, 0, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if total and self.stream.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="episode", file=self.stream)
            except ImportError:
                pass

    def update(self, success: Optional[bool]) -> None:
        """One more episode done (success None: a task scored by return)."""
        self.done += 1
        if success is not None:
            self.scored += 1
            self.successes += int(success)
        if self.bar is not None:
            if self.scored:
                self.bar.set_postfix(success=f"{self.successes / self.scored:.2f}")
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.done == self.total or self.done % PROGRESS_EVERY == 0 or now - self.last_line >= PROGRESS_LINE_S:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        """"12/50 episodes, success 8/12 (0.67), 3m05s elapsed, about 9m40s left"."""
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        rate = f", success {self.successes}/{self.scored} ({self.successes / self.scored:.2f})" if self.scored else ""
        return (f"sim_eval: {self.done}/{self.total} episodes{rate}, {clock(elapsed)} elapsed, "
                f"about {clock(left)} left")

    def note(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar."""
        if self.bar is not None:
            self.bar.close()


def clock(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def check_servers(addresses: List[str], client_options: Dict[str, Optional[str]], timeout_s: float) -> None:
    """Every server answers a ping, or SetupError naming the one that does not."""
    for address in addresses:
        sim = SimulatorClient(address, timeout_s=timeout_s, retries=0, **client_options)
        try:
            sim.ping()
        except ServerTimeout:
            raise SetupError(f"no simulator server answers at {address} within {timeout_s:g} s: is it "
                             "running, is the address right (tcp://HOST:PORT), are the CURVE keys right?") from None
        except ServerError as error:  # e.g. --simulator names one the server does not serve
            raise SetupError(f"{address}: {error}") from None
        finally:
            sim.disconnect()


def resolve_tasks(address: str, tasks: Optional[List[str]], suite: Optional[str],
                  client_options: Dict[str, Optional[str]]) -> List[str]:
    """The tasks to run: the suite's, or `tasks`, each a name list_tasks gives (the server's list, the
    suite's, or its own "suite/" group's). SetupError when neither is given (naming the server's
    suites), or for an unknown suite or task."""
    with SimulatorClient(address, timeout_s=PREFLIGHT_TIMEOUT_S, **client_options) as sim:
        listing = sim.call("list_tasks")
        if not tasks and suite is None:
            raise SetupError("say what to evaluate: --suite NAME or --tasks NAME ...; " + offer(listing))
        candidates = set(listing["tasks"])
        if suite is not None:
            suite_tasks = suite_listing(sim, suite, listing)
            if not tasks:
                return suite_tasks
            candidates.update(suite_tasks)
        for group in sorted({task.rpartition("/")[0] for task in tasks} - {""}):
            if group in listing.get("suites", {}):
                candidates.update(sim.list_tasks(suite=group))
    unknown = [task for task in tasks if task not in candidates]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(candidates), n=3)
        raise SetupError(f"--tasks: no task {unknown[0]!r} on {address}; close matches: {close or 'none'} "
                         "(names as list_tasks gives them)")
    return tasks


def suite_listing(sim: SimulatorClient, suite: str, listing: Dict[str, Any]) -> List[str]:
    """The suite's tasks; SetupError in the flag's words for one the server does not have."""
    try:
        return sim.list_tasks(suite=suite)
    except ServerError as error:
        raise SetupError(f"--suite {suite}: {error}; {offer(listing)}") from None


def offer(listing: Dict[str, Any]) -> str:
    """What the server has to evaluate, from list_tasks' answer: its suites with their sizes, or tasks."""
    suites = listing.get("suites") or {}
    if suites:
        return "this server's suites: " + ", ".join(f"{name} ({count})" for name, count in suites.items())
    names = listing["tasks"]
    return f"this server has no suites; its tasks: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else "")
