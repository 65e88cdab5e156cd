"""A deterministic pure-numpy simulator for tests, demos and transport benchmarks.

A point "gripper" moves in a 3-D box toward a per-task goal. Observations are two
camera-like uint8 images (SIM_MOCK_IMAGE_SIZE square, RGB, as LIBERO's two
cameras) and a small float32 state vector. Each step burns SIM_MOCK_STEP_MS of real CPU time, so benchmarks
see a simulator's cost; the episode ends after SIM_MOCK_EPISODE_STEPS steps.

Fault injection for tests, as load_task options (Gymnasium's AsyncVectorEnv
tests do the same with slow or failing environments):
  crash_at_step=N   the process kills itself with SIGKILL at step N
  hang_at_step=N    step N never returns
  fail_at_step=N    step N raises a plain exception (becomes backend_error)
  step_sleep_s=S    every step also sleeps S seconds (no CPU)
  load_sleep_s=S    load_task sleeps S seconds, like a slow simulator build
  gate_file=PATH    every step waits until PATH exists (at most GATE_LIMIT_S): a test holds a
                    step open for exactly as long as it needs, then opens the gate by making the file
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
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
    require_action,
    require_task,
    stack_versions,
)

VERSION = "1.0"
ACTION_DIM = 7
CONTROL_HZ = 20  # as LIBERO's: one action is 50 ms of the mock's (imaginary) time
GOALS = {
    "reach_center": (0.0, 0.0, 0.0),
    "reach_corner": (0.8, 0.8, 0.8),
    "reach_floor": (0.0, 0.0, -0.8),
}
FAULT_OPTIONS = ("crash_at_step", "hang_at_step", "fail_at_step")
SLEEP_OPTIONS = ("step_sleep_s", "load_sleep_s")
# A gated step gives up waiting after this long (a bound on a test that never opens its gate).
GATE_LIMIT_S = 600.0


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def burn_cpu(milliseconds: float) -> None:
    """Busy-wait on the CPU, as a real simulator's physics and rendering would."""
    deadline = time.process_time() + milliseconds / 1000.0
    while time.process_time() < deadline:
        pass


