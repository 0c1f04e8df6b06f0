"""Batches for end users (`/tasks/batches`): pick some of one's own records, start one of
the form's batches over them (`started_by: users`), follow it, get the combined zip.

Everything here is the current user's only: records they submitted, batches they started
(`Batch.self_service`); anything else is 404, as on the rest of My tasks. The operator
pages (`formrules.web.batches`) keep showing every batch.
"""

from __future__ import annotations

import hashlib
import json

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_wtf import FlaskForm
from sqlalchemy import select, update

from formrules.language.tree import BatchDef, Form
from formrules.language.values import typed_record
from formrules.runs import batch as batches
from formrules.runs.status import run_view
from formrules.store.models import Batch, Notification, Record, Run, utcnow
from formrules.web.batches import results_response
from formrules.web.state import current_owner_or_none, db, rt, rules

bp = Blueprint("my_batches", __name__, url_prefix="/tasks/batches")
SHOWN_RECORDS = 500  # a user's own records listed for picking, newest first
USERS = "users"


def startable(form: Form) -> list[BatchDef]:
    """The form's batches its users may start over their own records."""
    return [b for b in form.batches.values() if USERS in b.started_by]


def offers(owner: str | None) -> list[tuple[Form, BatchDef]]:
    """What My tasks offers to start: batches of the forms this user has records on."""
    if owner is None:
        return []
    forms = [f for f in rules().forms.values() if startable(f)]
    if not forms:
        return []
    used = set(db().scalars(select(Record.form_id).where(
        Record.owner == owner, Record.form_id.in_([f.id for f in forms])).distinct()))
    return [(f, b) for f in sorted(forms, key=lambda f: f.title) if f.id in used
            for b in startable(f)]


def recent(owner: str | None, limit: int = 20) -> list[dict]:
    """This user's own batches, newest first, each with its progress (for My tasks)."""
    if owner is None:
        return []
    items = db().scalars(select(Batch).where(Batch.owner == owner, Batch.self_service)
                         .order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit))
    return [_view(b) for b in items]


def _view(item: Batch) -> dict:
    """A batch as its owner sees it: overall progress and the items running now."""
    progress = batches.progress(db(), item)
    current = [run_view(r) for r in batches.current_items(db(), item)]
    return {"id": item.id, "title": item.title, "status": item.status,
            "form_id": item.form_id, "created_at": item.created_at,
            "finished_at": item.finished_at, "progress": progress, "current": current,
            "active": item.finished_at is None,
            "has_results": bool(progress["counts"].get("done"))}


def _own_batch(batch_id: str) -> Batch:
    """The current user's own batch, or 404 (never 403: others' ids are not confirmed)."""
    me = current_owner_or_none()
    found = db().get(Batch, batch_id) if len(batch_id) <= 32 else None
    if found is None or me is None or found.owner != me or not found.self_service:
        abort(404)
    return found


@bp.route("/new/<form_id>/<name>", methods=("GET", "POST"))
def new(form_id: str, name: str):
    """The user's own records of the form, with boxes; start the batch over those ticked."""
    form = rules().form(form_id) or abort(404)
    definition = form.batches.get(name)
    if definition is None or USERS not in definition.started_by:
        abort(404)
    me = current_owner_or_none()
    wtf = FlaskForm()  # the CSRF token
    error = None
    if wtf.validate_on_submit():
        ids = [int(i) for i in request.form.getlist("record") if i.isdigit()]
        if me is None or not ids:
            error = "Select at least one of your records."
        else:
            try:
                started = batches.launch(rt(), db(), form, name, owner=me, starter=USERS,
                                         record_ids=ids)
            except batches.BatchError as exc:
                error = exc.sentence
            else:
                flash(f"Started “{started.title}” over {started.total} record(s).", "success")
                return redirect(url_for("my_batches.show", batch_id=started.id), 303)
    elif request.method == "POST":
        error = "This form expired. Select the records again."
    records = [] if me is None else list(db().scalars(
        select(Record).where(Record.form_id == form.id, Record.owner == me)
        .order_by(Record.id.desc()).limit(SHOWN_RECORDS)))
    columns = [f for f in form.fields if not f.hidden][:4]
    rows = [(r, typed_record(r.data, form.field_types)) for r in records]
    return render_template("tasks/batch_new.html", form=form, definition=definition,
                           wtf=wtf, rows=rows, columns=columns, error=error,
                           chosen=set(request.form.getlist("record"))), 422 if error else 200


def _mark_seen(item: Batch) -> None:
    """The owner is looking at the ended batch: its notice is read."""
    if item.finished_at is None:
        return
    seen = db().execute(update(Notification).where(
        Notification.owner == item.owner, Notification.batch_id == item.id,
        Notification.read_at.is_(None)).values(read_at=utcnow())).rowcount
    if seen:
        db().commit()


@bp.get("/<batch_id>")
def show(batch_id: str):
    """One of my batches: "n of m", the items running now, every item, the zip."""
    item = _own_batch(batch_id)
    _mark_seen(item)
    return render_template("tasks/batch.html", batch=_view(item), items=_items(item))


def _items(item: Batch) -> list[dict]:
    children = db().scalars(select(Run).where(Run.batch_id == item.id)
                            .order_by(Run.record_id, Run.id))
    return [run_view(r) for r in children]


@bp.get("/<batch_id>/part")
def part(batch_id: str):
    """The batch's status part alone, for tasks.js to refresh in place (304 if unchanged)."""
    item = _own_batch(batch_id)
    view, items = _view(item), _items(item)
    etag = hashlib.sha256(json.dumps([view, items], sort_keys=True, default=str)
                          .encode()).hexdigest()[:32]
    if request.if_none_match.contains_weak(etag):
        return Response(status=304, headers={"ETag": f'"{etag}"'})
    response = make_response(render_template("tasks/_batch.html", batch=view, items=items))
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/<batch_id>/progress")
def progress(batch_id: str):
    """The same as JSON: overall progress and the current items' progress."""
    view = _view(_own_batch(batch_id))
    return Response(json.dumps(view, default=str), mimetype="application/json",
                    headers={"Cache-Control": "no-cache"})


@bp.post("/<batch_id>/cancel")
def cancel(batch_id: str):
    """Cancel my whole batch: items not started never start, running ones stop."""
    item = _own_batch(batch_id)
    db().rollback()  # cancel locks the batch in its own session
    try:
        outcome = batches.cancel(rt(), item.id, "its owner")
    except batches.BatchError:
        flash("This batch has already ended: there is nothing to cancel.", "error")
    else:
        flash("Batch cancelled." if outcome == "cancelled"
              else "Cancelled; items running now stop at their next step.", "info")
    return redirect(url_for("my_batches.show", batch_id=item.id), 303)


@bp.get("/<batch_id>/results.zip")
def download(batch_id: str):
    """Every item's result files in one zip, for the batch's owner only."""
    return results_response(_own_batch(batch_id))
