"""What a run leaves behind: one record per episode, the results file (written after every
episode, resumed by a rerun), and the same results in LeRobot's eval_info.json shape."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from evaluation import SetupError

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
    success: bool
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

    @classmethod
    def failed(cls, task: str, init_state_index: int, failure: str, error: str, **fields: Any) -> EpisodeRecord:
        """An episode that could not run: no steps, no success."""
        return cls(task=task, init_state_index=init_state_index, seed=fields.pop("seed", None), success=False,
                   steps=0, failure=failure, error=error, **fields)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> EpisodeRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def as_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


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
        records = [EpisodeRecord.from_json(data) for data in earlier["episodes"]]
        return [record for record in records if record.failure != "server_lost" and keep(record)]

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
        return {"avg_sum_reward": float(np.mean([r.sum_reward for r in group])) if group else 0.0,
                "avg_max_reward": float(np.mean([r.max_reward for r in group])) if group else 0.0,
                "pc_success": 100.0 * float(np.mean([r.success for r in group])) if group else 0.0,
                "n_episodes": len(group), "video_paths": [r.video for r in group if r.video]}

    per_task = []
    for task_id, task in enumerate(tasks):
        group = [r for r in ordered if r.task == task]
        per_task.append({"task_group": task_group(task), "task_id": task_id, "task": task, "metrics": {
            "sum_rewards": [r.sum_reward for r in group], "max_rewards": [r.max_reward for r in group],
            "successes": [bool(r.success) for r in group], **aggregate(group)}})
    overall = aggregate(ordered)
    overall.update(eval_s=eval_s, eval_ep_s=eval_s / max(1, len(ordered)))
    return {
        "per_episode": [{"episode_ix": i, "sum_reward": r.sum_reward, "max_reward": r.max_reward,
                         "success": bool(r.success), "seed": r.seed, "task": r.task,
                         "init_state_index": r.init_state_index} for i, r in enumerate(ordered)],
        "per_task": per_task,
        "per_group": {name: aggregate([r for r in ordered if task_group(r.task) == name])
                      for name in sorted({task_group(task) for task in tasks})},
        "overall": overall,
    }
