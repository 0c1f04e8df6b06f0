"""Form pages: the list, one form, and its submission."""

from __future__ import annotations

import logging
import secrets
import time

from flask import Blueprint, abort, redirect, render_template, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from formrules.errors import ActionError
from formrules.language.tree import DeferNode, Form, walk
from formrules.runs.engine import submit as submit_record
from formrules.store.models import FINAL, Record, Run
from formrules.web.formbuilder import form_class, record_values
from formrules.web.state import db, discard_db, owner, rt, rules

bp = Blueprint("forms", __name__)
FINAL_STATUSES = {status.value for status in FINAL}
log = logging.getLogger("formrules.web")


@bp.get("/")
def index():
    """List every form."""
    return render_template("forms/index.html", forms=sorted(rules().forms.values(),
                                                            key=lambda f: f.title))


@bp.route("/forms/<form_id>", methods=("GET", "POST"))
def show(form_id: str):
    """Render a form; on POST validate, store, run the submit tree and go to its status."""
    form = rules().form(form_id) or abort(404)
    wtf = form_class(form)()
    if request.method == "GET":
        wtf.submit_key.data = secrets.token_urlsafe(24)
        return render_template("forms/form.html", form=form, wtf=wtf)
    if not wtf.validate_on_submit():
        return render_template("forms/form.html", form=form, wtf=wtf), 422
    key = wtf.submit_key.data or None
    s = db()
    try:
        record, runs = submit_record(s, form, record_values(form, wtf), owner=owner(),
                                     settings=rt().settings, submit_key=key)
        s.commit()
    except IntegrityError:
        s.rollback()  # a double submit: the unique submit_key refused the second INSERT
        existing = s.scalar(select(Record).where(Record.submit_key == key))
        if existing is None:
            raise
        return redirect(url_for("records.wait", token=existing.token), 303)
    except ActionError as exc:
        s.rollback()  # nothing of the submission is kept; the user's input stays on screen
        log.warning("form %s: submit failed: %s", form.id, exc)
        return render_template("forms/form.html", form=form, wtf=wtf,
                               error=exc.safe_message), 500
    rt().dispatcher.dispatch_all(runs, new=True)
    _wait_inline(form, runs)
    return redirect(url_for("records.wait", token=record.token), 303)


def _wait_inline(form: Form, runs: list[Run]) -> None:
    """`inline_for:` hold the answer a little so quick background work shows as done.

    Only awaited Runs are waited for, and never longer than the largest `inline_for` of
    the nodes that started them; slower work simply continues in the background.
    """
    limits = inline_limits(form)
    if not limits:
        return
    waited = [r for r in runs if r.node_path in limits and r.awaited != "false"]
    if not waited:
        return
    deadline = time.monotonic() + max(limits[r.node_path] for r in waited)
    ids = [r.id for r in waited]
    with rt().store.sessions() as s:
        while True:
            statuses = s.scalars(select(Run.status).where(Run.id.in_(ids))).all()
            s.rollback()  # end the read so the next one sees the worker's commits
            if all(st in FINAL_STATUSES for st in statuses) or time.monotonic() >= deadline:
                return
            time.sleep(0.1)


def inline_limits(form: Form) -> dict[str, float]:
    """`inline_for:` seconds by node path (computed once per form definition)."""
    cached = _limits.get(id(form))
    if cached is None or cached[0] is not form:
        cached = _limits[id(form)] = (form, {
            n.path: n.inline_for.total_seconds() for n in walk(form.events.get("submit", ()))
            if isinstance(n, DeferNode) and n.inline_for})
    return cached[1]


_limits: dict[int, tuple[Form, dict[str, float]]] = {}


@bp.teardown_app_request
def close_db(exc):
    """Close the request's database session (never failing on a cut connection)."""
    discard_db()
