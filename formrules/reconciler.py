"""The reconciler: makes RQ agree with the database, which is the source of truth.

Each pass (every `reconcile_seconds`, in every worker; passes are safe to run at once):
1. resume Runs whose heartbeat stopped (their worker died): back to queued, same attempt;
2. enqueue every pending Run that has no live RQ job (Redis was down at submit, lost its
   data, or a delayed job vanished); `unique` enqueueing means never twice;
3. fire due cron schedules (`formrules.schedule`), one Run per slot.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from redis.exceptions import RedisError
from sqlalchemy import select, update

from .models import PENDING, Run, RunEvent, RunStatus, utcnow
from .runtime import Runtime

log = logging.getLogger("formrules.reconciler")


@dataclass
class Pass:
    """What one reconcile pass did."""

    recovered: int = 0
    dispatched: int = 0
    dead: int = 0
    schedules: int = 0


def reconcile_once(rt: Runtime, schedules: bool = True) -> Pass:
    """One pass; returns counts for logs and tests."""
    result = Pass()
    now = utcnow()
    stale_before = now - timedelta(seconds=rt.settings.stale_seconds)
    store = rt.store
    with store.session() as s:
        stale = list(s.scalars(select(Run).where(Run.status == RunStatus.RUNNING.value,
                                                 Run.heartbeat_at < stale_before)))
    for run in stale:
        with store.session() as s:
            too_many = run.recoveries + 1 >= rt.settings.max_recoveries
            values = dict(lease=None, recoveries=Run.recoveries + 1, updated_at=now)
            if too_many:
                values.update(status=RunStatus.DEAD.value, finished_at=now,
                              safe_error="This task stopped unexpectedly several times.",
                              last_error=f"worker lost {run.recoveries + 1} times")
            else:  # the interrupted attempt does not count: it resumes where it stopped
                values.update(status=RunStatus.QUEUED.value, due_at=now,
                              attempt=Run.attempt - 1)
            # Guard on the lease we saw: a late heartbeat means it is alive after all.
            changed = s.execute(update(Run).where(Run.id == run.id, Run.lease == run.lease,
                                                  Run.heartbeat_at < stale_before)
                                .values(**values)).rowcount
            if changed:
                silent = (now - run.heartbeat_at).total_seconds()
                s.add(RunEvent(run_id=run.id, attempt=run.attempt,
                               event="dead" if too_many else "recover",
                               detail=f"no heartbeat for {silent:.0f}s; worker presumed dead"))
        if changed:
            result.dead += too_many
            result.recovered += not too_many
            if not too_many:
                _dispatch(rt, run.id, result, replace_started=True)
    with store.session() as s:
        pending = list(s.scalars(select(Run.id).where(
            Run.status.in_([p.value for p in PENDING]), Run.cancel_requested.is_(False))))
    for run_id in pending:
        _dispatch(rt, run_id, result)
    if schedules:
        from .schedule import fire_due
        try:
            result.schedules = fire_due(rt)
        except Exception:  # a broken schedule must not stop recovery of everything else
            log.exception("schedules failed")
    return result


def _dispatch(rt: Runtime, run_id: str, result: Pass, replace_started: bool = False) -> None:
    with rt.store.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            return
        try:
            if rt.dispatcher.dispatch(run, replace_started=replace_started):
                result.dispatched += 1
                log.info("run %s enqueued by the reconciler", run_id)
        except RedisError as exc:
            log.warning("reconciler: Redis unavailable (%s)", exc)


def run_forever(rt: Runtime, stop: threading.Event) -> None:
    """Reconcile every `reconcile_seconds` until `stop` is set."""
    while not stop.is_set():
        try:
            done = reconcile_once(rt)
            if done.recovered or done.dispatched or done.dead or done.schedules:
                log.info("reconciled: %s", done)
        except Exception:  # database or Redis away: try again next interval
            log.exception("reconcile pass failed")
        stop.wait(rt.settings.reconcile_seconds)
