"""The OpenAPI 3.1 document of the JSON API, built from the loaded forms."""

from __future__ import annotations

from typing import Any

from formrules.language.fieldtypes import field_type
from formrules.language.tree import FieldDef, Form, RuleSet

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def field_schema(fd: FieldDef) -> dict[str, Any]:
    """A field's JSON Schema, as the API accepts it."""
    schema = field_type(fd.type).json_schema(fd)
    schema["title"] = fd.label
    if fd.help:
        schema["description"] = fd.help
    if fd.default is not None:
        schema["default"] = fd.default
    return schema


def form_schema(form: Form, *, partial: bool, multipart: bool = False) -> dict[str, Any]:
    """The request body of a form's POST (or, `partial`, of a PATCH of its records).

    Files travel only in a multipart POST: the JSON bodies leave file fields out.
    """
    visible = [f for f in form.fields if not f.hidden
               and (multipart or not field_type(f.type).upload)]
    schema: dict[str, Any] = {
        "type": "object", "title": form.title, "additionalProperties": False,
        "properties": {f.name: field_schema(f) for f in visible},
    }
    if not partial:
        schema["properties"]["callback_url"] = {
            "type": "string", "format": "uri", "maxLength": 2000,
            "description": "Called (POST, signed JSON) when the record's awaited work ends: "
                           "https, or a host on FORMRULES_HTTP_ALLOW; see docs/api.md."}
    required = [f.name for f in visible if f.required and not partial]
    if required:
        schema["required"] = required
    return schema


SHARED: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "message"], "properties": {
        "error": {"type": "string"}, "message": {"type": "string"}}},
    "Invalid": {"type": "object", "required": ["error", "message", "fields"], "properties": {
        "error": {"const": "invalid"}, "message": {"type": "string"},
        "fields": {"type": "object", "description": "Field name to its messages.",
                   "additionalProperties": {"type": "array", "items": {"type": "string"}}}}},
    "Run": {"type": "object", "properties": {
        "id": {"type": "string"}, "title": {"type": "string"},
        "status": {"enum": ["scheduled", "queued", "running", "retrying", "done", "dead",
                            "cancelled", "skipped", "waiting"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "awaited": {"type": "boolean", "description": "The record's page waits for it."},
        "can_continue": {"type": "boolean",
                         "description": "Awaited, but may be left to finish in the background."},
        "message": {"type": "string"}, "due_at": {"type": ["string", "null"]},
        "waiting_for": {"const": "slot", "description": "Due, but its node's `concurrency:` "
                        "is reached: it starts when a slot frees (label: Waiting for a "
                        "slot)."},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "updated_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "eta_seconds": {"type": ["integer", "null"], "minimum": 0,
                        "description": "Estimated seconds left while running, from the "
                                       "rate progress moved since it started; null before "
                                       "progress moves."},
        "user_retry": {"type": "boolean",
                       "description": "Failed, and its owner may try it again."},
        "error": {"type": "string", "description": "Safe to show to people."},
        "error_step": {"type": ["string", "null"],
                       "description": "The action of the step that failed."}}},
    "Deleting": {"type": "object", "required": ["token", "state"], "properties": {
        "token": {"type": "string"}, "state": {"const": "deleting"},
        "message": {"type": "string"}}},
    "Record": {"type": "object", "required": ["token", "form", "status_url", "state"],
               "properties": {
                   "token": {"type": "string"}, "form": {"type": "string"},
                   "status_url": {"type": "string", "format": "uri"},
                   "page_url": {"type": "string", "format": "uri"},
                   "state": {"enum": ["working", "done", "failed", "cancelled", "expired"],
                             "description": "expired: the form's retention removed its "
                                            "Runs; the fields stay."},
                   "paused": {"type": "boolean",
                              "description": "Working, but an operator paused the form."},
                   "done": {"type": "boolean"}, "failed": {"type": "boolean"},
                   "progress": {"type": "integer"},
                   "started_at": {"type": ["string", "null"], "format": "date-time",
                                  "description": "When the first awaited Run started."},
                   "updated_at": {"type": ["string", "null"], "format": "date-time",
                                  "description": "The last change to the record or "
                                                 "its work."},
                   "eta_seconds": {"type": ["integer", "null"], "minimum": 0,
                                   "description": "Estimated seconds left while working, "
                                                  "from the overall progress rate; null "
                                                  "before progress moves."},
                   "record": {"type": "object", "description": "Every field's value."},
                   "runs": {"type": "array", "items": _ref("Run")},
                   "other_runs": {"type": "array", "items": _ref("Run")},
                   "message": {"type": ["string", "null"]},
                   "changed": {"type": "array", "items": {"type": "string"},
                               "description": "PATCH only: the fields that changed."}}},
}


