"""Notices left for people: a Run or a batch ended (shown on their next page).

Who is told what is decided here; `formrules.runs.lifecycle` calls `run_ended` from the
transitions that end a Run, in the same transaction.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from formrules.store.models import Batch, Notification, Record, Run, RunStatus


def run_ended(s: Session, run: Run, level: str, message: str) -> None:
    """Tell a Run's owner how it ended, unless that is not news to them."""
    if run.batch_id is not None:
        return  # the batch tells its owner once, when it ends, not once per record
    if run.hidden:
        return  # its owner deleted it (cancel-and-delete): news of it would only confuse
    if run.awaited == "false" and level == "success" and run.kind == "delay":
        return  # a reminder firing on schedule is not news to the person who submitted
    # The record's token is read by the INSERT itself (no statement of its own).
    token = None if run.record_id is None else \
        select(Record.token).where(Record.id == run.record_id).scalar_subquery()
    s.add(Notification(owner=run.owner, run_id=run.id, record_token=token, level=level,
                       message=message[:500]))


def batch_ended(s: Session, batch: Batch, counts: dict[str, int]) -> None:
    """Tell a batch's owner how it ended: one notice for all its records."""
    done, failed = counts.get(RunStatus.DONE, 0), counts.get(RunStatus.DEAD, 0)
    level = "success" if batch.status == "done" else "error"
    s.add(Notification(owner=batch.owner, level=level,
                       batch_id=batch.id if batch.self_service else None, message=(
        f"{batch.title}: {batch.status}; {done} of {batch.total} done"
        + (f", {failed} failed" if failed else ""))[:500]))
