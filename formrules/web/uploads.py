"""Uploads on the web side: the request size a form with files may send, a too-large
upload as a field message (not an error page), and downloads for the record's owner.

The files themselves are kept by `formrules.store.uploads`; what a file field accepts is
the field type's (`formrules.language.fieldtypes.FileType`).
"""

from __future__ import annotations

import secrets

from flask import Blueprint, Flask, Response, abort, jsonify, render_template, request, send_file
from sqlalchemy import select

from formrules.language.fieldtypes import field_type, format_size, is_upload
from formrules.language.tree import FieldDef, Form
from formrules.store import uploads
from formrules.store.models import Record
from formrules.web.auth import is_operator
from formrules.web.formbuilder import form_class
from formrules.web.state import current_owner_or_none, db, rt, rules

bp = Blueprint("uploads", __name__)
SUBMIT_ENDPOINTS = ("forms.show", "api.create")
PART_OVERHEAD = 64 * 1024  # multipart headers and boundaries around each file


def file_fields(form: Form) -> list[FieldDef]:
    """The fields of `form` a user uploads a file into."""
    return [fd for fd in form.fields if not fd.hidden and field_type(fd.type).upload]


def _submitted_form() -> Form | None:
    if request.endpoint not in SUBMIT_ENDPOINTS or not request.view_args:
        return None
    return rules().form(request.view_args.get("form_id", ""))


def install(app: Flask) -> None:
    """Size limits per form and the 413 answer. Call before CSRF is set up: its check
    reads the body, so the limit must be in place first."""
    base = app.config["MAX_CONTENT_LENGTH"]

    @app.before_request
    def room_for_files():
        # The app's limit fits every field but files; a form with files gets room for
        # each one's `max_size` (a larger body is refused before it is read: 413).
        form = _submitted_form()
        files = file_fields(form) if form is not None else []
        if files:
            request.max_content_length = base + sum(fd.max_size + PART_OVERHEAD
                                                    for fd in files)

    @app.errorhandler(413)
    def too_large(exc):
        form = _submitted_form()
        files = file_fields(form) if form is not None else []
        messages = {fd.name: [f"The file is too large: at most {format_size(fd.max_size)}."]
                    for fd in files}
        if request.endpoint == "api.create" and files:
            response = jsonify({"error": "invalid", "fields": messages,
                                "message": "The upload is too large; see 'fields'."})
            return response, 413
        if request.endpoint == "forms.show" and files:
            # The body was refused unread: the form comes back empty, the reason beside
            # each file field.
            wtf = form_class(form)(formdata=None)
            wtf.submit_key.data = secrets.token_urlsafe(24)
            for name, message in messages.items():
                getattr(wtf, name).errors = list(message)
            return render_template("forms/form.html", form=form, wtf=wtf), 413
        return render_template("error.html", title="Too large",
                               message="What you sent is too large."), 413


def upload_response(record: Record, name: str) -> Response:
    """An uploaded file of `record` as a download browsers never render in place."""
    meta = record.data.get(name)
    if not is_upload(meta):
        abort(404)
    path = uploads.path_of(rt().settings, meta)
    if not path.is_file():
        abort(404)
    response = send_file(path, mimetype=meta.get("type") or "application/octet-stream",
                         as_attachment=True, download_name=meta.get("name") or "upload",
                         max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "private, no-store"
    return response


@bp.get("/r/<token>/files/<name>")
def download(token: str, name: str):
    """An uploaded file, for the record's owner and operators only (others: 404)."""
    record = db().scalar(select(Record).where(Record.token == token)) \
        if len(token) <= 64 else None
    me = current_owner_or_none()
    if record is None or not (is_operator() or (me is not None and record.owner == me)):
        abort(404)  # a shared page link (API records) does not share the uploads
    return upload_response(record, name)
