"""Every change of a Run's status, in one place.

Each transition is one guarded statement, `UPDATE runs … WHERE status IN (from-states)
[AND lease = ours] … RETURNING *`, so a transition that lost a race (a worker claimed the
Run, a cancel ended it, another execution took the lease over) changes nothing and says
so, without a read before the write or a reload after it. The same call writes the
trace line, the timestamps (`finished_at`, `updated_at`, heartbeat), releases the lease
when the Run leaves `running`, and tells the owner (`formrules.runs.notifications`).

    new Run ── born ──> scheduled | queued | waiting (a batch child)
    waiting ── RELEASE (a batch slot) ──> queued
    pending ── WAIT_FOR_SLOT (`concurrency:` reached) ──> pending, due again later
    pending, waiting for a slot ── WAKE (a slot was given back) ──> pending, due now
    pending ── CLAIM ──> running ── SUCCEED ──> done
                            │ ├── SKIP_AT_FIRE (`when:` false) ──> skipped
                            │ ├── STOP (a cancel seen) ──> cancelled
                            │ ├── RETRY_LATER ──> retrying (pending again)
                            │ ├── DIE ──> dead
                            │ └── RECOVER* (heartbeat stopped) ──> queued | cancelled | dead
    not started ── CANCEL_NOW ──> cancelled;   running ── REQUEST_CANCEL ──> running (stopping)
    not fired (Delay) ── EDIT_CANCEL | EDIT_SKIP | EDIT_MOVE ──> cancelled | skipped | pending
    dead | cancelled ── OPERATOR_RETRY ──> queued;   dead ── OWNER_RETRY (`user_retry:`) ──> queued

The named sets of statuses (PENDING, NOT_STARTED, ACTIVE, FINAL, …) live with `RunStatus`
in `formrules.store.models`; this module is the only writer of `Run.status`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import bindparam, case, exists, func, insert, select, update
from sqlalchemy.orm import Session

from formrules.errors import GENERIC_FAILURE, Cancelled, LeaseLost
from formrules.runs import notifications
from formrules.store.db import RecordFacts, known_record, remember_record
from formrules.store.models import (
    AWAITED,
    NOT_FIRED,
    NOT_STARTED,
    PENDING,
    RETRYABLE_BY_OPERATOR,
    Callback,
    CallbackState,
    EventKind,
    Record,
    Run,
    RunEvent,
    RunStatus,
    utcnow,
)

RUNNING = frozenset({RunStatus.RUNNING})
WAITING = frozenset({RunStatus.WAITING})
# What deferred work is doing right now, as the form diagram counts it and the Runs list
# filters it (`?state=`): `waiting` is `scheduled` (a Delay not due yet) or a batch child
# waiting for a slot.
NOW_STATES: dict[str, frozenset[RunStatus]] = {
    "queued": frozenset({RunStatus.QUEUED}),
    "running": RUNNING,
    "retrying": frozenset({RunStatus.RETRYING}),
    "waiting": WAITING | {RunStatus.SCHEDULED},
    "dead": frozenset({RunStatus.DEAD}),
}


@dataclass(frozen=True)
class Transition:
    """From which states, to which one, and what else goes with the move."""

    name: str
    sources: frozenset[RunStatus]
    target: RunStatus | None  # None: the status stays (a cancel request)
    event: EventKind | None
    finishes: bool = False  # sets finished_at (the Run ended)
    releases: bool = False  # clears the lease (no execution owns it any more)
    notice: tuple[str, Callable[[Run], str]] | None = None  # (level, message) for the owner


CLAIM = Transition("claim", PENDING, RunStatus.RUNNING, EventKind.START)
SUCCEED = Transition("succeed", RUNNING, RunStatus.DONE, EventKind.FINISH, True, True,
                     ("success", lambda run: f"{run.title}: done."))
SKIP_AT_FIRE = Transition("skip at fire time", RUNNING, RunStatus.SKIPPED, EventKind.SKIP,
                          True, True)
STOP = Transition("stop", RUNNING, RunStatus.CANCELLED, EventKind.CANCEL, True, True)
RETRY_LATER = Transition("retry later", RUNNING, RunStatus.RETRYING, EventKind.RETRY,
                         releases=True)
DIE = Transition("die", RUNNING, RunStatus.DEAD, EventKind.DEAD, True, True,
                 ("error", lambda run: f"{run.title}: {run.safe_error or GENERIC_FAILURE}"))
RECOVER = Transition("recover", RUNNING, RunStatus.QUEUED, EventKind.RECOVER, releases=True)
RECOVER_CANCELLED = Transition("recover cancelled", RUNNING, RunStatus.CANCELLED,
                               EventKind.CANCEL, True, True)
RECOVER_DEAD = Transition("recover dead", RUNNING, RunStatus.DEAD, EventKind.DEAD, True, True,
                          DIE.notice)
CANCEL_NOW = Transition("cancel", NOT_STARTED, RunStatus.CANCELLED, EventKind.CANCEL, True)
REQUEST_CANCEL = Transition("request cancel", RUNNING, None, EventKind.CANCEL)
RELEASE = Transition("release", WAITING, RunStatus.QUEUED, None)
# No trace line: a Run may wait for its slot many times; `Run.waiting_for` says it is.
WAIT_FOR_SLOT = Transition("wait for a slot", PENDING, None, None)
WAKE = Transition("wake for a slot", PENDING, None, None)
EDIT_CANCEL = Transition("edit cancel", NOT_FIRED, RunStatus.CANCELLED, EventKind.CANCEL, True)
EDIT_SKIP = Transition("edit skip", NOT_FIRED, RunStatus.SKIPPED, EventKind.SKIP, True)
EDIT_MOVE = Transition("edit move", NOT_FIRED, None, EventKind.RESCHEDULE)
OPERATOR_RETRY = Transition("operator retry", RETRYABLE_BY_OPERATOR, RunStatus.QUEUED,
                            EventKind.RETRY)
OWNER_RETRY = Transition("owner retry", frozenset({RunStatus.DEAD}), RunStatus.QUEUED,
                         EventKind.RETRY)


def _record_column(column: Any) -> Any:
    return select(column).where(Record.id == Run.record_id).scalar_subquery()


# What the worker's claim reads of the Run's record with it: token, waiting callbacks
# (`RecordFacts`), then the data and version its first step starts from.
_RECORD_FACTS = (
    _record_column(Record.token),
    exists().where(Callback.record_id == Run.record_id,
                   Callback.state == CallbackState.WAITING.value),
    _record_column(Record.data),
    _record_column(Record.version),
)


def move(s: Session, t: Transition, where: Iterable[Any], *,
         detail: str | Callable[[Run], str] = "",
         path: str | None = None, now: datetime | None = None,
         target: RunStatus | None = None, **values: Any) -> list[Run]:
    """Apply `t` to the Runs matching `where` that are in one of its from-states.

    One UPDATE … RETURNING; returns the Runs that moved (fresh), with their trace line,
    timestamps and notices written in the same transaction.
    """
    now = now or utcnow()
    statement = _update(t, where, now, target, **values)
    moved = list(s.scalars(statement.returning(Run).execution_options(**_FRESH)))
    return _moved(s, t, moved, detail=detail, path=path, now=now)


_FRESH = dict(synchronize_session=False, populate_existing=True)


def _update(t: Transition, where: Iterable[Any], now: Any, target: RunStatus | None = None,
            **values: Any) -> Any:
    """The guarded UPDATE of transition `t` (`now`: a time, or a bound parameter for a
    statement built once): its from-states, its target, and what ending or releasing
    the lease writes."""
    target = target or t.target
    if target is not None:
        values["status"] = target.value
    if t.finishes:
        values["finished_at"] = now
    if t.releases:
        values["lease"] = None
    values.setdefault("updated_at", now)
    return update(Run).where(Run.status.in_(sorted(t.sources)), *where).values(**values)


Lines = list[dict[str, Any]]  # trace lines gathered for one INSERT (`write_lines`)


def trace_line(s: Session, lines: Lines | None, **row: Any) -> None:
    """A trace line (every RunEvent column but its id): added to `s`, or, given `lines`,
    kept there for `write_lines`. Every column given: lines of one transaction have one
    shape, so they go in one multi-row INSERT either way."""
    if lines is None:
        s.add(RunEvent(**row))
    else:
        lines.append(row)


_INSERT_LINES = insert(RunEvent.__table__)


def write_lines(s: Session, lines: Lines) -> None:
    """The gathered trace lines, in order, in one INSERT. Objects added to a session are
    inserted one statement each on SQLite (the ORM reads back each new id); these are
    never read back in the transaction that writes them."""
    if lines:
        # Core on the session's connection: the ORM's bulk INSERT costs more than the
        # statements it saves here.
        s.connection().execute(_INSERT_LINES, lines)
        lines.clear()


def _moved(s: Session, t: Transition, moved: list[Run], *,
           detail: str | Callable[[Run], str], path: str | None, now: datetime,
           lines: Lines | None = None) -> list[Run]:
    """What goes with a transition, in its transaction: trace lines (into `lines` when
    given), notices, the live event, a record's callbacks."""
    for run in moved:
        if t.event is not None:
            text = detail(run) if callable(detail) else detail
            trace_line(s, lines, run_id=run.id, attempt=run.attempt, event=t.event.value,
                       path=run.node_path if path is None else path, detail=text[:20000],
                       at=now, duration_ms=None)
        if t is CLAIM:
            notifications.run_started(s, run)
        if t.notice is not None:
            level, message = t.notice
            notifications.run_ended(s, run, level, message(run))
        if t.target is not None or t.event is not None:  # not a slot's wait or wake-up
            notifications.changed(s, run, "start" if t is CLAIM else
                                  "end" if t.finishes else "status")
    if t.finishes:  # a record's awaited work that ended: its callbacks become due, here
        from formrules.runs import callbacks
        for record_id in sorted({r.record_id for r in moved if r.record_id is not None
                                 and r.awaited in AWAITED}):
            known = known_record(s, record_id)
            if known is None or known.callbacks_waiting:
                callbacks.record_ended(s, record_id, now)
    return moved


