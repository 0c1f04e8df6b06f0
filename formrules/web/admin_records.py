"""Operator pages for records (list, per-record timeline) and the queue/worker overview."""

from __future__ import annotations

from collections import Counter

from flask import abort, current_app, render_template, request, url_for
from redis.exceptions import RedisError
from sqlalchemy import func, or_, select

from formrules.language.tree import queues_of
from formrules.runs import overview
from formrules.store import search
from formrules.store.models import NOT_STARTED, PENDING, Record, Run, RunEvent, RunStatus
from formrules.web.admin import COUNT_LIMIT, bp, form_ids, page_count, page_number, paginate
from formrules.web.auth import operator_required
from formrules.web.state import db, rt, rules

# The queue page lists what needs eyes first: work in flight, then what is over.
STATUS_ORDER = ["queued", "scheduled", "waiting", "running", "retrying", "dead", "done",
                "cancelled", "skipped"]


@bp.get("/records")
@operator_required
def records():
    """Every record, newest first, by form and text (id, token, owner)."""
    page = page_number()
    query = select(Record).order_by(Record.created_at.desc(), Record.id.desc())
    if request.args.get("form"):
        query = query.where(Record.form_id == request.args["form"])
    if text := (request.args.get("q") or "").strip()[:200]:
        ids = search.record_ids(db(), text, COUNT_LIMIT)
        clauses = [Record.token == text,
                   Record.id.in_(ids) if ids is not None
                   else Record.owner.icontains(text, autoescape=True)]
        if text.isdigit():
            clauses.append(Record.id == int(text))
        query = query.where(or_(*clauses))
    items, total = paginate(query, page)
    counts: dict[int, Counter] = {r.id: Counter() for r in items}
    if items:
        for record_id, status, n in db().execute(
                select(Run.record_id, Run.status, func.count()).where(
                    Run.record_id.in_(counts)).group_by(Run.record_id, Run.status)):
            counts[record_id][status] = n
    return render_template("admin/records.html", records=items, counts=counts, total=total,
                           page=page, pages=page_count(total), forms=form_ids(),
                           args=request.args)


def edit_url(record: Record) -> str | None:
    """The record's edit page, when the updates blueprint is installed."""
    if "updates.edit" not in current_app.view_functions:
        return None
    return url_for("updates.edit", record_id=record.id)


@bp.get("/records/<int:record_id>")
@operator_required
def record(record_id: int):
    """A record's timeline: what ran, what runs now, what is pending and when."""
    item = db().get(Record, record_id) or abort(404)
    runs = list(db().scalars(select(Run).where(Run.record_id == record_id)
                             .order_by(Run.created_at, Run.id)))
    titles = {r.id: r.title for r in runs}
    events = list(db().scalars(
        select(RunEvent).where(RunEvent.run_id.in_(titles)).order_by(RunEvent.at, RunEvent.id)
        .limit(500))) if runs else []
    form = rules().form(item.form_id)
    labels = {f.name: f.label for f in form.fields} if form else {}
    return render_template(
        "admin/record.html", record=item, form=form, labels=labels, events=events,
        titles=titles, edit_url=edit_url(item),
        running=[r for r in runs if r.status == RunStatus.RUNNING],
        pending=sorted((r for r in runs if r.status in NOT_STARTED),
                       key=lambda r: r.due_at),
        ran=sorted((r for r in runs if r.is_final),
                   key=lambda r: r.finished_at or r.updated_at, reverse=True))


@bp.get("/queues")
@operator_required
def queues():
    """Queues, registries and workers as RQ sees them, beside the database's view."""
    by_status = dict(db().execute(select(Run.status, func.count()).group_by(Run.status)).all())
    oldest = db().scalar(select(func.min(Run.due_at)).where(
        Run.status.in_(sorted(PENDING))))
    error = None
    queue_infos, worker_infos = [], []
    pending = dict(db().execute(select(Run.queue, func.count()).where(
        Run.status.in_(sorted(PENDING))).group_by(Run.queue)).all())
    try:
        worker_infos = overview.workers(rt().redis)
        queue_infos = overview.lanes(rt().redis, rt().settings.queue, queues_of(rules()),
                                     pending, worker_infos)
    except RedisError as exc:
        error = f"Redis is unreachable ({type(exc).__name__}). The database is still the " \
                f"source of truth: the reconciler re-enqueues pending work when it is back."
    current = {w.current_job for w in worker_infos if w.current_job}
    titles = dict(db().execute(select(Run.id, Run.title).where(Run.id.in_(current))).all())
    return render_template("admin/queues.html", queues=queue_infos, workers=worker_infos,
                           by_status=by_status,
                           statuses=STATUS_ORDER + [s.value for s in RunStatus
                                                    if s.value not in STATUS_ORDER],
                           oldest_pending=oldest, titles=titles, error=error)
