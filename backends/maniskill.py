"""ManiSkill3 (PyPI `mani-skill` 3.0.1, SAPIEN 3.0.3) behind the server, in its own venv, rendering
with Mesa's lavapipe (Vulkan on the CPU).

    bash .ci/setup --simulator maniskill              # .venvs/maniskill, with lavapipe from Debian backports
    python sim_server.py --simulator maniskill

SAPIEN renders through Vulkan. Debian 12's lavapipe (Mesa 22.3) lacks VK_KHR_external_semaphore_fd,
so SAPIEN finds no device; Mesa 25's lavapipe from bookworm-backports works. `.ci/setup-maniskill`
unpacks it into `.venvs/maniskill/vulkan/` (no system change), and this backend points its
simulator processes at it (VK_ICD_FILENAMES).

Tasks are `maniskill/<EnvId>` for ManiSkill3's single-arm tabletop tasks (PickCube-v1, StackCube-v1,
PushCube-v1, PegInsertionSide-v1, ...), one environment each (ManiSkill's GPU-parallel batches are
for later). The description is the first sentence of the task's own description in ManiSkill's
source; the instruction is its goal as an imperative ("Push and move a cube to a goal region ...").
Control mode `pd_ee_delta_pose` by default; horizons are ManiSkill's registered ones; success is its
`info["success"]`. The observation is the agent's and the task's state (`agent/qpos`,
`extra/tcp_pose`, ...) and, when cameras are on, `<camera>_image` per sensor camera. An episode is a
function of reset's seed and the actions. Every step renders its cameras (ManiSkill renders its
sensors inside its step).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

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
    observation_spec_of,
    package_versions,
    require_action,
    require_modules,
    require_seed,
    require_task,
    stack_versions,
)

log = logging.getLogger("sim_server.maniskill")
PREFIX = "maniskill/"
TASKS = ("PickCube-v1", "StackCube-v1", "PushCube-v1", "PullCube-v1", "PegInsertionSide-v1", "LiftPegUpright-v1",
         "PlaceSphere-v1", "PokeCube-v1", "RollBall-v1")
CONTROL_MODES = ("pd_ee_delta_pose", "pd_ee_delta_pos", "pd_joint_delta_pos", "pd_joint_pos")
LOAD_OPTIONS = ("cameras", "camera_width", "camera_height", "control_mode", "max_episode_steps")
# lavapipe, as .ci/setup-maniskill unpacks it into the environment.
LAVAPIPE_ICD = os.path.join(sys.prefix, "vulkan", "lvp_icd.json")
LAVAPIPE_LIBRARIES = os.path.join(sys.prefix, "vulkan", "usr", "lib", "x86_64-linux-gnu")

_RENDER_PROBE = """
import gymnasium as gym, mani_skill.envs
env = gym.make("PickCube-v1", obs_mode="rgb", num_envs=1, sensor_configs=dict(width=16, height=16))
env.reset(seed=0)
assert env.unwrapped.device.type == "cpu"
env.close()
print("rendered")
"""


def description(env_id: str) -> str:
    """The first sentence of the task's own description in ManiSkill's source."""
    from mani_skill.utils.registration import REGISTERED_ENVS

    match = re.search(r"\*\*Task Description:\*\*\s*(.*?)(?:\n\s*\n|\*\*)", REGISTERED_ENVS[env_id].cls.__doc__ or "",
                      re.S)
    text = " ".join(match.group(1).split()) if match else env_id
    return text.split(". ")[0].rstrip(".")


def instruction(env_id: str) -> str:
    """The description's goal as an imperative: "A simple task where the objective is to push and move a
    cube ..." becomes "Push and move a cube ..."."""
    text = re.sub(r"^(A simple task where the objective is to|The goal is to)\s+", "", description(env_id))
    return text[:1].upper() + text[1:]


