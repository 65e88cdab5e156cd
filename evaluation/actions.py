"""What makes an episode replayable without its policy: the actions it executed, and digests.

An `EpisodeTrace` follows an episode as it runs: every executed action exactly as it was sent
(a chunk's actions in order, cut where the episode ended), every step's reward, and after each
round trip the step count and a digest of the observation's state (its non-image keys). At the
end it digests the final observation's state, its camera frames and the actions themselves.

The `ActionsSidecar` keeps one `.npz` per episode in a folder beside the results file
(`RESULTS.actions/`); the record names its file and carries the digests, so `sim_eval.py
verify` can tell an edited record, an edited action and a different simulator apart.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from evaluation import SetupError

ACTION_PREFIX = "action."
# A chunk longer than this is split when replayed (the server's limit on one step's chunk).
MAX_REPLAY_CHUNK = 256


def image_keys(task_info: Dict[str, Any]) -> List[str]:
    """The observation keys that are camera images ([H, W, C])."""
    return sorted(key for key, spec in task_info["observation_spec"].items() if len(spec["shape"]) == 3)


def arrays_digest(arrays: Dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays in name order: each one's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def state_digest(observation: Dict[str, Any], images: List[str]) -> str:
    """The digest of an observation's non-image entries."""
    return arrays_digest({key: np.asarray(value) for key, value in observation.items() if key not in images})


def frames_digest(observation: Dict[str, Any], images: List[str]) -> str:
    """The digest of an observation's camera images."""
    return arrays_digest({key: np.asarray(observation[key]) for key in images if key in observation})


def named_actions(action: Any) -> Dict[str, np.ndarray]:
    """An action as the client sends it: {name: array}, a bare array meaning {"action": it}."""
    if isinstance(action, dict):
        return {str(name): np.asarray(value) for name, value in action.items()}
    return {"action": np.asarray(action)}


@dataclass
class EpisodeTrace:
    """One episode's executed actions, rewards and state checkpoints, gathered as it runs."""

    images: List[str]
    actions: Dict[str, List[np.ndarray]] = field(default_factory=dict)  # name -> [steps of each round trip]
    rewards: List[float] = field(default_factory=list)
    checks: List[int] = field(default_factory=list)  # the step count after each round trip
    check_digests: List[str] = field(default_factory=list)  # the state digest there
    latency_steps: Optional[List[int]] = None  # a real-time episode's delay at each policy call

    @property
    def steps(self) -> int:
        return len(self.rewards)

    def add(self, sent: Dict[str, np.ndarray], result: Dict[str, Any]) -> None:
        """One round trip: the action (or chunk) sent, and the step's reply."""
        steps_run = result.get("steps_run")  # present only when the server ran it as a chunk
        for name, value in sent.items():
            self.actions.setdefault(name, []).append(value[:steps_run] if steps_run is not None else value[None])
        self.rewards += [float(r) for r in result.get("rewards", [result["reward"]])]
        self.checks.append(self.steps)
        self.check_digests.append(state_digest(result["observation"], self.images))

    def action_arrays(self) -> Dict[str, np.ndarray]:
        """Every executed action per name, [steps, ...] (empty when no step ran)."""
        return {name: np.concatenate(parts) for name, parts in self.actions.items()}

    def digests(self, final_observation: Dict[str, Any]) -> Dict[str, str]:
        """The record's digests: the actions, and the final observation's state and frames."""
        return {"actions": arrays_digest(self.action_arrays()),
                "final_state": state_digest(final_observation, self.images),
                "final_frames": frames_digest(final_observation, self.images)}


@dataclass
class RecordedEpisode:
    """An episode's sidecar read back: what to send again and what to expect."""

    actions: Dict[str, np.ndarray]
    rewards: np.ndarray
    checks: np.ndarray
    check_digests: List[str]

    @property
    def steps(self) -> int:
        return len(self.rewards)

    def chunk(self, start: int, stop: int) -> Dict[str, np.ndarray]:
        """Actions start..stop-1 as one chunk."""
        return {name: value[start:stop] for name, value in self.actions.items()}

    def round_trips(self, until: Optional[int] = None) -> List[int]:
        """Where the original's round trips ended, split to the server's chunk limit, up to `until`."""
        ends, start = [], 0
        last = self.steps if until is None else min(until, self.steps)
        for check in [int(c) for c in self.checks if c < last] + [last]:
            while check - start > MAX_REPLAY_CHUNK:
                start += MAX_REPLAY_CHUNK
                ends.append(start)
            if check > start:
                ends.append(check)
                start = check
        return ends


class ActionsSidecar:
    """The folder of per-episode action files beside a results file: RESULTS.actions/."""

    def __init__(self, results_path: str) -> None:
        self.folder = os.path.splitext(results_path)[0] + ".actions"

    @staticmethod
    def file_name(task: str, init_state_index: int, latency: Any = None) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", task.replace("/", "__"))
        suffix = "" if latency is None else "__latency_" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(latency))
        return f"{stem}__init{init_state_index:03d}{suffix}.npz"

    def save(self, task: str, init_state_index: int, trace: EpisodeTrace, latency: Any = None) -> str:
        """Write the episode's file (atomically; a rerun replaces it) and return its name; a real-time
        episode's file also holds `latency_steps`, the delay of each policy call."""
        os.makedirs(self.folder, exist_ok=True)
        name = self.file_name(task, init_state_index, latency)
        temporary = os.path.join(self.folder, name + ".tmp.npz")
        arrays = {ACTION_PREFIX + key: value for key, value in trace.action_arrays().items()}
        if trace.latency_steps is not None:
            arrays["latency_steps"] = np.asarray(trace.latency_steps, dtype=np.int64)
        np.savez_compressed(temporary, rewards=np.asarray(trace.rewards, dtype=np.float64),
                            checks=np.asarray(trace.checks, dtype=np.int64),
                            check_digests=np.asarray(trace.check_digests, dtype="<U64"), **arrays)
        os.replace(temporary, os.path.join(self.folder, name))
        return name

    def load(self, name: str) -> RecordedEpisode:
        """An episode's file; SetupError when it is missing or not one."""
        path = os.path.join(self.folder, os.path.basename(name))
        try:
            with np.load(path, allow_pickle=False) as content:
                actions = {key[len(ACTION_PREFIX):]: content[key] for key in content.files
                           if key.startswith(ACTION_PREFIX)}
                return RecordedEpisode(actions=actions, rewards=content["rewards"], checks=content["checks"],
                                       check_digests=[str(d) for d in content["check_digests"]])
        except OSError as error:
            raise SetupError(f"cannot read the actions file {path}: {error}") from None
        except (KeyError, ValueError) as error:
            raise SetupError(f"{path} is not an actions file ({type(error).__name__}: {error})") from None

    def matches(self, name: Optional[str], digests: Optional[Dict[str, str]]) -> bool:
        """Whether the episode's file is there and holds the actions its record's digest names."""
        if not name or not digests:
            return False
        try:
            return arrays_digest(self.load(name).actions) == digests.get("actions")
        except SetupError:
            return False
