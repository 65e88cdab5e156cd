"""robosuite's own environments behind the server (Lift, Stack, Door, PickPlace, TwoArm*, ...).

    python sim_server.py --simulator robosuite

Tasks are robosuite's registered environment names. load_task options:
robots (a name or a list; default Panda, or two Pandas for TwoArm tasks),
controller (default OSC_POSE), cameras (default ["agentview"], [] for no
images), camera_width / camera_height (default 128), horizon (default 500),
reward_shaping (default false). terminated is robosuite's success check,
truncated comes at the horizon. Images are as robosuite renders them
(upside down).

An episode is a function of the load options and reset's seed (default 0):
it equals `robosuite.make(...)`, `np.random.seed(seed)`, `env.reset()` and
the same actions in-process, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict
from typing import Any, Collection, Dict, Iterator, List, Optional, Tuple

import numpy as np

from backends import register_backend
from backends.base import (
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
    require_action,
    require_modules,
    require_seed,
    require_task,
    stack_versions,
)
from backends.robosuite_frames import CameraFrames
from backends.task_specs import CUSTOM_SUITE, TASK_DIR_VARIABLE, Registry, served_task

log = logging.getLogger("sim_server.robosuite")
LOAD_OPTIONS = ("robots", "controller", "cameras", "camera_width", "camera_height", "horizon", "reward_shaping")
DEFAULTS = {"controller": "OSC_POSE", "cameras": ["agentview"], "camera_width": 128, "camera_height": 128,
            "horizon": 500, "reward_shaping": False}
DEFAULT_SEED = 0


def environment_names() -> List[str]:
    import robosuite

    return list(robosuite.ALL_ENVIRONMENTS)


def controller_config(robosuite, controller: str, robot: str) -> Dict[str, Any]:
    """robosuite 1.4's arm controller config; on 1.5 the robot's composite config with that arm controller."""
    if hasattr(robosuite, "load_controller_config"):
        return robosuite.load_controller_config(default_controller=controller)
    from robosuite.controllers import load_part_controller_config

    config = robosuite.load_composite_controller_config(controller=None, robot=robot)
    for part in ("right", "left"):
        arm = config["body_parts"].get(part)
        if arm is not None and arm["type"] != controller:
            config["body_parts"][part] = {**load_part_controller_config(default_controller=controller),
                                          "gripper": arm.get("gripper", {"type": "GRIP"})}
    return config


def make_env(task_name: str, settings: Dict[str, Any]):
    """The robosuite env for these settings; the in-process reference builds it the same way."""
    import robosuite

    cameras = settings["cameras"]
    return robosuite.make(
        task_name, robots=settings["robots"],
        controller_configs=controller_config(robosuite, settings["controller"], settings["robots"][0]),
        has_renderer=False, has_offscreen_renderer=bool(cameras), use_camera_obs=bool(cameras),
        camera_names=cameras or "agentview", camera_widths=settings["camera_width"],
        camera_heights=settings["camera_height"], reward_shaping=settings["reward_shaping"],
        horizon=settings["horizon"], ignore_done=True)


def load_settings(task_name: str, options: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise InvalidParams(f"unknown robosuite load options {unknown}; options: {', '.join(LOAD_OPTIONS)}")
    settings = {**DEFAULTS, **options}
    robots = settings.get("robots") or (["Panda", "Panda"] if task_name.startswith("TwoArm") else "Panda")
    if isinstance(robots, str):
        robots = [robots]
    if not (isinstance(robots, list) and robots and all(isinstance(r, str) for r in robots)):
        raise InvalidParams("robots must be a robot name or a list of names")
    settings["robots"] = robots
    cameras = settings["cameras"]
    if not (isinstance(cameras, list) and all(isinstance(c, str) for c in cameras)):
        raise InvalidParams("cameras must be a list of camera names")
    for name, low, high in (("camera_width", 8, 2048), ("camera_height", 8, 2048), ("horizon", 1, 100_000)):
        bounded_int(settings, name, None, low, high)
    if not isinstance(settings["controller"], str):
        raise InvalidParams("controller must be a controller name such as OSC_POSE")
    settings["reward_shaping"] = bool(settings["reward_shaping"])
    return settings


class RobosuiteBackend(SimulatorBackend):
    name = "robosuite"

    def __init__(self) -> None:
        self.env = None
        self.frames: Optional[CameraFrames] = None
        self.settings: Dict[str, Any] = {}
        self.steps = 0
        self._names: Optional[List[str]] = None

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("robosuite", {"mujoco": "mujoco==3.2.3", "robosuite": "robosuite==1.4.0"})
        log.info("robosuite renders with MUJOCO_GL=%s", choose_renderer()["MUJOCO_GL"])

    def list_tasks(self) -> List[str]:
        if self._names is None:
            self._names = environment_names()
        return list(self._names)

    def task_registry(self) -> Optional[Dict[str, Any]]:
        return asdict(self._registry()) if os.environ.get(TASK_DIR_VARIABLE) else None

    def _registry(self) -> Registry:
        """What robosuite specs are checked against: its environments, robots and controllers."""
        import robosuite
        from robosuite.controllers import ALL_CONTROLLERS

        return Registry(objects=[], affordances={}, predicates=[], shipped_tasks=self.list_tasks(),
                        simulator=self.name, robots=sorted(robosuite.ALL_ROBOTS), controllers=sorted(ALL_CONTROLLERS))

    def custom_task(self, task_name: str, options: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        """A custom/NAME spec's base environment, and its options under the client's own."""
        spec = served_task(task_name, self._registry()).spec
        return spec.environment, {**spec.options, **options}

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        shown_name = task_name
        if task_name.startswith(CUSTOM_SUITE + "/"):
            task_name, options = self.custom_task(task_name, options)
        names = self.list_tasks()
        if task_name not in names:
            raise TaskNotFound(f"no robosuite environment {task_name!r}; environments: {', '.join(names)}")
        settings = load_settings(task_name, options)
        self.close()
        try:
            self.env = make_env(task_name, settings)
        except (ValueError, AssertionError, KeyError) as error:  # robosuite's word for bad robots/controllers
            raise InvalidParams(f"robosuite refused these options: {type(error).__name__}: {error}") from None
        self.settings = {"task_name": task_name, **settings}
        self.frames = CameraFrames(self.env)
        observation = self.reset(seed=DEFAULT_SEED)[0]
        low, high = self.env.action_spec
        action = array_spec((self.env.action_dim,), np.float64, low, high)
        return {
            "task_name": shown_name, "environment": task_name, "description": f"robosuite {task_name}",
            "max_episode_steps": settings["horizon"], "robots": settings["robots"],
            "controller": settings["controller"], "cameras": settings["cameras"],
            "image_size": [settings["camera_height"], settings["camera_width"]],
            "control_freq": int(self.env.control_freq), "control_hz": float(self.env.control_freq),
            "has_success": True, "conventions": [], "images_rotated_180": True,  # as LIBERO's: robosuite's renderer
            "action_spec": {"action": action}, "action_space": action,
            "observation_spec": observation_spec_of(observation),
        }

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.env is not None, "reset")
        seed = require_seed(seed, init_state_index, "robosuite environments have no init states; pass seed instead",
                            default=DEFAULT_SEED)
        np.random.seed(seed)  # robosuite 1.4 draws placements from numpy's global RNG
        observation = self.env.reset()
        self.steps = 0
        return dict(observation), {"seed": seed, "step": 0, "success": False}

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.env is not None, "step")
        move = require_action(action, "action", (self.env.action_dim,))
        observation, reward, _, _ = self.env.step(move)
        self.steps += 1
        success = bool(self.env._check_success())
        truncated = self.steps >= self.settings["horizon"] and not success
        return dict(observation), float(reward), success, truncated, {"success": success, "step": self.steps}

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        with self.frames.skipped(keep):
            yield

    def render_skipped(self, observation: Observation) -> Observation:
        return {**observation, **self.frames.render_skipped()}

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": package_versions("robosuite"),
                "simulator_stack": stack_versions("mujoco", "robosuite")}

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


register_backend("robosuite", RobosuiteBackend)
