"""Operations on Runs shared by the web pages, the JSON API and the CLI.

Each function changes the database (the source of truth) and then tells RQ; if Redis is
unreachable the reconciler brings RQ in line later.
"""

from __future__ import annotations

import contextlib
import logging

from redis.exceptions import RedisError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from formrules.errors import NotAllowed
from formrules.runs import lifecycle
from formrules.runs.queue import Dispatcher
from formrules.store import uploads
from formrules.store.models import (
    OPEN,
    Notification,
    Record,
    ResultFile,
    Run,
    RunEvent,
    RunStatus,
    utcnow,
)

log = logging.getLogger("formrules.runs.control")


def cancel(s: Session, run: Run, who: str) -> str:
    """Cancel a Run: pending ones stop now, a running one at its next step or progress."""
    # Guarded transitions, not read-then-write: a worker may claim the Run (or finish it)
    # between our read and our write, and a cancel must never overwrite that.
    outcome = lifecycle.cancel(s, run, who)
    if outcome is None:
        raise NotAllowed(f"a {run.status} run cannot be cancelled")
    return outcome


def retry(s: Session, run: Run, who: str) -> None:
    """Run a dead or cancelled Run again now, resuming after its completed steps."""
    _refuse_if_deleting(s, run)
    if not lifecycle.operator_retry(s, run, who):
        raise NotAllowed(f"a {run.status} run cannot be retried")


def _refuse_if_deleting(s: Session, run: Run) -> None:
    """A retry must not run steps on a record whose deletion is waiting for its work."""
    if run.record_id is not None and s.scalar(
            select(Record.delete_requested).where(Record.id == run.record_id)):
        raise NotAllowed("its record is being deleted")


def owner_may_retry(run: Run) -> bool:
    """A failed Run its owner may retry: its node says `user_retry: true`."""
    if run.status != RunStatus.DEAD or run.hidden or run.batch_id is not None:
        return False
    from formrules.runs.snapshot import Snapshot  # the checker, loaded when needed
    try:  # rebuilt once per distinct snapshot (cached): the checker's own reading
        return Snapshot.load(run.snapshot or {}).node(run.node_path).user_retry
    except Exception:  # a snapshot this code cannot rebuild offers no retry
        return False


def owner_retry(s: Session, run: Run) -> None:
    """The owner retries a failed Run whose node allows it, after its completed steps."""
    _refuse_if_deleting(s, run)
    if not owner_may_retry(run) or not lifecycle.owner_retry(s, run):
        raise NotAllowed(f"a {run.status} run cannot be retried by its owner")


def delete_record(s: Session, record: Record, who: str) -> tuple[list[Run], list[dict]]:
    """Delete a record with its work (owners through the API, operators). Work not started
    is cancelled and goes with it; a step running now cannot be cut off midway, so its Run
    is asked to stop and the record is only marked: the worker deletes it when that Run
    has stopped (or the reconciler, if the worker died), so no step ever writes to a
    deleted record. Returns the Runs whose state changed (for `after_commit`) and the
    uploads of a record deleted now, which the caller removes once this has committed
    (`formrules.store.uploads.remove`: a rollback keeps them)."""
    # Its Runs first, then the record: the order in which workers lock them.
    runs = list(s.scalars(select(Run).where(Run.record_id == record.id,
                                            Run.status.in_(sorted(OPEN)))))
    for run in runs:
        lifecycle.cancel(s, run, who)  # None: it ended meanwhile, nothing to cancel
    s.execute(update(Record).where(Record.id == record.id).values(delete_requested=True))
    return runs, _delete_if_idle(s, record.id) or []


