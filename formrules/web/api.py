"""The JSON API for machine clients (described at /api/openapi.json).

    POST  /api/forms/<form_id>    201 {token, status_url, …}; 422 with field messages
    GET   /api/records/<token>    the record, its state and its Runs
    PATCH /api/records/<token>    change fields: update events and Delay policies follow
    DELETE /api/records/<token>   delete it; work still running is cancelled first

Same validation (the form's WTForms class) and the same events as the HTML form. Every
call but the document needs `Authorization: Bearer <token>` (`formrules tokens add NAME`);
CSRF does not apply: no cookie authenticates these requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from flask import Blueprint, g, jsonify, request, url_for
from sqlalchemy import select
from werkzeug.datastructures import CombinedMultiDict, MultiDict

from formrules.errors import ActionError
from formrules.language.fieldtypes import field_type, is_upload
from formrules.language.tree import Form
from formrules.runs import callbacks, control, submit, updates
from formrules.runs.status import record_status
from formrules.store import tokens, uploads
from formrules.store.models import Record, ResultFile, Run
from formrules.web import csrf, openapi
from formrules.web.formbuilder import form_class, record_values
from formrules.web.records import file_response
from formrules.web.state import db, rt, rules
from formrules.web.uploads import upload_response

bp = Blueprint("api", __name__, url_prefix="/api")
csrf.exempt(bp)
log = logging.getLogger("formrules.api")


def error(status: int, code: str, message: str, **extra: Any):
    """A JSON error body: `{"error": code, "message": …}` plus details."""
    response = jsonify({"error": code, "message": message, **extra})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="formrules"'
    return response


@bp.before_request
def authenticate():
    """Every endpoint but the OpenAPI document needs a valid API token."""
    if request.endpoint == "api.document":
        return None
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    found = tokens.lookup(db(), value.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        return error(401, "unauthorized", "Send 'Authorization: Bearer <token>' with a token "
                                          "from 'formrules tokens add NAME'.")
    db().commit()  # last_used_at
    g.api_token = found
    return None


IDEMPOTENCY_KEY_MAX = 200  # characters, as the OpenAPI document says


def _json_object():
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser's stack: not a form's values
        return None
    return body if isinstance(body, dict) else None


def _formdata(form: Form, values: dict[str, Any]) -> tuple[MultiDict, dict[str, list[str]]]:
    """JSON values as the form post WTForms validates; type mistakes as field messages."""
    data, errors = MultiDict(), {}
    for name, value in values.items():
        fd = form.field(name)
        if fd is None:
            errors[name] = ["There is no such field."]
        elif fd.hidden:
            errors[name] = ["This field is set by the form's rules, not by clients."]
        elif isinstance(value, dict | list):
            errors[name] = ["Expected a single value."]
        else:
            try:
                posted = field_type(fd.type).from_json(value)
            except ValueError as exc:
                errors[name] = [str(exc)]
                continue
            if posted is not None:  # None: empty, and `required` decides about that
                data.add(name, posted)
    return data, errors


def _validate(form: Form, values: dict[str, Any]):
    """The form's own WTForms class over `values`: (wtf, field errors)."""
    data, errors = _formdata(form, values)
    wtf = form_class(form)(formdata=data, meta={"csrf": False})
    if not wtf.validate():
        for name, messages in wtf.errors.items():
            errors.setdefault(name, list(messages))  # a type mistake already says it best
    return wtf, errors


def _validate_multipart(form: Form):
    """A multipart body (files, and other fields as an HTML form posts them) through the
    form's WTForms class: (wtf, field errors)."""
    errors: dict[str, list[str]] = {}
    for name in {*request.form, *request.files} - {"callback_url"}:  # that one is the API's
        fd = form.field(name)
        if fd is None:
            errors[name] = ["There is no such field."]
        elif fd.hidden:
            errors[name] = ["This field is set by the form's rules, not by clients."]
    formdata = CombinedMultiDict([request.files, request.form])
    wtf = form_class(form)(formdata=formdata, meta={"csrf": False})
    if not wtf.validate():
        for name, messages in wtf.errors.items():
            errors.setdefault(name, list(messages))
    return wtf, errors


