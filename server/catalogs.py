"""Simulator catalogs as the loop holds them: each served simulator's tasks and info, read once at
start, and the interpreter its simulator processes run under."""

from __future__ import annotations

import difflib
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from backends.base import BackendError, TaskNotFound
from backends.catalog import catalog_snapshot
from backends.task_specs import CUSTOM_SUITE, TASK_DIR_VARIABLE, Registry, TaskFolder
from server.process import stderr_tail

log = logging.getLogger("sim_server")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# From a checkout, simulator processes import backends/ from it (their working folder). Installed with
# pip, the project sits in a site-packages that another interpreter must not put first on its path
# (its numpy would shadow the environment's own): each then imports the copy installed beside it.
INSTALLED = os.path.basename(HERE) in ("site-packages", "dist-packages")
PROCESS_CWD = tempfile.gettempdir() if INSTALLED else HERE
# Reading a catalog imports the simulator and probes its renderer: seconds, not minutes.
CATALOG_TIMEOUT_S = 180.0


class CatalogError(Exception):
    """This Python cannot serve a simulator it was asked to: the server does not start."""


class Catalog:
    """One served simulator as the loop knows it: its tasks and info, and how to start its processes.

    A simulator that could not be read has a `problem`, answered as backend_error to its sessions.
    """

    def __init__(self, simulator: str, snapshot: Optional[Dict[str, Any]], interpreter: str,
                 problem: Optional[str] = None) -> None:
        self.simulator = simulator
        self.interpreter = interpreter
        self.problem = problem
        snapshot = snapshot or {}
        self.tasks: List[str] = snapshot.get("tasks", [])
        self.suites: Dict[str, List[str]] = snapshot.get("suites", {})
        self.unavailable_suites: Dict[str, str] = snapshot.get("unavailable_suites", {})
        self.info: Dict[str, Any] = snapshot.get("info", {"backend_name": simulator, "backend_version": "unknown"})
        self.worker_env: Dict[str, str] = snapshot.get("worker_env", {})
        self.known = set(self.tasks).union(*self.suites.values())
        self.needs_assets = set(snapshot.get("needs_assets", []))
        registry, folder = snapshot.get("task_registry"), os.environ.get(TASK_DIR_VARIABLE)
        # custom/NAME tasks, read afresh from the operator's folder on every call
        self.task_folder = TaskFolder(folder, Registry.from_json(registry)) if registry and folder else None

    def list_tasks(self, suite: Optional[str] = None) -> List[str]:
        """The default task list, or a suite's tasks; TaskNotFound for a suite that cannot load here."""
        self._check_usable()
        if suite is None:
            return self.tasks
        if suite == CUSTOM_SUITE and self.task_folder is not None:
            return self.task_folder.task_names()
        if suite in self.suites:
            return self.suites[suite]
        raise TaskNotFound(self._no_suite(suite))

    def needing_assets(self, tasks: List[str]) -> List[str]:
        """Those of `tasks` that cannot load here for want of assets."""
        return [task for task in tasks if task in self.needs_assets] if self.needs_assets else []

    def suite_sizes(self) -> Dict[str, int]:
        """Each suite that loads here -> its task count (the custom folder's as it is now)."""
        sizes = {suite: len(tasks) for suite, tasks in self.suites.items()}
        if self.task_folder is not None:
            sizes[CUSTOM_SUITE] = len(self.task_folder.task_names())
        return sizes

    def check_task(self, task_name: str) -> None:
        """TaskNotFound unless load_task can find `task_name`: checked before any simulator starts."""
        self._check_usable()
        if task_name in self.known:
            return
        suite = task_name.rpartition("/")[0]
        if suite == CUSTOM_SUITE and self.task_folder is not None:
            self.task_folder.find(task_name)  # InvalidParams names what is wrong with its file
            return
        if suite and suite not in self.suites:
            raise TaskNotFound(self._no_suite(suite))
        choices = self.suites.get(suite, self.tasks)
        close = difflib.get_close_matches(task_name, choices, n=5, cutoff=0.3)
        raise TaskNotFound(f"no {self.simulator} task {task_name!r}; close matches: {close or choices[:5]}")

    def task_folder_info(self) -> Dict[str, Any]:
        """get_info's view of the task folder: where it is, its tasks, and the files it cannot serve."""
        if self.task_folder is None:
            return {}
        entries, problems = self.task_folder.scan()
        return {"task_folder": {"path": self.task_folder.folder, "tasks": len(entries), "problems": problems}}

    def _check_usable(self) -> None:
        if self.problem is not None:
            raise BackendError(self.problem)

    def _no_suite(self, suite: str) -> str:
        if suite in self.unavailable_suites:
            return self.unavailable_suites[suite]
        if suite == CUSTOM_SUITE:
            return f"{self.simulator} serves no custom tasks here: start sim_server.py with --task-dir DIR"
        if not self.suites:
            return f"the {self.simulator} simulator has no task suites: name its tasks instead"
        close = difflib.get_close_matches(suite, list(self.suites), n=5)
        return f"no {self.simulator} suite {suite!r}; close matches: {close or list(self.suites)[:5]}"


def read_local_catalog(simulator: str) -> Catalog:
    """The catalog read in this interpreter; BackendError when the simulator cannot run here."""
    return Catalog(simulator, catalog_snapshot(simulator), sys.executable)


def read_catalog(simulator: str, interpreter: str) -> Catalog:
    """The catalog as `interpreter` reads it in a child process, so this one never imports a simulator
    another Python serves. A failure becomes the catalog's problem, not an exception."""
    with tempfile.TemporaryDirectory(prefix="sim-catalog-") as folder:
        path = os.path.join(folder, "catalog.json")
        try:
            result = subprocess.run([interpreter, "-m", "backends.catalog", simulator, path], cwd=PROCESS_CWD,
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                    timeout=CATALOG_TIMEOUT_S)
        except OSError as error:
            return Catalog(simulator, None, interpreter, f"cannot run {interpreter} for {simulator}: {error}")
        except subprocess.TimeoutExpired:
            return Catalog(simulator, None, interpreter,
                           f"{interpreter} did not list {simulator}'s tasks in {CATALOG_TIMEOUT_S:.0f} s")
        if result.returncode != 0 or not os.path.exists(path):
            return Catalog(simulator, None, interpreter, f"{interpreter} cannot serve {simulator} (exit code "
                           f"{result.returncode}); its stderr ends: {stderr_tail(result.stderr)}")
        with open(path) as snapshot_file:
            return Catalog(simulator, json.load(snapshot_file), interpreter)


def open_catalogs(simulators: Tuple[str, ...], interpreters: Dict[str, str]) -> Dict[str, Catalog]:
    """A catalog per served simulator, in order. This Python's failure to serve one is a CatalogError;
    another interpreter's is logged and answered as backend_error to the sessions that select it."""
    catalogs = {}
    for simulator in simulators:
        if simulator not in interpreters:
            try:
                catalogs[simulator] = read_local_catalog(simulator)
            except BackendError as error:
                raise CatalogError(f"cannot serve {simulator}: {error}") from None
            continue
        catalogs[simulator] = read_catalog(simulator, interpreters[simulator])
        if catalogs[simulator].problem is not None:
            log.error("%s is not available: %s", simulator, catalogs[simulator].problem)
    return catalogs
