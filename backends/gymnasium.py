"""Gymnasium environments behind the server: any registered id that can be created here.

    python sim_server.py --simulator gymnasium

Tasks are Gymnasium ids (CartPole-v1, Hopper-v5, ...). Spaces map onto the
protocol's specs: a Box is an array spec with bounds, a Discrete an int64
scalar with low/high, Dict and Tuple spaces become one key per entry. The
observation is {"observation": ...} for a flat space, one key per entry for a
Dict or Tuple space, plus "image" (env.render()) when load_task asks for
render=True. terminated and truncated are the environment's own; actions
outside the action space are invalid_params.

load_task options: render (bool), render_width / render_height (MuJoCo envs),
max_episode_steps (overrides the registered limit).

Gymnasium's environments declare no success criterion (CartPole, Hopper, ...
end when they fail or at their time limit), so task_info says
`has_success: false`, every info's `success` is False, and an evaluation
reports these tasks by their return. `control_hz` is 1 / the environment's
`dt` (or CartPole's `tau`); None where the environment has no time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from typing import Any, Collection, Dict, Iterator, List, Optional, Tuple

import numpy as np

from backends import register_backend
from backends.base import (
    BackendError,
    InvalidParams,
    Observation,
    SimulatorBackend,
    StepResult,
    TaskNotFound,
    array_spec,
    bounded_int,
    choose_renderer,
    observation_spec_of,
    package_versions,
    require_modules,
    require_task,
    stack_versions,
)

log = logging.getLogger("sim_server.gymnasium")
LOAD_OPTIONS = ("render", "render_width", "render_height", "max_episode_steps")


def creatable_ids() -> List[str]:
    """Registered ids whose environment can be built with what is installed (built once, closed)."""
    import gymnasium

    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every old version warns that it is old
        for env_id in sorted(gymnasium.envs.registry):
            try:
                gymnasium.make(env_id).close()
            except Exception:  # missing extras (box2d, mujoco-py, jax, shimmy...) mean "not here"
                continue
            found.append(env_id)
    return found


def space_specs(space, name: str) -> Dict[str, Any]:
    """The spec map of a space: one entry for a flat space, one per key of a Dict or Tuple."""
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {f"{name}/{key}" if name != "action" else key: space_specs(sub, key)[key]
                for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return {f"{name}/{index}": space_specs(sub, str(index))[str(index)] for index, sub in enumerate(space.spaces)}
    if isinstance(space, spaces.Box):
        return {name: array_spec(space.shape, space.dtype, space.low, space.high)}
    if isinstance(space, spaces.Discrete):
        return {name: array_spec((), np.int64, int(space.start), int(space.start + space.n - 1))}
    if isinstance(space, (spaces.MultiDiscrete, spaces.MultiBinary)):
        return {name: array_spec(space.shape, space.dtype)}
    raise BackendError(f"unsupported Gymnasium space {type(space).__name__}")


def flatten_observation(value: Any, space, name: str = "observation") -> Observation:
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {k: v for key, sub in space.spaces.items() for k, v in
                flatten_observation(value[key], sub, f"{name}/{key}").items()}
    if isinstance(space, spaces.Tuple):
        return {k: v for index, sub in enumerate(space.spaces) for k, v in
                flatten_observation(value[index], sub, f"{name}/{index}").items()}
    return {name: np.asarray(value)}


def control_hz(env) -> Optional[float]:
    """Actions per simulated second: 1 / dt (MuJoCo's and most classic environments), or 1 / tau
    (CartPole); None for an environment without time (MountainCar's steps are not seconds)."""
    unwrapped = env.unwrapped
    seconds = getattr(unwrapped, "dt", None) or getattr(unwrapped, "tau", None)
    return round(1.0 / float(seconds), 6) if isinstance(seconds, (int, float)) and seconds > 0 else None


def serializable_info(info: Dict[str, Any]) -> Dict[str, Any]:
    """The info entries msgpack can carry: numbers, strings, bools and numeric arrays."""
    kept = {}
    for key, value in info.items():
        if isinstance(value, (bool, int, float, str, np.generic)) and not isinstance(value, np.object_):
            kept[str(key)] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            kept[str(key)] = value
    return kept


class GymnasiumBackend(SimulatorBackend):
    name = "gymnasium"
    _task_ids: Optional[List[str]] = None

    def __init__(self) -> None:
        self.env = None
        self.render = False
        self.task_name: Optional[str] = None
        self.steps = 0

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("Gymnasium", {"gymnasium": "gymnasium"})
        if importlib.util.find_spec("mujoco") is None:
            log.info("MuJoCo is not installed: Gymnasium's MuJoCo environments are not offered")
        else:
            log.info("Gymnasium renders MuJoCo envs with MUJOCO_GL=%s", choose_renderer()["MUJOCO_GL"])
        cls._task_ids = creatable_ids()
        log.info("%d Gymnasium environments can be created here", len(cls._task_ids))

    def list_tasks(self) -> List[str]:
        if GymnasiumBackend._task_ids is None:
            GymnasiumBackend._task_ids = creatable_ids()
        return list(GymnasiumBackend._task_ids)

    def check_task(self, task_name: str) -> None:
        import gymnasium

        if task_name not in gymnasium.envs.registry:
            close = [env_id for env_id in gymnasium.envs.registry if task_name.split("-")[0].lower() in env_id.lower()]
            raise TaskNotFound(f"no Gymnasium environment {task_name!r}; close matches: {close[:5]}")

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        import gymnasium

        self.check_task(task_name)
        unknown = sorted(set(options) - set(LOAD_OPTIONS))
        if unknown:
            raise InvalidParams(f"unknown Gymnasium load options {unknown}; options: {', '.join(LOAD_OPTIONS)}")
        kwargs = self._make_kwargs(options)
        self.close()
        try:
            self.env = gymnasium.make(task_name, **kwargs)
        except gymnasium.error.Error as error:
            raise BackendError(f"cannot create {task_name} here: {error}") from None
        self.render = bool(options.get("render", False))
        self.task_name = task_name
        observation_spec = space_specs(self.env.observation_space, "observation")
        if self.render:
            self.env.reset(seed=0)
            observation_spec.update(observation_spec_of({"image": self.env.render()}))
        action_spec = space_specs(self.env.action_space, "action")
        limit = self.env.spec.max_episode_steps if self.env.spec else None
        return {
            "task_name": task_name, "description": f"Gymnasium {task_name}",
            "max_episode_steps": int(limit or 0),  # 0: the environment sets no limit
            "action_spec": action_spec, "observation_spec": observation_spec,
            "action_space": next(iter(action_spec.values())),
            "has_success": False, "control_hz": control_hz(self.env), "conventions": [], "images_rotated_180": False,
        }

    @staticmethod
    def _make_kwargs(options: Dict[str, Any]) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {}
        if options.get("render"):
            kwargs["render_mode"] = "rgb_array"
            for option, keyword in (("render_width", "width"), ("render_height", "height")):
                if option in options:
                    kwargs[keyword] = bounded_int(options, option, None, 8, 2048)
        if "max_episode_steps" in options:
            if type(options["max_episode_steps"]) is not int or options["max_episode_steps"] < 1:
                raise InvalidParams("max_episode_steps must be a positive int")
            kwargs["max_episode_steps"] = options["max_episode_steps"]
        return kwargs

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.env is not None, "reset")
        if init_state_index is not None:
            raise InvalidParams("Gymnasium environments have no init states; pass seed instead")
        if seed is not None and not 0 <= seed < 2**32:
            raise InvalidParams("seed must be in [0, 2**32)")
        observation, info = self.env.reset(seed=seed)
        self.steps = 0
        return self._observation(observation), {**serializable_info(info), "success": False, "step": 0}

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        rendering, self.render = self.render, self.render and "image" in keep
        try:
            yield
        finally:
            self.render = rendering

    def render_skipped(self, observation: Observation) -> Observation:
        return {**observation, "image": np.asarray(self.env.render())} if self.render else observation

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.env is not None, "step")
        observation, reward, terminated, truncated, info = self.env.step(self._checked_action(action))
        self.steps += 1
        return self._observation(observation), float(reward), bool(terminated), bool(truncated), \
            {**serializable_info(info), "success": False, "step": self.steps}

    def _checked_action(self, action: Dict[str, np.ndarray]) -> Any:
        from gymnasium import spaces

        space = self.env.action_space
        if isinstance(space, spaces.Dict):
            candidate = {key: self._convert(action.get(key), sub, key) for key, sub in space.spaces.items()}
        else:
            candidate = self._convert(action.get("action"), space, "action")
        if not space.contains(candidate):
            raise InvalidParams(f"action {action} is outside the action space {space}")
        return candidate

    @staticmethod
    def _convert(value: Optional[np.ndarray], space, name: str) -> Any:
        from gymnasium import spaces

        if value is None:
            raise InvalidParams(f"action needs {name!r}")
        value = np.asarray(value)
        if value.dtype.kind not in "biuf" or (value.dtype.kind == "f" and not np.all(np.isfinite(value))):
            raise InvalidParams(f"action {name!r} must be finite numbers")
        if isinstance(space, spaces.Discrete):
            if value.shape != () or value.dtype.kind not in "iu" and not float(value).is_integer():
                raise InvalidParams(f"action {name!r} must be one integer")
            return np.int64(value)
        if value.shape != space.shape:
            raise InvalidParams(f"action {name!r} must have shape {list(space.shape)}, got {list(value.shape)}")
        return value.astype(space.dtype)

    def _observation(self, observation: Any) -> Observation:
        flat = flatten_observation(observation, self.env.observation_space)
        if self.render:
            flat["image"] = np.asarray(self.env.render())
        return flat

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": package_versions("gymnasium"),
                "simulator_stack": stack_versions("gymnasium", "mujoco")}

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


register_backend("gymnasium", GymnasiumBackend)
