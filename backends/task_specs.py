"""Custom tasks as files a person writes and diffs: reading and checking them.

A task folder (`sim_server.py --task-dir DIR`, `SIM_TASK_DIR`) holds task specs (`NAME.yaml`,
`NAME.yml` or `NAME.json`) and raw BDDL files (`NAME.bddl`). Each is served as `custom/NAME` by
the simulator it names (`simulator:`, LIBERO when absent; a robosuite spec names a base
environment and its options: robots, controller, cameras, horizon, reward shaping).
Beside a spec, building it writes `NAME.generated.bddl` (LIBERO's own generator made it) and
`NAME.init.npz` (the init states sampled once with the recorded seed).

This module needs no simulator: it checks a spec against a `Registry` (LIBERO's own object,
affordance-region and predicate tables, read once where LIBERO is installed, see
backends/libero_tasks.py), so the server can list a folder and name every problem without
importing LIBERO. Building and sampling happen in backends/libero_tasks.py.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from backends.base import InvalidParams, TaskNotFound

CUSTOM_SUITE = "custom"
TASK_DIR_VARIABLE = "SIM_TASK_DIR"  # the folder, as sim_server.py --task-dir sets it for its processes
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
BDDL_SUFFIX = ".bddl"
GENERATED_SUFFIX = ".generated.bddl"  # written beside a spec; never a task of its own
INIT_SUFFIX = ".init.npz"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
# LIBERO's workspaces and the fixture each stands on (bddl_generation_utils.object_naming_mapping
# and task_generation_utils.get_suite_generator_func define exactly these).
WORKSPACE_FIXTURES = {"main_table": "table", "kitchen_table": "kitchen_table", "living_room_table": "living_room_table",
                      "study_table": "study_table", "coffee_table": "coffee_table", "floor": "floor"}
DEFAULT_INIT_STATES = 50
DEFAULT_HORIZON = 300
MAX_INIT_STATES = 1000
SPEC_KEYS = ("simulator", "name", "language", "workspace", "fixtures", "objects", "regions", "init", "goal",
             "objects_of_interest", "horizon", "init_states", "seed")
ROBOSUITE_KEYS = ("simulator", "name", "environment", "robots", "controller", "cameras", "camera_width",
                  "camera_height", "horizon", "reward_shaping")


@dataclass
class Registry:
    """LIBERO's tables a spec is checked against (plain data, read where LIBERO is installed)."""

    objects: List[str]  # object categories (OBJECTS_DICT)
    affordances: Dict[str, List[str]]  # category -> its regions (e.g. wooden_cabinet: top_region, ...)
    predicates: List[str]  # goal and init predicates, as BDDL writes them (On, In, Open, ...)
    shipped_tasks: List[str] = field(default_factory=list)  # the names of the simulator's own tasks
    simulator: str = "libero"  # whose specs these tables check
    robots: List[str] = field(default_factory=list)  # robosuite's
    controllers: List[str] = field(default_factory=list)  # robosuite's

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> Registry:
        return cls(**data)


def choices(value: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(value, valid, n=5, cutoff=0.5)
    return f"close matches: {', '.join(close)}" if close else f"choices: {', '.join(sorted(valid))}"


@dataclass
class TaskSpec:
    """A checked spec: everything LIBERO's BDDL generator needs, and how to sample init states."""

    name: str
    language: str
    workspace: str
    fixtures: Dict[str, int]
    objects: Dict[str, int]
    regions: Dict[str, Dict[str, Any]]  # name -> center [x, y], half_size, optional yaw [low, high]
    init: List[Tuple[str, ...]]
    goal: List[Tuple[str, ...]]
    objects_of_interest: List[str]
    horizon: int
    init_states: int
    seed: int
    digest: str  # SHA-256 of the spec file: a built task is current when it names this digest

    def instances(self) -> Dict[str, str]:
        """Every object and fixture instance in the scene (e.g. plate_1) -> its category."""
        named = {self.workspace: WORKSPACE_FIXTURES[self.workspace]}
        for category, count in {**self.fixtures, **self.objects}.items():
            named.update({f"{category}_{i}": category for i in range(1, count + 1)})
        return named


def read_spec_file(path: str) -> Dict[str, Any]:
    """A spec file's mapping; InvalidParams for a file that is not YAML or JSON of a mapping."""
    try:
        with open(path, "rb") as spec_file:
            raw = spec_file.read(1_000_001)
    except OSError as error:
        raise InvalidParams(f"cannot read {os.path.basename(path)}: {error.strerror}") from None
    if len(raw) > 1_000_000:
        raise InvalidParams(f"{os.path.basename(path)} is over 1 MB: not a task spec")
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            data = yaml_load(raw)
    except ImportError:
        raise InvalidParams(f"{os.path.basename(path)}: YAML specs need PyYAML (pip install pyyaml), "
                            "or write the spec as JSON") from None
    except Exception as error:  # yaml's and json's own parse errors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidParams(f"{os.path.basename(path)} does not parse: {first}") from None
    if not isinstance(data, dict):
        raise InvalidParams(f"{os.path.basename(path)} must hold a mapping of spec fields ({', '.join(SPEC_KEYS)})")
    return {**data, "__digest__": hashlib.sha256(raw).hexdigest()}


def yaml_load(raw: bytes) -> Any:
    """YAML as a person means it: only true and false are booleans. YAML 1.1 reads On, Off, Yes and
    No as booleans too, and On is LIBERO's most common predicate."""
    import yaml

    class SpecLoader(yaml.SafeLoader):
        pass

    SpecLoader.yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    SpecLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))
    return yaml.load(raw, Loader=SpecLoader)


