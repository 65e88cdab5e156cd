"""Policies: the built-in ones, `module:name` from the current folder, and batching many sessions
into one call. A policy is `act(observation, task_info) -> action or [K, A] chunk`."""

from __future__ import annotations

import importlib
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from evaluation import PolicyError, PolicyTimeout, SetupError
from evaluation.realtime import accepts_prefix
from sim_client import zero_action

DEFAULT_BATCH_WAIT_MS = 10.0
# How long an episode waits for a policy's action: a first call of a big model may compile for
# minutes, a policy server that never answers must not hang the run.
DEFAULT_POLICY_TIMEOUT_S = 300.0


def zero_policy(observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """All zeros, whatever the observation: a baseline and a smoke test."""
    return zero_action(task_info)


def random_policy(observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Uniform within the action spec's bounds (or [-1, 1] where it has none)."""
    action = {}
    for name, spec in task_info["action_spec"].items():
        dtype = np.dtype(spec["dtype"])
        low = np.maximum(np.asarray(spec.get("low", -1.0), dtype=np.float64), -1.0)
        high = np.minimum(np.asarray(spec.get("high", 1.0), dtype=np.float64), 1.0)
        if dtype.kind in "iu":
            action[name] = np.asarray(np.random.randint(int(spec.get("low", 0)), int(spec.get("high", 1)) + 1),
                                      dtype=dtype)
        else:
            action[name] = np.random.uniform(low, high, spec["shape"]).astype(dtype)
    return action


BUILTIN_POLICIES = {"zero": zero_policy, "random": random_policy}


class Policy:
    """What an episode calls: `act(observation, task_info)` and `reset(task_info)`.

    Any exception from the user's code becomes a PolicyError carrying its traceback.
    `convention` is the observation convention the policy declares (a module's CONVENTION, openpi's
    "openpi"; --convention overrides it), `expects` the inputs it declares (key -> {"shape", "dtype"}),
    checked before the first episode against `inputs_of(observation, task_info)`, what it is given.
    With `clip_actions`, every action is clipped into the action spec's bounds. `replan_steps` is how
    many actions of each chunk run between calls (None: the whole chunk); `takes_prefix` whether `act`
    takes the actions that will run during its delay (`prefix=`, real-time runs: realtime.py).
    """

    def __init__(self, act: Callable, reset: Optional[Callable] = None, name: str = "",
                 convention: Optional[str] = None, expects: Optional[Dict[str, Dict[str, Any]]] = None,
                 inputs_of: Optional[Callable] = None) -> None:
        self._act, self._reset = act, reset
        self.name = name
        self.convention, self.expects = convention, expects
        self.inputs_of = inputs_of or (lambda observation, task_info: observation)
        self.clip_actions = False
        self.replan_steps: Optional[int] = None
        self.takes_prefix = False

    @property
    def load_options(self) -> Dict[str, Any]:
        """The load_task options the policy needs: its convention."""
        return {"convention": self.convention} if self.convention else {}

    def act(self, observation: Dict[str, np.ndarray], task_info: Dict[str, Any],
            prefix: Optional[np.ndarray] = None) -> Any:
        try:
            action = self._act(observation, task_info) if prefix is None else \
                self._act(observation, task_info, prefix=prefix)
        except PolicyError:
            raise
        except Exception:
            raise PolicyError(traceback.format_exc()) from None
        return clipped(action, task_info["action_spec"]) if self.clip_actions else action

    def reset(self, task_info: Dict[str, Any]) -> None:
        if self._reset is None:
            return
        try:
            self._reset(task_info)
        except PolicyError:
            raise
        except Exception:
            raise PolicyError(traceback.format_exc()) from None

    def close(self) -> None:
        """Stop helper threads (the batcher); safe to call twice."""
        closer = getattr(self._act, "close", None)
        if closer is not None:
            closer()


def clipped(action: Any, action_spec: Dict[str, Any]) -> Any:
    """The action (or chunk) clipped into its spec's low/high, as openpi's and LeRobot's loops clip."""
    named = action if isinstance(action, dict) else {"action": action}
    kept = {}
    for key, value in named.items():
        spec, value = action_spec.get(key, {}), np.asarray(value)
        if "low" in spec and "high" in spec and value.dtype.kind in "iuf":
            value = np.clip(value, np.asarray(spec["low"]), np.asarray(spec["high"])).astype(value.dtype)
        kept[key] = value
    return kept if isinstance(action, dict) else kept["action"]


def normalized_expectations(declared: Any, source: str) -> Dict[str, Dict[str, Any]]:
    """A policy's declared inputs as key -> {"shape": [...], "dtype": dtype.str or None}. Accepts
    {"state": [8]}, {"state": {"shape": [8], "dtype": "float32"}} and LeRobot's input_features
    (objects with a `shape`); SetupError for anything else."""
    if not isinstance(declared, dict):
        raise SetupError(f"{source} must map observation keys to shapes, e.g. {{'state': [8]}}")
    expected = {}
    for key, value in declared.items():
        shape, dtype = getattr(value, "shape", None), None
        if isinstance(value, dict):
            shape, dtype = value.get("shape"), value.get("dtype")
        elif isinstance(value, (list, tuple)):
            shape = value
        try:
            shape = [int(n) for n in shape]
            dtype = None if dtype is None else np.dtype(dtype).str
        except (TypeError, ValueError):
            raise SetupError(f"{source}[{key!r}]: give a shape such as [8] (and optionally a dtype)") from None
        expected[str(key)] = {"shape": shape, "dtype": dtype}
    return expected


def load_policy(spec: str, batch_size: int = 1, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                timeout_s: float = DEFAULT_POLICY_TIMEOUT_S, replan_steps: Optional[int] = None,
                send_prefix: bool = False) -> Policy:
    """A built-in policy, `module:name` importable from the current folder, or openpi://HOST:PORT
    (openpi's loop runs 5 actions of each chunk; others the whole chunk, unless `replan_steps` says).
    With `send_prefix`, an openpi server gets the actions that run during its delay (`prefix_actions`)."""
    if replan_steps is not None and replan_steps < 1:
        raise SetupError("--replan-steps must be at least 1")
    policy = _loaded_policy(spec, batch_size, batch_wait_ms, timeout_s, send_prefix)
    if spec.startswith("openpi://") and replan_steps is None:
        from evaluation.openpi import DEFAULT_REPLAN_STEPS

        replan_steps = DEFAULT_REPLAN_STEPS
    policy.replan_steps = replan_steps
    return policy


def _loaded_policy(spec: str, batch_size: int, batch_wait_ms: float, timeout_s: float, send_prefix: bool) -> Policy:
    if spec.startswith("openpi://"):
        from evaluation.openpi import OpenpiPolicy, openpi_observation

        served = OpenpiPolicy(spec, timeout_s, send_prefix)
        declared = served.declared_inputs()
        expects = normalized_expectations(declared, f"{spec} metadata") if declared is not None else None
        policy = Policy(served, name=served.uri, convention="openpi", expects=expects, inputs_of=openpi_observation)
        policy.takes_prefix = send_prefix
        return policy
    if send_prefix:
        raise SetupError("--send-prefix is for openpi:// policies; a module policy that takes prefix= gets it")
    if spec in BUILTIN_POLICIES:
        if batch_size > 1:
            raise SetupError(f"--batch-size needs a batched module:function policy, not {spec!r}")
        return Policy(BUILTIN_POLICIES[spec], name=spec)
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SetupError(f"--policy {spec!r}: use zero, random, module:function or openpi://HOST:PORT")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise SetupError(f"--policy {spec!r}: cannot import {module_name}: {type(error).__name__}: {error}") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise SetupError(f"--policy {spec!r}: {module_name} has no callable {attribute!r}")
    reset = getattr(target, "reset", None)
    reset_hook = (lambda task_info: reset()) if callable(reset) else getattr(module, "reset", None)
    reset_hook = reset_hook if callable(reset_hook) else None
    if batch_size > 1:
        act = PolicyBatcher(target, batch_size, batch_wait_ms, timeout_s)
    else:
        act = timed(target, TimedCalls(timeout_s))
        reset_hook = timed(reset_hook, act.calls) if reset_hook is not None else None
    policy = Policy(act, reset_hook, name=spec, convention=declared_convention(module, spec),
                    expects=declared_inputs(module, target, spec))
    policy.takes_prefix = batch_size == 1 and accepts_prefix(target)
    return policy


def timed(function: Callable, calls: TimedCalls) -> Callable:
    """`function` run through `calls` (its time bounded), keeping its name for messages."""
    def bounded(*args: Any, **keywords: Any) -> Any:
        return calls.call(function, *args, **keywords)

    bounded.__name__ = getattr(function, "__name__", "policy")
    bounded.calls = calls  # type: ignore[attr-defined]
    return bounded


def declared_convention(module: Any, spec: str) -> Optional[str]:
    """A policy module's CONVENTION (e.g. "openpi"), or None."""
    convention = getattr(module, "CONVENTION", None)
    if convention is not None and not isinstance(convention, str):
        raise SetupError(f"--policy {spec!r}: CONVENTION must be a convention's name, e.g. 'openpi'")
    return convention


def declared_inputs(module: Any, target: Any, spec: str) -> Optional[Dict[str, Dict[str, Any]]]:
    """What a policy declares it expects: EXPECTS (or LeRobot's input_features) on the policy object
    or its module, normalized; None when it declares nothing."""
    for owner in (target, module):
        for name in ("EXPECTS", "input_features"):
            declared = getattr(owner, name, None)
            if declared is not None and not callable(declared):
                return normalized_expectations(declared, f"--policy {spec!r}: {name}")
    return None


class TimedCalls:
    """A plain policy's calls (act and reset) bounded by --policy-timeout: each session thread hands
    its calls to a helper thread of its own (so a policy sees one thread per session, as before) and
    waits at most `timeout_s`. A call that overruns fails its episode with policy_timeout; its helper,
    which cannot be killed, is left to finish and the next call gets a new one."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.local = threading.local()

    def call(self, function: Callable, *args: Any, **keywords: Any) -> Any:
        helper = getattr(self.local, "helper", None)
        if helper is None:
            helper = self.local.helper = _Helper()
        slot = helper.submit(function, args, keywords)
        if not slot.done.wait(self.timeout_s):
            self.local.helper = None  # it is stuck in the policy: the next call gets a fresh helper
            name = getattr(function, "__name__", "the policy")
            raise PolicyTimeout(f"the policy's {name} gave no answer within {self.timeout_s:g} s (--policy-timeout)")
        if slot.error is not None:
            raise PolicyError(slot.error)
        return slot.action


@dataclass
class _Call:
    function: Callable
    args: Tuple[Any, ...]
    keywords: Dict[str, Any]
    done: threading.Event
    action: Any = None
    error: Optional[str] = None


class _Helper:
    """One thread that runs the calls handed to it, one at a time."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="policy-call", daemon=True).start()

    def submit(self, function: Callable, args: Tuple[Any, ...], keywords: Dict[str, Any]) -> _Call:
        call = _Call(function, args, keywords, threading.Event())
        self.calls.put(call)
        return call

    def _serve(self) -> None:
        while True:
            call = self.calls.get()
            try:
                call.action = call.function(*call.args, **call.keywords)
            except Exception:
                call.error = traceback.format_exc()
            call.done.set()


@dataclass
class _BatchSlot:
    observation: Dict[str, np.ndarray]
    task_info: Dict[str, Any]
    done: threading.Event
    action: Any = None
    error: Optional[str] = None


class PolicyBatcher:
    """One call of a batched policy for the observations of many sessions.

    Each session's thread calls the batcher like a plain policy and waits, at most `timeout_s`;
    a serving thread takes the first waiting observation, gathers others for at most `wait_ms`
    (up to `batch_size`), calls `policy(observations, task_infos)` once and hands each its action.
    """

    def __init__(self, policy: Callable, batch_size: int, wait_ms: float,
                 timeout_s: float = DEFAULT_POLICY_TIMEOUT_S) -> None:
        self.policy, self.batch_size, self.wait_s, self.timeout_s = policy, batch_size, wait_ms / 1000.0, timeout_s
        self.waiting: queue.Queue = queue.Queue()
        self.calls = 0
        self.thread = threading.Thread(target=self._serve, name="policy-batcher", daemon=True)
        self.thread.start()

    def __call__(self, observation: Dict[str, np.ndarray], task_info: Dict[str, Any]) -> Any:
        slot = _BatchSlot(observation, task_info, threading.Event())
        self.waiting.put(slot)
        if not slot.done.wait(self.timeout_s):
            raise PolicyTimeout(f"the batched policy gave no action within {self.timeout_s:g} s")
        if slot.error is not None:
            raise PolicyError(slot.error)
        return slot.action

    def _gather(self, first: _BatchSlot) -> List[_BatchSlot]:
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                slot = self.waiting.get(timeout=remaining) if remaining > 0 else self.waiting.get_nowait()
            except queue.Empty:
                break
            if slot is None:
                self.waiting.put(None)  # keep the stop signal for _serve
                break
            batch.append(slot)
        return batch

    def _serve(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = self._gather(first)
            try:
                actions = list(self.policy([s.observation for s in batch], [s.task_info for s in batch]))
                if len(actions) != len(batch):
                    raise ValueError(f"a batched policy returned {len(actions)} actions for {len(batch)} observations")
            except Exception:
                error = traceback.format_exc()
                actions = [None] * len(batch)
                for slot in batch:
                    slot.error = error
            self.calls += 1
            for slot, action in zip(batch, actions):
                slot.action = action
                slot.done.set()

    def close(self) -> None:
        self.waiting.put(None)
