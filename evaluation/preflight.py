"""The policy checked before the first episode (`sim_eval.py check`, and the start of every run).

One reset of the run's first task and one policy call. The policy's declared inputs (a module's
`EXPECTS` or LeRobot-style `input_features`, an openpi server's metadata) are checked against what
the chosen convention sends, and its action or chunk against the task's `action_spec`: keys, shape,
dtype, finite values, bounds, chunk length. The action is then sent as one step, so whatever the
server itself refuses is found here too. Any mismatch stops the run before it writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from evaluation import PolicyError, SetupError
from evaluation.policies import Policy, clipped
from evaluation.realtime import as_chunk
from evaluation.runner import reset_episode
from sim_client import InvalidParams, ServerError, SimulatorClient


@dataclass
class PolicyInputs:
    """What the policy gets and must give on one simulator, as the results file records it."""

    simulator: str
    task: str
    convention: Optional[str]
    images: Dict[str, List[int]] = field(default_factory=dict)
    images_rotated_180: bool = False
    state: Dict[str, List[int]] = field(default_factory=dict)
    dtypes: Dict[str, str] = field(default_factory=dict)
    action: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def line(self) -> str:
        """One line: convention, image keys with sizes and orientation, state keys, action shape."""
        images = ", ".join(f"{key} {'x'.join(map(str, shape))}" for key, shape in self.images.items()) or "none"
        state = ", ".join(f"{key} {shape}" for key, shape in self.state.items()) or "none"
        action = ", ".join(f"{key} {spec['shape']} {np.dtype(spec['dtype']).name}" + (f" in [{min(spec['low']):g}, "
                                                                         f"{max(spec['high']):g}]"
                                                                         if spec.get("low") and spec.get("high")
                                                                         else "")
                           for key, spec in self.action.items())
        orientation = "rotated 180° as rendered" if self.images_rotated_180 else "upright"
        return (f"policy inputs on {self.simulator} ({self.task}): convention {self.convention or 'none'}; images "
                f"{images} ({orientation}); state {state}; action {action}")

    def as_json(self) -> Dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()}


def policy_inputs(simulator: str, task: str, task_info: Dict[str, Any], observation: Dict[str, np.ndarray]
                  ) -> PolicyInputs:
    images = {key: list(value.shape) for key, value in observation.items() if value.ndim == 3}
    return PolicyInputs(
        simulator=simulator, task=task, convention=task_info.get("convention"), images=images,
        images_rotated_180=bool(task_info.get("images_rotated_180")),
        state={key: list(value.shape) for key, value in observation.items() if key not in images},
        dtypes={key: value.dtype.str for key, value in observation.items()},
        action={key: {k: spec[k] for k in ("shape", "dtype", "low", "high") if k in spec}
                for key, spec in task_info["action_spec"].items()})


def input_problems(expected: Dict[str, Dict[str, Any]], inputs: Dict[str, Any], convention: Optional[str]
                   ) -> List[str]:
    """Each declared input that what the policy gets does not match: missing key, shape, dtype."""
    problems = []
    sent = f"the {convention} convention" if convention else "the simulator"
    for key, spec in expected.items():
        if key not in inputs:
            problems.append(f"the policy expects {key!r} {spec['shape']}, but {sent} sends no such key "
                            f"(keys: {', '.join(sorted(inputs))})")
            continue
        value = np.asarray(inputs[key])
        if list(value.shape) != spec["shape"]:
            problems.append(f"the policy expects {key!r} of shape {spec['shape']}, {sent} sends {list(value.shape)}")
        if spec["dtype"] is not None and value.dtype.str != spec["dtype"]:
            problems.append(f"the policy expects {key!r} as {np.dtype(spec['dtype']).name}, {sent} sends "
                            f"{value.dtype.name}")
    return problems


def action_problems(action: Any, task_info: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(problems, out of bounds) of one action or [K, ...] chunk against the task's action_spec."""
    specs = task_info["action_spec"]
    named = action if isinstance(action, dict) else {"action": action}
    problems = [f"the action has keys {sorted(named)}, the task takes {sorted(specs)}"] \
        if set(named) != set(specs) else []
    lengths, outside = set(), []
    for key in sorted(set(named) & set(specs)):
        spec, value = specs[key], np.asarray(named[key])
        shape = tuple(spec["shape"])
        where = f"action {key!r}"
        if value.dtype.kind not in "biuf":
            problems.append(f"{where} is not numeric ({value.dtype})")
            continue
        if value.shape == shape:
            lengths.add(None)
        elif value.shape[1:] == shape and value.ndim == len(shape) + 1:
            lengths.add(value.shape[0])
        else:
            problems.append(f"{where} has shape {list(value.shape)}; the task takes {list(shape)} "
                            f"(or a chunk [K, {', '.join(map(str, shape))}])")
            continue
        if not np.all(np.isfinite(value)):
            problems.append(f"{where} contains NaN or Inf")
            continue
        if np.dtype(spec["dtype"]).kind in "iu" and not np.all(np.equal(np.mod(value, 1), 0)):
            problems.append(f"{where} must hold whole numbers ({np.dtype(spec['dtype']).name}), got {value.dtype}")
        low, high = spec.get("low"), spec.get("high")
        if low is not None and high is not None and (np.any(value < np.asarray(low)) or
                                                     np.any(value > np.asarray(high))):
            outside.append(f"{where} leaves its bounds [{np.min(low):g}, {np.max(high):g}] "
                           f"(values {np.min(value):.3g}..{np.max(value):.3g})")
    chunks = lengths - {None}
    limit = task_info.get("max_chunk")
    if len(lengths) > 1:
        problems.append("the action mixes single actions and chunks, or chunks of different lengths")
    elif chunks and (min(chunks) < 1 or (limit is not None and max(chunks) > limit)):
        problems.append(f"a chunk of {max(chunks)} actions; the server takes 1..{limit}")
    return problems, outside


