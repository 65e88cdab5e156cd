"""The episode logic of a simulator process: one backend for one session, answering checked calls.

The server's loop decodes and checks every client request once and hands the call (method,
request_id and typed fields) to the session's simulator process, which is the spine's other mode
(`python sim_server.py --simulator-process ...`: the codec stays in one file). That process hands
each decoded call to `SessionSimulator.answer` here, which keeps the episode lifecycle the
protocol promises (no_task_loaded, not_reset) and runs action chunks: a call in, a result map or a
SimulatorError out. Only backends/ is imported, so it runs under any interpreter given with
--python.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import numpy as np

from backends import get_backend
from backends.base import PROVENANCE_KEYS, InvalidParams, NoTaskLoaded, NotReset, SimulatorBackend

# Longest action chunk one step may carry (openpi replans every 5 of 10 or 50).
MAX_CHUNK = 256


class SessionSimulator:
    """One backend plus the episode lifecycle the protocol promises."""

    def __init__(self, backend: SimulatorBackend) -> None:
        self.backend = backend
        self.task_loaded = False
        self.episode_running = False
        self.action_ndims: Dict[str, int] = {}  # from the task's action_spec, to tell a chunk from one action
        self.observation_keys: List[str] = []  # from the task's observation_spec
        self.provenance: Optional[Dict[str, Any]] = None  # this process's versions, read at the first load_task

    @classmethod
    def of(cls, simulator: str) -> SessionSimulator:
        """A new session's simulator: the registered backend `simulator`, not yet loaded."""
        return cls(get_backend(simulator)())

    def answer(self, call: Dict[str, Any]) -> Dict[str, Any]:
        """The result of one decoded call (load_task, reset or step); raises its SimulatorError."""
        method = call["method"]
        if method == "load_task":
            return {"task_info": self.load_task(call["task_name"], call["options"])}
        if not self.task_loaded:
            raise NoTaskLoaded(f"{method} needs a task: call load_task first")
        if method == "reset":
            observation, info = self.backend.reset(seed=call["seed"], init_state_index=call["init_state_index"])
            self.episode_running = True
            return {"observation": observation, "info": info}
        return self.step(call["action"], call["frame_key"], call.get("render", True))

    def load_task(self, task_name: str, options: Dict[str, Any]) -> Dict[str, Any]:
        self.episode_running = False
        task_info = self.backend.load_task(task_name, **options)
        if self.provenance is None:
            static = self.backend.get_info()
            self.provenance = {key: static[key] for key in PROVENANCE_KEYS if key in static}
        for key, value in self.provenance.items():
            task_info.setdefault(key, value)
        task_info["max_chunk"] = MAX_CHUNK
        self.task_loaded = True
        self.action_ndims = {name: len(spec["shape"]) for name, spec in task_info["action_spec"].items()}
        self.observation_keys = sorted(task_info["observation_spec"])
        return task_info

    def step(self, action: Dict[str, np.ndarray], frame_key: Optional[str] = None,
             render: bool = True) -> Dict[str, Any]:
        """One action, or a chunk of K actions (one more leading axis) run until the episode ends.

        Only the observation a client receives is rendered: a chunk's steps before its last skip
        their camera images, but for `frame_key`'s, whose frame of every step the reply carries
        in `frames` ([steps run, ...]) when asked. With `render` false the last step skips them
        too (a replay that checks the state and looks at no picture).
        """
        if not self.episode_running:
            raise NotReset("step needs a running episode: call reset first")
        if frame_key is not None and frame_key not in self.observation_keys:
            raise InvalidParams(f"no observation key {frame_key!r} for frame_key; keys: {self.observation_keys}")
        chunk = self.chunk_length(action)
        actions = [action] if chunk is None else [{name: value[i] for name, value in action.items()}
                                                  for i in range(chunk)]
        keep = () if frame_key is None else (frame_key,)
        replies: List[Dict[str, Any]] = []
        for index, one_action in enumerate(actions):
            last = index == len(actions) - 1
            with contextlib.nullcontext() if last and render else self.backend.frames_skipped(keep):
                replies.append(self.step_once(one_action))
            if not self.episode_running:
                if not last and render:  # it ended early: the frames it skipped are the ones the client gets
                    replies[-1]["observation"] = self.backend.render_skipped(replies[-1]["observation"])
                break
        reply = replies[-1] if chunk is None else self.chunk_reply(replies)
        if frame_key is not None:
            reply["frames"] = stacked_frames(replies, frame_key)
        return reply

    @staticmethod
    def chunk_reply(replies: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {**replies[-1], "reward": float(sum(r["reward"] for r in replies)), "steps_run": len(replies),
                "rewards": [r["reward"] for r in replies],
                "successes": [bool(r["info"].get("success", False)) for r in replies]}

    def chunk_length(self, action: Dict[str, np.ndarray]) -> Optional[int]:
        """K when every action array has one axis more than its spec (a [K, ...] chunk), else None."""
        extra = {value.ndim - self.action_ndims.get(name, value.ndim) for name, value in action.items()}
        if extra != {1}:
            return None
        lengths = {value.shape[0] for value in action.values()}
        if len(lengths) != 1 or not 1 <= next(iter(lengths)) <= MAX_CHUNK:
            raise InvalidParams(f"an action chunk needs the same length K in 1..{MAX_CHUNK} for every action")
        return lengths.pop()

    def step_once(self, action: Dict[str, np.ndarray]) -> Dict[str, Any]:
        observation, reward, terminated, truncated, info = self.backend.step(action)
        self.episode_running = not (terminated or truncated)
        return {"observation": observation, "reward": float(reward), "terminated": bool(terminated),
                "truncated": bool(truncated), "info": info}


    def close(self) -> None:
        self.backend.close()


def stacked_frames(replies: List[Dict[str, Any]], frame_key: str) -> np.ndarray:
    """`frame_key`'s observation of every step, stacked."""
    return np.stack([reply["observation"][frame_key] for reply in replies])
