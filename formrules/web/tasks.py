"""My tasks (`/tasks`) and notifications: a user's own Runs, and only theirs."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from sqlalchemy import select, update

from .. import control
from ..models import Notification, Record, ResultFile, Run, utcnow
from ..status import run_view
from .state import current_owner_or_none, db, rt

bp = Blueprint("tasks", __name__)


def _own_run(run_id: str) -> Run:
    """The current user's Run, or 404 (never 403: other users' ids are not confirmed)."""
    me = current_owner_or_none()
    run = db().get(Run, run_id)
    if run is None or me is None or run.owner != me or run.hidden:
        abort(404)
    return run


@bp.get("/tasks")
def index():
    """The current user's Runs, newest first, grouped by state."""
    me = current_owner_or_none()
    runs = [] if me is None else list(db().scalars(
        select(Run).where(Run.owner == me, Run.hidden.is_(False))
        .order_by(Run.created_at.desc()).limit(200)))
    files: dict[str, list[ResultFile]] = {}
    tokens: dict[int, str] = {}
    if runs:
        for f in db().scalars(select(ResultFile).where(
                ResultFile.run_id.in_([r.id for r in runs]))):
            files.setdefault(f.run_id, []).append(f)
        ids = {r.record_id for r in runs if r.record_id}
        tokens = dict(db().execute(select(Record.id, Record.token).where(Record.id.in_(ids))))
    views = [dict(run_view(r, files.get(r.id)), token=tokens.get(r.record_id),
                  form_id=r.form_id, created_at=r.created_at) for r in runs]
    return render_template("tasks/index.html", runs=views)


@bp.post("/tasks/<run_id>/cancel")
def cancel(run_id: str):
    """Cancel one of my Runs."""
    run = _own_run(run_id)
    try:
        outcome = control.cancel(db(), run, "its owner")
    except control.NotAllowed as exc:
        flash(str(exc).capitalize() + ".", "error")
        return redirect(request.referrer or url_for("tasks.index"), 303)
    db().commit()
    control.after_commit(rt().dispatcher, run)
    flash("Cancelled." if outcome == "cancelled" else "Stopping at the next step…", "info")
    return redirect(request.referrer or url_for("tasks.index"), 303)


@bp.post("/tasks/<run_id>/delete")
def delete(run_id: str):
    """Remove a finished Run (and its files) from my list."""
    run = _own_run(run_id)
    if not run.is_final:
        flash("Only finished tasks can be deleted; cancel it first.", "error")
        return redirect(url_for("tasks.index"), 303)
    run.hidden = True
    db().execute(ResultFile.__table__.delete().where(ResultFile.run_id == run.id))
    db().commit()
    flash("Deleted.", "info")
    return redirect(url_for("tasks.index"), 303)


@bp.get("/notifications")
def notifications():
    """All my notices; opening the list marks them read."""
    me = current_owner_or_none()
    items = [] if me is None else list(db().scalars(
        select(Notification).where(Notification.owner == me)
        .order_by(Notification.created_at.desc()).limit(100)))
    if me is not None:
        db().execute(update(Notification).where(Notification.owner == me,
                                                Notification.read_at.is_(None))
                     .values(read_at=utcnow()))
        db().commit()
    return render_template("tasks/notifications.html", items=items)


@bp.post("/notifications/<int:note_id>/dismiss")
def dismiss(note_id: int):
    """Mark one notice read."""
    me = current_owner_or_none()
    note = db().get(Notification, note_id)
    if note is None or note.owner != me:
        abort(404)
    note.read_at = utcnow()
    db().commit()
    return redirect(request.referrer or url_for("tasks.notifications"), 303)


def inject_notifications():
    """Unread notices for the banner on every page."""
    me = current_owner_or_none()
    if me is None:
        return {"unread": []}
    unread = list(db().scalars(select(Notification).where(
        Notification.owner == me, Notification.read_at.is_(None))
        .order_by(Notification.created_at.desc()).limit(5)))
    return {"unread": unread}
