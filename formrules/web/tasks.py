"""My tasks (`/tasks`) and notifications: a user's own Runs, and only theirs."""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import func, or_, select, update

from formrules.runs import control
from formrules.runs.status import files_by_run, run_view
from formrules.store.models import (
    FINAL,
    OPEN,
    Notification,
    Record,
    Run,
    RunStatus,
    User,
    utcnow,
)
from formrules.web import my_batches
from formrules.web.state import current_owner_or_none, db, rt, rules

bp = Blueprint("tasks", __name__)
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _own_run(run_id: str) -> Run:
    """The current user's Run, or 404 (never 403: other users' ids are not confirmed)."""
    me = current_owner_or_none()
    run = db().get(Run, run_id)
    if run is None or me is None or run.owner != me or run.hidden:
        abort(404)
    return run


def _back(default: str) -> str:
    """Where the user came from, if it is a page of this site (never another host)."""
    ref = urlsplit(request.referrer or "")
    if ref.netloc == request.host and ref.path.startswith("/"):
        return ref.path + (f"?{ref.query}" if ref.query else "")
    return default


def _form_title(form_id: str) -> str:
    form = rules().form(form_id)
    return form.title if form else form_id


# My tasks, in the order people look for them: what is happening, what is coming, what
# needs attention, what is over.
GROUPS = (
    ("active", "In progress", OPEN - {RunStatus.SCHEDULED}),
    ("scheduled", "Scheduled", {RunStatus.SCHEDULED}),
    ("failed", "Failed", {RunStatus.DEAD}),
    ("finished", "Finished", FINAL - {RunStatus.DEAD}),
)


def _my_tasks() -> tuple[list[tuple[str, str, list[dict]]], list[dict]]:
    """The current user's Runs as views, and grouped for the page."""
    me = current_owner_or_none()
    # A batch's Runs are the operator's work on other people's records: they are followed
    # on the batch's page, not listed one by one among the operator's own tasks.
    runs = [] if me is None else list(db().scalars(
        select(Run).where(Run.owner == me, Run.hidden.is_(False), Run.batch_id.is_(None))
        .order_by(Run.created_at.desc(), Run.id.desc()).limit(300)))
    files = files_by_run(db(), runs)
    ids = {r.record_id for r in runs if r.record_id}
    tokens = dict(db().execute(select(Record.id, Record.token).where(Record.id.in_(ids))).all())
    views = [dict(run_view(r, files.get(r.id)), token=tokens.get(r.record_id),
                  form_title=_form_title(r.form_id)) for r in runs]
    grouped = {s for _, _, statuses in GROUPS[:-1] for s in statuses}
    groups = [(key, title, [v for v in views if v["status"] in statuses
                            or (key == "finished" and v["status"] not in grouped)])
              for key, title, statuses in GROUPS]
    return groups, views


@bp.get("/tasks")
def index():
    """The current user's Runs, newest first, grouped by state."""
    groups, views = _my_tasks()
    continued = next((v for v in views if v["id"] == request.args.get("continued")), None)
    me = current_owner_or_none()
    return render_template("tasks/index.html", groups=groups, total=len(views),
                           continued=continued, batches=my_batches.recent(me),
                           offers=my_batches.offers(me))


@bp.get("/tasks/part")
def part():
    """The task list alone, for tasks.js to refresh in place (304 when unchanged)."""
    groups, views = _my_tasks()
    batches = my_batches.recent(current_owner_or_none())
    # The tag comes from the data, not the HTML: the HTML's CSRF tokens differ each time.
    etag = hashlib.sha256(json.dumps([views, batches], sort_keys=True, default=str)
                          .encode()).hexdigest()
    if request.if_none_match.contains(etag[:32]):
        return Response(status=304, headers={"ETag": f'"{etag[:32]}"'})
    response = make_response(render_template("tasks/_list.html", groups=groups,
                                             total=len(views), batches=batches))
    response.set_etag(etag[:32])
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.post("/tasks/<run_id>/cancel")
def cancel(run_id: str):
    """Cancel one of my Runs."""
    run = _own_run(run_id)
    try:
        outcome = control.cancel(db(), run, "its owner")
    except control.NotAllowed:
        flash(f"“{run.title}” has already finished: there is nothing to cancel.", "error")
        return redirect(_back(url_for("tasks.index")), 303)
    db().commit()
    control.after_commit(rt().dispatcher, run)
    flash(f"“{run.title}” was cancelled." if outcome == "cancelled"
          else f"Stopping “{run.title}” at its next step…", "info")
    return redirect(_back(url_for("tasks.index")), 303)