# The worker's two transitions of every Run, built once (bound parameters `p_*`): building
# and keying an UPDATE with subqueries anew cost a trivial Run about a tenth of its time.
@cache
def _claim_statement() -> Any:
    from formrules.runs.pause import not_paused
    now = bindparam("p_now")
    return (_update(CLAIM, [Run.id == bindparam("p_run"), Run.due_at <= now,
                            Run.cancel_requested.is_(False), not_paused()], now,
                    lease=bindparam("p_lease"), heartbeat_at=now, attempt=Run.attempt + 1,
                    started_at=func.coalesce(Run.started_at, now), waiting_for=None)
            # The record's facts in the same statement (subqueries of its RETURNING): the
            # notices and the execution's later transactions need not ask again.
            .returning(Run, *_RECORD_FACTS).execution_options(**_FRESH))


@cache
def _succeed_statement() -> Any:
    now = bindparam("p_now")
    full = case((Run.progress_total <= 0, 1), else_=Run.progress_total)
    return (_update(SUCCEED, [Run.id == bindparam("p_run"), Run.lease == bindparam("p_lease"),
                              Run.cancel_requested.is_(False)], now,
                    progress_total=full, progress_done=full)
            .returning(Run).execution_options(**_FRESH))


def initial(due: datetime, now: datetime) -> str:
    """The status a new Run starts in: scheduled when it is due later, else queued."""
    return (RunStatus.SCHEDULED if due > now + timedelta(seconds=1) else RunStatus.QUEUED).value


