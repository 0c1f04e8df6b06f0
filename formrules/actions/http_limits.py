"""Rate limits per external host for `http_request`, shared by every worker (Redis).

Configured by the deployment (`FORMRULES_HTTP_LIMITS=api.example.com=10/second,...`), as
the host allowlist is: a limit belongs to the service, whichever forms call it. Counted
with the `limits` package (already here through Flask-Limiter): a moving window in Redis,
so two workers together never exceed the host's rate.

A request over the limit waits for its turn: it sleeps until the window has room, checking
the step's cancel and timeout while it waits, for at most `http_limit_wait_seconds`; only
then does it fail, as a retryable "busy" error (as an HTTP 429 would). If Redis cannot be
reached the request goes ahead unthrottled (logged): the service's own 429 still applies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from formrules.config import Settings
from formrules.errors import RetryableError

log = logging.getLogger("formrules.actions.http_limits")
BUSY = "A service needed for this is busy at the moment."
_limiters: dict[tuple[int, str], MovingWindowRateLimiter] = {}


def limit_for(url: str, limits: tuple[tuple[str, str], ...]) -> tuple[str, RateLimitItem] | None:
    """The configured limit for `url`'s host (`host:port` first, then `host`), or None."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    table = dict(limits)
    for name in (f"{host}:{port}", host):
        if name in table:
            return name, parse(table[name])
    return None


def _limiter(settings: Settings) -> MovingWindowRateLimiter:
    """One limiter per process (a forked work-horse makes its own connections)."""
    key = (os.getpid(), settings.redis_url)
    if key not in _limiters:
        storage = RedisStorage(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        _limiters[key] = MovingWindowRateLimiter(storage)
    return _limiters[key]


def wait_turn(settings: Settings, url: str, check: Callable[[], object] | None = None) -> float:
    """Block until `url`'s host may take one more request; return the seconds waited.

    `check` is called while waiting (the step's cancel/timeout check, which raises).
    """
    found = limit_for(url, settings.http_limits)
    if found is None:
        return 0.0
    host, item = found
    limiter = _limiter(settings)
    began = time.monotonic()
    ident = (settings.queue, host)
    while True:
        try:
            if limiter.hit(item, *ident):
                return time.monotonic() - began
            reset = limiter.get_window_stats(item, *ident).reset_time
        except Exception as exc:  # noqa: BLE001 — Redis away: go ahead, unthrottled
            log.warning("http limit for %s not applied (%s)", host, exc)
            return time.monotonic() - began
        waited = time.monotonic() - began
        if waited >= settings.http_limit_wait_seconds:
            raise RetryableError(f"http_request: {host} stayed at its limit {item} for "
                                 f"{waited:.0f}s", BUSY)
        if check is not None:
            check()
        pause = min(max(0.01, reset - time.time()), 0.5,
                    settings.http_limit_wait_seconds - waited)
        time.sleep(max(0.01, pause))