def check_name(name: Any, registry: Registry) -> str:
    """A task name that stays inside the folder and shadows no shipped task."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidParams(f"task name {name!r}: use letters, digits, _ and - only (it names a file inside the "
                            "task folder and cannot leave it)")
    if name in registry.shipped_tasks:
        raise InvalidParams(f"task name {name!r} is a shipped LIBERO task's: pick another")
    return name


@dataclass
class RobosuiteSpec:
    """A checked robosuite spec: a base environment and the load options it is served with."""

    name: str
    environment: str
    options: Dict[str, Any]
    digest: str
    language: str = ""


def check_robosuite_spec(data: Dict[str, Any], stem: str, registry: Registry) -> RobosuiteSpec:
    """A robosuite spec checked against robosuite's tables; InvalidParams naming the problem."""
    unknown = sorted(set(data) - set(ROBOSUITE_KEYS) - {"__digest__"})
    if unknown:
        raise InvalidParams(f"unknown robosuite spec fields {unknown}; fields: {', '.join(ROBOSUITE_KEYS)}")
    name = check_name(data.get("name", stem), registry)
    environment = data.get("environment")
    if environment not in registry.shipped_tasks:
        raise InvalidParams(f"environment {environment!r}: {choices(str(environment), registry.shipped_tasks)}")
    robots = data.get("robots", "Panda")
    for robot in robots if isinstance(robots, list) else [robots]:
        if robot not in registry.robots:
            raise InvalidParams(f"robots: no robosuite robot {robot!r}; {choices(str(robot), registry.robots)}")
    controller = data.get("controller", "OSC_POSE")
    if controller not in registry.controllers:
        raise InvalidParams(f"controller {controller!r}: {choices(str(controller), registry.controllers)}")
    options = {key: data[key] for key in ROBOSUITE_KEYS[3:] if key in data}
    if "horizon" in data:
        int_field(data, "horizon", 0, 1, 100_000)
    if not isinstance(data.get("reward_shaping", False), bool):
        raise InvalidParams("reward_shaping must be true or false")
    return RobosuiteSpec(name=name, environment=environment, options=options, digest=data.get("__digest__", ""),
                         language=f"robosuite {environment}")


