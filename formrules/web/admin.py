"""Operator pages (`/admin`): every Run with filters, a Run's trace, retry/cancel/delete,
the dead list. Records and queues are in `admin_records`, which adds its views to this
blueprint (imported by the app factory; nothing here imports it back). Operators only.

Every change goes through `formrules.runs.control` (database first, then RQ), as the CLI does.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from redis.exceptions import RedisError
from sqlalchemy import func, or_, select, text
from sqlalchemy.sql import Select

from formrules.runs import control, pause
from formrules.runs.lifecycle import NOW_STATES
from formrules.runs.trace import attempt_numbers
from formrules.store import search, uploads
from formrules.store.models import Record, ResultFile, Run, RunEvent, RunStatus
from formrules.web.auth import operator_required
from formrules.web.state import db, rt, rules

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = logging.getLogger("formrules.web.admin")
PER_PAGE = 50
STATUSES = [s.value for s in RunStatus]


def who() -> str:
    """The operator, as written into traces."""
    return f"operator {session.get('user_name', '?')}"


def page_number() -> int:
    """The `page` query argument, 1 or more."""
    return max(1, request.args.get("page", 1, type=int) or 1)


COUNT_LIMIT = 1000  # counted exactly up to here; beyond it the pager says "1000+"


class Total(int):
    """A result count that may be a lower bound (`more`): shown as "1000+"."""

    more: bool = False

    def __str__(self) -> str:
        return f"{int(self)}+" if self.more else str(int(self))


def paginate(query: Select, page: int) -> tuple[list, Total]:
    """One page of `query`'s rows and the count of results, exact up to COUNT_LIMIT.

    Counting every match of a million-row table costs a scan of all of them on every
    page view; counting up to a limit (past the page shown) costs what the page does.
    """
    rows = list(db().scalars(query.limit(PER_PAGE).offset((page - 1) * PER_PAGE)))
    limit = max(COUNT_LIMIT, page * PER_PAGE)
    counted = db().scalar(select(func.count()).select_from(
        query.order_by(None).with_only_columns(Run.id if _is_runs(query) else Record.id)
        .limit(limit + 1).subquery()))
    total = Total(min(counted, limit))
    total.more = counted > limit
    return rows, total


def page_count(total: Total) -> int:
    """Pages for `total` results; one more past a lower bound, so "Older" stays."""
    return max(1, -(-total // PER_PAGE)) + (1 if total.more else 0)


def _is_runs(query: Select) -> bool:
    return any(d.get("entity") is Run for d in query.column_descriptions)


def _day(value: str, end: bool) -> datetime | None:
    """A `YYYY-MM-DD` filter as the start (or end) of that day in the configured zone."""
    try:
        day = date.fromisoformat(value)
    except ValueError:
        return None
    moment = datetime.combine(day, time.min, ZoneInfo(rt().settings.timezone))
    return moment + timedelta(days=1) if end else moment


def run_filters(query: Select, args) -> Select:
    """Apply the status, form, date range and text filters of the Runs page."""
    if args.get("status") in STATUSES:
        query = query.where(Run.status == args["status"])
    if args.get("state") in NOW_STATES:  # a diagram count: a named set of statuses
        query = query.where(Run.status.in_(sorted(NOW_STATES[args["state"]])))
    if args.get("path"):
        query = query.where(Run.node_path == args["path"])
    if args.get("form"):
        query = query.where(Run.form_id == args["form"])
    if args.get("from") and (start := _day(args["from"], end=False)):
        query = query.where(Run.created_at >= start)
    if args.get("to") and (stop := _day(args["to"], end=True)):
        query = query.where(Run.created_at < stop)
    if text := (args.get("q") or "").strip()[:200]:
        # A few matches come from the text index (a scan would read every row to find
        # them); many, or text too short for it, from LIKE over the newest rows.
        ids = search.run_ids(db(), text, COUNT_LIMIT)
        if ids is not None:
            return query.where(Run.id.in_(ids))
        query = query.where(or_(Run.id.startswith(text), *(
            getattr(Run, column).icontains(text, autoescape=True)
            for column in search.RUN_COLUMNS)))
    return query


# The distinct form ids of Runs, one index probe each (a loose index scan), instead of
# reading every Run: `SELECT DISTINCT` walks the whole table on SQLite and PostgreSQL.
USED_FORMS = text("""
WITH RECURSIVE f(id) AS (
  SELECT MIN(form_id) FROM runs
  UNION ALL
  SELECT (SELECT MIN(form_id) FROM runs WHERE form_id > f.id) FROM f WHERE f.id IS NOT NULL
) SELECT id FROM f WHERE id IS NOT NULL""")


def form_ids() -> list[str]:
    """Forms to filter by: those loaded now and those that left Runs behind."""
    used = set(db().scalars(USED_FORMS))
    return sorted(used | set(rules().forms))


@bp.get("")
@operator_required
def runs():
    """Every Run, newest first, filtered and paginated."""
    page = page_number()
    query = run_filters(select(Run), request.args).order_by(Run.created_at.desc(),
                                                            Run.id.desc())
    items, total = paginate(query, page)
    return render_template("admin/runs.html", runs=items, total=total, page=page,
                           pages=page_count(total), statuses=STATUSES,
                           forms=form_ids(), args=request.args,
                           paused=pause.paused_forms(db()))


@bp.post("/forms/<form_id>/pause")
@operator_required
def pause_form(form_id: str):
    """Pause a form's queued and scheduled work (submits still work)."""
    if form_id not in form_ids():
        abort(404)
    if pause.pause(db(), form_id, who()):
        db().commit()
        log.warning("form %s: work paused by %s", form_id, who())
    flash(f"{form_id}: paused. Its work waits until you resume it.", "info")
    return redirect(url_for("admin.runs", form=form_id), 303)