def _invalid(errors: dict[str, list[str]]):
    return error(422, "invalid", "Some fields are not valid; see 'fields'.", fields=errors)


def _body(record: Record, form: Form | None) -> dict[str, Any]:
    return {
        "token": record.token,
        "form": record.form_id,
        "status_url": url_for("api.record", token=record.token, _external=True),
        "page_url": url_for("records.wait", token=record.token, _external=True),
        "created_at": record.created_at.isoformat(timespec="seconds"),
        "updated_at": record.updated_at.isoformat(timespec="seconds"),
        **record_status(db(), record, form),
    }


def _idempotency_key(form: Form) -> str | None:
    """The stored submit key: the client's key scoped to its token and this form, hashed
    to fit, so neither two clients' keys nor one client's keys for two forms ever meet."""
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key:
        return None
    scoped = json.dumps([g.api_token.id, form.id, key])
    return "api-" + hashlib.sha256(scoped.encode()).hexdigest()[:48]


def _fingerprint(values: dict[str, Any]) -> str:
    """What a submission asked for, to tell a repeat from another body with the same key."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _repeat(existing: Record, form: Form, fingerprint: str):
    """The answer to a key seen before: the first record, or 422 if the body differs."""
    if existing.submit_fingerprint not in (None, fingerprint):
        return error(422, "idempotency_key_reused",
                     "This Idempotency-Key was already used with a different body. Use a "
                     "new key for a new submission.")
    return jsonify(_body(existing, form)), 200


@bp.post("/forms/<form_id>")
def create(form_id: str):
    """Submit a form: validate, store, run the submit tree; 201 with the record's token."""
    form = rules().form(form_id)
    if form is None:
        return error(404, "not_found", f"There is no form '{form_id}'.")
    if len(request.headers.get("Idempotency-Key", "").strip()) > IDEMPOTENCY_KEY_MAX:
        return error(400, "bad_request",
                     f"An Idempotency-Key is at most {IDEMPOTENCY_KEY_MAX} characters.")
    if request.mimetype == "multipart/form-data":  # a form with files (docs/api.md)
        callback_url = request.form.get("callback_url")
        wtf, errors = _validate_multipart(form)
    else:
        values = _json_object()
        if values is None:
            return error(400, "bad_request", "Send a JSON object of field values.")
        callback_url = values.pop("callback_url", None)
        wtf, errors = _validate(form, values)
    if callback_url is not None:
        problem = "Callbacks are not enabled on this server." \
            if not rt().settings.callback_secret else \
            callbacks.check_url(callback_url, rt().settings.http_allow)
        if problem:
            errors = {**errors, "callback_url": [problem]}
    if errors:
        return _invalid(errors)
    settings = rt().settings
    stored = record_values(form, wtf, settings=settings)
    # An upload's storage key is new each time: a repeat is recognised by its content.
    fingerprint = _fingerprint({k: {"name": v["name"], "size": v["size"]} if is_upload(v)
                                else v for k, v in stored.items()})
    try:
        done = submit.accept(db(), form, stored, owner=f"api:{g.api_token.name}",
                             settings=settings, submit_key=_idempotency_key(form),
                             fingerprint=fingerprint, callback_url=callback_url)
    except ActionError as exc:
        uploads.remove(settings, uploads.in_data(stored))
        log.warning("api: form %s: submit failed: %s", form.id, exc)
        return error(500, "action_failed", exc.safe_message)
    except Exception:  # nothing was stored: neither are its files
        uploads.remove(settings, uploads.in_data(stored))
        raise
    if done.duplicate:  # the same request again: same record (or 422 if the body differs)
        uploads.remove(settings, uploads.in_data(stored))
        return _repeat(done.record, form, fingerprint)
    submit.dispatch(rt().dispatcher, done)
    body = _body(done.record, form)
    return jsonify(body), 201, {"Location": body["status_url"]}


