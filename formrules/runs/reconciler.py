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
import time
from dataclasses import dataclass
from datetime import timedelta

from redis.exceptions import RedisError
from sqlalchemy import select, update

from formrules.process import metrics
from formrules.process.runtime import Runtime
from formrules.runs.job import EARLY_WAIT_LIMIT, LOST_WORKER, notify
from formrules.runs.queue import JobState
from formrules.store.models import PENDING, Run, RunEvent, RunStatus, utcnow

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
    now = utcnow()
    stale_before = now - timedelta(seconds=rt.settings.stale_seconds)
    with rt.store.session() as s:
        stale = list(s.scalars(select(Run).where(Run.status == RunStatus.RUNNING.value,
                                                 Run.heartbeat_at < stale_before)))
    for run in stale:
        # The execution after the last allowed recovery only runs the on_error branch
        # (see `job.Execution`); if even that kills its worker, the Run goes dead here.
        too_many = run.recoveries >= rt.settings.max_recoveries
        values: dict = dict(lease=None, recoveries=Run.recoveries + 1, updated_at=now)
        if too_many:
            values.update(status=RunStatus.DEAD.value, finished_at=now,
                          safe_error=LOST_WORKER,
                          last_error=f"worker lost {run.recoveries + 1} times")
            kind = "dead"
        elif run.cancel_requested:  # it was stopping anyway: do not start it again
            values.update(status=RunStatus.CANCELLED.value, finished_at=now)
            kind = "cancel"
        else:  # the interrupted attempt does not count: it resumes where it stopped
            values.update(status=RunStatus.QUEUED.value, due_at=now,
                          attempt=Run.attempt - 1)
            kind = "recover"
        silent = (now - run.heartbeat_at).total_seconds()
        with rt.store.session() as s:
            # Guard on the lease we saw: a late heartbeat means it is alive after all.
            changed = s.execute(update(Run).where(Run.id == run.id, Run.lease == run.lease,
                                                  Run.status == RunStatus.RUNNING.value,
                                                  Run.heartbeat_at < stale_before)
                                .values(**values)).rowcount
            if changed:
                s.add(RunEvent(run_id=run.id, attempt=run.attempt, event=kind,
                               detail=f"no heartbeat for {silent:.0f}s; worker presumed dead"))
                if too_many:
                    notify(s, s.get(Run, run.id, populate_existing=True), "error",
                           f"{run.title}: {LOST_WORKER}")
        if not changed:
            continue
        log.warning("run %s: %s after %.0fs without heartbeat", run.id, kind, silent)
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
        stuck = s.execute(update(Run).where(
            Run.status.in_([p.value for p in PENDING]), Run.cancel_requested.is_(True))
            .values(status=RunStatus.CANCELLED.value, finished_at=utcnow())
            .returning(Run.id)).scalars().all()
        for run_id in stuck:
            s.add(RunEvent(run_id=run_id, event="cancel",
                           detail="cancelled: the cancel was asked for between attempts"))
    with rt.store.session() as s:
        pending = list(s.execute(select(Run.id, Run.due_at).where(
            Run.status.in_([p.value for p in PENDING]), Run.cancel_requested.is_(False))))
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
        if run is None or run.status not in {p.value for p in PENDING} \
                or run.cancel_requested:
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
        started, done = time.monotonic(), None
        try:
            done = reconcile_once(rt)
            if done.recovered or done.dispatched or done.dead or done.schedules:
                log.info("reconciled: %s", done)
        except Exception:  # database or Redis away: try again next interval
            log.exception("reconcile pass failed")
        metrics.reconciled(done, time.monotonic() - started)
        stop.wait(rt.settings.reconcile_seconds)
