"""Riding out an outage of a service (Redis): back off, and say so once, not per retry."""

from __future__ import annotations

import logging
import time


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
