"""Helpers for the child processes formrules starts (Redis, workers)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from formrules.process.redis_server import RedisServer

log = logging.getLogger("formrules.process.children")


def die_with_parent() -> None:
    """Linux: have the kernel stop this process when its parent dies (even by SIGKILL).

    Used as `preexec_fn`, it is armed before the child program starts. The child also
    ignores SIGHUP: a closing terminal hangs up its whole process group, and the parent
    stops its children in order (the worker before its Redis), not the terminal.
    """
    with contextlib.suppress(ValueError):  # only a main thread may; then the default stays
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Not Linux (no libc.so.6 / prctl): the parent's own cleanup still applies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor(threading.Thread):
    """Keeps the one-command run's worker, and its private Redis, running.

    A child that exits on its own (a crash, the OOM killer, a Redis that was killed) is
    started again, after a wait that doubles while it keeps dying young (1 s up to 30 s),
    with one log line per restart.
    """

    def __init__(self, start_worker: Callable[[], subprocess.Popen],
                 redis_server: RedisServer | None = None, check_seconds: float = 0.5):
        super().__init__(name="formrules-supervisor", daemon=True)
        self.start_worker = start_worker
        self.redis_server = redis_server
        self.check_seconds = check_seconds
        self.stopping = threading.Event()
        self.worker = start_worker()
        self.started = time.monotonic()
        self.delay = 1.0

    def run(self) -> None:
        """Until stopped: restart whatever exited."""
        while not self.stopping.wait(self.check_seconds):
            try:
                self.check()
            except Exception:  # noqa: BLE001 — a failed restart is tried again
                log.exception("supervisor: restart failed; trying again")
                self.stopping.wait(self.backoff())

    def check(self) -> None:
        """Restart the Redis server and the worker if they exited."""
        server = self.redis_server
        if server is not None and (server.process is None or server.process.poll() is not None):
            log.warning("the private Redis exited; starting it again on port %s", server.port)
            server.start()
        code = self.worker.poll()
        if code is not None and not self.stopping.is_set():
            wait = self.backoff()
            log.warning("the worker exited (code %s); starting another in %.0f s", code, wait)
            if self.stopping.wait(wait):
                return
            self.worker = self.start_worker()
            self.started = time.monotonic()

    def backoff(self) -> float:
        """Seconds to wait before a restart: longer while children keep dying young."""
        if time.monotonic() - self.started > 60:
            self.delay = 1.0
        else:
            self.delay = min(30.0, self.delay * 2)
        return self.delay / 2

    def stop(self) -> subprocess.Popen:
        """Stop supervising; returns the current worker for the caller to stop."""
        self.stopping.set()
        if self.is_alive():
            self.join(35)
        return self.worker
