"""Author custom LIBERO tasks: specs a person writes, checked and built with LIBERO's own tools.

    python sim_tasks.py new bowl_on_plate --dir tasks/   # a spec to edit, made of LIBERO's real names
    python sim_tasks.py choices objects                  # LIBERO's objects (or fixtures' regions, predicates, ...)
    python sim_tasks.py validate tasks/bowl_on_plate.yaml   # check it, generate its BDDL, sample its init states
    python sim_tasks.py list --dir tasks/                 # what a server with --task-dir tasks/ serves
    python sim_tasks.py preview tasks/bowl_on_plate.yaml --out preview.png   # init states 0..3, upright

Serve the folder with `sim_server.py --simulator libero --task-dir tasks/`: each task is
`custom/NAME`. Runs where LIBERO is installed; docs/task_builder.md has a worked example.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from typing import List, Optional

import numpy as np

from backends.base import InvalidParams
from backends.task_specs import BDDL_SUFFIX, SPEC_SUFFIXES, WORKSPACE_FIXTURES, FolderEntry, TaskFolder
from sim_client import OneLineParser

TEMPLATE = """\
# A custom LIBERO task (docs/task_builder.md). Names come from LIBERO's own tables:
# python sim_tasks.py choices objects | affordances | predicates | workspaces
language: put the black bowl on the plate
workspace: {workspace}
fixtures: {{wooden_cabinet: 1}}           # besides the workspace itself
objects: {{akita_black_bowl: 1, plate: 1, porcelain_mug: 1}}
regions:                                  # centre [x, y] on the workspace and half size, in metres
  bowl_region: {{center: [0.0, -0.05], half_size: 0.04}}
  plate_region: {{center: [0.0, 0.2], half_size: 0.04}}
  mug_region: {{center: [-0.15, 0.1], half_size: 0.04}}
  cabinet_region: {{center: [0.0, -0.3], half_size: 0.01, yaw: [3.14159, 3.14159]}}
init:                                     # where each object starts
  - [On, akita_black_bowl_1, bowl_region]
  - [On, plate_1, plate_region]
  - [On, porcelain_mug_1, mug_region]
  - [On, wooden_cabinet_1, cabinet_region]
goal:                                     # success when all of these hold
  - [On, akita_black_bowl_1, plate_1]
