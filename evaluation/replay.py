"""Episodes re-run from their recorded actions, with no policy: `sim_eval.py replay` and `verify`.

A replay resets the episode's init state (or seed), sends the recorded actions in the original's
round trips with every camera left unrendered but on the last one, and checks what comes back
against the record: every step's reward, the state digest after each round trip, the steps,
success, and the final state's and frames' digests. The first step where they part is named.

A fork replays the first k actions and hands the episode to another policy from there; the
result is a new episode that names its parent.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from evaluation import SetupError
from evaluation.actions import ActionsSidecar, RecordedEpisode, arrays_digest, image_keys
from evaluation.compare import setting_differences
from evaluation.policies import Policy
from evaluation.pool import SessionPool
from evaluation.records import EpisodeRecord, ResultsFile, records_of, utc_now
from evaluation.report import summary_json
from evaluation.runner import MAX_UNLIMITED_STEPS, TASK_PROVENANCE, Episode, reset_episode, server_facts
from evaluation.videos import VideoWriter
from sim_client import CLIENT_VERSION, DEFAULT_RETRIES, SimulatorClient


class RecordedRun:
    """A results file and its actions sidecar, read for replaying."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "rb") as results_file:
                raw = results_file.read()
            content = json.loads(raw)
            self.episodes = records_of(content)
            self.load_options: Dict[str, Any] = content["run"]["settings"]["load_options"]
        except OSError as error:
            raise SetupError(f"cannot read {path}: {error.strerror}") from None
        except SetupError as error:
            raise SetupError(f"{path}: {error}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise SetupError(f"{path} is not a sim_eval.py results file ({type(error).__name__}: {error})") from None
        self.path, self.sha256 = path, hashlib.sha256(raw).hexdigest()
        self.policy = content["run"].get("policy")
        self.task_settings: Dict[str, Dict[str, Any]] = content.get("task_settings", {})
        simulators = {info.get("simulator") for info in content.get("servers", {}).values()} - {None}
        self.simulator: Optional[str] = simulators.pop() if len(simulators) == 1 else None
        self.sidecar = ActionsSidecar(path)

    def indices(self, wanted: Optional[str]) -> List[int]:
        """The episode positions `wanted` names ("0,3,7"; None: all); SetupError for a bad one."""
        if wanted is None:
            return list(range(len(self.episodes)))
        try:
            indices = [int(part) for part in wanted.split(",") if part.strip()]
        except ValueError:
            raise SetupError(f"--episodes {wanted!r}: write positions in the results file, e.g. 0,3,7") from None
        bad = [i for i in indices if not 0 <= i < len(self.episodes)]
        if bad or not indices:
            raise SetupError(f"--episodes {wanted!r}: {self.path} has episodes 0..{len(self.episodes) - 1}")
        return indices

    def recorded(self, index: int) -> Optional[RecordedEpisode]:
        """Episode `index`'s actions, or None when the run kept none for it."""
        record = self.episodes[index]
        return self.sidecar.load(record.actions_file) if record.actions_file else None


@dataclass
class ReplayOutcome:
    """How one replayed episode compared with its record."""

    episode: int  # its position in the results file
    task: str
    init_state_index: int
    status: str  # verified, diverged, or unverifiable (no actions were recorded)
    reasons: List[str] = field(default_factory=list)
    first_divergent_step: Optional[int] = None
    steps: int = 0
    success: Optional[bool] = None
    seconds: float = 0.0
    video: Optional[str] = None

    def line(self) -> str:
        head = f"#{self.episode} {self.task} init {self.init_state_index}: {self.status}"
        if self.status == "verified":
            return f"{head} (success {self.success}, {self.steps} steps; rewards and digests equal the record)"
        where = f" from step {self.first_divergent_step}" if self.first_divergent_step is not None else ""
        return f"{head}{where}: " + "; ".join(self.reasons)


def replay_episode(sim: SimulatorClient, task_info: Dict[str, Any], record: EpisodeRecord, recorded: RecordedEpisode,
                   video_key: Optional[str] = None, until_step: Optional[int] = None) -> Episode:
    """Re-run the recorded actions (the first `until_step` only, when given) from the episode's
    start, in the original's round trips; only the last is rendered (and `video_key`'s camera on
    every step when a video is wanted)."""
    start_state = reset_episode(sim, task_info, record.init_state_index)
    episode = Episode(record.task, task_info, record.init_state_index, start_state, video_key, video_key is not None)
    ends, start = recorded.round_trips(until_step), 0
    for position, end in enumerate(ends):
        episode.step(sim, recorded.chunk(start, end), render=position == len(ends) - 1)
        start = end
        if episode.ended:
            break
    return episode


def divergences(record: EpisodeRecord, recorded: RecordedEpisode, episode: Episode) -> Tuple[List[str], Optional[int]]:
    """What differs between the record (and its actions file) and the replay, and the first step
    at which it shows."""
    reasons, steps = [], []
    digests = record.digests or {}
    if arrays_digest(recorded.actions) != digests.get("actions"):
        reasons.append("the actions file does not match the record's digest (edited actions or record)")
        steps.append(0)
    replayed = episode.trace.rewards
    for step, (old, new) in enumerate(zip(recorded.rewards.tolist(), replayed), start=1):
        if old != new:
            reasons.append(f"reward of step {step}: recorded {old!r}, replayed {new!r}")
            steps.append(step)
            break
    replayed_checks = dict(zip(episode.trace.checks, episode.trace.check_digests))
    equal_until = 0
    for check, digest in zip(recorded.checks.tolist(), recorded.check_digests):
        if check in replayed_checks and replayed_checks[check] != digest:
            reasons.append(f"state after step {check} differs (equal after step {equal_until})")
            steps.append(equal_until + 1)
            break
        equal_until = check if check in replayed_checks else equal_until
    if len(replayed) != recorded.steps or episode.steps != record.steps:
        reasons.append(f"steps: recorded {record.steps}, replayed {episode.steps}")
        steps.append(min(len(replayed), recorded.steps) + 1)
    final = episode.trace.digests(episode.observation)
    outcome = [("success", record.success, episode.success), ("sum_reward", record.sum_reward, float(sum(replayed))),
               ("final state digest", digests.get("final_state"), final["final_state"]),
               ("final frames digest", digests.get("final_frames"), final["final_frames"])]
    for name, old, new in outcome:
        if old != new:
            reasons.append(f"{name}: recorded {short(old)}, replayed {short(new)}")
            steps.append(episode.steps)
    return reasons, (min(steps) if steps else None)


def short(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)


def check_episode(sim: SimulatorClient, task_info: Dict[str, Any], run: RecordedRun, index: int,
                  videos: Optional[VideoWriter] = None) -> ReplayOutcome:
    """Replay episode `index` of `run` and compare it with its record (and save its video)."""
    record, started = run.episodes[index], time.monotonic()
    outcome = ReplayOutcome(index, record.task, record.init_state_index, "unverifiable")
    recorded = run.recorded(index)
    if recorded is None or not record.digests:
        why = f" ({record.failure}: nothing ran)" if record.failure in ("server_lost", "simulator_error") else ""
        outcome.reasons.append(f"no actions were recorded for it{why}")
        return outcome
    episode = replay_episode(sim, task_info, record, recorded, video_camera(task_info, videos))
    outcome.reasons, outcome.first_divergent_step = divergences(record, recorded, episode)
    outcome.status = "diverged" if outcome.reasons else "verified"
    outcome.steps, outcome.success = episode.steps, episode.success
    outcome.seconds = round(time.monotonic() - started, 3)
    if videos is not None:
        outcome.video = videos.save(episode.frames, episode.record())
    return outcome


def video_camera(task_info: Dict[str, Any], videos: Optional[VideoWriter]) -> Optional[str]:
    """The camera a replay's video shows: the one asked for, else the first; SetupError for an unknown one."""
    if videos is None:
        return None
    cameras = image_keys(task_info)
    if videos.camera is not None and videos.camera not in cameras:
        raise SetupError(f"--video-camera {videos.camera!r}: this task's cameras are {cameras}")
    if not cameras:
        raise SetupError("this task has no camera to make a video of")
    return videos.camera or cameras[0]


class Replayer:
    """Replays a run's episodes over parallel sessions (one thread each), loading each task with the
    run's own load options, and notes the servers and task settings they ran on."""

    def __init__(self, run: RecordedRun, addresses: List[str], parallel: int, client_options: Dict[str, Any],
                 timeout_s: float, videos: Optional[VideoWriter] = None) -> None:
        self.run, self.addresses, self.parallel = run, addresses, max(1, parallel)
        self.client_options = {**client_options, "simulator": client_options.get("simulator") or run.simulator}
        self.timeout_s, self.videos = timeout_s, videos
        self.servers: Dict[str, Dict[str, Any]] = {}
        self.task_settings: Dict[str, Dict[str, Any]] = {}
        self.outcomes: List[ReplayOutcome] = []
        self.lock = threading.Lock()

    def replay(self, indices: List[int], show: bool = True) -> List[ReplayOutcome]:
        """Replay these episodes; their outcomes in the order asked (printed as they finish when `show`)."""
        queue, errors = list(indices), []
        pool = SessionPool(min(self.parallel, len(indices)), lambda slot: self._work(slot, queue, errors, show),
                           "replay")
        if pool.run(self.worst_case_s(len(indices))):
            raise SetupError("a replay session outlived every bound (the client's timeouts and retries)")
        if errors:
            raise errors[0]
        return sorted(self.outcomes, key=lambda outcome: indices.index(outcome.episode))

    def worst_case_s(self, episodes: int) -> float:
        """How long replaying `episodes` can take when every call runs to its bound."""
        per_call = self.timeout_s * (DEFAULT_RETRIES + 1)
        return (episodes / self.parallel + 1) * (MAX_UNLIMITED_STEPS + 2) * per_call

    def _work(self, slot: int, queue: List[int], errors: List[Exception], show: bool) -> None:
        task, task_info = None, {}
        try:
            with self.open(self.addresses[slot % len(self.addresses)]) as sim:
                while True:
                    with self.lock:
                        if not queue or errors:
                            return
                        index = queue.pop(0)
                    if self.run.episodes[index].task != task:
                        task = self.run.episodes[index].task
                        task_info = self.load(sim, task)
                    outcome = check_episode(sim, task_info, self.run, index, self.videos)
                    with self.lock:
                        self.outcomes.append(outcome)
                    if show:
                        print(outcome.line(), flush=True)
        except Exception as error:  # ends the replay: the caller raises it
            with self.lock:
                errors.append(error)

    def open(self, address: str) -> SimulatorClient:
        """A session on `address` (its server's facts noted)."""
        sim = SimulatorClient(address, timeout_s=self.timeout_s, **self.client_options)
        if address not in self.servers:
            facts = server_facts(sim)
            with self.lock:
                self.servers[address] = facts
        return sim

    def load(self, sim: SimulatorClient, task: str) -> Dict[str, Any]:
        """Load `task` with the run's own options; its task_info (its settings noted)."""
        task_info = sim.load_task(task, **self.run.load_options)
        with self.lock:
            self.task_settings[task] = {key: task_info[key] for key in TASK_PROVENANCE if key in task_info}
        return task_info

    def setting_differences(self) -> List[str]:
        """The score-deciding settings in which the replay's tasks differ from the recorded run's."""
        return setting_differences({"task_settings": self.run.task_settings}, {"task_settings": self.task_settings},
                                   sorted(self.task_settings))


def sampled(indices: List[int], sample: Optional[int], seed: int) -> List[int]:
    """`sample` of the indices drawn with `seed` (in file order), or all of them."""
    if sample is None or sample >= len(indices):
        return indices
    if sample < 1:
        raise SetupError("--sample must be at least 1")
    return sorted(random.Random(seed).sample(indices, sample))


def verification_json(replayer: Replayer, outcomes: List[ReplayOutcome], sample: Optional[Dict[str, int]]
                      ) -> Dict[str, Any]:
    """The verification as a file: what was checked, on which stack, and how each episode came out.
    A run is verified when every episode is, under the same score-deciding settings it records."""
    counts = {status: sum(o.status == status for o in outcomes) for status in ("verified", "diverged", "unverifiable")}
    differences = replayer.setting_differences()
    per_task: Dict[str, Dict[str, int]] = {}
    for outcome in outcomes:
        per_task.setdefault(outcome.task, {"verified": 0, "diverged": 0, "unverifiable": 0})[outcome.status] += 1
    return {"results": replayer.run.path, "results_sha256": replayer.run.sha256, "verified_at": utc_now(),
            "command": sys.argv, "client_version": CLIENT_VERSION, "sample": sample,
            "all_verified": counts["verified"] == len(outcomes) and not differences, "summary": counts,
            "per_task": per_task,
            "servers": replayer.servers, "task_settings": replayer.task_settings,
            "recorded_task_settings": replayer.run.task_settings,
            "setting_differences": differences,
            "episodes": [asdict(outcome) for outcome in outcomes]}


def print_verification(report: Dict[str, Any]) -> None:
    """Per task: verified, diverged, unverifiable; then the settings that differ and the verdict."""
    width = max([len(task) for task in report["per_task"]] + [4])
    for task, counts in report["per_task"].items():
        print(f"{task.ljust(width)}  verified {counts['verified']}, diverged {counts['diverged']}"
              + (f", unverifiable {counts['unverifiable']}" if counts["unverifiable"] else ""))
    for line in report["setting_differences"]:
        print(f"note: recorded vs here: {line}")
    total = report["summary"]
    verdict = "every episode verified" if report["all_verified"] else "NOT verified"
    if total["verified"] == sum(total.values()) and report["setting_differences"]:
        verdict = "NOT verified (every episode reproduced, but under the other settings noted above)"
    print(f"{verdict}: {total['verified']} verified, {total['diverged']} diverged, "
          f"{total['unverifiable']} unverifiable of {sum(total.values())}")


def fork_episode(sim: SimulatorClient, task_info: Dict[str, Any], run: RecordedRun, index: int, until_step: int,
                 policy: Policy) -> Episode:
    """Replay episode `index`'s first `until_step` actions, then let `policy` act from there."""
    recorded, record = run.recorded(index), run.episodes[index]
    if recorded is None:
        raise SetupError(f"episode {index} of {run.path} has no recorded actions to fork from")
    if not 0 <= until_step < recorded.steps:
        raise SetupError(f"--until-step {until_step}: episode {index} ran {recorded.steps} steps; fork at 0.."
                         f"{recorded.steps - 1}")
    episode = replay_episode(sim, task_info, record, recorded, until_step=until_step)
    episode.run_policy(sim, policy)
    return episode


class ForkResults:
    """The results file of forks (default RESULTS.forks.json): records appended, with actions, so a
    fork can be replayed and verified like any run."""

    def __init__(self, path: str, run: RecordedRun, policy: Policy) -> None:
        self.file, self.sidecar, self.run, self.policy = ResultsFile(path), ActionsSidecar(path), run, policy
        self.episodes: List[EpisodeRecord] = []
        if os.path.exists(path):
            earlier = RecordedRun(path)
            if earlier.policy != policy.name:
                raise SetupError(f"{path} holds forks by the policy {earlier.policy!r}: give another --fork-results")
            self.episodes = earlier.episodes

    def add(self, episode: Episode, parent: int, until_step: int, replayer: Replayer) -> EpisodeRecord:
        record = episode.record()
        record.forked_from = {"results": self.run.path, "results_sha256": self.run.sha256, "episode": parent,
                              "step": until_step, "policy": self.run.policy}
        stem = f"fork{len(self.episodes):03d}"
        record.actions_file = self.sidecar.save(f"{record.task}__{stem}", record.init_state_index, episode.trace)
        self.episodes.append(record)
        self.file.save({"run": {"command": sys.argv, "policy": self.policy.name, "client_version": CLIENT_VERSION,
                                "settings": {"policy": self.policy.name, "load_options": self.run.load_options},
                                "finished_at": utc_now()},
                        "servers": replayer.servers, "tasks": sorted({r.task for r in self.episodes}),
                        "task_settings": {**self.run.task_settings, **replayer.task_settings},
                        "summary": summary_json(self.episodes), "retried": [],
                        "episodes": [r.as_json() for r in self.episodes]})
        return record