def _record(token: str) -> Record | None:
    if len(token) > 64:
        return None
    # One being deleted (its work stopping) is gone already as far as clients can tell.
    return db().scalar(select(Record).where(Record.token == token,
                                            Record.delete_requested.is_(False)))


def _own_record(token: str) -> Record | None:
    """A record this API token submitted: only its submitter changes or deletes it (a
    record token read elsewhere, e.g. from a person's page link, grants no more)."""
    found = _record(token)
    return found if found is not None and found.owner == f"api:{g.api_token.name}" else None


@bp.get("/records/<token>")
def record(token: str):
    """A record: its fields, state (working, done, failed, cancelled) and Runs."""
    found = _record(token)
    if found is None:
        return error(404, "not_found", "There is no record with this token.")
    return jsonify(_body(found, rules().form(found.form_id)))


@bp.patch("/records/<token>")
def patch(token: str):
    """Change some fields; the form's update events and Delay policies follow."""
    found = _own_record(token)
    if found is None:
        return error(404, "not_found", "There is no record with this token.")
    form = rules().form(found.form_id)
    if form is None:
        return error(409, "form_gone", f"The form '{found.form_id}' is no longer served.")
    values = _json_object()
    if values is None:
        return error(400, "bad_request", "Send a JSON object of the fields to change.")
    current = {f.name: found.data.get(f.name) for f in form.fields if not f.hidden}
    wtf, errors = _validate(form, {**current, **values})
    errors = {k: v for k, v in errors.items() if k in values or k not in current}
    if errors:
        return _invalid(errors)
    changes = {name: getattr(wtf, name).data for name in values}
    try:
        edit = updates.apply_edit(db(), form, found.id, changes, settings=rt().settings,
                                  who=f"API client {g.api_token.name}")
        db().commit()
    except updates.InvalidValues as exc:
        db().rollback()
        return _invalid(exc.errors)
    except ActionError as exc:
        db().rollback()
        log.warning("api: record %s: update failed: %s", found.id, exc)
        return error(500, "action_failed", exc.safe_message)
    updates.after_edit(rt().dispatcher, edit)
    body = _body(edit.record, form)
    body["changed"] = sorted(edit.changed)
    return jsonify(body)


@bp.get("/records/<token>/files/<name>")
def upload(token: str, name: str):
    """A file uploaded with a record, for the API client that submitted it."""
    found = _own_record(token)
    if found is None:
        return error(404, "not_found", "There is no such file.")
    return upload_response(found, name)


@bp.delete("/records/<token>")
def remove(token: str):
    """Delete a record with its work and files. Work not started is cancelled; a step
    running now is asked to stop and the record goes once it has (202), else at once
    (204). Either way it answers 404 from now on; no step writes to it any more."""
    found = _own_record(token)
    if found is None:
        return error(404, "not_found", "There is no record with this token.")
    runs, files = control.delete_record(db(), found, f"API client {g.api_token.name}")
    db().commit()
    uploads.remove(rt().settings, files)
    for run in runs:
        if run.status == "cancelled":
            control.after_commit(rt().dispatcher, run)
    db().expire_all()
    if db().scalar(select(Record.id).where(Record.token == token)) is None:
        return "", 204
    return jsonify({"token": token, "state": "deleting",
                    "message": "Work in progress is stopping; the record is deleted as "
                               "soon as it has stopped."}), 202


@bp.get("/files/<file_id>")
def file(file_id: str):
    """A result file of a Run (ids come from a record's `runs[].files`)."""
    found = db().get(ResultFile, file_id) if len(file_id) <= 32 else None
    run = db().get(Run, found.run_id) if found is not None else None
    record = db().get(Record, run.record_id) if run is not None and run.record_id else None
    # Only files the API lists: those of a record's own Runs (not an operator's batch
    # exports or a schedule's reports, which are for operators).
    if record is None or run.owner != record.owner or run.hidden:
        return error(404, "not_found", "There is no file with this id.")
    return file_response(found)


@bp.get("/openapi.json")
def document():
    """This API as an OpenAPI 3.1 document, with a request schema per form."""
    return jsonify(openapi.document(rules(), request.host_url.rstrip("/")))