horizon: 300
init_states: 50                           # sampled once with this seed, stored beside the spec
seed: 0
"""


def parser() -> argparse.ArgumentParser:
    """The commands and flags of sim_tasks.py."""
    parser = OneLineParser(prog="sim_tasks.py", description="Author custom LIBERO tasks (served as custom/NAME).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    new = commands.add_parser("new", help="write a spec to edit")
    new.add_argument("name", help="the task's name (letters, digits, _ and -)")
    new.add_argument("--dir", default="tasks", help="the task folder (default tasks/)")
    new.add_argument("--workspace", default="main_table", choices=list(WORKSPACE_FIXTURES))
    choices = commands.add_parser("choices", help="LIBERO's names a spec may use")
    choices.add_argument("table", choices=["objects", "affordances", "predicates", "workspaces"])
    validate = commands.add_parser("validate", help="check specs, generate their BDDL, sample their init states")
    validate.add_argument("paths", nargs="+", help="spec (.yaml, .yml, .json) or .bddl files")
    validate.add_argument("--rebuild", action="store_true", help="sample the init states again even if current")
    listing = commands.add_parser("list", help="the tasks a server with --task-dir DIR serves, and the problems")
    listing.add_argument("--dir", default="tasks", help="the task folder (default tasks/)")
    preview = commands.add_parser("preview", help="render init states 0..3 to a PNG grid")
    preview.add_argument("path", help="a spec or .bddl file")
    preview.add_argument("--out", default=None, help="the PNG (default NAME.preview.png beside the spec)")
    preview.add_argument("--size", type=int, default=256, help="pixels per image (default 256)")
    return parser


def entry_of(path: str) -> FolderEntry:
    """The task a file in a folder defines, checked; InvalidParams naming what is wrong."""
    from backends.libero_tasks import libero_registry

    stem, suffix = os.path.splitext(os.path.basename(path))
    if suffix not in SPEC_SUFFIXES + (BDDL_SUFFIX,):
        raise InvalidParams(f"{path}: a task is a .yaml, .yml, .json spec or a .bddl file")
    if not os.path.isfile(path):
        raise InvalidParams(f"{path}: no such file")
    entry = TaskFolder(os.path.dirname(path) or ".", libero_registry()).entry(path, stem, suffix)
    if entry is None:
        raise InvalidParams(f"{path} is another simulator's spec: this tool builds LIBERO tasks (a robosuite "
                            "spec needs no building: serve it with --simulator robosuite --task-dir)")
    return entry


def new(name: str, folder: str, workspace: str) -> int:
    from backends.libero_tasks import libero_registry
    from backends.task_specs import check_name

    check_name(name, libero_registry())
    path = os.path.join(folder, f"{name}.yaml")
    if os.path.exists(path):
        raise InvalidParams(f"{path} exists: edit it, or pick another name")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as spec_file:
        spec_file.write(TEMPLATE.format(workspace=workspace))
    print(f"wrote {path}: edit it, then python sim_tasks.py validate {path}")
    return 0


def show_choices(table: str) -> int:
    from backends.libero_tasks import libero_registry

    registry = libero_registry()
    rows = {"objects": registry.objects, "predicates": registry.predicates, "workspaces": list(WORKSPACE_FIXTURES),
            "affordances": [f"{category}: {', '.join(regions)}" for category, regions in
                            sorted(registry.affordances.items())]}[table]
    print("\n".join(rows))
    return 0


def validate(paths: List[str], rebuild: bool) -> int:
    """One line per file: what it builds to, or its one problem; exit 2 when any has one."""
    from backends.libero_tasks import built_task, describe

    failed = 0
    for path in paths:
        try:
            task = describe(built_task(entry_of(path), rebuild))
        except InvalidParams as error:
            print(f"{path}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok: custom/{task['name']}, \"{task['language']}\", {task['init_states']} init states "
              f"(seed {task['seed']}), horizon {task['horizon']}")
    return 2 if failed else 0


def list_folder(folder: str) -> int:
    from backends.libero_tasks import libero_registry

    if not os.path.isdir(folder):
        raise InvalidParams(f"--dir {folder!r} is not a folder")
    entries, problems = TaskFolder(folder, libero_registry()).scan()
    for name, entry in entries.items():
        built = os.path.exists(os.path.splitext(entry.path)[0] + ".init.npz")
        language = entry.spec.language if entry.spec is not None else "(raw BDDL)"
        print(f"custom/{name}  {language}  ({'built' if built else 'built at its first load'})")
    for file_name, problem in problems.items():
        print(f"problem: {file_name}: {problem}")
    return 0


def preview(path: str, out: Optional[str], size: int) -> int:
    """Init states 0..3 from the agentview camera, upright, as a 2x2 PNG grid."""
    from libero.libero.envs import OffScreenRenderEnv

    from backends.libero_tasks import built_task
    from server.dashboard import png_bytes

    if not 32 <= size <= 1024:
        raise InvalidParams("--size must be 32 to 1024")
    task = built_task(entry_of(path))
    env = OffScreenRenderEnv(bddl_file_name=task.bddl_path, camera_names=["agentview"], camera_heights=size,
                             camera_widths=size, ignore_done=True)
    try:
        env.reset()
        images = [env.set_init_state(state)["agentview_image"][::-1, ::-1] for state in task.init_states[:4]]
    finally:
        env.close()
    images += [np.zeros_like(images[0])] * (4 - len(images))
    grid = np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:], axis=1)], axis=0)
    out = out or os.path.splitext(path)[0] + ".preview.png"
    with open(out, "wb") as png_file:
        png_file.write(png_bytes(grid))
    print(f"wrote {out}: init states 0..{min(4, len(task.init_states)) - 1} of custom/{task.name}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)  # its advice on macro files is noise here
    try:
        if args.command == "new":
            return new(args.name, args.dir, args.workspace)
        if args.command == "choices":
            return show_choices(args.table)
        if args.command == "validate":
            return validate(args.paths, args.rebuild)
        if args.command == "list":
            return list_folder(args.dir)
        return preview(args.path, args.out, args.size)
    except InvalidParams as error:
        print(f"sim_tasks.py: {error}", file=sys.stderr)
        return 2


def quiet_exit() -> None:
    """Nothing more on stderr once main() has answered: at interpreter exit, robosuite's EGL contexts
    are freed after EGL itself and print tracebacks that mean nothing (the work is done by then)."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


if __name__ == "__main__":
    code = main()
    atexit.register(quiet_exit)
    sys.exit(code)
