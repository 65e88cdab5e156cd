"""Franka Kitchen (gymnasium-robotics' FrankaKitchen-v1) behind the server, in its own venv.

    bash .ci/setup --simulator kitchen                # .venvs/kitchen: gymnasium-robotics 1.4.2, mujoco 3.3.7
    python sim_server.py --simulator kitchen

Tasks are `kitchen/<sub-task>` for each of the seven sub-tasks (microwave, kettle, light_switch,
slide_cabinet, hinge_cabinet, bottom_burner, top_burner), and the two classic multi-task
combinations of D4RL's kitchen datasets: `kitchen/complete` (microwave, kettle, light switch,
slide cabinet) and `kitchen/mixed` (microwave, kettle, bottom burner, light switch). Suites:
`kitchen/single` and `kitchen/multi`. The instructions are gymnasium-robotics' own descriptions of
the sub-tasks (kitchen_env.py), joined in order for a combination.

The observation is `state` (the robot's 59-D vector) and, per sub-task, `achieved_goal/<task>` and
`desired_goal/<task>`; `render=true` adds `image`. `info` carries `success` (every sub-task done:
the episode then terminates, as FrankaKitchen-v1 does), `completed` (the sub-tasks done so far) and
`step_completed`. An episode is a function of reset's seed (the robot's start noise) and the actions.
"""

from __future__ import annotations

import contextlib
import logging
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

log = logging.getLogger("sim_server.kitchen")
PREFIX = "kitchen/"
ENV_ID = "FrankaKitchen-v1"
# gymnasium-robotics' own words for each sub-task (the task table in kitchen_env.py).
SUBTASKS = {
    "microwave": "Open the microwave door",
    "kettle": "Move the kettle to the top left burner",
    "light switch": "Turn on the light switch",
    "slide cabinet": "Open the slide cabinet",
    "hinge cabinet": "Open the left hinge cabinet",
    "bottom burner": "Turn the oven knob that activates the bottom burner",
    "top burner": "Turn the oven knob that activates the top burner",
}
# D4RL's kitchen datasets: kitchen-complete, and kitchen-partial / kitchen-mixed.
COMBINATIONS = {"complete": ["microwave", "kettle", "light switch", "slide cabinet"],
                "mixed": ["microwave", "kettle", "bottom burner", "light switch"]}
LOAD_OPTIONS = ("render", "render_width", "render_height", "max_episode_steps")
HORIZON = 280  # FrankaKitchen-v1's max_episode_steps


def task_names() -> Dict[str, List[str]]:
    """task name -> the sub-tasks it asks for, in order."""
    tasks = {PREFIX + subtask.replace(" ", "_"): [subtask] for subtask in SUBTASKS}
    tasks.update({PREFIX + name: subtasks for name, subtasks in COMBINATIONS.items()})
    return tasks


