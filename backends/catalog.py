"""A simulator's catalog: what the server's loop knows of it without running it.

    python -m backends.catalog SIMULATOR PATH    # sim_server.py runs this under the simulator's own
                                                 # interpreter (--python) and reads PATH (JSON)

The loop answers list_tasks and checks task names from the catalog, so the server process never
imports a simulator that another Python serves.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from backends import get_backend
from backends.base import BackendError

EXIT_CANNOT_SERVE = 3


def catalog_snapshot(simulator: str) -> Dict[str, Any]:
    """Tasks, suites, static info, and the environment the backend's prepare_server set for its
    simulator processes (e.g. MUJOCO_GL), read in this interpreter. Plain JSON data.

    Raises BackendError when the simulator cannot run here.
    """
    backend_class = get_backend(simulator)
    before = dict(os.environ)
    backend_class.prepare_server()
    worker_env = {name: value for name, value in os.environ.items() if before.get(name) != value}
    backend = backend_class()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints a line per suite it opens
            return {"tasks": backend.list_tasks(), "suites": backend.suites(),
                    "unavailable_suites": backend.unavailable_suites(), "info": backend.get_info(),
                    "worker_env": worker_env, "task_registry": backend.task_registry(),
                    "needs_assets": backend.tasks_needing_assets()}
    finally:
        backend.close()


def main(argv: Optional[List[str]] = None) -> int:
    """Write SIMULATOR's catalog to PATH as JSON; exit 3 with the reason on stderr when it cannot run."""
    simulator, path = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level="WARNING", format=f"%(asctime)s catalog {simulator} %(levelname)s %(message)s")
    try:
        snapshot = catalog_snapshot(simulator)
    except BackendError as error:
        print(f"cannot serve {simulator}: {error}", file=sys.stderr)
        return EXIT_CANNOT_SERVE
    with open(path, "w") as snapshot_file:
        json.dump(snapshot, snapshot_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
