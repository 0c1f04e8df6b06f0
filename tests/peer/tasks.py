"""The peer's RQ job: set the flag."""

from __future__ import annotations

from sqlalchemy import update

from tests.peer.models import Session, Submission


def set_flag(submission_id: int) -> None:
    """The background work: mark the submission worked and done."""
    with Session() as s:
        s.execute(update(Submission).where(Submission.id == submission_id)
                  .values(status="worked", done=True))
        s.commit()