def check_policy(sim: SimulatorClient, simulator: str, task: str, policy: Policy, load_options: Dict[str, Any],
                 clip_actions: bool) -> PolicyInputs:
    """Load the first task, reset it, call the policy once and step with its action; the PolicyInputs,
    or SetupError naming every mismatch (nothing of the run is written)."""
    try:
        task_info = sim.load_task(task, **load_options)
    except InvalidParams as error:
        raise SetupError(options_problem(str(error), load_options)) from None
    observation, _ = reset_episode(sim, task_info, 0)
    inputs = policy_inputs(simulator, task, task_info, observation)
    if policy.expects is not None:  # a policy that declares other inputs is not called at all
        try:
            given = policy.inputs_of(observation, task_info)
        except KeyError as error:
            raise SetupError(f"{policy.name} needs the observation key {error} ({task} under the "
                             f"{inputs.convention} convention sends {', '.join(sorted(observation))})") from None
        mismatches = input_problems(policy.expects, given, inputs.convention)
        if mismatches:
            raise SetupError(f"the policy does not fit {task} (nothing was run): " + "; ".join(mismatches))
    try:
        policy.reset(task_info)
        action = policy.act(observation, task_info)
    except PolicyError as error:
        raise SetupError(f"the policy failed on {task}'s first observation: "
                         f"{str(error).strip().splitlines()[-1]}") from None
    if policy.replan_steps is not None and not isinstance(action, dict):  # what a run sends of the chunk
        action = as_chunk(action, task_info)[:policy.replan_steps]
    problems, outside = action_problems(action, task_info)
    if not problems:
        problems += step_problem(sim, clipped(action, task_info["action_spec"]) if clip_actions else action)
    if problems:
        raise SetupError(f"the policy does not fit {task} (nothing was run): " + "; ".join(problems))
    if outside and not clip_actions:
        inputs.warnings.append("; ".join(outside) + ": the simulator gets them as they are (--clip-actions clips "
                               "them into the bounds, as openpi and LeRobot do)")
    return inputs


def step_problem(sim: SimulatorClient, action: Any) -> List[str]:
    """What the server says of the action, sent as one step: [] when it took it."""
    try:
        sim.step(action, render=False)
    except ServerError as error:
        return [f"the server refused the action: {type(error).__name__}: {error}"]
    return []


def options_problem(message: str, load_options: Dict[str, Any]) -> str:
    """A load_task refusal of the run's options, in the flags' words."""
    if "convention" in load_options and "convention" in message:
        return f"--convention {load_options['convention']}: {message}"
    return f"the load options {sorted(load_options)} were refused: {message}"
