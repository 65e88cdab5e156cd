"""The contract every simulator backend keeps, and the typed errors it raises.

A backend is one simulator instance driven by one client session. The server
runs each backend in its own process, so a backend may block, hold GL contexts
and use gigabytes; it never sees sockets or msgpack, only Python values and
numpy arrays.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any, Collection, Dict, Iterator, List, Optional, Tuple

import numpy as np

Observation = Dict[str, np.ndarray]
StepResult = Tuple[Observation, float, bool, bool, Dict[str, Any]]


class SimulatorError(Exception):
    """Base of the errors that become a typed error reply; `error_type` names it on the wire."""

    error_type = "internal_error"


class InvalidParams(SimulatorError):
    """A request field is missing, ill-typed or out of range (e.g. a wrong action shape)."""

    error_type = "invalid_params"


class TaskNotFound(SimulatorError):
    """load_task named a task this backend does not have."""

    error_type = "task_not_found"


class NoTaskLoaded(SimulatorError):
    """reset or step came before a successful load_task."""

    error_type = "no_task_loaded"


class NotReset(SimulatorError):
    """step came before reset, or after the episode terminated or was truncated."""

    error_type = "not_reset"


class BackendError(SimulatorError):
    """The simulator itself failed; the session may need a new load_task."""

    error_type = "backend_error"


class UnknownMethod(SimulatorError):
    """The request named a method the protocol does not have."""

    error_type = "unknown_method"


class InternalError(SimulatorError):
    """A bug in the server; the traceback goes to the server's log, never to the client."""

    error_type = "internal_error"


class NoSimulatorSelected(SimulatorError):
    """A server with several simulators got a simulator request before select_simulator."""

    error_type = "no_simulator_selected"


class UnknownSimulator(SimulatorError):
    """select_simulator named a simulator the server does not serve."""

    error_type = "unknown_simulator"


class SimulatorAlreadySelected(SimulatorError):
    """select_simulator came twice in one session; disconnect first to switch."""

    error_type = "simulator_already_selected"


class ServerBusy(SimulatorError):
    """The session limit is reached, or the session already has a request running."""

    error_type = "server_busy"


class AssetsMissing(SimulatorError):
    """The task reads files this installation lacks (LIBERO-plus's asset pack); the message names
    them and the setting that supplies them."""

    error_type = "assets_missing"


