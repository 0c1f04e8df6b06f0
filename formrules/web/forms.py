"""Form pages: the list, one form, and its submission."""

from __future__ import annotations

import logging
import secrets

from flask import Blueprint, abort, redirect, render_template, request, url_for

from formrules.errors import ActionError
from formrules.runs import submit
from formrules.store import uploads
from formrules.web.formbuilder import form_class, record_values
from formrules.web.state import db, owner, rt, rules

bp = Blueprint("forms", __name__)
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
    settings = rt().settings
    values = record_values(form, wtf, settings=settings)
    try:
        done = submit.accept(db(), form, values, owner=owner(),
                             settings=settings, submit_key=wtf.submit_key.data or None)
    except ActionError as exc:  # nothing of the submission is kept; the input stays on screen
        uploads.remove(settings, uploads.in_data(values))
        log.warning("form %s: submit failed: %s", form.id, exc)
        return render_template("forms/form.html", form=form, wtf=wtf,
                               error=exc.safe_message), 500
    except Exception:  # nothing was stored: neither are its files
        uploads.remove(settings, uploads.in_data(values))
        raise
    if done.duplicate:  # the first submit's record keeps its own copies of the files
        uploads.remove(settings, uploads.in_data(values))
    else:
        submit.dispatch(rt().dispatcher, done)
        submit.wait_inline(rt().store, form, done.runs)
    return redirect(url_for("records.wait", token=done.record.token), 303)
