"""A simulator process: one backend for one session, answering the server's checked calls.

    python -m backends.worker FD SIMULATOR SESSION_ID LOG_LEVEL    # started by sim_server.py

The server's loop decodes and checks every client request once. This process gets the checked
call (method, request_id and typed fields) on its end of a socket pair, runs it on its backend,
and writes back the reply body, which the loop forwards to the client unchanged. It keeps the
episode lifecycle the protocol promises (no_task_loaded, not_reset) and runs action chunks.

It needs numpy and msgpack only (plus its simulator), so it runs under any interpreter given
with --python, and it dies with the server.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import signal
import sys
import traceback
from typing import Any, Dict, List, Optional

import numpy as np

from backends import get_backend
from backends.base import BackendError, InvalidParams, NoTaskLoaded, NotReset, SimulatorBackend, SimulatorError
from server.process import die_with_parent, reuse_freed_memory
from server.workers import CLOSE_CALL
from sim_server import PROVENANCE_KEYS, decode_call, reply_body

log = logging.getLogger("sim_server.worker")

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

    def handle(self, call: bytes) -> bytes:
        """The reply body to one call: its result, or the typed error it raised."""
        message = decode_call(call)
        try:
            return reply_body(message["request_id"], self.answer(message))
        except SimulatorError as error:
            return reply_body(message["request_id"], error)
        except Exception as error:  # the simulator's own failure, reported, not fatal
            log.error("simulator raised:\n%s", traceback.format_exc())
            return reply_body(message["request_id"], BackendError(f"{type(error).__name__}: {error}"))

    def answer(self, call: Dict[str, Any]) -> Dict[str, Any]:
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


def stacked_frames(replies: List[Dict[str, Any]], frame_key: str) -> np.ndarray:
    """`frame_key`'s observation of every step, stacked."""
    return np.stack([reply["observation"][frame_key] for reply in replies])


def serve(fd: int, simulator: str) -> None:
    """Answer calls from the socket `fd` until the server closes it or sends CLOSE_CALL."""
    connection = multiprocessing.connection.Connection(fd)
    session = SessionSimulator(get_backend(simulator)())
    try:
        while True:
            try:
                call = connection.recv_bytes()
            except (EOFError, OSError):
                break  # the server is gone
            if call == CLOSE_CALL:
                break
            connection.send_bytes(session.handle(call))
    finally:
        session.backend.close()


def main(argv: Optional[List[str]] = None) -> int:
    fd, simulator, session_id, log_level = sys.argv[1:] if argv is None else argv
    die_with_parent()
    reuse_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes us
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker {session_id} %(levelname)s %(message)s")
    serve(int(fd), simulator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
