"""Batch runs (`/admin/batches`): run a form's batch over selected records, watch, cancel."""

from __future__ import annotations

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import StringField
from wtforms.validators import Length, Optional

from formrules.language.values import typed_record
from formrules.runs import batch as batches
from formrules.store.models import Batch, Record, Run
from formrules.web.auth import operator_required
from formrules.web.state import db, rt, rules

bp = Blueprint("batches", __name__, url_prefix="/admin/batches")
SHOWN_RECORDS = 500  # records listed for picking; a filter reaches the rest
OPERATORS = "operators"  # who starts batches here (`started_by:`)


class StartForm(FlaskForm):
    where = StringField("Filter expression", validators=[Optional(), Length(max=500)],
                        description="e.g. record.status == 'reserved' (empty: all records)")


def _who() -> str:
    return f"operator {session.get('user_name', '?')}"


def _batch(batch_id: str) -> Batch:
    found = db().get(Batch, batch_id) if len(batch_id) <= 32 else None
    if found is None:
        abort(404)
    return found


@bp.get("")
@operator_required
def index():
    """Every batch, newest first, with its progress; and the batch defs that can be started."""
    items = list(db().scalars(select(Batch).order_by(Batch.created_at.desc()).limit(100)))
    views = [(b, batches.progress(db(), b)) for b in items]
    defs = [(form, item) for form in sorted(rules().forms.values(), key=lambda f: f.title)
            for item in form.batches.values() if OPERATORS in item.started_by]
    return render_template("batches/index.html", batches=views, defs=defs)


@bp.route("/new/<form_id>/<name>", methods=("GET", "POST"))
@operator_required
def new(form_id: str, name: str):
    """Pick records (boxes, or a filter) and start the batch over them."""
    form = rules().form(form_id) or abort(404)
    definition = form.batches.get(name)
    if definition is None or OPERATORS not in definition.started_by:
        abort(404)
    wtf = StartForm()
    error = None
    if wtf.validate_on_submit():
        ids = [int(i) for i in request.form.getlist("record") if i.isdigit()]
        scope = request.form.get("scope", "selected")
        if scope == "selected" and not ids:
            error = "Select at least one record, or run on every record matching the filter."
        else:
            try:
                started = batches.launch(
                    rt(), db(), form, name, owner=f"user:{session.get('user_id')}",
                    starter=OPERATORS, record_ids=ids if scope == "selected" else None,
                    where=(wtf.where.data or "").strip() or None)
            except batches.BatchError as exc:
                error = exc.sentence
            else:
                flash(f"Started {started.title} over {started.total} record(s).", "success")
                return redirect(url_for("batches.show", batch_id=started.id), 303)
    records = list(db().scalars(select(Record).where(Record.form_id == form.id)
                                .order_by(Record.id.desc()).limit(SHOWN_RECORDS)))
    columns = [f for f in form.fields if not f.hidden][:4]
    rows = [(r, typed_record(r.data, form.field_types)) for r in records]
    return render_template("batches/new.html", form=form, definition=definition, wtf=wtf,
                           rows=rows, columns=columns, error=error,
                           chosen=set(request.form.getlist("record"))), 422 if error else 200


@bp.get("/<batch_id>")
@operator_required
def show(batch_id: str):
    """A batch's progress ("n of m"), its children, cancel and the combined download."""
    item = _batch(batch_id)
    children = list(db().scalars(select(Run).where(Run.batch_id == item.id)
                                 .order_by(Run.record_id, Run.id)))
    return render_template("batches/show.html", batch=item, children=children,
                           progress=batches.progress(db(), item))


@bp.get("/<batch_id>/progress")
@operator_required
def progress(batch_id: str):
    """The progress as JSON, for scripts and live pages."""
    item = _batch(batch_id)
    return jsonify(dict(batches.progress(db(), item), id=item.id, status=item.status))


@bp.post("/<batch_id>/cancel")
@operator_required
def cancel(batch_id: str):
    """Cancel the whole batch: waiting children never start, running ones stop."""
    item = _batch(batch_id)
    db().rollback()  # release this request's read; cancel locks the batch in its own session
    try:
        outcome = batches.cancel(rt(), item.id, _who())
    except batches.BatchError as exc:
        flash(exc.sentence, "error")
    else:
        flash("Batch cancelled." if outcome == "cancelled"
              else "Cancelled; running items stop at their next step.", "info")
    return redirect(url_for("batches.show", batch_id=item.id), 303)


@bp.get("/<batch_id>/results.zip")
@operator_required
def download(batch_id: str):
    """Every child's result files in one zip."""
    return results_response(_batch(batch_id))


def results_response(item: Batch) -> Response:
    """A batch's result files in one zip download (404 when it has none yet); for the
    operator's page and the owner's alike, each checking who may ask first."""
    data, count = batches.results_zip(db(), item)
    if not count:
        abort(404)
    filename = f"{item.form_id}-{item.name}-{item.id[:8]}.zip"
    return Response(data, mimetype="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "private, no-store"})