def instruction(subtasks: List[str]) -> str:
    """The sub-tasks' descriptions as one sentence: "Open the microwave door, move the kettle ... and ..."."""
    words = [SUBTASKS[subtask] for subtask in subtasks]
    words = [words[0]] + [word[0].lower() + word[1:] for word in words[1:]]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class KitchenBackend(SimulatorBackend):
    name = "kitchen"

    def __init__(self) -> None:
        self.env = None
        self.subtasks: List[str] = []
        self.settings: Dict[str, Any] = {}
        self.raw: Dict[str, Any] = {}  # the last observation as the env gave it
        self.render_image = False
        self.steps = 0

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("Franka Kitchen", {"gymnasium_robotics": "gymnasium-robotics==1.4.2",
                                           "mujoco": "mujoco==3.3.7"}, setup="bash .ci/setup --simulator kitchen")
        log.info("Franka Kitchen renders with MUJOCO_GL=%s", choose_renderer()["MUJOCO_GL"])

    def list_tasks(self) -> List[str]:
        return list(task_names())

    def suites(self) -> Dict[str, List[str]]:
        names = list(task_names())
        return {PREFIX + "single": names[:len(SUBTASKS)], PREFIX + "multi": names[len(SUBTASKS):]}

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        import gymnasium
        import gymnasium_robotics

        if task_name not in task_names():
            raise TaskNotFound(f"no Franka Kitchen task {task_name!r}; tasks: {', '.join(task_names())}")
        self.settings = load_settings(options)
        gymnasium.register_envs(gymnasium_robotics)
        self.close()
        self.subtasks = task_names()[task_name]
        self.env = gymnasium.make(ENV_ID, tasks_to_complete=list(self.subtasks), disable_env_checker=True,
                                  **self.settings["make"])
        self.render_image = self.settings["render"]
        observation, _ = self.reset(seed=0)
        action = array_spec((9,), np.float64, -1.0, 1.0)
        return {
            "task_name": task_name, "suite": "kitchen", "subtasks": self.subtasks,
            "language": instruction(self.subtasks), "description": instruction(self.subtasks),
            "max_episode_steps": self.settings["max_episode_steps"], "terminates_on_success": True,
            "has_success": True, "control_hz": round(1.0 / self.env.unwrapped.robot_env.dt, 6), "conventions": [],
            "images_rotated_180": False,
            "simulator_stack": stack_versions("gymnasium-robotics", "gymnasium", "mujoco"),
            "action_spec": {"action": action}, "action_space": action,
            "observation_spec": observation_spec_of(observation),
        }

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.env is not None, "reset")
        seed = require_seed(seed, init_state_index, "Franka Kitchen has no init states: its start is drawn from "
                                                    "reset's seed")
        self.raw, _ = self.env.reset(seed=seed)
        self.steps = 0
        return self._observation(), {"seed": seed, "success": False, "step": 0, "completed": []}

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.env is not None, "step")
        move = require_action(action, "action", (9,))
        self.raw, reward, terminated, _, info = self.env.step(move)
        self.steps += 1
        success = not info["tasks_to_complete"]
        truncated = self.steps >= self.settings["max_episode_steps"] and not success
        return (self._observation(), float(reward), bool(terminated or success), truncated,
                {"success": success, "step": self.steps, "completed": list(info["episode_task_completions"]),
                 "step_completed": list(info["step_task_completions"])})

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        rendering, self.render_image = self.render_image, self.render_image and "image" in keep
        try:
            yield
        finally:
            self.render_image = rendering

    def render_skipped(self, observation: Observation) -> Observation:
        return self._observation()  # nothing moved since the step: its frame is the one skipped

    def _observation(self) -> Observation:
        observation = {"state": np.array(self.raw["observation"])}
        for part in ("achieved_goal", "desired_goal"):
            for subtask, value in self.raw[part].items():
                observation[f"{part}/{subtask.replace(' ', '_')}"] = np.array(value)
        if self.render_image:
            observation["image"] = np.asarray(self.env.render())
        return observation

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": package_versions("gymnasium-robotics"),
                "simulator_stack": stack_versions("gymnasium-robotics", "gymnasium", "mujoco")}

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


def load_settings(options: Dict[str, Any]) -> Dict[str, Any]:
    """Checked load options, and the keyword arguments for gymnasium.make they imply."""
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise InvalidParams(f"unknown Franka Kitchen load options {unknown}; options: {', '.join(LOAD_OPTIONS)}")
    render = bool(options.get("render", False))
    make: Dict[str, Any] = {"render_mode": "rgb_array"} if render else {}
    for option, keyword in (("render_width", "width"), ("render_height", "height")):
        value = bounded_int(options, option, 128, 8, 2048)
        if render:
            make[keyword] = value
    horizon = bounded_int(options, "max_episode_steps", HORIZON, 1, HORIZON)
    return {"render": render, "make": make, "max_episode_steps": horizon}


register_backend("kitchen", KitchenBackend)
