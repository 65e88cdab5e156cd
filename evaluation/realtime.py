"""Real-time evaluation: the policy's inference latency spent in simulated time, reproducibly.

A chunk policy is called every S control steps (`--replan-steps S`). With a latency of D steps
(0 <= D <= S) the world does not wait for it:

    step   t-S ............ t ........... t+D ............ t+S
    call   k-1 (sees obs t-S)  k (sees obs t)                  k+1 (sees obs t+S)
    runs        ...        | chunk k-1's actions S..S+D-1 | chunk k's actions D..S-1 |

The first call of an episode is waited for (the robot starts when its first plan is ready): its
actions 0..S-1 run. Where the previous chunk is shorter than S+D, its last action repeats; where a
new chunk is shorter than S, so does its last. The S actions between two calls go to the server as
one chunk step, so a real-time run renders as little as one without latency. D comes from
`Latency`: a fixed number of steps, each call's own wall time ("measured"), or a seeded model of
milliseconds; time converts to steps at the task's control_hz, rounded up, at most S.
"""

from __future__ import annotations

import inspect
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np

from evaluation import PolicyError, SetupError

MEASURED = "measured"


@dataclass(frozen=True)
class Latency:
    """How long one policy call takes, in control steps: `steps` (fixed), `measured` (each call's
    wall time), or `model` ("fixed:MS" or "lognormal:MEAN_MS,SIGMA", drawn from a seeded generator)."""

    steps: Optional[int] = None
    measured: bool = False
    model: Optional[str] = None

    @property
    def label(self) -> Union[int, str]:
        """What records carry as `latency_steps`: D, "measured", or the model's text."""
        if self.steps is not None:
            return self.steps
        return MEASURED if self.measured else str(self.model)

    def needs_clock(self) -> bool:
        """Whether converting this latency to steps needs the task's control_hz."""
        return self.steps is None


def parse_latencies(text: str) -> List[Latency]:
    """--latency: "2", a sweep "0,1,2,4", or "measured"; SetupError in the flag's words."""
    if text.strip() == MEASURED:
        return [Latency(measured=True)]
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise SetupError(f"--latency {text!r}: give control steps (2, or a sweep 0,1,2,4) or 'measured'") from None
    if any(d < 0 for d in steps) or len(set(steps)) != len(steps):
        raise SetupError(f"--latency {text!r}: steps must be distinct and at least 0")
    return [Latency(steps=d) for d in steps]


def parse_model(text: str) -> Latency:
    """--latency-model: "fixed:MS" or "lognormal:MEAN_MS,SIGMA"; SetupError otherwise."""
    kind, _, numbers = text.partition(":")
    try:
        values = [float(v) for v in numbers.split(",")]
    except ValueError:
        values = []
    if (kind == "fixed" and len(values) == 1 and values[0] >= 0) or \
            (kind == "lognormal" and len(values) == 2 and values[0] > 0 and values[1] >= 0):
        return Latency(model=text)
    raise SetupError(f"--latency-model {text!r}: use fixed:MS or lognormal:MEAN_MS,SIGMA (e.g. lognormal:120,0.3)")


def check_latencies(latencies: List[Latency], replan_steps: Optional[int]) -> None:
    """Every fixed D within 0..S, and S given; SetupError otherwise."""
    if replan_steps is None:
        raise SetupError("--latency needs --replan-steps S: how many actions of each chunk run between calls")
    too_long = [lat.steps for lat in latencies if lat.steps is not None and lat.steps > replan_steps]
    if too_long:
        raise SetupError(f"--latency {too_long[0]} is more than --replan-steps {replan_steps}: a call may take at "
                         "most S steps, or the robot would run out of plan")


def steps_of(seconds: float, control_hz: float, replan_steps: int) -> int:
    """A latency in seconds as control steps: rounded up, at most S."""
    return min(replan_steps, int(math.ceil(seconds * control_hz - 1e-9)))


def episode_generator(task: str, index: int) -> np.random.Generator:
    """The latency model's generator for one episode: the same task and index draw the same delays."""
    return np.random.default_rng([zlib.crc32(task.encode()), index])


