"""What a run leaves behind: one record per episode, the results file (written after every
episode, resumed by a rerun), and the same results in LeRobot's eval_info.json shape."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from evaluation import SetupError
from evaluation.stats import finite_or_none, mean_interval

# Why an episode did not succeed.
FAILURES = {
    "horizon": "ran to the task's horizon",
    "terminated": "ended without success",
    "policy_error": "the policy raised (the record has its traceback)",
    "policy_timeout": "the policy gave no action within --policy-timeout",
    "simulator_error": "the server refused an action or a reset",
    "server_lost": "every retry on every server failed (a rerun tries again)",
}


@dataclass
class EpisodeRecord:
    """One finished episode, as the results file stores it."""

    task: str
    init_state_index: int
    seed: Optional[int]
    success: Optional[bool]  # None: the task has no success criterion (has_success false), scored by return
    steps: int
    failure: Optional[str]  # a key of FAILURES, None on success
    error: Optional[str] = None  # the traceback or server message behind the failure
    sum_reward: float = 0.0
    max_reward: float = 0.0
    seconds: float = 0.0
    address: Optional[str] = None
    attempts: int = 1
    video: Optional[str] = None
    actions_file: Optional[str] = None  # its file in the actions sidecar (RESULTS.actions/)
    digests: Optional[Dict[str, str]] = None  # SHA-256 of the actions, the final state and the final frames
    forked_from: Optional[Dict[str, Any]] = None  # a fork's parent episode and the step it took over at
    latency_steps: Optional[Any] = None  # a real-time episode's latency: D, "measured" or its model (realtime.py)
    base_task: Optional[str] = None  # a perturbed task's unperturbed twin, as its task_info names it (robustness.py)
    base_init_state: Optional[int] = None  # the twin's init state

    @classmethod
    def failed(cls, task: str, init_state_index: int, failure: str, error: str, **fields: Any) -> EpisodeRecord:
        """An episode that could not run: no steps, no success."""
        return cls(task=task, init_state_index=init_state_index, seed=fields.pop("seed", None), success=False,
                   steps=0, failure=failure, error=error, **fields)

    @classmethod
    def from_json(cls, data: Dict[str, Any], position: Optional[int] = None) -> EpisodeRecord:
        """The record a results file holds; SetupError naming the record ("record 3 (task, init state
        2): missing 'failure'") and the field when one is missing or of the wrong type."""
        where = f"record {position}" if position is not None else "a record"
        if not isinstance(data, dict):
            raise SetupError(f"{where}: not a map but {type(data).__name__}")
        where += f" ({data.get('task')!r}, init state {data.get('init_state_index')!r})"
        for name, kinds in RECORD_FIELDS.items():
            if name not in data:
                if name in REQUIRED_FIELDS:
                    raise SetupError(f"{where}: missing {name!r}")
                continue
            value = data[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in kinds)
                raise SetupError(f"{where}: {name!r} must be {expected}, not {json.dumps(value)[:60]}")
        return cls(**{name: data[name] for name in RECORD_FIELDS if name in data})

    def as_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Each field a results file's record may have, and the JSON types it may take.
RECORD_FIELDS: Dict[str, Tuple[type, ...]] = {
    "task": (str,), "init_state_index": (int,), "seed": (int, type(None)), "success": (bool, type(None)),
    "steps": (int,), "failure": (str, type(None)), "error": (str, type(None)), "sum_reward": (int, float),
    "max_reward": (int, float), "seconds": (int, float), "address": (str, type(None)), "attempts": (int,),
    "video": (str, type(None)), "actions_file": (str, type(None)), "digests": (dict, type(None)),
    "forked_from": (dict, type(None)), "latency_steps": (int, str, type(None)), "base_task": (str, type(None)),
    "base_init_state": (int, type(None)),
}
REQUIRED_FIELDS = ("task", "init_state_index", "seed", "success", "steps", "failure")


