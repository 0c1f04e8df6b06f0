"""Operations on Runs shared by the web pages, the JSON API and the CLI.

Each function changes the database (the source of truth) and then tells RQ; if Redis is
unreachable the reconciler brings RQ in line later.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from sqlalchemy import update
from sqlalchemy.orm import Session

from formrules.runs.queue import Dispatcher
from formrules.store.models import PENDING, Run, RunEvent, RunStatus, utcnow

log = logging.getLogger("formrules.runs.control")


class NotAllowed(Exception):
    """The Run is not in a state where this operation makes sense."""


def cancel(s: Session, run: Run, who: str) -> str:
    """Cancel a Run: pending ones stop now, a running one at its next step or progress."""
    # Guarded updates, not read-then-write: a worker may claim the Run (or finish it)
    # between our read and our write, and a cancel must never overwrite that.
    # A batch child waiting for its turn is as good as pending (its batch moves on).
    not_started = [p.value for p in PENDING] + [RunStatus.WAITING.value]
    if s.execute(update(Run).where(Run.id == run.id, Run.status.in_(not_started))
                 .values(status=RunStatus.CANCELLED.value, finished_at=utcnow())).rowcount:
        s.add(RunEvent(run_id=run.id, attempt=run.attempt, event="cancel",
                       detail=f"cancelled by {who} before it ran"))
        s.refresh(run)
        return "cancelled"
    if s.execute(update(Run).where(Run.id == run.id, Run.status == RunStatus.RUNNING.value)
                 .values(cancel_requested=True)).rowcount:
        s.add(RunEvent(run_id=run.id, attempt=run.attempt, event="cancel",
                       detail=f"cancel requested by {who}; stops at the next step"))
        s.refresh(run)
        return "stopping"
    s.refresh(run)
    raise NotAllowed(f"a {run.status} run cannot be cancelled")


def retry(s: Session, run: Run, who: str) -> None:
    """Run a dead or cancelled Run again now, resuming after its completed steps."""
    if run.status not in (RunStatus.DEAD, RunStatus.CANCELLED):
        raise NotAllowed(f"a {run.status} run cannot be retried")
    run.status, run.due_at, run.finished_at = RunStatus.QUEUED.value, utcnow(), None
    run.attempt, run.cancel_requested, run.lease = 0, False, None
    run.recoveries = 0  # a fresh start: a crash loop that made it dead may be fixed now
    run.safe_error = None
    s.add(RunEvent(run_id=run.id, event="retry", detail=f"retried by {who}"))


def after_commit(dispatcher: Dispatcher, run: Run) -> None:
    """Bring RQ in line with a Run's new state (failures left to the reconciler)."""
    try:
        if run.status == RunStatus.CANCELLED:
            dispatcher.cancel(run.id)
        elif run.status == RunStatus.QUEUED:
            dispatcher.dispatch(run)
    except RedisError as exc:
        log.warning("run %s: Redis unavailable (%s); the reconciler will catch up", run.id, exc)
