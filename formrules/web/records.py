"""The waiting page (`/r/<token>`), its JSON, and result downloads."""

from __future__ import annotations

import hashlib
import json

from flask import Blueprint, Response, abort, jsonify, render_template, request
from sqlalchemy import select

from ..models import Record, ResultFile, Run
from ..status import record_status
from .state import current_owner_or_none, db, rules

bp = Blueprint("records", __name__)


def _record(token: str) -> Record:
    if len(token) > 64:
        abort(404)
    return db().scalar(select(Record).where(Record.token == token)) or abort(404)


@bp.get("/r/<token>")
def wait(token: str):
    """The page that refreshes until the awaited work is done (meta refresh, or JS)."""
    record = _record(token)
    form = rules().form(record.form_id)
    status = record_status(db(), record, form)
    return render_template("records/wait.html", record=record, form=form, status=status,
                           is_owner=current_owner_or_none() == record.owner)


@bp.get("/r/<token>/status")
def status_json(token: str):
    """`{"done", "record", "runs"}`; answers 304 when nothing changed (ETag)."""
    record = _record(token)
    status = record_status(db(), record, rules().form(record.form_id))
    body = json.dumps(status, sort_keys=True, default=str)
    etag = hashlib.sha256(body.encode()).hexdigest()[:32]
    if request.if_none_match.contains(etag):
        return Response(status=304, headers={"ETag": f'"{etag}"'})
    response = jsonify(status)
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/files/<file_id>")
def download(file_id: str):
    """A result file, for its owner only (anyone else gets 404, not 403)."""
    me = current_owner_or_none()
    found = db().get(ResultFile, file_id)
    if found is None or me is None or found.owner != me:
        abort(404)
    run = db().get(Run, found.run_id)
    if run is None or run.hidden:
        abort(404)
    return Response(found.data, mimetype=found.content_type.split(";")[0], headers={
        "Content-Disposition": f'attachment; filename="{_safe_name(found.filename)}"',
        "X-Content-Type-Options": "nosniff"})


def _safe_name(name: str) -> str:
    return "".join(c for c in name if c.isalnum() or c in "._- ")[:200] or "result"