def records_of(content: Dict[str, Any]) -> List[EpisodeRecord]:
    """A results file's episodes, each checked (SetupError naming the first bad record)."""
    episodes = content.get("episodes") if isinstance(content, dict) else None
    if not isinstance(episodes, list):
        raise SetupError("it has no list of 'episodes'")
    return [EpisodeRecord.from_json(data, position) for position, data in enumerate(episodes)]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ResultsFile:
    """The JSON results file: written whole (atomically) after every episode; a rerun with the same
    file resumes it, provided the run's settings are the same (or `force`)."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.earlier: Dict[str, Any] = {}  # what the resumed file held, once finished_episodes() read it

    def finished_episodes(self, settings: Dict[str, Any], force: bool,
                          keep: Callable[[EpisodeRecord], bool] = lambda record: True) -> List[EpisodeRecord]:
        """The episodes an earlier run finished that `keep` accepts (lost ones are run again);
        SetupError for other settings."""
        if not (self.path and os.path.exists(self.path)):
            return []
        with open(self.path) as results_file:
            earlier = self.earlier = json.load(results_file)
        recorded = earlier.get("run", {}).get("settings")
        if recorded is not None and recorded != settings and not force:
            raise SetupError(f"{self.path} was made with other settings ({json.dumps(recorded)}, now "
                             f"{json.dumps(settings)}): use another --results file, or --force to resume")
        try:
            records = records_of(earlier)
        except SetupError as error:
            raise SetupError(f"{self.path}: {error}") from None
        return [record for record in records if record.failure != "server_lost" and keep(record)]

    def earlier_invocations(self) -> List[Dict[str, Any]]:
        """The invocations that wrote the resumed file (a file from before they were kept: its run block)."""
        if "invocations" in self.earlier:
            return list(self.earlier["invocations"])
        run = self.earlier.get("run")
        return [{key: run.get(key) for key in ("command", "client_version", "started_at", "finished_at")}] if run \
            else []

    def save(self, content: Dict[str, Any]) -> None:
        if not self.path:
            return
        temporary = self.path + ".tmp"
        with open(temporary, "w") as results_file:
            json.dump(content, results_file, indent=1)
        os.replace(temporary, self.path)


def task_group(task: str) -> str:
    """The suite of "suite/task" names; other tasks form one group."""
    return task.rpartition("/")[0] or "tasks"


def lerobot_eval_info(records: List[EpisodeRecord], tasks: List[str], eval_s: float) -> Dict[str, Any]:
    """The results in LeRobot's eval_info.json shape: per_episode, per_task, per_group, overall."""
    ordered = sorted(records, key=lambda r: (tasks.index(r.task) if r.task in tasks else len(tasks),
                                             r.init_state_index))

    def aggregate(group: List[EpisodeRecord]) -> Dict[str, Any]:
        """LeRobot's averages; pc_success over the episodes of tasks with a success criterion only (null
        when none has one), the mean return with its 95% interval for every group."""
        scored = [r.success for r in group if r.success is not None]
        mean, low, high = mean_interval([r.sum_reward for r in group])
        return {"avg_sum_reward": mean if group else 0.0,
                "avg_sum_reward_ci95": [finite_or_none(low), finite_or_none(high)],
                "avg_max_reward": float(np.mean([r.max_reward for r in group])) if group else 0.0,
                "pc_success": 100.0 * float(np.mean(scored)) if scored else None,
                "n_episodes": len(group), "video_paths": [r.video for r in group if r.video]}

    per_task = []
    for task_id, task in enumerate(tasks):
        group = [r for r in ordered if r.task == task]
        per_task.append({"task_group": task_group(task), "task_id": task_id, "task": task, "metrics": {
            "sum_rewards": [r.sum_reward for r in group], "max_rewards": [r.max_reward for r in group],
            "successes": [r.success for r in group], **aggregate(group)}})
    overall = aggregate(ordered)
    overall.update(eval_s=eval_s, eval_ep_s=eval_s / max(1, len(ordered)))
    return {
        "per_episode": [{"episode_ix": i, "sum_reward": r.sum_reward, "max_reward": r.max_reward,
                         "success": r.success, "seed": r.seed, "task": r.task,
                         "init_state_index": r.init_state_index} for i, r in enumerate(ordered)],
        "per_task": per_task,
        "per_group": {name: aggregate([r for r in ordered if task_group(r.task) == name])
                      for name in sorted({task_group(task) for task in tasks})},
        "overall": overall,
    }
