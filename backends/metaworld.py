"""Meta-World (PyPI `metaworld` 3.1, its v3 environments) behind the server, in its own venv.

    bash .ci/setup --simulator metaworld              # .venvs/metaworld: metaworld 3.1.1 on mujoco 3.3.0
    python sim_server.py --simulator libero,metaworld

Tasks are `metaworld/<env-name>` for each of the 50 MT50 environments (`metaworld/reach-v3`).
Suites: `metaworld/MT10` and `metaworld/MT50` (Meta-World's own lists) and LeRobot's difficulty
groups `metaworld/easy`, `medium`, `hard`, `very_hard`.

Init states are the 50 goal and object configurations Meta-World's MT1 benchmark draws for a task
(`metaworld.MT1(env, seed=42)`; `init_state_index` 0-49), so an episode is a function of the task,
the init state and the actions. Success is Meta-World's `info["success"]`; an episode terminates on
success, as Meta-World's and LeRobot's evaluations do, and is truncated at the environment's
`max_path_length` (500).

Conventions (load option `convention`, echoed in task_info):
- `standard`: Meta-World's benchmark tasks; observation `state` (its 39-D vector) and one image
  per asked camera (`cameras`, default corner2, 256x256), turned upright (Meta-World's corner
  cameras render rotated 180 degrees).
- `lerobot`: LeRobot's `MetaworldEnv` (src/lerobot/envs/metaworld.py): the corner2 camera at
  480x480 flipped upright as `pixels`, `agent_pos` = the first 4 entries of the state (hand
  position and gripper), actions as float32, task config 0 of `MT1(env, seed=42)` with the
  configuration drawn anew at each reset: here from numpy's global RNG seeded with reset's seed
  (LeRobot seeds it once per run), so no fixed init states.

Instructions (`task_info["language"]`) and the difficulty groups are LeRobot's
(src/lerobot/envs/metaworld_config.json), the short task descriptions of the Meta-World paper.
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

log = logging.getLogger("sim_server.metaworld")
PREFIX = "metaworld/"
MT1_SEED = 42  # LeRobot's; Meta-World draws its 50 configurations per task from it
ACTION_DIM = 4
# Meta-World's corner cameras render rotated 180 degrees; the others upright.
ROTATED_CAMERAS = ("corner", "corner2", "corner3")
CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV")
LEROBOT_CORNER2_POSITION = (0.75, 0.075, 0.7)  # LeRobot sets it; it is metaworld 3.1.1's own too
LOAD_OPTIONS = ("convention", "cameras", "camera_width", "camera_height", "observation_keys", "max_episode_steps")
CONVENTIONS = {
    "standard": {"cameras": ["corner2"], "size": 256, "init_states": True},
    "lerobot": {"cameras": ["corner2"], "size": 480, "init_states": False},
}
DEFAULT_CONVENTION = "standard"

# LeRobot's TASK_DESCRIPTIONS and DIFFICULTY_TO_TASKS (src/lerobot/envs/metaworld_config.json).
INSTRUCTIONS = {
    "assembly-v3": "Pick up a nut and place it onto a peg",
    "basketball-v3": "Dunk the basketball into the basket",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin",
    "box-close-v3": "Grasp the cover and close the box with it",
    "button-press-topdown-v3": "Press a button from the top",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top",
    "button-press-v3": "Press a button",
    "button-press-wall-v3": "Bypass a wall and press a button",
    "coffee-button-v3": "Push a button on the coffee machine",
    "coffee-pull-v3": "Pull a mug from a coffee machine",
    "coffee-push-v3": "Push a mug under a coffee machine",
    "dial-turn-v3": "Rotate a dial 180 degrees",
    "disassemble-v3": "Pick a nut out of a peg",
    "door-close-v3": "Close a door with a revolving joint",
    "door-lock-v3": "Lock the door by rotating the lock clockwise",
    "door-open-v3": "Open a door with a revolving joint",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise",
    "hand-insert-v3": "Insert the gripper into a hole",
    "drawer-close-v3": "Push and close a drawer",
    "drawer-open-v3": "Open a drawer",
    "faucet-open-v3": "Rotate the faucet counter-clockwise",
    "faucet-close-v3": "Rotate the faucet clockwise",
    "hammer-v3": "Hammer a screw on the wall",
    "handle-press-side-v3": "Press a handle down sideways",
    "handle-press-v3": "Press a handle down",
    "handle-pull-side-v3": "Pull a handle up sideways",
    "handle-pull-v3": "Pull a handle up",
    "lever-pull-v3": "Pull a lever down 90 degrees",
    "peg-insert-side-v3": "Insert a peg sideways",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck",
    "pick-out-of-hole-v3": "Pick up a puck from a hole",
    "reach-v3": "Reach a goal position",
    "push-back-v3": "Push the puck to a goal",
    "push-v3": "Push the puck to a goal",
    "pick-place-v3": "Pick and place a puck to a goal",
    "plate-slide-v3": "Slide a plate into a cabinet",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways",
    "plate-slide-back-v3": "Get a plate from the cabinet",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways",
    "peg-unplug-side-v3": "Unplug a peg sideways",
    "soccer-v3": "Kick a soccer into the goal",
    "stick-push-v3": "Grasp a stick and push a box using the stick",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick",
    "push-wall-v3": "Bypass a wall and push a puck to a goal",
    "reach-wall-v3": "Bypass a wall and reach a goal",
    "shelf-place-v3": "Pick and place a puck onto a shelf",
    "sweep-into-v3": "Sweep a puck into a hole",
    "sweep-v3": "Sweep a puck off the table",
    "window-open-v3": "Push and open a window",
    "window-close-v3": "Push and close a window",
}
DIFFICULTY = {
    "easy": ["button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-wall-v3",
             "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
             "drawer-close-v3", "drawer-open-v3", "faucet-close-v3", "faucet-open-v3", "handle-press-v3",
             "handle-press-side-v3", "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
             "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3", "reach-wall-v3",
             "window-close-v3", "window-open-v3", "peg-unplug-side-v3"],
    "medium": ["basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3", "hammer-v3",
               "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-v3", "sweep-into-v3"],
    "hard": ["assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3"],
    "very_hard": ["shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"],
}


def environment_lists() -> Tuple[List[str], List[str]]:
    """(MT50, MT10) environment names, in Meta-World's order."""
    from metaworld import env_dict

    return list(env_dict.MT50_V3), list(env_dict.MT10_V3)