@bp.post("/forms/<form_id>/resume")
@operator_required
def resume_form(form_id: str):
    """Resume a paused form: the reconciler's next pass dispatches what waited."""
    if pause.resume(db(), form_id):
        db().commit()
        log.warning("form %s: work resumed by %s", form_id, who())
    flash(f"{form_id}: resumed. What waited starts within a few seconds.", "info")
    return redirect(url_for("admin.runs", form=form_id), 303)


@bp.get("/runs/<run_id>")
@operator_required
def run(run_id: str):
    """One Run: its state, step-by-step trace, full error, children and actions."""
    item = db().get(Run, run_id) or abort(404)
    events = attempt_numbers(db().scalars(select(RunEvent).where(RunEvent.run_id == run_id)
                                          .order_by(RunEvent.id)))
    children = list(db().scalars(select(Run).where(Run.parent_id == run_id)
                                 .order_by(Run.created_at)))
    files = list(db().scalars(select(ResultFile.filename).where(ResultFile.run_id == run_id)))
    record = db().get(Record, item.record_id) if item.record_id else None
    try:
        job_status = rt().dispatcher.job_status(run_id)
        job = job_status.value if job_status else "no job"
    except RedisError:
        job = "Redis unreachable"
    return render_template("admin/run.html", run=item, events=events, children=children,
                           files=files, record=record, job=job)


def _act(run_id: str, action) -> Run:
    item = db().get(Run, run_id) or abort(404)
    try:
        outcome = action(db(), item, who())
    except control.NotAllowed as exc:
        flash(f"Not done: {exc}.", "error")
        return item
    db().commit()
    control.after_commit(rt().dispatcher, item)
    flash(f"{item.title}: {outcome or 'queued again'}.", "info")
    return item


@bp.post("/runs/<run_id>/retry")
@operator_required
def retry(run_id: str):
    """Run a dead or cancelled Run again, after its completed steps."""
    _act(run_id, control.retry)
    return redirect(url_for("admin.run", run_id=run_id), 303)


@bp.post("/runs/<run_id>/cancel")
@operator_required
def cancel(run_id: str):
    """Cancel a pending Run now, or a running one at its next step."""
    _act(run_id, control.cancel)
    return redirect(url_for("admin.run", run_id=run_id), 303)


@bp.post("/runs/<run_id>/delete")
@operator_required
def delete_run(run_id: str):
    """Delete a finished Run with its trace and files (a pending one must be cancelled)."""
    item = db().get(Run, run_id) or abort(404)
    try:
        control.delete_run(db(), item)
    except control.NotAllowed:
        flash("Only finished Runs can be deleted: cancel it first.", "error")
        return redirect(url_for("admin.run", run_id=run_id), 303)
    db().commit()
    flash(f"Deleted {item.title} ({run_id[:8]}).", "info")
    return redirect(url_for("admin.runs"), 303)


@bp.post("/records/<int:record_id>/delete")
@operator_required
def delete_record(record_id: int):
    """Delete a record with its Runs and uploaded files; work still going is cancelled
    first, and a step running now ends before the record goes (`control.delete_record`)."""
    record = db().get(Record, record_id) or abort(404)
    runs, files = control.delete_record(db(), record, who())
    db().commit()
    uploads.remove(rt().settings, files)  # after the commit: a rollback keeps them
    for run in runs:
        control.after_commit(rt().dispatcher, run)
    db().expire_all()
    if db().get(Record, record_id) is None:
        flash(f"Deleted record #{record_id}.", "info")
    else:
        flash(f"Record #{record_id} is deleted as soon as its running step has stopped.",
              "info")
    return redirect(url_for("admin.records"), 303)


@bp.get("/dead")
@operator_required
def dead():
    """Runs that ran out of attempts, oldest failure first, with bulk retry."""
    page = page_number()
    query = select(Run).where(Run.status == RunStatus.DEAD.value)
    if request.args.get("form"):
        query = query.where(Run.form_id == request.args["form"])
    items, total = paginate(query.order_by(Run.finished_at, Run.id), page)
    return render_template("admin/dead.html", runs=items, total=total, page=page,
                           pages=page_count(total), forms=form_ids(),
                           args=request.args)


@bp.post("/dead/retry")
@operator_required
def retry_dead():
    """Retry the selected dead Runs in one go."""
    ids = request.form.getlist("run_id")[:1000]
    items = list(db().scalars(select(Run).where(Run.id.in_(ids),
                                                Run.status == RunStatus.DEAD.value)))
    for item in items:
        control.retry(db(), item, who())
    db().commit()
    for item in items:
        control.after_commit(rt().dispatcher, item)
    skipped = len(set(ids)) - len(items)
    flash(f"Retrying {len(items)} run{'s' if len(items) != 1 else ''}."
          + (f" {skipped} skipped: no longer dead." if skipped else ""),
          "info" if items else "error")
    return redirect(url_for("admin.dead"), 303)


@bp.app_context_processor
def endpoint_helpers() -> dict:
    """`has_endpoint(name)`: link to pages of blueprints that may not be installed."""
    return {"has_endpoint": lambda name: name in current_app.view_functions}