def born(run: Run, *, waiting: bool = False) -> Run:
    """Give a new Run (not yet flushed) its first status; a batch child starts waiting."""
    run.status = RunStatus.WAITING.value if waiting else initial(run.due_at, run.created_at)
    return run


# -- the worker's transitions (guarded by its lease) --------------------------------------

@dataclass(frozen=True)
class Claimed:
    """A claimed Run, with its record's data and version as of the claim (the record's
    token is remembered in the session: `formrules.store.db.known_record`)."""

    run: Run
    data: dict[str, Any]
    version: int | None


def claim(s: Session, run_id: str, lease: str, now: datetime,
          lines: Lines | None = None) -> Claimed | None:
    """Take a due, pending Run for the execution holding `lease`; None if not claimable
    (a paused form's Run among them: it stays pending, its attempt unused). One
    statement takes it and reads its record. `lines`: see `trace_line`."""
    row = s.execute(_claim_statement(), {"p_run": run_id, "p_now": now,
                                         "p_lease": lease}).first()
    if row is None:
        return None
    run, token, waiting, data, version = row
    if run.record_id is not None and token is not None:
        remember_record(s, run.record_id, RecordFacts(token, bool(waiting)))
    _moved(s, CLAIM, [run], detail=lambda run: f"attempt {run.attempt}", path="", now=now,
           lines=lines)
    return Claimed(run, dict(data) if data else {}, version)


