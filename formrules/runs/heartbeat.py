"""One heartbeat thread per process for every Run it executes.

A running Run proves every `heartbeat_seconds` that its execution is alive (the
reconciler resumes it elsewhere when the beats stop). A thread started and joined per
job cost a trivial job about a tenth of its time (thread start, then waiting for it to
wake and end); this thread lives as long as the process and beats for whichever
executions are registered. A forked work-horse starts its own on its first job.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Protocol


class Beating(Protocol):
    """What the thread needs of an execution."""

    def beat(self) -> None: ...


class Heartbeats:
    """Registered executions, each beaten every `interval` seconds from its start."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # no lock or thread crosses a fork

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._due: dict[Beating, tuple[float, float]] = {}  # execution -> (next, interval)
        self._thread: threading.Thread | None = None

    def add(self, execution: Beating, interval: float) -> None:
        """Beat for `execution` every `interval` seconds until `discard`."""
        with self._lock:
            self._due[execution] = (time.monotonic() + interval, interval)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="heartbeats",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def discard(self, execution: Beating) -> None:
        """Stop beating for it (a beat already under way just finds the lease gone)."""
        with self._lock:
            self._due.pop(execution, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [e for e, (at, _) in self._due.items() if at <= now]
                for execution in due:
                    self._due[execution] = (now + self._due[execution][1],
                                            self._due[execution][1])
                wait = min((at for at, _ in self._due.values()), default=now + 60) - now
            for execution in due:
                execution.beat()
            self._wake.wait(max(0.0, wait))
            self._wake.clear()


heartbeats = Heartbeats()