class SimulatorBackend(abc.ABC):
    """One simulator for one session.

    Lifecycle: construct (cheap, imports nothing heavy) -> load_task -> reset ->
    step ... -> reset -> step ... -> close. The server enforces the order
    (no_task_loaded, not_reset); used in-process, reset or step before
    load_task raise NoTaskLoaded (require_task), never another error. Any
    exception that is not a SimulatorError is reported to the client as
    backend_error. Every backend proves the contract with test_sim.py's
    BackendContract.

    Observations are flat maps of name -> numpy array. Arrays handed to step()
    are read-only views of the request; copy before writing into one.

    The episode contract (what a score is made of; a runner counts nothing else):

    - every info of reset and step carries `success` (a bool, True only when the
      simulator's own success criterion holds at that step; always False for a
      task without one) and `step` (control steps taken in this episode);
    - task_info carries `has_success` (False where the task has no success
      criterion: its episodes are scored by return, never by a made-up rate),
      `control_hz` (how many actions one simulated second applies, or None for a
      simulator without time), `conventions` (the names the `convention` load
      option accepts; [] where it has none), `images_rotated_180` (whether the
      sent camera images are upside down as rendered), and `num_init_states`
      where episodes start from fixed init states (reset's init_state_index).

    A missing `success` is a failure wherever it is read: `terminated` never
    stands in for it.
    """

    #: Registry name, e.g. "libero"; set by each subclass.
    name = "base"

    @classmethod
    def prepare_server(cls) -> None:
        """Check, once in the server process before it binds, that this backend can run here.

        May set process-wide environment that workers inherit (e.g. MUJOCO_GL).
        Raises BackendError naming what to install when it cannot run.
        """

    @abc.abstractmethod
    def list_tasks(self) -> List[str]:
        """Names accepted by load_task, in a stable order.

        Must be cheap and must not create a simulator: the server answers
        list_tasks without starting a simulator process.
        """

    def suites(self) -> Dict[str, List[str]]:
        """Named groups of tasks beside the default list (LIBERO's suites): suite -> task names as
        load_task takes them. Only suites that can load here; {} for a backend without suites.

        Called once when the server starts, never per request.
        """
        return {}

    def unavailable_suites(self) -> Dict[str, str]:
        """Suites this backend knows of but cannot load here: suite -> why, said to the client."""
        return {}

    def tasks_needing_assets(self) -> List[str]:
        """Listed tasks that cannot load here for want of assets (load_task answers AssetsMissing);
        list_tasks names them as `needs_assets`. Called once when the server starts."""
        return []

    def task_registry(self) -> Optional[Dict[str, Any]]:
        """The tables custom task specs are checked against (backends/task_specs.py Registry), for a
        backend that serves a task folder (SIM_TASK_DIR); None otherwise."""
        return None

    @abc.abstractmethod
    def load_task(self, task_name: str, **options: Any) -> Dict[str, Any]:
        """Build the simulator for `task_name` and return its task_info.

        task_info has at least `action_spec`, `observation_spec` (maps of
        name -> {"shape", "dtype"} plus "low"/"high" where bounded),
        `max_episode_steps`, `description`, and the episode contract's keys
        (CONTRACT_TASK_INFO_KEYS; see the class docstring). Raises TaskNotFound
        for an unknown name, InvalidParams for a bad option (an unknown
        convention's message names the known ones).
        """

    @abc.abstractmethod
    def reset(
        self, seed: Optional[int] = None, init_state_index: Optional[int] = None
    ) -> Tuple[Observation, Dict[str, Any]]:
        """Start a new episode and return (observation, info); info has `success` False and `step` 0.

        Raises InvalidParams for an out-of-range init_state_index.
        """

    @abc.abstractmethod
    def step(self, action: Dict[str, np.ndarray]) -> StepResult:
        """Advance one control step: (observation, reward, terminated, truncated, info).

        `terminated` means the task reached a terminal state (success or
        failure), `truncated` that the episode hit max_episode_steps; info's
        `success` alone says whether the task succeeded. Raises
        InvalidParams for an action of the wrong keys, shape, dtype, or with
        non-finite values.
        """

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        """Steps taken inside skip rendering the camera images nobody will see: image keys not in
        `keep` may come back blank. Physics, rewards, success and info are exactly as without, and
        so is every later observation. The server uses it for all but the last action of a chunk.
        The default renders as usual."""
        yield

    def render_skipped(self, observation: Observation) -> Observation:
        """`observation`, returned by the last step inside frames_skipped(), with the images it
        skipped rendered as that step would have rendered them (a chunk that ended the episode
        early). The default returns it as it is."""
        return observation

    @abc.abstractmethod
    def get_info(self) -> Dict[str, Any]:
        """Static facts: at least backend_name and backend_version."""

    def close(self) -> None:
        """Free the simulator. Safe to call twice and before load_task."""


# What every task_info and every step's info carry beside the seed protocol's fields (the episode contract).
CONTRACT_TASK_INFO_KEYS = ("has_success", "control_hz", "conventions", "images_rotated_180")
CONTRACT_STEP_INFO_KEYS = ("success", "step")
# What a backend's get_info adds to every task_info and to the server's get_info: the stack and renderer in use.
PROVENANCE_KEYS = ("simulator_stack", "renderer")


def array_spec(shape, dtype, low=None, high=None) -> Dict[str, Any]:
    """The spec map a client checks arrays against."""
    spec: Dict[str, Any] = {"shape": [int(n) for n in shape], "dtype": np.dtype(dtype).str}
    if low is not None:
        spec["low"] = np.broadcast_to(np.asarray(low, dtype=np.float64), spec["shape"]).tolist()
    if high is not None:
        spec["high"] = np.broadcast_to(np.asarray(high, dtype=np.float64), spec["shape"]).tolist()
    return spec


def observation_spec_of(observation: Observation) -> Dict[str, Any]:
    return {key: array_spec(value.shape, value.dtype) for key, value in observation.items()}


def require_task(loaded: bool, method: str) -> None:
    """NoTaskLoaded unless a task is loaded: reset and step call this first."""
    if not loaded:
        raise NoTaskLoaded(f"{method} needs a task: call load_task first")


def require_seed(seed: Optional[int], init_state_index: Optional[int], no_init_states: str,
                 default: int = 0, limit: int = 2**32) -> int:
    """Reset's seed (`default` when none) for a simulator that draws its start from a seed: InvalidParams
    when an init state is asked (`no_init_states` says why there are none) or the seed is out of range."""
    if init_state_index is not None:
        raise InvalidParams(no_init_states)
    seed = default if seed is None else seed
    if not 0 <= seed < limit:
        raise InvalidParams(f"seed must be in [0, {limit})")
    return seed


