"""Session threads: a run's and a replay's parallel sessions, one thread each, started and joined in
one place.

Nothing a session thread waits on is unbounded: every simulator call has the client's timeout and
retries, and every policy call --policy-timeout (policies.py runs a plain policy's calls on a helper
thread for that). So the threads end by themselves; the join waits in short slices, so Ctrl-C
reaches the main thread at once, and it gives up on a thread that outlives every bound.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, List

# How often the join looks up from its wait (Ctrl-C is noticed within this).
JOIN_SLICE_S = 0.5


class SessionPool:
    """`slots` threads, each running `work(slot)` until it returns."""

    def __init__(self, slots: int, work: Callable[[int], None], name: str) -> None:
        self.threads: List[threading.Thread] = [
            threading.Thread(target=work, args=(slot,), name=f"{name}-{slot}", daemon=True)
            for slot in range(max(1, slots))]

    def run(self, bound_s: float) -> List[threading.Thread]:
        """Start every thread and wait for them, at most `bound_s` in all; the threads still running
        then (none, unless something broke a bound) are returned, left to die with the process."""
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + bound_s
        for thread in self.threads:
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(min(JOIN_SLICE_S, max(0.0, deadline - time.monotonic())))
        return [thread for thread in self.threads if thread.is_alive()]
