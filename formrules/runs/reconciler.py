"""The reconciler: makes RQ agree with the database, which is the source of truth.

Each pass (every `reconcile_seconds`, in every worker; passes are safe to run at once):
1. resume Runs whose heartbeat stopped (their worker died): back to queued, same attempt,
   and their dead worker's RQ job replaced;
2. enqueue every pending Run that has no live RQ job (Redis was down at submit, lost its
   data, a delayed job vanished, the scheduler died); one pipelined Redis round trip
   reads every job's state, and `unique` enqueueing means never twice;
3. fire due cron schedules (`formrules.runs.schedule`), one Run per slot;
4. advance batches (`formrules.runs.batch`): start waiting children in free slots.

Recovery bound: a Run whose worker (or work-horse) is SIGKILLed mid-step is enqueued
again, at the front of the queue, at most `stale_seconds` (FORMRULES_STALE_AFTER, 30 s by
default) + `reconcile_seconds` (FORMRULES_RECONCILE, 10 s) after its last heartbeat, plus
one pass's own duration; it starts as soon as a worker is free. A worker killed after
taking a job but before claiming its Run leaves no heartbeat to miss: that job is
replaced `stale_seconds` + `job.EARLY_WAIT_LIMIT` (5 s) after it started, within one more
interval. `heartbeat_seconds` (FORMRULES_HEARTBEAT) must stay well under `stale_seconds`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from redis.exceptions import RedisError
from sqlalchemy import select

from formrules.process.runtime import Runtime
from formrules.runs import lifecycle
from formrules.runs.job import EARLY_WAIT_LIMIT, LOST_WORKER
from formrules.runs.queue import JobState
from formrules.store.models import PENDING, Run, RunStatus, utcnow

log = logging.getLogger("formrules.runs.reconciler")


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
    recover_stale(rt, result)
    dispatch_pending(rt, result)
    if schedules:
        from formrules.runs.schedule import fire_due
        try:
            result.schedules = fire_due(rt)
        except Exception:  # a broken schedule must not stop recovery of everything else
            log.exception("schedules failed")
    from formrules.runs.batch import advance_all
    try:  # a batch whose child ended without its hook (worker killed) moves on here
        result.dispatched += advance_all(rt)
    except Exception:
        log.exception("batches failed")
    return result


def recover_stale(rt: Runtime, result: Pass) -> None:
    """Put Runs whose heartbeat stopped back in the queue (or give up on crash loops)."""
    stale_before = utcnow() - timedelta(seconds=rt.settings.stale_seconds)
    with rt.store.session() as s:
        stale = list(s.scalars(select(Run).where(Run.status == RunStatus.RUNNING,
                                                 Run.heartbeat_at < stale_before)))
    for run in stale:
        with rt.store.session() as s:
            kind = lifecycle.recover(s, run, stale_before=stale_before,
                                     max_recoveries=rt.settings.max_recoveries,
                                     lost_message=LOST_WORKER)
        if kind is None:
            continue  # a late heartbeat: it is alive after all
        log.warning("run %s: %s after its heartbeat stopped", run.id, kind)
        if kind == "recover":
            result.recovered += 1
            _dispatch(rt, run.id, result, replace_started=True)
        else:
            result.dead += kind == "dead"
            try:  # its dead worker's job must not be revived by RQ's own cleanup
                rt.dispatcher.discard(run.id)
            except RedisError as exc:
                log.warning("reconciler: Redis unavailable (%s)", exc)


def dispatch_pending(rt: Runtime, result: Pass) -> None:
    """Enqueue each pending Run whose job RQ would not run on time (or at all)."""
    with rt.store.session() as s:
        # A cancel requested while a Run was between attempts: nothing will claim it, so
        # it ends here (guarded: a claim in between turns it into a running cancel).
        lifecycle.end_cancelled_between_attempts(s)
    with rt.store.session() as s:
        pending = list(s.execute(select(Run.id, Run.due_at).where(
            Run.status.in_(sorted(PENDING)), Run.cancel_requested.is_(False))))
    if not pending:
        return
    try:
        states = rt.dispatcher.job_states(run_id for run_id, _ in pending)
    except RedisError as exc:
        log.warning("reconciler: Redis unavailable (%s)", exc)
        return
    now = utcnow().timestamp()
    grace = rt.settings.stale_seconds + EARLY_WAIT_LIMIT
    for run_id, due_at in pending:
        state = states[run_id]
        if state.exists and state.live(due_at, now, started_grace=grace):
            continue
        _dispatch(rt, run_id, result, state=state)


def _dispatch(rt: Runtime, run_id: str, result: Pass, replace_started: bool = False,
              state: JobState | None = None) -> None:
    with rt.store.session() as s:
        run = s.get(Run, run_id)
        if run is None or not lifecycle.is_pending(run):
            return  # it moved on since we looked
        try:
            grace = rt.settings.stale_seconds + EARLY_WAIT_LIMIT
            if rt.dispatcher.dispatch(run, replace_started=replace_started, state=state,
                                      started_grace=grace):
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
