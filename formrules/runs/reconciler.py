"""The reconciler: makes RQ agree with the database, which is the source of truth.

One worker at a time runs it: the elected leader (`formrules.process.leader`). Each pass
(every `reconcile_seconds`; passes are still safe to run at once, e.g. while leadership
changes hands):
1. resume Runs whose heartbeat stopped (their worker died): back to queued, same attempt,
   and their dead worker's RQ job replaced, at the front of the queue;
2. enqueue every pending Run that is due and has no live RQ job (Redis was down at
   submit, lost its data, a delayed job vanished, a retry came due); one pipelined Redis
   round trip per `CHUNK` Runs reads the jobs' states, and `unique` enqueueing means never
   twice. Only Runs due now are read (the `status, due_at` index): a pass costs what is
   due, not what is pending, so 100k future Delays cost nothing until they come due;
3. fire due cron schedules (`formrules.runs.schedule`), one Run per slot;
4. advance batches (`formrules.runs.batch`): start waiting children in free slots;
5. purge finished Runs past their retention (`formrules.runs.purge`), a bounded batch.
6. delete records marked for deletion whose work has stopped, and send the notice
   e-mails a worker left unsent (`formrules.runs.control`, `.notifications`).
Between passes, `dispatch_due` (every `tick_seconds`) enqueues the Delays and retries
that just came due, so they start on time.

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from redis.exceptions import RedisError
from sqlalchemy import and_, or_, select

from formrules.process.runtime import Runtime
from formrules.runs import lifecycle
from formrules.runs.job import EARLY_WAIT_LIMIT, LOST_WORKER
from formrules.runs.pause import not_paused
from formrules.runs.queue import CHUNK, JobState
from formrules.store.models import PENDING, Run, RunStatus, utcnow

log = logging.getLogger("formrules.runs.reconciler")


@dataclass
class Pass:
    """What one reconcile pass did."""

    recovered: int = 0
    dispatched: int = 0
    dead: int = 0
    schedules: int = 0
    purged: int = 0  # finished Runs removed by retention (`formrules.runs.purge`)


def reconcile_once(rt: Runtime, schedules: bool = True,
                   between: Callable[[], None] | None = None) -> Pass:
    """One pass; returns counts for logs and tests. `between` runs between batches."""
    result = Pass()
    recover_stale(rt, result)
    dispatch_pending(rt, result, between)
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
    from formrules.runs import control, notifications
    try:  # what a worker that died left undone: deletions and notice e-mails
        control.finish_deletions(rt.store, rt.settings)
        notifications.send_emails(rt.store, rt.settings)
    except Exception:
        log.exception("deletions or notice e-mails failed")
    from formrules.runs import purge
    try:  # last: what is due now comes before tidying up what ended long ago
        removed = purge.purge_due(rt)
        result.purged = removed.runs
        from formrules.process import metrics
        metrics.purged(removed.runs, removed.events, removed.files)
    except Exception:
        log.exception("retention purge failed")
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


def dispatch_pending(rt: Runtime, result: Pass,
                     between: Callable[[], None] | None = None) -> None:
    """Enqueue each due pending Run whose job RQ would not run on time (or at all)."""
    now = utcnow()
    pending = sorted(PENDING)
    with rt.store.session() as s:
        # A cancel requested while a Run was between attempts: nothing will claim it, so
        # it ends here (guarded: a claim in between turns it into a running cancel).
        # A future Run is left to its due time: it cannot be claimed before then either.
        lifecycle.end_cancelled_between_attempts(s, now)
    after: tuple[datetime, str] | None = None
    while True:  # batches in due order (keyset), so a backlog costs in proportion to it
        query = select(Run.id, Run.due_at).where(
            Run.status.in_(pending), Run.due_at <= now, Run.cancel_requested.is_(False),
            not_paused())
        if after is not None:
            query = query.where(or_(Run.due_at > after[0],
                                    and_(Run.due_at == after[0], Run.id > after[1])))
        with rt.store.session() as s:
            batch = list(s.execute(query.order_by(Run.due_at, Run.id).limit(CHUNK)))
        if not batch:
            return
        if not _dispatch_batch(rt, batch, result):
            return  # Redis is away: the next pass tries again
        if len(batch) < CHUNK:
            return
        after = (batch[-1][1], batch[-1][0])
        if between is not None:
            between()


def dispatch_due(rt: Runtime, since: datetime | None = None) -> int:
    """Enqueue the Delays and retries that came due (after `since`); count the enqueued.

    What the leader does every `tick_seconds`: RQ's scheduler moves due scheduled jobs,
    then Runs due by the database but not live in RQ (a retry: RQ does not retry; a
    delayed job Redis lost; a Run whose turn for a `concurrency:` slot came) are enqueued.
    Reads only what came due since the last tick.
    """
    rt.dispatcher.enqueue_due_scheduled()
    now = utcnow()
    query = select(Run.id, Run.due_at).where(
        or_(Run.status.in_([RunStatus.SCHEDULED.value, RunStatus.RETRYING.value]),
            and_(Run.status == RunStatus.QUEUED.value, Run.waiting_for.is_not(None))),
        Run.due_at <= now, Run.cancel_requested.is_(False), not_paused())
    if since is not None:
        query = query.where(Run.due_at > since)
    with rt.store.session() as s:
        due = list(s.execute(query.order_by(Run.due_at).limit(CHUNK)))
    result = Pass()
    if due:
        _dispatch_batch(rt, due, result, quiet=True)
    return result.dispatched


def _dispatch_batch(rt: Runtime, batch: list, result: Pass, quiet: bool = False) -> bool:
    """Dispatch the Runs of `batch` ((id, due_at) rows) whose jobs are not live."""
    try:
        states = rt.dispatcher.job_states(run_id for run_id, _ in batch)
    except RedisError as exc:
        log.warning("reconciler: Redis unavailable (%s)", exc)
        return False
    now = utcnow().timestamp()
    grace = rt.settings.stale_seconds + EARLY_WAIT_LIMIT
    for run_id, due_at in batch:
        state = states[run_id]
        if state.exists and state.live(due_at, now, started_grace=grace):
            continue
        _dispatch(rt, run_id, result, state=state, quiet=quiet)
    return True


def _dispatch(rt: Runtime, run_id: str, result: Pass, replace_started: bool = False,
              state: JobState | None = None, quiet: bool = False) -> None:
    with rt.store.session() as s:
        run = s.get(Run, run_id)
        if run is None or not lifecycle.is_pending(run):
            return  # it moved on since we looked
        try:
            grace = rt.settings.stale_seconds + EARLY_WAIT_LIMIT
            if rt.dispatcher.dispatch(run, replace_started=replace_started, state=state,
                                      started_grace=grace):
                result.dispatched += 1
                if not quiet:
                    log.info("run %s enqueued by the reconciler", run_id)
        except RedisError as exc:
            log.warning("reconciler: Redis unavailable (%s)", exc)


def run_forever(rt: Runtime, stop: threading.Event) -> None:
    """Reconcile every `reconcile_seconds` until `stop` is set (tests; workers elect a
    leader that does this, see `formrules.process.leader`)."""
    while not stop.is_set():
        try:
            done = reconcile_once(rt)
            if done.recovered or done.dispatched or done.dead or done.schedules or done.purged:
                log.info("reconciled: %s", done)
        except Exception:  # database or Redis away: try again next interval
            log.exception("reconcile pass failed")
        stop.wait(rt.settings.reconcile_seconds)
