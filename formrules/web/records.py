"""The waiting page (`/r/<token>`), its JSON and HTML part, and result downloads.

A record's page is its owner's (or an operator's): anyone else gets 404, as for every
other thing a user owns (API records excepted: see `_record`). Without JavaScript the
page reloads itself (a meta refresh in `<noscript>`); with it, `wait.js` polls the JSON
(ETag/304) and swaps in the HTML part.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, abort, current_app, render_template, request
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from formrules.language.fieldtypes import format_size, is_upload
from formrules.runs.status import etag_for, poll_status, poll_tag, polled_status, record_status
from formrules.store.models import Notification, Record, ResultFile, Run, utcnow
from formrules.web.auth import is_operator
from formrules.web.finished_views import FinishedViews
from formrules.web.state import current_owner_or_none, db, discard_db, reading, rules

bp = Blueprint("records", __name__)


def _record(token: str) -> Record:
    """The record behind `token`, if this browser owns it (or is an operator's)."""
    if len(token) > 64:
        abort(404)
    record = db().scalar(select(Record).where(Record.token == token))
    if record is None or record.delete_requested:
        abort(404)
    # A record submitted through the API has no browser owner: its page is a link the API
    # client may hand to a person (`page_url`), so the unguessable token is the key there.
    shared = record.owner.startswith("api:")
    if record.owner != current_owner_or_none() and not shared and not is_operator():
        abort(404)  # not 403: whether someone else's record exists is not ours to say
    return record


def _page_context(token: str) -> dict:
    record = _record(token)
    form = rules().form(record.form_id)
    status = record_status(db(), record, form)
    if status["done"] and record.owner == current_owner_or_none():
        _mark_seen(record)
    is_owner = current_owner_or_none() == record.owner
    return {"record": record, "form": form, "status": status, "is_owner": is_owner,
            "uploads": _uploads(record, form) if is_owner or is_operator() else []}


def _uploads(record: Record, form) -> list[dict]:
    """The files uploaded with the record, for its owner's page (with download links)."""
    labels = {f.name: f.label for f in form.fields} if form is not None else {}
    return [{"field": name, "label": labels.get(name, name), "name": value["name"],
             "size": format_size(int(value.get("size") or 0))}
            for name, value in (record.data or {}).items() if is_upload(value)]


def _mark_seen(record: Record) -> None:
    """The owner is looking at the result: its "finished" notices are read."""
    seen = db().execute(update(Notification).where(
        Notification.owner == record.owner, Notification.record_token == record.token,
        Notification.read_at.is_(None)).values(read_at=utcnow())).rowcount
    if seen:
        db().commit()


@bp.get("/r/<token>")
def wait(token: str):
    """The page that refreshes until the awaited work is done (meta refresh, or JS)."""
    return render_template("records/wait.html", **_page_context(token))


@bp.get("/r/<token>/part")
def part(token: str):
    """The status part of the waiting page alone: the markup JS swaps in."""
    response = Response(render_template("records/_status.html", **_page_context(token)))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/r/<token>/status")
def status_json(token: str):
    """`{"state", "done", "progress", "runs", …}`; 304 when nothing changed (ETag).

    Polled every second or two by every open waiting page: a revalidation reads the
    change tag alone first (`poll_tag`: one statement, and all an unchanged poll costs);
    a poll without an ETag reads the tag and the view in one statement (`poll_status`),
    or, for finished work already answered, the tag alone (`finished_views`).
    The JSON is serialised once.
    """
    if len(token) > 64:
        abort(404)
    revalidating = bool(request.if_none_match)
    views = _finished_views()
    # The login check may have read through the request's session: its connection goes
    # back to the pool first, so a poll never holds two.
    discard_db()
    with reading() as conn, Session(bind=conn) as s:  # the session only if a view is read
        found = poll_tag(conn, token) if revalidating or views.known(token) \
            else poll_status(s, token)
        if found is None:
            abort(404)
        if found.owner != current_owner_or_none() and not found.owner.startswith("api:") \
                and not is_operator():
            abort(404)  # as `_record`: whether someone else's record exists is not ours to say
        form = rules().form(found.form_id)
        etag = etag_for(found.tag, form)
        headers = {"ETag": f'"{etag}"', "Cache-Control": "no-cache"}
        if revalidating and request.if_none_match.contains_weak(etag):
            return Response(status=304, headers=headers)
        body = views.get(token, etag, form)
        if body is None:
            view = polled_status(s, found, form)
            body = json.dumps(view, default=str)
            views.keep(token, etag, form, view, body)
    return Response(body, mimetype="application/json", headers=headers)


def _finished_views() -> FinishedViews:
    views = current_app.extensions.get("formrules.finished_views")
    if views is None:
        views = current_app.extensions["formrules.finished_views"] = FinishedViews()
    return views


@bp.get("/files/<file_id>")
def download(file_id: str):
    """A result file, for its owner only (anyone else gets 404, not 403)."""
    me = current_owner_or_none()
    found = db().get(ResultFile, file_id) if len(file_id) <= 32 else None
    if found is None or me is None or found.owner != me:
        abort(404)
    run = db().get(Run, found.run_id)
    if run is None or run.hidden:
        abort(404)
    return file_response(found)


def file_response(found: ResultFile) -> Response:
    """A result file as a download that browsers never render in place."""
    return Response(found.data, mimetype=found.content_type.split(";")[0], headers={
        "Content-Disposition": f'attachment; filename="{_safe_name(found.filename)}"',
        "X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"})


def _safe_name(name: str) -> str:
    return "".join(c for c in name if c.isalnum() or c in "._- ")[:200] or "result"
