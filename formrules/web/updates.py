"""The operator's record edit page: the form prefilled, saved through `formrules.runs.updates`."""

from __future__ import annotations

import logging

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
from sqlalchemy import select

from formrules.errors import ActionError, RuleError
from formrules.language.values import typed_record
from formrules.runs import updates
from formrules.runs.snapshot import Snapshot
from formrules.store.models import PENDING, Record, Run
from formrules.web.auth import operator_required
from formrules.web.formbuilder import form_class
from formrules.web.state import db, rt, rules

bp = Blueprint("updates", __name__)
log = logging.getLogger("formrules.web")


def _delays(record: Record) -> list[dict]:
    """The record's pending Delays and what an edit does to each (shown beside the form)."""
    out = []
    for run in db().scalars(select(Run).where(
            Run.record_id == record.id, Run.kind == "delay",
            Run.status.in_(sorted(PENDING))).order_by(Run.due_at)):
        try:
            node = Snapshot.load(run.snapshot).node(run.node_path)
        except RuleError as exc:  # shown without its policy; the edit still works
            log.warning("run %s: cannot rebuild its node: %s", run.id, exc)
            node = None
        policy = "keeps its time"
        if node is not None and node.on_change == "recompute" and node.at:
            policy = f"follows {node.at}"
        if node is not None and node.cancel_if:
            policy += f"; cancelled if {node.cancel_if}"
        out.append({"run": run, "policy": policy,
                    "when": node.when if node is not None else None})
    return out


@bp.route("/admin/records/<int:record_id>/edit", methods=("GET", "POST"))
@operator_required
def edit(record_id: int):
    """Edit a record's fields; the form's update tree and Delay policies follow."""
    record = db().get(Record, record_id) or abort(404)
    form = rules().form(record.form_id)
    if form is None:
        abort(404)  # its form is no longer loaded: nothing to validate an edit against
    cls = form_class(form, include_hidden=True)
    wtf = cls(data=typed_record(record.data, form.field_types))
    error = None
    if request.method == "POST" and request.form.get("version") != str(record.version):
        # The record was written since this page was rendered (a worker's step, another
        # operator): saving the stale values would silently undo that write.
        flash("This record changed while you were editing it. The form now shows the "
              "current values; make your change again.", "error")
        return redirect(url_for("updates.edit", record_id=record.id), 303)
    if wtf.validate_on_submit():
        values = {fd.name: getattr(wtf, fd.name).data for fd in form.fields
                  if fd.name in wtf}  # not uploads: an edit keeps them
        who = f"operator {session.get('user_name', '?')}"
        try:
            change = updates.apply_edit(db(), form, record.id, values,
                                        settings=rt().settings, who=who)
            db().commit()
        except updates.InvalidValues as exc:
            db().rollback()
            for name, messages in exc.errors.items():
                getattr(wtf, name).errors = list(messages)
        except ActionError as exc:
            db().rollback()  # the update tree failed: nothing of the edit is kept
            log.warning("record %s: update failed: %s", record.id, exc)
            error = exc.safe_message
        else:
            updates.after_edit(rt().dispatcher, change)
            flash(updates.describe(change), "success" if change.changed else "info")
            if "admin.record" in current_app.view_functions:
                return redirect(url_for("admin.record", record_id=record.id), 303)
            return redirect(url_for("updates.edit", record_id=record.id), 303)
    status = 200 if not wtf.errors and not error else (500 if error else 422)
    return render_template("updates/edit.html", record=record, form=form, wtf=wtf,
                           error=error, delays=_delays(record)), status
