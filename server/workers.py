"""Simulator processes as the server sees them: start one, hand it a call, read its reply, time it,
close it.

A simulator process is `INTERPRETER -m backends.worker ...` (backends/worker.py) on one end of a
socket pair; `Worker` holds the other end, and the poll loop polls `Worker.fileno()`.
`SimulatorProcesses` keeps the rules over all of them: the session limit, fresh processes after
task switches, deadlines, graceful closing. Sessions are sim_server.py's `Session` objects.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

from backends.base import BackendError, ServerBusy
from server.catalogs import PROCESS_CWD, Catalog, stderr_tail

log = logging.getLogger("sim_server")

# A whole LIBERO reply fits in the socket buffers: no ping-pong between the process and the loop.
PIPE_BUFFER_BYTES = 4 * 1024 * 1024
# A zero-length call on the pipe means "close your simulator and exit".
CLOSE_CALL = b""
# Seconds a closing simulator process gets to free its simulator before it is killed.
CLOSE_GRACE_S = 5.0
# robosuite/LIBERO leak memory and GL contexts across env close: a session that switches
# tasks gets a fresh simulator process after this many task switches.
MAX_TASKS_PER_WORKER = 8


def frame_header(size: int) -> bytes:
    """multiprocessing.connection's length prefix, which backends/worker.py reads with Connection."""
    return struct.pack("!i", size) if size < 0x7FFFFFFF else struct.pack("!iQ", -1, size)


class StderrRelay:
    """Copies a process's stderr to the server's, line by line, keeping the last lines so that a
    process that dies can be explained to its client."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.lines: deque = deque(maxlen=30)
        self.thread = threading.Thread(target=self._relay, name="worker-stderr", daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        with self.pipe:
            for raw in iter(self.pipe.readline, b""):
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                sys.stderr.write(line)

    def tail(self) -> str:
        """The last lines written, after waiting briefly for the rest of a dead process's output."""
        self.thread.join(timeout=1.0)
        return stderr_tail("".join(self.lines))


class Worker:
    """One simulator process: its pipe, its stderr and its exit.

    Started fresh under the simulator's interpreter (no fork: EGL state must not be inherited).
    """

    def __init__(self, catalog: Catalog, session_id: str, log_level: str, env: Dict[str, str]) -> None:
        parent_end, worker_end = socket.socketpair()
        for end in (parent_end, worker_end):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
        try:
            self.process = subprocess.Popen(
                [catalog.interpreter, "-m", "backends.worker", str(worker_end.fileno()), catalog.simulator,
                 session_id, log_level],
                pass_fds=[worker_end.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                cwd=PROCESS_CWD)
        except OSError as error:
            parent_end.close()
            raise BackendError(f"cannot start a {catalog.simulator} simulator with {catalog.interpreter}: "
                               f"{error}") from None
        finally:
            worker_end.close()  # so the process's death reads as EOF here
        self.pipe = parent_end
        self.stderr = StderrRelay(self.process.stderr)
        self.pid = self.process.pid
        self.close_deadline: Optional[float] = None
        self.task_switches = 0

    def fileno(self) -> int:
        return self.pipe.fileno()

    def submit(self, call: bytes) -> None:
        """Hand a call to the simulator; OSError when the process is gone."""
        self.pipe.sendall(frame_header(len(call)) + call)

    def read_reply(self) -> bytearray:
        """The simulator's reply body, read straight into one buffer (multiprocessing's reader
        copies a reply three times); EOFError or OSError when the process died."""
        size = struct.unpack("!i", self._read_exactly(4))[0]
        if size == -1:
            size = struct.unpack("!Q", self._read_exactly(8))[0]
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            count = self.pipe.recv_into(view[got:])
            if count == 0:
                raise EOFError("the simulator process closed its pipe")
            got += count
        return buffer

    def begin_close(self) -> None:
        """Ask the process to close its simulator; finished() enforces the grace period."""
        self.close_deadline = time.monotonic() + CLOSE_GRACE_S
        try:
            self.submit(CLOSE_CALL)
        except OSError:
            pass  # already gone

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        self.pipe.close()

    def finished(self) -> bool:
        """True once the process exited (reaped) or was killed after its grace period."""
        if self.process.poll() is not None:
            self.pipe.close()
            return True
        if self.close_deadline is not None and time.monotonic() > self.close_deadline:
            log.warning("simulator process %s did not close in %.0f s; killing it", self.pid, CLOSE_GRACE_S)
            self.kill()
            return True
        return False

    def death_description(self) -> str:
        """How the process ended, and the last lines it wrote to stderr."""
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
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
    """Starting, timing and closing the sessions' simulator processes (the loop polls their pipes)."""

    def __init__(self, config: Any, catalogs: Dict[str, Catalog], sessions: Any) -> None:
        self.config = config
        self.catalogs = catalogs
        self.sessions = sessions
        self.environment = WorkerEnvironment(config.render_threads, config.egl_devices)
        self.closing: List[Worker] = []

    def timeout_s(self, method: str) -> float:
        return self.config.load_timeout_s if method == "load_task" else self.config.step_timeout_s

    def start(self, session: Any) -> Worker:
        """A new simulator process for the session; ServerBusy when every slot is taken."""
        if self.sessions.with_simulator() >= self.config.max_sessions:
            raise ServerBusy(f"all {self.config.max_sessions} simulator sessions are in use; try again later")
        catalog = self.catalogs[session.simulator]
        env = self.environment.for_worker(catalog, self.sessions.with_simulator())
        worker = Worker(catalog, session.session_id, self.config.log_level, env)
        session.crash = None
        self.sessions.attach(session, worker)
        log.info("session %s: simulator process %d started", session.session_id, worker.pid)
        return worker

    def worn_out(self, session: Any, task_name: str) -> bool:
        """Whether this task switch passes MAX_TASKS_PER_WORKER: simulators leak on close."""
        if task_name == session.current_task:
            return False
        session.worker.task_switches += 1
        if session.worker.task_switches <= MAX_TASKS_PER_WORKER:
            return False
        log.info("session %s: simulator process %d switched tasks %d times; starting a fresh one",
                 session.session_id, session.worker.pid, MAX_TASKS_PER_WORKER)
        return True

    @staticmethod
    def died(session: Any) -> BackendError:
        worker = session.worker
        return BackendError(f"simulator process {worker.pid} died ({worker.death_description()})")

    def overdue(self) -> List[Tuple[Any, BackendError]]:
        """Sessions whose running request passed its deadline, each with the error to answer."""
        now, late = time.monotonic(), []
        for session in self.sessions:
            if session.pending is not None and now > session.pending.deadline and session.worker is not None:
                method = session.pending.request.method
                limit = "SIM_LOAD_TIMEOUT_S" if method == "load_task" else "SIM_STEP_TIMEOUT_S"
                late.append((session, BackendError(f"{method} overran {limit}; simulator process "
                                                   f"{session.worker.pid} was killed")))
        return late

    def retire(self, worker: Worker, kill: bool) -> None:
        """Close a process the loop no longer polls: at once when `kill`, else in its own time."""
        if kill:
            worker.kill()
        else:
            worker.begin_close()
            self.closing.append(worker)

    def finish_closing(self) -> None:
        self.closing = [worker for worker in self.closing if not worker.finished()]

    def close_all(self) -> None:
        """Wait for (or kill, after their grace period) every closing process."""
        while self.closing:
            self.finish_closing()
            time.sleep(0.05)
