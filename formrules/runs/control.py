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
from formrules.language.fieldtypes import is_upload
from formrules.runs import lifecycle
from formrules.runs.queue import Dispatcher
from formrules.store.models import (
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
    if not lifecycle.operator_retry(s, run, who):
        raise NotAllowed(f"a {run.status} run cannot be retried")


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


def delete_record(s: Session, record: Record) -> list[dict]:
    """An operator deletes a record with its Runs, traces, files and notices. Refused
    while any of its Runs is not final (cancel them first). Returns the record's uploads:
    the caller removes them (`formrules.store.uploads.remove`) once this has committed."""
    runs = list(s.scalars(select(Run).where(Run.record_id == record.id)))
    if any(not run.is_final for run in runs):
        raise NotAllowed("a record with pending or running work cannot be deleted; "
                         "cancel it first")
    ids = [run.id for run in runs]
    if ids:  # explicit deletes: the schema cascades, but not every database enforces it
        s.execute(delete(RunEvent).where(RunEvent.run_id.in_(ids)))
        s.execute(delete(ResultFile).where(ResultFile.run_id.in_(ids)))
        s.execute(delete(Notification).where(Notification.run_id.in_(ids)))
        s.execute(delete(Run).where(Run.id.in_(ids)))
    files = [v for v in (record.data or {}).values() if is_upload(v)]
    s.delete(record)
    return files


def after_commit(dispatcher: Dispatcher, run: Run) -> None:
    """Bring RQ in line with a Run's new state (failures left to the reconciler)."""
    try:
        if run.status == RunStatus.CANCELLED:
            dispatcher.cancel(run.id)
        elif run.status == RunStatus.QUEUED:
            dispatcher.dispatch(run)
    except RedisError as exc:
        log.warning("run %s: Redis unavailable (%s); the reconciler will catch up", run.id, exc)