class MetaWorldBackend(SimulatorBackend):
    name = "metaworld"

    def __init__(self) -> None:
        self.env = None
        self.settings: Dict[str, Any] = {}
        self.tasks: List[Any] = []  # the MT1 benchmark's 50 configurations of the loaded task
        self.next_init_state = 0
        self.steps = 0
        self.state: Optional[np.ndarray] = None  # the last raw observation
        self.skipped_cameras: Collection[str] = ()

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("Meta-World", {"metaworld": "metaworld==3.1.1", "mujoco": "mujoco==3.3.0",
                                       "packaging": "packaging"}, setup="bash .ci/setup --simulator metaworld")
        log.info("Meta-World renders with MUJOCO_GL=%s", choose_renderer()["MUJOCO_GL"])

    # Catalog ----------------------------------------------------------------

    def list_tasks(self) -> List[str]:
        return [PREFIX + name for name in environment_lists()[0]]

    def suites(self) -> Dict[str, List[str]]:
        mt50, mt10 = environment_lists()
        groups = {"MT10": mt10, "MT50": mt50, **DIFFICULTY}
        return {PREFIX + group: [PREFIX + name for name in names] for group, names in groups.items()}

    # Loading ----------------------------------------------------------------

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        env_name = task_name[len(PREFIX):] if task_name.startswith(PREFIX) else None
        if env_name not in environment_lists()[0]:
            raise TaskNotFound(f"no Meta-World task {task_name!r}; tasks look like metaworld/reach-v3")
        settings = self._load_settings(env_name, options)
        self.close()
        self.env, self.tasks = make_env(env_name, settings)
        self.settings = settings
        self.next_init_state = 0
        observation, _ = self.reset(**({"init_state_index": 0} if settings["init_states"] else {"seed": 0}))
        return self._task_info(observation)

    def _load_settings(self, env_name: str, options: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(options) - set(LOAD_OPTIONS))
        if unknown:
            raise InvalidParams(f"unknown Meta-World load options {unknown}; options: {', '.join(LOAD_OPTIONS)}")
        name = options.get("convention", DEFAULT_CONVENTION)
        if name not in CONVENTIONS:
            raise InvalidParams(f"unknown convention {name!r}; conventions: {', '.join(CONVENTIONS)}")
        convention = CONVENTIONS[name]
        cameras = options.get("cameras", convention["cameras"])
        if name == "lerobot" and cameras != ["corner2"]:
            raise InvalidParams("the lerobot convention renders the corner2 camera only, as LeRobot does")
        if not (isinstance(cameras, list) and all(camera in CAMERAS for camera in cameras)):
            raise InvalidParams(f"cameras must be a list drawn from {list(CAMERAS)}")
        settings = {"env_name": env_name, "convention": name, "cameras": list(dict.fromkeys(cameras)),
                    "init_states": convention["init_states"], "observation_keys": options.get("observation_keys")}
        for option in ("camera_width", "camera_height"):
            settings[option] = bounded_int(options, option, convention["size"], 8, 2048)
        settings["max_episode_steps"] = bounded_int(options, "max_episode_steps", 500, 1, 500)
        keys = settings["observation_keys"]
        if keys is not None and not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
            raise InvalidParams("observation_keys must be a list of observation names")
        return settings

    def _task_info(self, observation: Observation) -> Dict[str, Any]:
        settings = self.settings
        action = array_spec((ACTION_DIM,), np.float32, -1.0, 1.0)
        info = {
            "task_name": PREFIX + settings["env_name"], "suite": "metaworld",
            "language": INSTRUCTIONS[settings["env_name"]], "description": INSTRUCTIONS[settings["env_name"]],
            "convention": settings["convention"], "max_episode_steps": settings["max_episode_steps"],
            "cameras": settings["cameras"], "image_size": [settings["camera_height"], settings["camera_width"]],
            "images_rotated_180": False, "terminates_on_success": True, "has_success": True,
            "control_hz": round(1.0 / self.env.dt, 6), "conventions": list(CONVENTIONS),
            "state_vector": "hand xyz + gripper (agent_pos)" if settings["convention"] == "lerobot" else
                            "Meta-World's 39-D observation",
            "simulator_stack": stack_versions("metaworld", "mujoco", "gymnasium"),
            "action_spec": {"action": action}, "action_space": action,
            "observation_spec": observation_spec_of(observation),
        }
        if settings["init_states"]:
            info["num_init_states"] = len(self.tasks)
        return info

    # Episodes ---------------------------------------------------------------

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.env is not None, "reset")
        if self.settings["init_states"]:  # a seed changes nothing here: the configuration fixes the episode
            index = self.next_init_state if init_state_index is None else init_state_index
            if not 0 <= index < len(self.tasks):
                raise InvalidParams(f"init_state_index must be in [0, {len(self.tasks)}), got {index}")
            self.env.set_task(self.tasks[index])
            self.next_init_state = (index + 1) % len(self.tasks)
            info = {"init_state_index": index}
        else:
            seed = require_seed(seed, init_state_index, "the lerobot convention draws a configuration from reset's "
                                                        "seed; pass seed")
            np.random.seed(seed)  # LeRobot's env draws the configuration from numpy's global RNG
            info = {"seed": seed}
        self.state, _ = self.env.reset()
        self.steps = 0
        return self._observation(), {**info, "success": False, "step": 0}

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.env is not None, "step")
        move = require_action(action, "action", (ACTION_DIM,)).astype(np.float32)  # as Meta-World's action space
        self.state, reward, _, _, info = self.env.step(move)
        self.steps += 1
        success = bool(info.get("success", 0.0))
        truncated = self.steps >= self.settings["max_episode_steps"] and not success
        return (self._observation(), float(reward), success, truncated,
                {"success": success, "step": self.steps, **{k: float(v) for k, v in info.items() if k != "success"}})

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        self.skipped_cameras = [camera for camera in self.settings["cameras"] if self._image_key(camera) not in keep]
        try:
            yield
        finally:
            self.skipped_cameras = ()

    def render_skipped(self, observation: Observation) -> Observation:
        return self._observation()  # nothing moved since the step: the frames are those it skipped

    def _observation(self) -> Observation:
        if self.settings["convention"] == "lerobot":
            observation = {"agent_pos": self.state[:4].copy()}
        else:
            observation = {"state": self.state.copy()}
        for camera in self.settings["cameras"]:
            observation[self._image_key(camera)] = self._render(camera)
        keys = self.settings["observation_keys"]
        if keys is not None:
            missing = sorted(set(keys) - set(observation))
            if missing:
                raise InvalidParams(f"no observation keys {missing}; keys: {sorted(observation)}")
            observation = {key: observation[key] for key in keys}
        return observation

    def _image_key(self, camera: str) -> str:
        return "pixels" if self.settings["convention"] == "lerobot" else f"{camera}_image"

    def _render(self, camera: str) -> np.ndarray:
        height, width = self.settings["camera_height"], self.settings["camera_width"]
        if camera in self.skipped_cameras:
            return np.zeros((height, width, 3), np.uint8)
        viewer = self.env.mujoco_renderer._get_viewer(render_mode="rgb_array")  # what env.render() uses
        image = viewer.render(render_mode="rgb_array", camera_id=self.env.model.camera(camera).id)
        return np.ascontiguousarray(image[::-1, ::-1]) if camera in ROTATED_CAMERAS else image

    # Lifetime ---------------------------------------------------------------

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": package_versions("metaworld"),
                "simulator_stack": stack_versions("metaworld", "mujoco", "gymnasium")}

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


def make_env(env_name: str, settings: Dict[str, Any]):
    """(env, the MT1 benchmark's tasks) as the convention builds them; the in-process reference too."""
    import metaworld

    benchmark = metaworld.MT1(env_name, seed=MT1_SEED)
    cameras = settings["cameras"]
    env = benchmark.train_classes[env_name](render_mode="rgb_array" if cameras else None,
                                            camera_name=cameras[0] if cameras else None,
                                            width=settings["camera_width"], height=settings["camera_height"])
    env.set_task(benchmark.train_tasks[0])
    if settings["convention"] == "lerobot":
        env.model.cam_pos[2] = LEROBOT_CORNER2_POSITION
        env.reset()
        env._freeze_rand_vec = False  # LeRobot: a new configuration at every reset
    return env, list(benchmark.train_tasks)


register_backend("metaworld", MetaWorldBackend)