def wait_for_slot(s: Session, run_id: str, due: datetime) -> bool:
    """Its node's `concurrency:` is reached: stay pending (no attempt used), marked as
    waiting for a slot, due again at `due` (the leader dispatches it then) unless a Run
    giving its slot back wakes it first (`wake_for_slot`)."""
    return bool(move(s, WAIT_FOR_SLOT, [Run.id == run_id, Run.lease.is_(None),
                                        Run.cancel_requested.is_(False)],
                     due_at=due, waiting_for="slot"))


def wake_for_slot(s: Session, form_id: str, node_path: str, now: datetime) -> Run | None:
    """A slot of this node was given back: the Run waiting for one longest is due now
    (first come, first served); None when nobody waits."""
    from formrules.runs.pause import not_paused
    oldest = s.scalar(select(Run.id).where(
        Run.form_id == form_id, Run.node_path == node_path, Run.waiting_for == "slot",
        Run.status.in_(sorted(PENDING)), Run.cancel_requested.is_(False), not_paused())
        .order_by(Run.created_at, Run.id).limit(1))
    if oldest is None:
        return None
    # No longer waiting: the next slot given back goes to the next Run in line.
    moved = move(s, WAKE, [Run.id == oldest, Run.waiting_for == "slot"], now=now, due_at=now,
                 waiting_for=None)
    return moved[0] if moved else None


def hold(s: Session, run_id: str, lease: str, **values: Any) -> Run:
    """Prove in this transaction that `lease` still owns the Run (and lock its row);
    `values` may set other columns (an error's text), never the status."""
    if "status" in values:
        raise ValueError("a status changes through a transition, not hold()")
    run = s.scalar(update(Run).where(Run.id == run_id, Run.lease == lease)
                   .values(heartbeat_at=utcnow(), **values).returning(Run)
                   .execution_options(synchronize_session=False, populate_existing=True))
    if run is None:
        raise LeaseLost(f"run {run_id}: lease lost")
    return run


def checkpoint(s: Session, run_id: str, lease: str, path: str, detail: str,
               duration_ms: int | None = None) -> Run:
    """A step's checkpoint line, with the lease proved; the Run says if a cancel came."""
    run = hold(s, run_id, lease)
    s.add(RunEvent(run_id=run.id, attempt=run.attempt, path=path,
                   event=EventKind.CHECKPOINT.value, detail=detail[:20000],
                   duration_ms=duration_ms))
    return run


