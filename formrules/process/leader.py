"""The leader: one worker of the deployment does the reconciler's duties, elected in Redis.

Every worker runs a `Leader` thread; the one holding the lease (a redis-py `Lock` on
`formrules:leader:<queue>`, `leader_lease_seconds` long, renewed every tick) is the leader.
It alone:
- moves due Delays and retries to the queue every `tick_seconds`, and sooner when a
  Delay comes due before the next tick (what RQ's scheduler did, one per worker process,
  with a lock another worker took over only minutes after its holder died);
- runs a reconciler pass every `reconcile_seconds` (recovery, re-dispatch, schedules,
  batches: `formrules.runs.reconciler`).
A killed leader's lease runs out and another worker's thread takes over within
`leader_lease_seconds` + `tick_seconds`; a stopped one releases it at once.

Why a Redis lease rather than a PostgreSQL advisory lock: it works on SQLite and
PostgreSQL alike; it expires by itself even when the leader's machine vanishes (a
session-level advisory lock lives as long as the server believes the connection does);
and without Redis the leader could not enqueue anything anyway. Two leaders for a moment
(a lease lost during a long pause) are harmless: every duty is guarded in the database
and by unique enqueueing, so the lease saves work, it does not provide safety.

A thread, not a process: it saves the memory of a second interpreter per worker. Forking
a process while another of its threads holds a lock (an import, SQLAlchemy's mapper
set-up, a cache) can leave the child waiting on it forever, so the forking worker takes
`QUIET` around each fork and the thread holds it while it works: a work-horse is only
ever forked while this thread rests between ticks. It also uses connections of its own,
which a work-horse never touches.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

from redis.exceptions import LockError, RedisError

from formrules.config import Settings
from formrules.process import metrics
from formrules.process.outage import Outage
from formrules.process.runtime import Runtime
from formrules.runs import callbacks, reconciler
from formrules.store.models import utcnow

log = logging.getLogger("formrules.process.leader")
KEY = "formrules:leader:{queue}"
# A tick reads Runs due since the previous one, minus this: a Run committed a little
# after a tick read the table (with a due time just before it) is still seen.
OVERLAP = timedelta(seconds=2)
# Held by the leader thread while it works and by the worker while it forks (see above).
QUIET = threading.Lock()


class Leader(threading.Thread):
    """Campaigns for the lease and, while holding it, does the leader's duties."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None):
        super().__init__(name="formrules-leader", daemon=True)
        self.settings = settings
        self.stop = stop or threading.Event()
        self.rt = Runtime(settings, bounded=False)  # its own store and Redis connections
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = self.rt.redis.lock(KEY.format(queue=settings.queue),
                                       timeout=settings.leader_lease_seconds,
                                       blocking=False, thread_local=False)
        self.leading = False
        self.since = None  # the due time up to which the last tick looked
        self.next_pass = 0.0
        self.redis_outage = Outage("Redis", log)

    def run(self) -> None:
        """Until stopped: hold or seek the lease, and do the duties while holding it."""
        try:
            while not self.stop.is_set():
                delay = self.settings.tick_seconds
                try:
                    with QUIET:
                        self.step()
                        delay = self.until_next_due(delay)
                    self.redis_outage.ok()
                except RedisError as exc:
                    self.leading = False
                    delay = self.redis_outage.failed(exc)
                except Exception:  # the database blinked, or a bug: the next tick retries
                    log.exception("leader tick failed")
                self.stop.wait(delay)
        finally:
            self.resign()
            self.rt.store.dispose()

    def step(self) -> None:
        """One tick: keep (or take) the lease; then move what came due; maybe a pass."""
        if not self.campaign():
            return
        now = utcnow()
        reconciler.dispatch_due(self.rt, self.since)
        callbacks.dispatch_due(self.rt)  # completion callbacks whose delivery is due
        self.since = now - OVERLAP
        if time.monotonic() >= self.next_pass:
            started, done = time.monotonic(), None
            try:
                done = reconciler.reconcile_once(self.rt, between=self.renew)
            finally:  # a failed pass is counted too (done stays None)
                metrics.reconciled(done, time.monotonic() - started)
            if done.recovered or done.dispatched or done.dead or done.schedules or done.purged:
                log.info("reconciled: %s", done)
            self.next_pass = time.monotonic() + self.settings.reconcile_seconds

    def until_next_due(self, tick: float) -> float:
        """How long to rest: a tick, or less when a Delay comes due sooner, so it is
        moved to its queue when due rather than up to a tick later (never before: RQ's
        scheduler moves only jobs whose time has come)."""
        if not self.leading:
            return tick
        due = self.rt.dispatcher.next_scheduled()
        if due is None:
            return tick
        return min(tick, max(0.005, due - time.time() + 0.002))

    def campaign(self) -> bool:
        """True while this worker holds the lease (renewed here)."""
        if self.leading:
            try:
                self.lock.reacquire()
                return True
            except LockError:  # it expired (a long pause) and maybe someone else has it
                log.warning("leader %s: lost the lease", self.identity)
                self.leading = False
        if self.lock.acquire(blocking=False, token=self.identity):
            self.leading = True
            self.since, self.next_pass = None, 0.0  # look at everything due, at once
            log.info("leader %s: elected; reconciling for the deployment", self.identity)
        return self.leading

    def renew(self) -> None:
        """Between batches of a long pass: let a waiting fork happen, keep the lease."""
        QUIET.release()
        try:
            time.sleep(0.01)  # a worker waiting to fork takes QUIET now
        finally:
            QUIET.acquire()
        self.lock.reacquire()

    def resign(self) -> None:
        """Give the lease up so another worker takes over at once (on a clean stop)."""
        if self.leading:
            try:
                self.lock.release()
                log.info("leader %s: resigned", self.identity)
            except (LockError, RedisError):
                pass  # it expires by itself
            self.leading = False


def leader_of(rt: Runtime) -> str | None:
    """`host:pid` of the worker holding the lease right now (tests, operators), or None."""
    holder = rt.redis.get(KEY.format(queue=rt.settings.queue))
    return holder.decode() if holder else None
