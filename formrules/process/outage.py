"""Riding out an outage of a service (Redis): back off, and say so once, not per retry."""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError


class Outage:
    """Exponential backoff from `first` to `cap` seconds, logged once per outage."""

    def __init__(self, what: str, log: logging.Logger, first: float = 0.5, cap: float = 5.0):
        self.what, self.log, self.first, self.cap = what, log, first, cap
        self.began: float | None = None
        self.delay = first

    @property
    def down(self) -> bool:
        """True between a failure and the next success."""
        return self.began is not None

    def failed(self, exc: BaseException) -> float:
        """Note a failure; returns how long to wait before trying again."""
        if self.began is None:
            self.began, self.delay = time.monotonic(), self.first
            self.log.warning("%s unavailable (%s: %s); retrying with backoff until it is back",
                             self.what, type(exc).__name__, exc)
        else:
            self.delay = min(self.cap, self.delay * 2)
        return self.delay

    def ok(self) -> None:
        """Note a success (logged when it ends an outage)."""
        if self.began is not None:
            self.log.warning("%s is back after %.0f s", self.what, time.monotonic() - self.began)
            self.began, self.delay = None, self.first


class QuietOutage(logging.Filter):
    """For RQ's worker logger: one "could not connect" line per outage, no tracebacks.

    RQ logs every reconnect attempt (every 2 s) and a traceback when its loop gives up;
    during an outage the worker's own single line says all of that.
    """

    def __init__(self, quiet_for: float = 300.0):
        super().__init__()
        self.quiet_for = quiet_for
        self.last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop repeats; keep the line but not the traceback of a Redis error."""
        if record.exc_info and isinstance(record.exc_info[1], RedisError):
            record.exc_info, record.exc_text = None, None
        if "could not connect to redis" in record.getMessage().lower():
            now = time.monotonic()
            if now - self.last < self.quiet_for:
                return False
            self.last = now
        return True