def _delete_if_idle(s: Session, record_id: int) -> list[dict] | None:
    """Delete a record marked for deletion once none of its Runs is running; its uploads
    (None: not deleted yet)."""
    running = s.scalar(select(Run.id).where(Run.record_id == record_id,
                                            Run.status == RunStatus.RUNNING).limit(1))
    if running is not None:
        return None
    # Work a running step started meanwhile (a child Run) never starts now.
    lifecycle.cancel_not_started(s, [Run.record_id == record_id],
                                 "cancelled: its record was deleted")
    run_ids = select(Run.id).where(Run.record_id == record_id).scalar_subquery()
    # Explicit deletes: the schema cascades, but not every database enforces it.
    s.execute(delete(RunEvent).where(RunEvent.run_id.in_(run_ids)))
    s.execute(delete(ResultFile).where(ResultFile.run_id.in_(run_ids)))
    s.execute(delete(Run).where(Run.record_id == record_id))
    token, data = s.execute(select(Record.token, Record.data)
                            .where(Record.id == record_id)).one()
    s.execute(update(Notification).where(Notification.record_token == token,
                                         Notification.read_at.is_(None))
              .values(read_at=utcnow()))
    s.execute(delete(Record).where(Record.id == record_id))
    return uploads.in_data(data)


def finish_deletions(store, settings, record_id: int | None = None) -> int:
    """Delete the records marked for deletion (one, or all) whose work has stopped, and
    then their uploaded files."""
    with store.session() as s:
        where = [Record.delete_requested.is_(True)]
        if record_id is not None:
            where.append(Record.id == record_id)
        marked = list(s.scalars(select(Record.id).where(*where).limit(100)))
    gone = 0
    for rid in marked:
        files = None
        with store.session() as s:
            # Its Runs' rows locked, then the record's: the order every writer uses (a
            # worker's step checkpoints its Run, then writes the record).
            s.execute(select(Run.id).where(Run.record_id == rid).with_for_update())
            if s.scalar(select(Record.id).where(Record.id == rid).with_for_update()) \
                    is not None:
                files = _delete_if_idle(s, rid)
        if files is not None:
            uploads.remove(settings, files)
            gone += 1
    return gone


def adopt(s: Session, old: str, new: str) -> None:
    """What one owner (an anonymous browser) made now belongs to another (its account)."""
    # Runs before records: the order workers lock them in, so the two never deadlock.
    for model in (Run, ResultFile, Notification, Record):
        s.execute(update(model).where(model.owner == old).values(owner=new))


def hide(s: Session, run: Run, who: str) -> str | None:
    """A person deletes a Run from their list: hidden, its files and notices go. One still
    going is cancelled first; returns that cancel's outcome (None: it had ended)."""
    outcome = None
    if not run.is_final:
        # A running one stops at its next step; hidden now, it is gone from the list. One
        # that finished meanwhile (NotAllowed) only needs deleting.
        with contextlib.suppress(NotAllowed):
            outcome = cancel(s, run, who)
    run.hidden = True
    s.execute(delete(ResultFile).where(ResultFile.run_id == run.id))
    # Its notices go too: a banner pointing at a deleted task only confuses.
    s.execute(update(Notification).where(Notification.run_id == run.id,
                                         Notification.read_at.is_(None))
              .values(read_at=utcnow()))
    return outcome


def delete_run(s: Session, run: Run) -> None:
    """An operator deletes a finished Run with its trace and files."""
    if not run.is_final:
        raise NotAllowed(f"a {run.status} run cannot be deleted; cancel it first")
    # Explicit deletes: the schema cascades, but not every database enforces it.
    s.execute(delete(RunEvent).where(RunEvent.run_id == run.id))
    s.execute(delete(ResultFile).where(ResultFile.run_id == run.id))
    s.delete(run)


def after_commit(dispatcher: Dispatcher, run: Run) -> None:
    """Bring RQ in line with a Run's new state (failures left to the reconciler)."""
    try:
        if run.status == RunStatus.CANCELLED:
            dispatcher.cancel(run.id)
        elif run.status == RunStatus.QUEUED:
            dispatcher.dispatch(run)
    except RedisError as exc:
        log.warning("run %s: Redis unavailable (%s); the reconciler will catch up", run.id, exc)