def check_spec(data: Dict[str, Any], stem: str, registry: Registry) -> TaskSpec:
    """The spec checked against LIBERO's tables; InvalidParams naming the first problem and the choices."""
    if registry.simulator == "robosuite":
        return check_robosuite_spec(data, stem, registry)
    unknown = sorted(set(data) - set(SPEC_KEYS) - {"__digest__"})
    if unknown:
        raise InvalidParams(f"unknown spec fields {unknown}; fields: {', '.join(SPEC_KEYS)}")
    name = check_name(data.get("name", stem), registry)
    language = data.get("language")
    if not isinstance(language, str) or not language.strip():
        raise InvalidParams("language: the instruction the policy reads, e.g. 'put the bowl on the plate'")
    workspace = data.get("workspace", "main_table")
    if workspace not in WORKSPACE_FIXTURES:
        raise InvalidParams(f"workspace {workspace!r}: {choices(str(workspace), list(WORKSPACE_FIXTURES))}")
    fixtures = counts(data.get("fixtures", {}), "fixtures", registry)
    objects = counts(data.get("objects", {}), "objects", registry)
    if not objects:
        raise InvalidParams("objects: name at least one object and its count, e.g. {akita_black_bowl: 1}")
    spec = TaskSpec(name=name, language=" ".join(language.split()), workspace=workspace, fixtures=fixtures,
                    objects=objects, regions=regions(data.get("regions", {})), init=[], goal=[],
                    objects_of_interest=[], horizon=int_field(data, "horizon", DEFAULT_HORIZON, 1, 100_000),
                    init_states=int_field(data, "init_states", DEFAULT_INIT_STATES, 1, MAX_INIT_STATES),
                    seed=int_field(data, "seed", 0, 0, 2**31 - 1), digest=data.get("__digest__", ""))
    places = spec_places(spec, registry)
    spec.init = predicates(data.get("init"), "init", spec, places, registry)
    placed = {item[1] for item in spec.init if len(item) > 1}
    unplaced = sorted(set(spec.instances()) - placed - {workspace})
    if unplaced:
        raise InvalidParams(f"init: {', '.join(unplaced)} has no placement; add e.g. [On, {unplaced[0]}, REGION]")
    spec.goal = predicates(data.get("goal"), "goal", spec, places, registry)
    interest = data.get("objects_of_interest", sorted({a for item in spec.goal for a in item[1:] if a in places}))
    spec.objects_of_interest = [check_instance(item, "objects_of_interest", spec) for item in interest or []]
    return spec


def counts(value: Any, what: str, registry: Registry) -> Dict[str, int]:
    if not isinstance(value, dict):
        raise InvalidParams(f"{what}: a mapping of category -> count, e.g. {{plate: 1}}")
    for category, count in value.items():
        if category not in registry.objects:
            raise InvalidParams(f"{what}: no LIBERO object {category!r}; {choices(str(category), registry.objects)}")
        if type(count) is not int or not 1 <= count <= 10:
            raise InvalidParams(f"{what}: {category}'s count must be 1 to 10, got {count!r}")
    return dict(value)


def regions(value: Any) -> Dict[str, Dict[str, Any]]:
    """Placement regions on the workspace: name -> {center: [x, y], half_size, optional yaw: [lo, hi]}."""
    if not isinstance(value, dict):
        raise InvalidParams("regions: a mapping of name -> {center: [x, y], half_size: metres}")
    checked = {}
    for name, region in value.items():
        if not (isinstance(name, str) and NAME_PATTERN.match(name)) or not isinstance(region, dict):
            raise InvalidParams(f"regions: {name!r} must be a plain name mapped to {{center: [x, y], half_size}}")
        center, half = region.get("center"), region.get("half_size", 0.025)
        yaw = region.get("yaw", [0.0, 0.0])
        if not (numbers(center, 2) and -1.0 <= min(center) <= max(center) <= 1.0):
            raise InvalidParams(f"regions: {name}.center must be [x, y] within 1 m of the workspace's centre")
        if not (numbers([half], 1) and 0.001 <= half <= 0.5):
            raise InvalidParams(f"regions: {name}.half_size must be 0.001 to 0.5 (metres)")
        if not numbers(yaw, 2):
            raise InvalidParams(f"regions: {name}.yaw must be [low, high] in radians")
        checked[name] = {"center": [float(c) for c in center], "half_size": float(half), "yaw": [float(y) for y in yaw]}
    return checked


