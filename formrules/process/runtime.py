"""Per-process resources shared by web, worker and CLI: settings, store, Redis, queue.

Workers import job functions by dotted path and know nothing of Flask, so the job entry
point finds its resources here. `current()` builds them from the environment once per
process (a forked work-horse gets its own database connections).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from formrules.actions import registry as actions
from formrules.config import Settings, from_env
from formrules.runs import notifications
from formrules.runs.queue import Dispatcher, connect
from formrules.store.db import Store


@dataclass
class Runtime:
    """Settings plus the store and queue built from them, lazily.

    `bounded` (web, CLI, jobs): enqueueing waits on Redis at most `submit_redis_seconds`
    per request, through a client of its own with that socket timeout; the leader's
    runtime is unbounded (it is the one that delivers what a bounded enqueue left).
    """

    settings: Settings
    bounded: bool = True

    @cached_property
    def store(self) -> Store:
        """The database."""
        return Store(self.settings.sqlalchemy_url)

    @cached_property
    def redis(self):
        """The Redis client."""
        return connect(self.settings.redis_url)

    @cached_property
    def dispatcher(self) -> Dispatcher:
        """Puts Runs on the RQ queue."""
        if not self.bounded:
            return Dispatcher(self.redis, self.settings.queue,
                              self.settings.default_timeout_seconds)
        budget = self.settings.submit_redis_seconds
        return Dispatcher(connect(self.settings.redis_url, timeout=budget),
                          self.settings.queue, self.settings.default_timeout_seconds,
                          budget=budget)


_current: tuple[int, Runtime] | None = None


def install(runtime: Runtime) -> Runtime:
    """Make `runtime` this process's current one (worker start-up, tests)."""
    global _current
    actions.load_modules(runtime.settings.actions_modules)
    _current = (os.getpid(), runtime)
    # Live events for open pages go out on the dispatcher's client (bounded in web
    # requests), looked up when sent: a forked work-horse uses its own connections.
    notifications.set_publisher(_publish)
    return runtime


def _publish(messages: list[tuple[str, str]]) -> None:
    """PUBLISH each (channel, text), in one round trip."""
    with current().dispatcher.redis.pipeline(transaction=False) as pipe:
        for channel, text in messages:
            pipe.publish(channel, text)
        pipe.execute()


def current() -> Runtime:
    """This process's runtime; after a fork the child gets fresh connections."""
    global _current
    if _current is None:
        return install(Runtime(from_env()))
    pid, runtime = _current
    if pid != os.getpid():
        if "store" in runtime.__dict__:
            runtime.store.engine.dispose(close=False)  # leave the parent's sockets alone
        _current = (os.getpid(), runtime)  # redis-py resets its own pool after a fork
    return runtime