def note(s: Session, run: Run, kind: EventKind, detail: str, path: str = "") -> None:
    """A trace line that changes no status (an error's detail, a note)."""
    s.add(RunEvent(run_id=run.id, attempt=run.attempt, path=path, event=kind.value,
                   detail=detail[:20000]))


def _owned(s: Session, t: Transition, run_id: str, lease: str, *, detail: str,
           path: str = "", **values: Any) -> Run:
    moved = move(s, t, [Run.id == run_id, Run.lease == lease], path=path, detail=detail,
                 **values)
    if not moved:
        raise LeaseLost(f"run {run_id}: lease lost")
    return moved[0]


def succeed(s: Session, run_id: str, lease: str, lines: Lines | None = None) -> Run:
    """Every step done: status done, progress full, owner told; a cancel asked for wins.
    `lines`: see `trace_line`."""
    now = utcnow()
    run = s.scalar(_succeed_statement(), {"p_run": run_id, "p_lease": lease, "p_now": now})
    if run is None:
        hold(s, run_id, lease)  # raises LeaseLost; holding it means a cancel was asked for
        raise Cancelled()
    return _moved(s, SUCCEED, [run], detail="done", path="", now=now, lines=lines)[0]


def skip_at_fire(s: Session, run_id: str, lease: str, detail: str, path: str) -> Run:
    """A Delay's `when:` was false when it came due."""
    return _owned(s, SKIP_AT_FIRE, run_id, lease, detail=detail, path=path)


def stop(s: Session, run_id: str, lease: str) -> Run:
    """The execution saw a cancel (or was told of it while failing): cancelled."""
    return _owned(s, STOP, run_id, lease, detail="cancelled while running")


def retry_later(s: Session, run_id: str, lease: str, due: datetime, attempt: int,
                max_attempts: int) -> Run:
    """A retryable failure with attempts left: pending again, due after the wait."""
    return _owned(s, RETRY_LATER, run_id, lease, due_at=due,
                  detail=f"attempt {attempt + 1} of {max_attempts} "
                         f"at {due.isoformat(timespec='seconds')}")


def die(s: Session, run_id: str, lease: str, attempts: int) -> Run:
    """Out of attempts, or failed for good: dead, for an operator; the owner is told."""
    return _owned(s, DIE, run_id, lease, detail=f"after {attempts} attempt(s)")


# -- transitions from outside the worker ----------------------------------------------------

def cancel(s: Session, run: Run, who: str) -> str | None:
    """Cancel: not started ones end now ("cancelled"), a running one stops at its next step
    ("stopping"); None when it is in no state to cancel. `run` is refreshed."""
    if move(s, CANCEL_NOW, [Run.id == run.id], path="",
            detail=f"cancelled by {who} before it ran"):
        outcome: str | None = "cancelled"
    elif move(s, REQUEST_CANCEL, [Run.id == run.id], path="", cancel_requested=True,
              detail=f"cancel requested by {who}; stops at the next step"):
        outcome = "stopping"
    else:
        outcome = None
    s.refresh(run)
    return outcome


def cancel_not_started(s: Session, where: Iterable[Any], reason: str) -> list[str]:
    """End every not-started Run matching `where` (a batch stopping); returns their ids."""
    return [run.id for run in move(s, CANCEL_NOW, where, path="", detail=reason)]


def request_cancel(s: Session, where: Iterable[Any], detail: str) -> list[str]:
    """Ask running Runs matching `where` to stop at their next step; returns their ids."""
    return [run.id for run in move(s, REQUEST_CANCEL, where, path="", detail=detail,
                                   cancel_requested=True)]


def end_cancelled_between_attempts(s: Session, now: datetime) -> list[str]:
    """Due pending Runs with a cancel requested (nothing will claim them): cancelled now.
    A future one is left to its due time: it cannot be claimed before then either."""
    return cancel_not_started(s, [Run.status.in_(sorted(PENDING)), Run.due_at <= now,
                                  Run.cancel_requested.is_(True)],
                              "cancelled: the cancel was asked for between attempts")