def flatten(observation: Dict[str, Any]) -> Observation:
    """ManiSkill's nested observation of one environment as flat numpy arrays ("agent/qpos", ...), each
    camera's rgb as `<camera>_image`; the cameras' parameters are left out."""
    flat = {}
    for part, value in observation.items():
        if part == "sensor_data":
            flat.update({f"{camera}_image": to_numpy(data["rgb"]) for camera, data in value.items() if "rgb" in data})
        elif isinstance(value, dict) and part != "sensor_param":
            flat.update({f"{part}/{key}": to_numpy(sub) for key, sub in value.items()})
        elif part != "sensor_param":
            flat[part] = to_numpy(value)
    return flat


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (or array) of a batch of one environment, without its batch axis."""
    array = value.cpu().numpy() if hasattr(value, "cpu") else np.asarray(value)
    return np.array(array[0] if array.ndim else array, order="C")  # a copy, 0-d arrays kept


class ManiSkillBackend(SimulatorBackend):
    name = "maniskill"

    def __init__(self) -> None:
        self.env = None
        self.settings: Dict[str, Any] = {}
        self.steps = 0

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("ManiSkill3", {"mani_skill": "mani-skill==3.0.1", "sapien": "sapien==3.0.3",
                                       "torch": "torch"}, setup="bash .ci/setup --simulator maniskill")
        if os.path.exists(LAVAPIPE_ICD) and "VK_ICD_FILENAMES" not in os.environ:
            os.environ["VK_ICD_FILENAMES"] = LAVAPIPE_ICD  # the simulator processes inherit these
            os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [LAVAPIPE_LIBRARIES,
                                                                          os.environ.get("LD_LIBRARY_PATH")]))
        probe = subprocess.run([sys.executable, "-c", _RENDER_PROBE], capture_output=True, text=True, timeout=300)
        if probe.returncode != 0 or "rendered" not in probe.stdout:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackendError(f"SAPIEN cannot render here ({last}); `bash .ci/setup --simulator maniskill` "
                               "installs Mesa's lavapipe for it")
        log.info("ManiSkill3 renders with %s", os.environ.get("VK_ICD_FILENAMES", "the system's Vulkan"))

    def list_tasks(self) -> List[str]:
        return [PREFIX + task for task in TASKS]

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        import gymnasium
        import mani_skill.envs  # noqa: F401 (registers the environments)
        from mani_skill.utils.registration import REGISTERED_ENVS

        env_id = task_name[len(PREFIX):] if task_name.startswith(PREFIX) else None
        if env_id not in TASKS:
            raise TaskNotFound(f"no ManiSkill3 task {task_name!r}; tasks: {', '.join(self.list_tasks())}")
        self.settings = load_settings(options, REGISTERED_ENVS[env_id].max_episode_steps)
        self.close()
        self.env = gymnasium.make(env_id, **make_kwargs(self.settings))
        self.settings["env_id"] = env_id
        observation, _ = self.reset(seed=0)
        low, high = self.env.action_space.low, self.env.action_space.high
        action = array_spec(self.env.action_space.shape, np.float32, low, high)
        return {
            "task_name": task_name, "suite": "maniskill", "language": instruction(env_id),
            "description": description(env_id), "max_episode_steps": self.settings["max_episode_steps"],
            "control_mode": self.settings["control_mode"], "cameras": self.settings["cameras"],
            "has_success": True, "control_hz": float(self.env.unwrapped.control_freq), "conventions": [],
            "images_rotated_180": False,
            "simulator_stack": stack_versions("mani-skill", "sapien", "torch"),
            "action_spec": {"action": action}, "action_space": action,
            "observation_spec": observation_spec_of(observation),
        }

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.env is not None, "reset")
        seed = require_seed(seed, init_state_index, "ManiSkill3 tasks have no init states: reset's seed draws "
                                                    "the scene", limit=2**31)
        observation, _ = self.env.reset(seed=seed)
        self.steps = 0
        return self._observation(observation), {"seed": seed, "success": False, "step": 0}

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.env is not None, "step")
        move = require_action(action, "action", self.env.action_space.shape).astype(np.float32)
        observation, reward, terminated, _, info = self.env.step(move)
        self.steps += 1
        success = bool(to_numpy(info["success"]))
        truncated = self.steps >= self.settings["max_episode_steps"] and not success
        return (self._observation(observation), float(to_numpy(reward)), bool(to_numpy(terminated)) or success,
                truncated, {"success": success, "step": self.steps})

    def _observation(self, observation: Any) -> Observation:
        return flatten(observation)

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": package_versions("mani-skill"),
                "simulator_stack": stack_versions("mani-skill", "sapien", "torch")}

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


def load_settings(options: Dict[str, Any], horizon: int) -> Dict[str, Any]:
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise InvalidParams(f"unknown ManiSkill3 load options {unknown}; options: {', '.join(LOAD_OPTIONS)}")
    cameras = options.get("cameras", True)
    if not isinstance(cameras, bool):
        raise InvalidParams("cameras must be true (the task's sensor cameras) or false (state only)")
    control_mode = options.get("control_mode", "pd_ee_delta_pose")
    if control_mode not in CONTROL_MODES:
        raise InvalidParams(f"control_mode must be one of {', '.join(CONTROL_MODES)}")
    settings = {"cameras": cameras, "control_mode": control_mode}
    for name, default, low, high in (("camera_width", 128, 8, 1024), ("camera_height", 128, 8, 1024),
                                     ("max_episode_steps", horizon, 1, horizon)):
        settings[name] = bounded_int(options, name, default, low, high)
    return settings


def make_kwargs(settings: Dict[str, Any]) -> Dict[str, Any]:
    """gymnasium.make's keywords for these settings; the in-process reference uses the same."""
    kwargs: Dict[str, Any] = {"num_envs": 1, "control_mode": settings["control_mode"],
                              "obs_mode": "rgb" if settings["cameras"] else "state_dict"}
    if settings["cameras"]:
        kwargs["sensor_configs"] = {"width": settings["camera_width"], "height": settings["camera_height"]}
    return kwargs


register_backend("maniskill", ManiSkillBackend)
