"""Pausing a form's work: operators stop its queued and scheduled Runs from starting.

The pause is a row in `form_pauses` (it survives restarts). Workers need no cache of it:
the claim statement itself says `AND NOT EXISTS (a pause of this form)`
(`lifecycle.claim`), so a Run picked up while its form is paused is left pending
without using an attempt, at the cost of no extra round trip. The reconciler does not
re-dispatch a paused form's due Runs; once resumed, its next pass dispatches everything
that waited. Submits still work (their inline part runs), and schedules still fire:
their Runs wait in the paused queue like the rest.
"""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from formrules.store.models import FormPause, Run


def pause(s: Session, form_id: str, who: str) -> bool:
    """Pause `form_id`'s work; False when it already was."""
    if s.get(FormPause, form_id) is not None:
        return False
    s.add(FormPause(form_id=form_id, paused_by=who))
    s.flush()
    return True


def resume(s: Session, form_id: str) -> bool:
    """Let `form_id`'s work start again (the reconciler's next pass dispatches what
    waited); False when it was not paused."""
    found = s.get(FormPause, form_id)
    if found is None:
        return False
    s.delete(found)
    s.flush()
    return True


def is_paused(s: Session, form_id: str) -> bool:
    """True while `form_id`'s work is paused."""
    return s.get(FormPause, form_id) is not None


def paused_forms(s: Session) -> dict[str, FormPause]:
    """Every paused form, by id."""
    return {p.form_id: p for p in s.scalars(select(FormPause))}


def not_paused():
    """A condition on Run: its form is not paused (for claims and dispatch queries)."""
    return ~exists().where(FormPause.form_id == Run.form_id)