def model_seconds(model: str, rng: np.random.Generator) -> float:
    """One draw of a latency model, in seconds. lognormal:MEAN_MS,SIGMA has mean MEAN_MS (its log's
    mean is ln(MEAN_MS) - SIGMA^2/2) and SIGMA the log's standard deviation."""
    kind, _, numbers = model.partition(":")
    values = [float(v) for v in numbers.split(",")]
    if kind == "fixed":
        return values[0] / 1000.0
    mean_ms, sigma = values
    return float(rng.lognormal(math.log(mean_ms) - sigma * sigma / 2.0, sigma)) / 1000.0


def accepts_prefix(function: Any) -> bool:
    """Whether a policy function takes `prefix=` (the actions that will run during its delay)."""
    try:
        return "prefix" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def as_chunk(action: Any, task_info: Dict[str, Any]) -> np.ndarray:
    """A policy's answer as [K, action_dim]: a single action is a chunk of one; named actions refused."""
    if isinstance(action, dict):
        raise PolicyError("--replan-steps and --latency need the policy to return an array (one action or a "
                          "[K, action_dim] chunk), not named actions")
    chunk = np.asarray(action)
    action_shape = tuple(task_info["action_spec"]["action"]["shape"])
    return chunk[None] if chunk.shape == action_shape else chunk


def padded(chunk: np.ndarray, length: int) -> np.ndarray:
    """The chunk extended to `length` by repeating its last action."""
    if len(chunk) >= length:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[-1:], length - len(chunk), axis=0)])


class ChunkSchedule:
    """One episode's policy calls under `--replan-steps S` and a latency (module docstring): each
    `next_actions` is one call and the actions to send as one chunk step. `latency_steps` holds the D
    applied at each call (0 for the first, which is waited for)."""

    def __init__(self, policy: Any, replan_steps: int, latency: Optional[Latency], task_info: Dict[str, Any],
                 rng: Optional[np.random.Generator] = None, clock=time.monotonic) -> None:
        self.policy, self.replan_steps, self.latency = policy, replan_steps, latency
        self.task_info, self.rng, self.clock = task_info, rng, clock
        self.control_hz = task_info.get("control_hz")
        if latency is not None and latency.needs_clock() and not self.control_hz:
            raise SetupError(f"--latency {latency.label}: the task declares no control_hz, so time cannot "
                             "become steps; give --latency in steps")
        self.previous: Optional[np.ndarray] = None
        self.latency_steps: List[int] = []

    def next_actions(self, observation: Dict[str, Any]) -> Any:
        """Call the policy on `observation`; the actions that run until the next call."""
        if self.latency is None:  # plain replanning: the first S actions, as the policy gave them
            action = self.policy.act(observation, self.task_info)
            chunk = as_chunk(action, self.task_info)
            self.latency_steps.append(0)
            return chunk[:self.replan_steps]
        if self.previous is None:
            new = self._call(observation, None)
            delay = 0
        else:
            planned = self._planned_delay()
            runs_meanwhile = padded(self.previous, self.replan_steps + self.replan_steps)[self.replan_steps:]
            guess = planned if planned is not None else self.latency_steps[-1]  # measured: the last call's
            started = self.clock()
            new = self._call(observation, runs_meanwhile[:guess])
            delay = planned if planned is not None else steps_of(self.clock() - started, self.control_hz,
                                                                 self.replan_steps)
        own = padded(new, self.replan_steps)[delay:self.replan_steps]
        executed = own if self.previous is None else np.concatenate(
            [padded(self.previous, self.replan_steps + delay)[self.replan_steps:self.replan_steps + delay], own])
        self.previous = new
        self.latency_steps.append(delay)
        return executed

    def _planned_delay(self) -> Optional[int]:
        """D known before the call (fixed, or drawn from the model); None when it is measured."""
        if self.latency.steps is not None:
            return self.latency.steps
        if self.latency.measured:
            return None
        return steps_of(model_seconds(self.latency.model, self.rng), self.control_hz, self.replan_steps)

    def _call(self, observation: Dict[str, Any], prefix: Optional[np.ndarray]) -> np.ndarray:
        if prefix is not None and getattr(self.policy, "takes_prefix", False):
            action = self.policy.act(observation, self.task_info, prefix=prefix)
        else:
            action = self.policy.act(observation, self.task_info)
        return as_chunk(action, self.task_info)