def require_action(action: Dict[str, np.ndarray], key: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The named action as float64 of `shape`, or InvalidParams saying what is wrong."""
    if key not in action:
        raise InvalidParams(f"action must contain {key!r}; got keys {sorted(action)}")
    value = np.asarray(action[key])
    if value.dtype.kind not in "biuf":
        raise InvalidParams(f"action {key!r} must be numeric, got dtype {value.dtype}")
    if value.shape != shape:
        raise InvalidParams(f"action {key!r} must have shape {list(shape)}, got {list(value.shape)}")
    value = value.astype(np.float64)
    if not np.all(np.isfinite(value)):
        raise InvalidParams(f"action {key!r} contains NaN or Inf")
    return value


def require_modules(simulator: str, modules: Dict[str, str], setup: Optional[str] = None) -> None:
    """BackendError naming the pip packages to install when a module `simulator` needs is missing
    (module name -> pip requirement), so a missing simulator is never mistaken for a missing renderer.
    `setup` is the command that makes the simulator's own environment, for one that needs its own."""
    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    how = (f"make its environment with `{setup}` (the server then finds it)" if setup else
           f"install them with `{sys.executable} -m pip install -r requirements.txt`")
    raise BackendError(f"{simulator} needs Python packages that {sys.executable} does not have: "
                       f"{', '.join(missing)}; {how}")


RENDERER_HINT = ("install an OpenGL renderer: `apt-get install libegl1 libegl-mesa0 libgl1` (EGL; Mesa renders "
                 "on the CPU) or `apt-get install libosmesa6` (OSMesa)")


# Run in a child process: a GL context made here before the workers spawn would be no use to them.
_RENDERER_PROBE = """
import json, mujoco
context = mujoco.GLContext(16, 16)
context.make_current()
strings = {}
try:
    from OpenGL import GL
    strings = {name: GL.glGetString(getattr(GL, name)).decode() for name in ("GL_VENDOR", "GL_RENDERER", "GL_VERSION")}
except Exception:
    pass
context.free()
print(json.dumps(strings))
"""


def probe_renderer(name: str) -> Optional[Dict[str, str]]:
    """GL_VENDOR/GL_RENDERER/GL_VERSION of an offscreen MuJoCo context with MUJOCO_GL=name, or None
    when no context can be made (checked in a child process)."""
    env = {**os.environ, "MUJOCO_GL": name, "PYOPENGL_PLATFORM": name}
    try:
        result = subprocess.run([sys.executable, "-c", _RENDERER_PROBE], env=env, capture_output=True, text=True,
                                timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def choose_renderer() -> Dict[str, str]:
    """MUJOCO_GL as given, else the first of EGL, OSMesa that works, exported for the workers;
    returned with the GL strings of the renderer it gives ({"MUJOCO_GL": ..., "GL_RENDERER": ...}).

    MuJoCo backends call this from prepare_server, before any worker starts.
    """
    if os.environ.get("MUJOCO_GL"):
        name = os.environ["MUJOCO_GL"]
        return {"MUJOCO_GL": name, **(probe_renderer(name) or {})}
    for name in ("egl", "osmesa"):
        strings = probe_renderer(name)
        if strings is not None:
            os.environ["MUJOCO_GL"] = name
            os.environ["PYOPENGL_PLATFORM"] = name
            return {"MUJOCO_GL": name, **strings}
    raise BackendError(f"MuJoCo found no offscreen renderer (tried EGL, OSMesa): {RENDERER_HINT}")


def bounded_int(options: Dict[str, Any], name: str, default: Any, low: int, high: int) -> int:
    """options[name] (or `default`) checked to be an int in [low, high]; InvalidParams naming the range."""
    value = options.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise InvalidParams(f"{name} must be an int in [{low}, {high}]")
    return value


def stack_versions(*packages: str) -> Dict[str, str]:
    """The named packages' versions plus numpy's and Python's, as this process has them."""
    versions = {"python": platform.python_version()}
    for package in (*packages, "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def package_versions(*packages: str) -> str:
    """"name version" of each installed package, comma separated: a backend_version string."""
    found = []
    for package in packages:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found) or "unknown"