def operator_retry(s: Session, run: Run, who: str, t: Transition = OPERATOR_RETRY) -> bool:
    """Run a dead or cancelled Run again now, resuming after its completed steps."""
    now = utcnow()
    # A fresh start (recoveries=0): a crash loop that made it dead may be fixed.
    moved = move(s, t, [Run.id == run.id], path="", now=now,
                 detail=f"retried by {who}", due_at=now, finished_at=None, attempt=0,
                 cancel_requested=False, lease=None, safe_error=None, error_step=None,
                 waiting_for=None, recoveries=0)
    s.refresh(run)
    return bool(moved)


def owner_retry(s: Session, run: Run) -> bool:
    """The owner runs a dead Run again (its node allows it), after its completed steps."""
    return operator_retry(s, run, "its owner", OWNER_RETRY)


def recover(s: Session, run: Run, *, stale_before: datetime, max_recoveries: int,
            lost_message: str) -> str | None:
    """A Run whose heartbeat stopped: queued again (same attempt), or cancelled if it was
    stopping, or dead after too many recoveries. Guarded on the lease we saw: a late
    heartbeat means it is alive after all (None)."""
    now = utcnow()
    silent = (now - run.heartbeat_at).total_seconds()
    detail = f"no heartbeat for {silent:.0f}s; worker presumed dead"
    where = [Run.id == run.id, Run.lease == run.lease, Run.heartbeat_at < stale_before]
    common = dict(path="", now=now, detail=detail, recoveries=Run.recoveries + 1)
    if run.recoveries >= max_recoveries:
        # The execution after the last allowed recovery only runs the on_error branch;
        # if even that kills its worker, the Run goes dead here.
        moved = move(s, RECOVER_DEAD, where, **common, safe_error=lost_message,
                     last_error=f"worker lost {run.recoveries + 1} times")
        return "dead" if moved else None
    if run.cancel_requested:  # it was stopping anyway: do not start it again
        return "cancel" if move(s, RECOVER_CANCELLED, where, **common) else None
    # The interrupted attempt does not count: it resumes where it stopped.
    moved = move(s, RECOVER, where, **common, due_at=now, attempt=Run.attempt - 1)
    return "recover" if moved else None


def release(s: Session, run_ids: list[str], now: datetime) -> list[Run]:
    """Batch children whose turn came: waiting -> queued, due now."""
    if not run_ids:
        return []
    return move(s, RELEASE, [Run.id.in_(run_ids)], now=now, due_at=now)


def _untouched() -> list[Any]:
    # A Delay that started meanwhile (claimed once, or leased now) is not the edit's.
    return [Run.attempt == 0, Run.lease.is_(None)]


def edit_stop(s: Session, run: Run, *, skipped: bool, reason: str, now: datetime) -> bool:
    """An edit cancelled a Delay (cancel_if) or left it no time (at:): it never runs."""
    t = EDIT_SKIP if skipped else EDIT_CANCEL
    moved = move(s, t, [Run.id == run.id, *_untouched()], detail=reason, now=now)
    if moved:
        s.refresh(run)
    return bool(moved)


def edit_move(s: Session, run: Run, due: datetime, *, reason: str, path: str,
              now: datetime) -> Run | None:
    """An edit moved a Delay's due time (on_change: recompute)."""
    target = RunStatus(initial(due, now))
    moved = move(s, EDIT_MOVE, [Run.id == run.id, *_untouched()], detail=reason, path=path,
                 now=now, target=target, due_at=due)
    return moved[0] if moved else None


def is_pending(run: Run) -> bool:
    """A worker may claim it when due (and no cancel waits for it)."""
    return run.status in PENDING and not run.cancel_requested
