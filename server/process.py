"""Process plumbing shared by the server, its simulator processes and the Ray launcher: dying with
the parent, reusing freed memory, and relaying a child's stderr.

Standard library only: a simulator process under another interpreter (--python) imports it too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections import deque

# How much of a failed process's stderr an error message quotes.
STDERR_TAIL_CHARS = 1500

# glibc serves allocations above 128 KiB with fresh mmaps and unmaps them on free, so every
# observation-sized buffer (encode, pipe read) faulted its pages in anew: 3.8x the mock's
# worker time. Up to these sizes, freed memory is kept for the next reply instead.
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers
PR_SET_PDEATHSIG = 1


def reuse_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds for this process (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def die_with_parent(how: signal.Signals = signal.SIGKILL, parent_pid: int = 0) -> None:
    """Ask Linux to send `how` to this process when its parent dies, so nothing outlives it.

    With `parent_pid`, exit at once when the parent is already gone (it may die before this runs).
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, how)
    except (OSError, AttributeError):
        pass  # not Linux: a simulator process still ends on its pipe's EOF
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)


def stderr_tail(text: str) -> str:
    """The end of a process's stderr, short enough for an error message."""
    text = text.strip()
    return text if len(text) <= STDERR_TAIL_CHARS else "..." + text[-STDERR_TAIL_CHARS:]


class StderrRelay:
    """Copies a process's stderr to ours, line by line, keeping the last lines so that a process that
    dies can be explained."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.lines: deque = deque(maxlen=30)
        self.thread = threading.Thread(target=self._relay, name="child-stderr", daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        with self.pipe:
            for raw in iter(self.pipe.readline, b""):
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                sys.stderr.write(line)

    def tail(self) -> str:
        """The last lines written so far (the relay ends with the process's stderr)."""
        return stderr_tail("".join(self.lines))
