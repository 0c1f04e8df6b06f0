"""The hand-written peer formrules is measured against: what people write without it.

A Flask-WTF form that stores a row and enqueues an RQ job that sets a flag, and a status
endpoint, in the plain Flask + Flask-WTF + SQLAlchemy + RQ style of their tutorials.
Used only by tests/bench_compare.py; configured from PEER_DATABASE_URL and PEER_REDIS_URL.
"""

from __future__ import annotations

import os
import secrets

from flask import Flask, abort, jsonify, redirect, render_template_string, url_for
from flask_wtf import FlaskForm
from redis import Redis
from rq import Queue
from sqlalchemy import select
from wtforms import StringField
from wtforms.validators import DataRequired

from tests.peer.models import Session, Submission, init_db

PAGE = """<!doctype html><title>Quick</title>
<form method="post">{{ form.csrf_token }}{{ form.name.label }} {{ form.name() }}
<button>Send</button></form>"""

WAIT = """<!doctype html><title>Working</title><p id="state">Working…</p>
<script>setInterval(async () => {const r = await fetch("/s/{{ token }}/status");
if ((await r.json()).done) document.getElementById("state").textContent = "Done.";}, 1000)
</script>"""


class QuickForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired()])


def create_app() -> Flask:
    """The peer app: /quick (form), /s/<token>/status (JSON)."""
    app = Flask(__name__)
    app.config["SECRET_KEY"] = os.environ.get("PEER_SECRET_KEY", "peer")
    init_db()
    queue = Queue("peer", connection=Redis.from_url(os.environ["PEER_REDIS_URL"]))

    @app.route("/quick", methods=["GET", "POST"])
    def quick():
        form = QuickForm()
        if form.validate_on_submit():
            status = "special" if form.name.data == "x" else "received"
            with Session() as s:
                row = Submission(token=secrets.token_urlsafe(24), name=form.name.data,
                                 status=status)
                s.add(row)
                s.commit()
                queue.enqueue("tests.peer.tasks.set_flag", row.id)
                return redirect(url_for("page", token=row.token), 303)
        return render_template_string(PAGE, form=form)

    @app.get("/s/<token>")
    def page(token: str):
        return render_template_string(WAIT, token=token)

    @app.get("/s/<token>/status")
    def status(token: str):
        with Session() as s:
            row = s.scalar(select(Submission).where(Submission.token == token))
            if row is None:
                abort(404)
            return jsonify(name=row.name, status=row.status, done=row.done)

    return app
