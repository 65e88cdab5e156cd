"""Simulator processes as the server sees them: start one, hand it a call, read its reply, time it,
close it.

A simulator process is `INTERPRETER -m sim_server --simulator-process ...` (the spine's other
mode) on one end of a socket pair; `Worker` holds the other end, non-blocking, and the poll loop
polls `Worker.fileno()`: a reply is read as it arrives and a call written as the socket takes it
(backends/channel.py), so the loop never waits on a simulator. `SimulatorProcesses` keeps the
rules over all of them: the session limit, fresh processes after task switches, deadlines,
graceful closing, and killing without waiting. Sessions are sim_server.py's `Session` objects.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from backends.base import BackendError, ServerBusy
from backends.channel import CLOSE_CALL, IncomingMessage, OutgoingMessage
from server.catalogs import PROCESS_CWD, Catalog
from server.process import StderrRelay

log = logging.getLogger("sim_server")

# The flag that starts sim_server.py as a simulator process.
SIMULATOR_PROCESS_FLAG = "--simulator-process"
# A whole LIBERO reply fits in the socket buffers: no ping-pong between the process and the loop.
PIPE_BUFFER_BYTES = 4 * 1024 * 1024
# Seconds a closing simulator process gets to free its simulator before it is killed.
CLOSE_GRACE_S = 5.0
# How long a dead process's exit status and last stderr lines are waited for before its session is
# answered with what is known by then (the loop goes on meanwhile).
DEATH_REPORT_S = 1.0
# A killed process that has not exited after this long (stuck in the kernel) is logged, and reaped later.
KILL_REPORT_S = 10.0
# robosuite/LIBERO leak memory and GL contexts across env close: a session that switches
# tasks gets a fresh simulator process after this many task switches.
MAX_TASKS_PER_WORKER = 8


class Worker:
    """One simulator process: its channel, its stderr and its exit.

    Started fresh under the simulator's interpreter (no fork: EGL state must not be inherited).
    No method waits on the process: `kill` sends SIGKILL and returns, `finished` tells whether it
    is gone, and a death is described only once its exit and last words are in (`death_known`).
    """

    def __init__(self, catalog: Catalog, session_id: str, log_level: str, env: Dict[str, str]) -> None:
        parent_end, worker_end = socket.socketpair()
        for end in (parent_end, worker_end):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
        try:
            self.process = subprocess.Popen(
                [catalog.interpreter, "-m", "sim_server", SIMULATOR_PROCESS_FLAG, str(worker_end.fileno()),
                 catalog.simulator, session_id, log_level],
                pass_fds=[worker_end.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                cwd=PROCESS_CWD)
        except OSError as error:
            parent_end.close()
            raise BackendError(f"cannot start a {catalog.simulator} simulator with {catalog.interpreter}: "
                               f"{error}") from None
        finally:
            worker_end.close()  # so the process's death reads as EOF here
        parent_end.setblocking(False)
        self.pipe = parent_end
        self.fd = parent_end.fileno()  # kept after close: the session table's and the poller's key
        self.watched = False  # whether the loop polls it (set by the loop)
        self.stderr = StderrRelay(self.process.stderr)
        self.pid = self.process.pid
        self.incoming = IncomingMessage()
        self.outgoing: Optional[OutgoingMessage] = None
        self.close_deadline: Optional[float] = None
        self.killed_at: Optional[float] = None
        self.died_at: Optional[float] = None  # when its channel broke (EOF): a death to report
        self.task_switches = 0

    def fileno(self) -> int:
        return self.fd

    def submit(self, call: bytes) -> bool:
        """Start handing a call to the simulator; True when it was all written, else the loop calls
        `write_more` when the channel is writable. OSError when the process is gone."""
        self.outgoing = OutgoingMessage(call)
        return self.write_more()

    def write_more(self) -> bool:
        """Write more of the call in hand; True once it is all written."""
        if self.outgoing is None or self.outgoing.write_to(self.pipe):
            self.outgoing = None
            return True
        return False

    def read_reply(self) -> Optional[bytearray]:
        """What the channel holds now: the whole reply body once it has come, else None. EOFError or
        OSError when the process died."""
        body = self.incoming.read_from(self.pipe)
        if body is not None:
            self.incoming = IncomingMessage()
        return body

    def begin_close(self) -> None:
        """Ask the process to close its simulator; finished() enforces the grace period."""
        self.close_deadline = time.monotonic() + CLOSE_GRACE_S
        try:
            if not self.submit(CLOSE_CALL):
                self.kill()  # it does not even read: it will not close by itself
        except OSError:
            pass  # already gone

    def kill(self) -> None:
        """SIGKILL, without waiting for the exit (finished() reaps it); never raises."""
        if self.killed_at is None:
            self.killed_at = time.monotonic()
            try:
                self.process.kill()
            except OSError:
                pass  # already reaped
        self.pipe.close()

    def finished(self) -> bool:
        """True once the process exited (reaped); kills it after its grace period. A killed process
        that does not exit (stuck in the kernel) is logged once and stays here to be reaped later."""
        if self.process.poll() is not None:
            self.pipe.close()
            return True
        now = time.monotonic()
        if self.killed_at is None and self.close_deadline is not None and now > self.close_deadline:
            log.warning("simulator process %s did not close in %.0f s; killing it", self.pid, CLOSE_GRACE_S)
            self.kill()
        elif self.killed_at is not None and now > self.killed_at + KILL_REPORT_S:
            log.error("simulator process %s has not exited %.0f s after SIGKILL (stuck in the kernel?); it "
                      "is reaped when it does", self.pid, KILL_REPORT_S)
            self.killed_at = float("inf")  # said once
        return False

    def death_known(self) -> bool:
        """Whether its exit status and last stderr lines are in, or DEATH_REPORT_S has passed."""
        exited = self.process.poll() is not None and not self.stderr.thread.is_alive()
        return exited or time.monotonic() > (self.died_at or 0.0) + DEATH_REPORT_S

    def death_description(self) -> str:
        """How the process ended, and the last lines it wrote to stderr (what is known now)."""
        code = self.process.poll()
        how = (f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else
               f"exit code {code}" if code is not None else "no exit status yet")
        tail = self.stderr.tail()
        return f"{how}; its stderr ends: {tail}" if tail else how


class WorkerEnvironment:
    """The environment a new simulator process starts with: its simulator's settings (e.g.
    MUJOCO_GL), renderer and math threads that fit the machine, and the next EGL device.

    llvmpipe, OpenMP and BLAS each start a thread per core in every process, so N simulators
    on N cores would run N*N threads. A process gets the cores shared among the simulators
    running when it starts (all of them when it is alone); a variable the operator set wins.
    """

    THREAD_VARIABLES = ("LP_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, render_threads: Optional[int], egl_devices: Tuple[str, ...]) -> None:
        self.render_threads = render_threads
        self.egl_devices = egl_devices
        self.started = 0  # processes started so far: the EGL round-robin's position

    def for_worker(self, catalog: Catalog, running: int) -> Dict[str, str]:
        """The environment for a process of `catalog` started while `running` others run."""
        env = {**os.environ, **catalog.worker_env}
        threads = self.render_threads or max(1, (os.cpu_count() or 1) // (running + 1))
        for name in self.THREAD_VARIABLES:
            env.setdefault(name, str(threads))
        if self.egl_devices and env.get("MUJOCO_GL") == "egl" and "MUJOCO_EGL_DEVICE_ID" not in os.environ:
            env["MUJOCO_EGL_DEVICE_ID"] = self.egl_devices[self.started % len(self.egl_devices)]
        self.started += 1
        return env


class SimulatorProcesses:
    """Starting, timing and closing simulator processes (the loop polls their channels). It knows
    Workers only: which session a process serves is the session table's business."""

    def __init__(self, config: Any, catalogs: Dict[str, Catalog]) -> None:
        self.config = config
        self.catalogs = catalogs
        self.environment = WorkerEnvironment(config.render_threads, config.egl_devices)
        self.serving: List[Worker] = []  # started, not yet retired
        self.closing: List[Worker] = []  # retired, not yet exited

    def timeout_s(self, method: str) -> float:
        return self.config.load_timeout_s if method == "load_task" else self.config.step_timeout_s

    def start(self, simulator: str, session_id: str) -> Worker:
        """A new simulator process for a session; ServerBusy when every slot is taken."""
        if len(self.serving) >= self.config.max_sessions:
            raise ServerBusy(f"all {self.config.max_sessions} simulator sessions are in use; try again later")
        catalog = self.catalogs[simulator]
        worker = Worker(catalog, session_id, self.config.log_level,
                        self.environment.for_worker(catalog, len(self.serving)))
        self.serving.append(worker)
        log.info("session %s: simulator process %d started", session_id, worker.pid)
        return worker

    @staticmethod
    def worn_out(worker: Worker) -> bool:
        """One more task switch: whether it passes MAX_TASKS_PER_WORKER (simulators leak on close)."""
        worker.task_switches += 1
        if worker.task_switches <= MAX_TASKS_PER_WORKER:
            return False
        log.info("simulator process %d switched tasks %d times; starting a fresh one", worker.pid,
                 MAX_TASKS_PER_WORKER)
        return True

    @staticmethod
    def died(worker: Worker) -> BackendError:
        return BackendError(f"simulator process {worker.pid} died ({worker.death_description()})")

    def overdue(self, worker: Worker, method: Optional[str], deadline: Optional[float]) -> Optional[BackendError]:
        """The error to answer for a process that died (once its death is known) or whose running
        request (`method`, due by `deadline`) is late; None while all is well."""
        if worker.died_at is not None:
            return self.died(worker) if worker.death_known() else None
        if method is not None and time.monotonic() > deadline:
            limit = "SIM_LOAD_TIMEOUT_S" if method == "load_task" else "SIM_STEP_TIMEOUT_S"
            return BackendError(f"{method} overran {limit}; simulator process {worker.pid} was killed")
        return None

    def dying(self) -> bool:
        """Whether a dead process's description is being waited for (the loop then polls briefly)."""
        return any(worker.died_at is not None for worker in self.serving)

    def retire(self, worker: Worker, kill: bool) -> None:
        """Close a process the loop no longer polls: at once when `kill`, else in its own time. Either
        way it stays listed until it has exited."""
        self.serving.remove(worker)
        if kill:
            worker.kill()
        else:
            worker.begin_close()
        self.closing.append(worker)

    def finish_closing(self) -> None:
        self.closing = [worker for worker in self.closing if not worker.finished()]

    def close_all(self, wait_s: float = CLOSE_GRACE_S + 1.0) -> None:
        """Wait for (or kill, after their grace period) every closing process, at most `wait_s`."""
        deadline = time.monotonic() + wait_s
        while self.closing and time.monotonic() < deadline:
            self.finish_closing()
            time.sleep(0.05)
        for worker in self.closing:
            worker.kill()
            log.error("simulator process %s had not exited when the server stopped", worker.pid)