def numbers(value: Any, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def int_field(data: Dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = data.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise InvalidParams(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def spec_places(spec: TaskSpec, registry: Registry) -> Dict[str, str]:
    """Every name a predicate may use -> what it is called in BDDL: instances as they are, the
    spec's regions prefixed with the workspace, each instance's affordance regions."""
    places = {name: name for name in spec.instances()}
    places.update({region: f"{spec.workspace}_{region}" for region in spec.regions})
    for instance, category in spec.instances().items():
        regions_of = registry.affordances.get(category, [])
        places.update({f"{instance}_{region}": f"{instance}_{region}" for region in regions_of})
    return places


def predicates(value: Any, what: str, spec: TaskSpec, places: Dict[str, str], registry: Registry
               ) -> List[Tuple[str, ...]]:
    """[[Predicate, arg, ...], ...] with known predicates and names, as BDDL tuples."""
    if not isinstance(value, list) or not value:
        raise InvalidParams(f"{what}: a list of [Predicate, name, ...], e.g. [[On, akita_black_bowl_1, plate_1]]")
    by_lower = {name.lower(): name for name in registry.predicates}
    checked = []
    for item in value:
        if not (isinstance(item, list) and len(item) >= 2 and all(isinstance(part, str) for part in item)):
            raise InvalidParams(f"{what}: {item!r} must be [Predicate, name, ...]")
        predicate = by_lower.get(item[0].lower())
        if predicate is None:
            raise InvalidParams(f"{what}: no predicate {item[0]!r}; predicates: {', '.join(registry.predicates)}")
        for argument in item[1:]:
            if argument not in places:
                where = "in the scene" if argument.rsplit("_", 1)[-1].isdigit() else "a region or object of the scene"
                raise InvalidParams(f"{what}: {argument!r} is not {where}; {choices(argument, list(places))}")
        checked.append((predicate, *[places[argument] for argument in item[1:]]))
    return checked


def check_instance(name: Any, what: str, spec: TaskSpec) -> str:
    if name not in spec.instances():
        raise InvalidParams(f"{what}: {name!r} is not in the scene; {choices(str(name), list(spec.instances()))}")
    return name


@dataclass
class FolderEntry:
    """One task of a folder: its source file, and its spec (None for a raw BDDL file)."""

    name: str
    path: str
    spec: Optional[Any] = None  # a TaskSpec or RobosuiteSpec


class TaskFolder:
    """The operator's task folder: its tasks and the files that could not be read, looked at afresh
    on every call (a file added shows up at the next list_tasks)."""

    def __init__(self, folder: str, registry: Registry) -> None:
        self.folder, self.registry = os.path.abspath(folder), registry

    def scan(self) -> Tuple[Dict[str, FolderEntry], Dict[str, str]]:
        """(name -> entry, file -> its problem), one bad file never hiding the others."""
        entries: Dict[str, FolderEntry] = {}
        problems: Dict[str, str] = {}
        try:
            files = sorted(os.listdir(self.folder))
        except OSError as error:
            return {}, {self.folder: f"cannot list the task folder: {error.strerror}"}
        for file_name in files:
            path = os.path.join(self.folder, file_name)
            stem, suffix = os.path.splitext(file_name)
            if file_name.endswith(GENERATED_SUFFIX) or suffix not in SPEC_SUFFIXES + (BDDL_SUFFIX,):
                continue
            try:
                entry = self.entry(path, stem, suffix)
                if entry is None:
                    continue
                if entry.name in entries:
                    taken_by = os.path.basename(entries[entry.name].path)
                    raise InvalidParams(f"the name {entry.name!r} is taken by {taken_by}")
            except InvalidParams as error:
                problems[file_name] = str(error)
                continue
            entries[entry.name] = entry
        return entries, problems

    def entry(self, path: str, stem: str, suffix: str) -> Optional[FolderEntry]:
        """The file's task, None when it is another simulator's; InvalidParams for a bad one."""
        if suffix == BDDL_SUFFIX:
            return FolderEntry(check_name(stem, self.registry), path) if self.registry.simulator == "libero" else None
        data = read_spec_file(path)
        if data.get("simulator", "libero") != self.registry.simulator:
            return None
        spec = check_spec(data, stem, self.registry)
        return FolderEntry(spec.name, path, spec)

    def task_names(self) -> List[str]:
        return [f"{CUSTOM_SUITE}/{name}" for name in self.scan()[0]]

    def find(self, task_name: str) -> FolderEntry:
        """The entry of "custom/NAME"; InvalidParams for a broken file, TaskNotFound (with close
        matches) for no such task."""
        name = task_name.split("/", 1)[1] if task_name.startswith(CUSTOM_SUITE + "/") else task_name
        entries, problems = self.scan()
        if name in entries:
            return entries[name]
        broken = [problem for file_name, problem in problems.items() if os.path.splitext(file_name)[0] == name]
        if broken:
            raise InvalidParams(f"custom/{name}: {broken[0]}")
        close = difflib.get_close_matches(name, list(entries), n=5, cutoff=0.3)
        raise TaskNotFound(f"no custom task {name!r} in the task folder; close matches: "
                       f"{[f'{CUSTOM_SUITE}/{c}' for c in close] or self.task_names()[:5]}")


def served_task(task_name: str, registry: Registry) -> FolderEntry:
    """A worker's "custom/NAME" from the folder the server serves (TASK_DIR_VARIABLE); TaskNotFound
    when it serves none or has no such task, InvalidParams for a broken file."""
    folder = os.environ.get(TASK_DIR_VARIABLE)
    if not folder:
        raise TaskNotFound(f"{task_name}: this server has no task folder (sim_server.py --task-dir DIR)")
    return TaskFolder(folder, registry).find(task_name)