def _responses(*codes: int) -> dict[str, Any]:
    known = {
        200: ("The record.", _ref("Record")),
        201: ("Created; poll `status_url` until `done`.", _ref("Record")),
        400: ("The body is not a JSON object (or the Idempotency-Key is too long).",
              _ref("Error")),
        401: ("No valid API token.", _ref("Error")),
        404: ("No such form or record.", _ref("Error")),
        422: ("Some fields are not valid, or the Idempotency-Key was used with another "
              "body.", {"anyOf": [_ref("Invalid"), _ref("Error")]}),
        413: ("A file is larger than its field's `max_size`; see 'fields'.", _ref("Invalid")),
        429: ("Too many requests with a wrong token from this client.", _ref("Error")),
        500: ("A rule's action failed; nothing was stored.", _ref("Error")),
    }
    return {str(c): {"description": known[c][0], "content": _content(known[c][1])}
            for c in codes}


def document(ruleset: RuleSet, server: str) -> dict[str, Any]:
    """The whole document: one POST path per form, the record paths, shared schemas."""
    schemas = dict(SHARED)
    paths: dict[str, Any] = {}
    forms = sorted(ruleset.forms.values(), key=lambda f: f.id)
    for form in forms:
        schemas[f"{form.id}.input"] = form_schema(form, partial=False)
        schemas[f"{form.id}.patch"] = form_schema(form, partial=True)
        content = _content(_ref(f"{form.id}.input"))
        codes = [200, 201, 400, 401, 404, 422, 429, 500]
        if any(field_type(f.type).upload for f in form.fields if not f.hidden):
            codes.insert(6, 413)
            schemas[f"{form.id}.multipart"] = form_schema(form, partial=False, multipart=True)
            content["multipart/form-data"] = {"schema": _ref(f"{form.id}.multipart")}
        paths[f"/api/forms/{form.id}"] = {"post": {
            "operationId": f"submit_{form.id.replace('-', '_')}",
            "summary": f"Submit “{form.title}”",
            "description": form.description or form.title,
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1,
                                       "maxLength": 200},
                            "description": "Repeating a key (per token and form) answers "
                                           "200 with the record the first request "
                                           "created; the same key with a different body "
                                           "answers 422."}],
            "requestBody": {"required": True, "content": content},
            "responses": _responses(*codes)}}
    token = [{"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}]
    patch_body = {"anyOf": [_ref(f"{f.id}.patch") for f in forms]} if forms \
        else {"type": "object"}
    paths["/api/records/{token}"] = {
        "get": {"operationId": "get_record", "summary": "A record and its work",
                "parameters": token, "responses": _responses(200, 401, 404)},
        "patch": {"operationId": "update_record",
                  "summary": "Change fields; the form's update events run",
                  "parameters": token,
                  "requestBody": {"required": True, "content": _content(patch_body)},
                  "responses": _responses(200, 400, 401, 404, 422, 500)},
        "delete": {"operationId": "delete_record",
                   "summary": "Delete a record; work still running is cancelled first",
                   "parameters": token,
                   "responses": {
                       "204": {"description": "Deleted, with its work and files."},
                       "202": {"description": "Its running work is stopping; the record "
                                              "is deleted once it has (404 from now on).",
                               "content": _content(_ref("Deleting"))},
                       **_responses(401, 404)}},
    }
    paths["/api/records/{token}/files/{name}"] = {"get": {
        "operationId": "get_upload",
        "summary": "A file uploaded with the record (`name` is its field)",
        "parameters": [*token, {"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file, as an attachment.",
                              "content": {"application/octet-stream": {}}},
                      **_responses(401, 404)}}}
    paths["/api/files/{file_id}"] = {"get": {
        "operationId": "get_file", "summary": "Download a result file listed in a Run's files",
        "parameters": [{"name": "file_id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file",
                              "content": {"application/octet-stream": {
                                  "schema": {"type": "string", "format": "binary"}}}},
                      **_responses(401, 404)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "formrules API", "version": "1",
                 "description": "Submit forms, read and update records. Create a token "
                                "with `formrules tokens add NAME`."},
        "servers": [{"url": server}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