def gradient_planes(size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The image before shading (x ramp, y ramp, their sum, each mod 256), and a one-hot mask per
    channel, both flat, so that shading is contiguous adds (a broadcast over a 3-long last axis
    is 40x slower)."""
    ramp = np.arange(size, dtype=np.uint16)
    planes = np.empty((size, size, 3), dtype=np.uint8)
    planes[..., 0] = ramp[None, :] % 256
    planes[..., 1] = ramp[:, None] % 256
    planes[..., 2] = (ramp[None, :] + ramp[:, None]) % 256
    masks = np.zeros((3, size, size, 3), dtype=np.uint8)
    for channel in range(3):
        masks[channel, ..., channel] = 1
    return planes.reshape(-1), masks.reshape(3, -1)


class MockBackend(SimulatorBackend):
    name = "mock"

    def __init__(self) -> None:
        self.image_size = int(_env_number("SIM_MOCK_IMAGE_SIZE", 256))
        self.episode_steps = int(_env_number("SIM_MOCK_EPISODE_STEPS", 100))
        self.step_ms = _env_number("SIM_MOCK_STEP_MS", 0.0)
        self.task: Optional[str] = None
        self.options: Dict[str, Any] = {}
        self.position = np.zeros(3)
        self.steps = 0
        self._planes: Optional[np.ndarray] = None
        self._masks: Optional[np.ndarray] = None
        self._skipped_images: Collection[str] = ()  # image keys not drawn inside frames_skipped()

    def list_tasks(self) -> List[str]:
        return list(GOALS)

    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        if task_name not in GOALS:
            raise TaskNotFound(f"no mock task {task_name!r}; tasks: {', '.join(GOALS)}")
        self.options = self._checked_options(options)
        time.sleep(self.options.get("load_sleep_s", 0))
        self.task = task_name
        return {
            "task_name": task_name,
            "description": f"move the gripper to {GOALS[task_name]}",
            "max_episode_steps": self.episode_steps,
            "action_spec": {"action": array_spec((ACTION_DIM,), np.float64, -1.0, 1.0)},
            "observation_spec": {
                "image": array_spec((self.image_size, self.image_size, 3), np.uint8),
                "wrist_image": array_spec((self.image_size, self.image_size, 3), np.uint8),
                "state": array_spec((4,), np.float32),
            },
            "action_space": array_spec((ACTION_DIM,), np.float64, -1.0, 1.0),
            "has_success": True, "control_hz": CONTROL_HZ, "conventions": [], "images_rotated_180": False,
        }

    @staticmethod
    def _checked_options(options: Dict[str, Any]) -> Dict[str, Any]:
        for key, value in options.items():
            if key in FAULT_OPTIONS and not (isinstance(value, int) and value >= 0):
                raise InvalidParams(f"{key} must be a non-negative int")
            elif key in SLEEP_OPTIONS and not (isinstance(value, (int, float)) and 0 <= value <= 600):
                raise InvalidParams(f"{key} must be a number of seconds in [0, 600]")
            elif key == "gate_file" and not isinstance(value, str):
                raise InvalidParams("gate_file must be a path")
            elif key not in FAULT_OPTIONS and key not in SLEEP_OPTIONS and key != "gate_file":
                raise InvalidParams(f"unknown mock option {key!r}")
        return dict(options)

    def reset(
        self, seed: Optional[int] = None, init_state_index: Optional[int] = None
    ) -> Tuple[Observation, Dict[str, Any]]:
        require_task(self.task is not None, "reset")
        if init_state_index is not None and not 0 <= init_state_index < 50:
            raise InvalidParams(f"init_state_index must be in [0, 50), got {init_state_index}")
        start = init_state_index if init_state_index is not None else (seed or 0)
        self.position = np.random.default_rng(start).uniform(-1.0, 1.0, 3)
        self.steps = 0
        return self._observation(), {"step": 0, "success": False}

    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        require_task(self.task is not None, "step")
        move = require_action(action, "action", (ACTION_DIM,))
        self.steps += 1
        self._inject_faults()
        burn_cpu(self.step_ms)
        self.position = np.clip(self.position + 0.1 * np.clip(move[:3], -1.0, 1.0), -1.0, 1.0)
        distance = float(np.linalg.norm(self.position - GOALS[self.task]))
        success = distance < 0.05
        truncated = self.steps >= self.episode_steps and not success
        info = {"step": self.steps, "success": success, "distance": distance}
        return self._observation(), -distance, success, truncated, info

    def _inject_faults(self) -> None:
        if self.options.get("step_sleep_s"):
            time.sleep(self.options["step_sleep_s"])
        if self.options.get("gate_file"):
            deadline = time.monotonic() + GATE_LIMIT_S
            while not os.path.exists(self.options["gate_file"]) and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.options.get("crash_at_step") == self.steps:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.options.get("hang_at_step") == self.steps:
            while True:
                time.sleep(3600)
        if self.options.get("fail_at_step") == self.steps:
            raise RuntimeError(f"injected failure at step {self.steps}")

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        self._skipped_images = {"image", "wrist_image"} - set(keep)
        try:
            yield
        finally:
            self._skipped_images = ()

    def render_skipped(self, observation: Observation) -> Observation:
        return self._observation()  # the images are a function of the state

    def _observation(self) -> Observation:
        state = np.append(self.position, self.steps).astype(np.float32)
        if self._skipped_images == {"image", "wrist_image"}:
            blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
            return {"image": blank, "wrist_image": blank, "state": state}
        image = self._image()
        return {"image": image, "wrist_image": image[::-1].copy(), "state": state}

    def _image(self) -> np.ndarray:
        size = self.image_size
        if self._planes is None:
            self._planes, self._masks = gradient_planes(size)
        shade = ((self.position + 1.0) * 127.5).astype(np.uint16)
        offsets = np.array([shade[0], shade[1], shade[2] + self.steps], dtype=np.uint16) % 256
        shading = self._masks[0] * np.uint8(offsets[0])
        shading += self._masks[1] * np.uint8(offsets[1])
        shading += self._masks[2] * np.uint8(offsets[2])
        return (self._planes + shading).reshape(size, size, 3)  # uint8 wraps: the sums mod 256

    def get_info(self) -> Dict[str, Any]:
        return {"backend_name": self.name, "backend_version": VERSION, "simulator_stack": stack_versions()}

    def close(self) -> None:
        self.task = None


register_backend("mock", MockBackend)