@bp.post("/tasks/<run_id>/retry")
def retry(run_id: str):
    """Try one of my failed Runs again, after its completed steps (`user_retry: true`)."""
    run = _own_run(run_id)
    try:
        control.owner_retry(db(), run)
    except control.NotAllowed:
        db().rollback()
        flash(f"“{run.title}” cannot be tried again.", "error")
        return redirect(_back(url_for("tasks.index")), 303)
    db().commit()
    control.after_commit(rt().dispatcher, run)
    flash(f"Trying “{run.title}” again…", "info")
    return redirect(_back(url_for("tasks.index")), 303)


@bp.post("/tasks/<run_id>/delete")
def delete(run_id: str):
    """Remove a Run (and its files) from my list; one still going is cancelled first."""
    run = _own_run(run_id)
    outcome = control.hide(db(), run, "its owner, deleting it")
    db().commit()
    if outcome is not None:
        control.after_commit(rt().dispatcher, run)
    flash({"cancelled": f"“{run.title}” was cancelled and deleted.",
           "stopping": f"“{run.title}” is stopping and was deleted from your list."}.get(
        outcome or "", f"“{run.title}” was deleted."), "info")
    return redirect(url_for("tasks.index"), 303)


def _account() -> User | None:
    """The logged-in user (preferences are an account's, not an anonymous browser's)."""
    user_id = session.get("user_id")
    return db().get(User, user_id) if user_id is not None else None


@bp.post("/notifications/preferences")
def preferences():
    """Save my notification preferences: an address, and e-mail when a task ends."""
    user = _account()
    if user is None:
        abort(404)
    address = request.form.get("email", "").strip()
    wanted = request.form.get("email_on_end") == "y"
    if address and (len(address) > 254 or not EMAIL.fullmatch(address)):
        flash("That e-mail address does not look right.", "error")
        return redirect(url_for("tasks.notifications"), 303)
    if wanted and not address:
        flash("Give an e-mail address to get e-mails.", "error")
        return redirect(url_for("tasks.notifications"), 303)
    user.email, user.email_on_end = address or None, wanted
    db().commit()
    flash("Your notification preferences were saved.", "info")
    return redirect(url_for("tasks.notifications"), 303)


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
    return render_template("tasks/notifications.html", items=items, account=_account())


@bp.post("/notifications/<int:note_id>/dismiss")
def dismiss(note_id: int):
    """Mark one notice read."""
    me = current_owner_or_none()
    note = db().get(Notification, note_id)
    if note is None or note.owner != me:
        abort(404)
    note.read_at = utcnow()
    db().commit()
    return redirect(_back(url_for("tasks.notifications")), 303)


OPERATOR_PAGES = ("admin.", "batches.")


def inject_notifications() -> dict:
    """The notice banner: one line (the newest unread notice that belongs on this page,
    and how many more), and the unread count for the menu's badge.

    A stack of notices above every page hid the page itself. Notices that are not about
    the person's own work (an operator's batch, which has no Run) show on operator pages
    only, never above an end user's form; a batch a user started over their own records is
    their own work. The Notifications page lists everything itself.
    """
    me = current_owner_or_none()
    if me is None:
        return {"notice": None, "notice_more": 0, "unread_count": 0}
    mine = (Notification.owner == me, Notification.read_at.is_(None))
    total = db().scalar(select(func.count()).select_from(Notification).where(*mine))
    endpoint = request.endpoint or ""
    if not total or endpoint == "tasks.notifications":
        return {"notice": None, "notice_more": 0, "unread_count": total}
    shown = mine if endpoint.startswith(OPERATOR_PAGES) else \
        (*mine, or_(Notification.run_id.is_not(None), Notification.batch_id.is_not(None)))
    notice = db().scalars(select(Notification).where(*shown).order_by(
        Notification.created_at.desc(), Notification.id.desc()).limit(1)).first()
    return {"notice": notice, "notice_more": total - 1 if notice else 0, "unread_count": total}
