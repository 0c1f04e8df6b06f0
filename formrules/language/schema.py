"""A JSON Schema for rule files, built from the tables the checker itself uses.

Editors (VS Code's YAML extension, any yaml-language-server client) validate and complete
rule files with it. Every key list comes from the loader's and checker's tables
(`FORM_KEYS`, `FIELD_KEYS`, `DEFER_KEYS`, ...) and every action from the action registry,
so the schema cannot drift from the checker: a key added to a table without a value
schema here raises `KeyError` when the schema is built (and the test that builds it fails).

The schema catches structure (unknown keys, node kinds, action names and arguments, value
types, enums). What needs the whole form (templates, field names in expressions, cron
strings, time zones) is left to `formrules check` and `formrules lsp`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from formrules.actions import registry as actions
from formrules.language import duration, retention
from formrules.language.checker import (
    AWAIT_VALUES,
    CALL_KEYS,
    DEFER_KEYS,
    IF_KEYS,
    INPUT_KEYS,
    ON_CHANGE_VALUES,
    PROGRESS_KEYS,
    RETRY_KEYS,
    TREE_KEYS,
    TRY_KEYS,
)
from formrules.language.loader import (
    BATCH_KEYS,
    CATCH_UP_VALUES,
    EVENTS,
    FIELD_KEYS,
    FORM_ID,
    FORM_KEYS,
    NAME,
    OLD_BATCHES_KEY,
    SCHEDULE_KEYS,
)
from formrules.language.tree import FIELD_TYPES, INPUT_TYPES, QUEUE_NAME, STARTERS

DIALECT = "http://json-schema.org/draft-07/schema#"  # what yaml-language-server reads best
COMMITTED = "docs/formrules.schema.json"  # built-in actions only; see `formrules schema`

TEXT = {"type": ["string", "number"]}
EXPRESSION = {"type": ["string", "number", "boolean"]}
NODES = {"$ref": "#/definitions/nodes"}


def _plain_regex(pattern: str) -> str:
    """A Python regex as one both Python and ECMA 262 read: no named groups."""
    return re.sub(r"\(\?P<\w+>", "(?:", pattern)


def _duration() -> dict:
    iso = _plain_regex(duration._ISO.pattern)
    return {"description": "A duration: now, 30s, 10m, 2h, 3d, 1w, 1h30m or ISO 8601 (PT10M)",
            "anyOf": [{"type": "number", "minimum": 0},
                      {"type": "string", "pattern": r"^\s*now\s*$"},
                      {"type": "string", "pattern": duration._SHORT.pattern},
                      {"type": "string", "pattern": iso},
                      {"type": "string", "pattern": iso.lower()}]}  # read case-blind


def _form_object(values: dict[str, Any]) -> dict:
    """The top level: FORM_KEYS, and the old name of `batches:`, still read (deprecated)."""
    out = _object(FORM_KEYS, values, required=("form",))
    out["properties"][OLD_BATCHES_KEY] = {
        **out["properties"]["batches"], "deprecated": True,
        "description": "The old name of `batches:`; rename it (`formrules check` warns)"}
    return out


def _object(keys, values: dict[str, Any], required=(), description: str = "") -> dict:
    """An object with exactly `keys` (from a checker table), each valued from `values`."""
    out: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "properties": {key: values[key] for key in keys}}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


RUN_VALUES: dict[str, Any] = {
    "title": {**TEXT, "description": "What the Run is called (a template)"},
    "flag": {"type": "string", "description": "A boolean field set true when the Run is done"},
    "await": {"enum": list(AWAIT_VALUES),
              "description": "Whether the submitter's page waits for this node"},
    "timeout": {"$ref": "#/definitions/duration"},
    "retry": {"$ref": "#/definitions/retry"},
    "do": NODES,
    "on_error": NODES,
    "inline_for": {"$ref": "#/definitions/duration"},
    "for": {"$ref": "#/definitions/duration"},
    "at": {**EXPRESSION, "description": "When to run: now, or an expression giving a time"},
    "on_change": {"enum": list(ON_CHANGE_VALUES)},
    "cancel_if": EXPRESSION,
    "when": EXPRESSION,
    "queue": {"type": "string", "pattern": QUEUE_NAME.pattern,
              "description": "The queue (lane) its Runs wait in; workers serve chosen queues"},
    "concurrency": {"type": "integer", "minimum": 1,
                    "description": "At most this many of its Runs at once, across workers"},
    "user_retry": {"type": "boolean",
                   "description": "The owner may retry it once it failed, after its "
                                  "completed steps"},
    "notify": {"description": "Notices to the owner: at start and/or end, by e-mail too",
               "anyOf": [{"type": "boolean", "const": False},
                         {"type": "array", "items": {"enum": ["start", "end"]}},
                         {"type": "object", "additionalProperties": False, "properties": {
                             "events": {"type": "array",
                                        "items": {"enum": ["start", "end"]}},
                             "email": {"anyOf": [{"type": "boolean"}, TEXT]}}}]},
    # batches and schedules
    "stop_on_error": {"type": "boolean"},
    "started_by": {"anyOf": [{"enum": list(STARTERS)},
                             {"type": "array", "minItems": 1,
                              "items": {"enum": list(STARTERS)}}],
                   "description": "Who may start it from the pages: operators (any records), "
                                  "users (their own records, from My tasks)"},
    "name": TEXT,
    "cron": {"type": "string", "description": "A cron string like '0 2 * * *'"},
    "timezone": {"type": "string"},
    "for_each": EXPRESSION,
    "catch_up": {"enum": list(CATCH_UP_VALUES)},
}
BATCHES = {"type": ["object", "null"], "propertyNames": {"pattern": NAME.pattern},
           "additionalProperties": _object(BATCH_KEYS, RUN_VALUES, required=("do",))}

FIELD_VALUES: dict[str, Any] = {
    "name": {"type": "string", "pattern": NAME.pattern},
    "type": {"enum": list(FIELD_TYPES)},
    "label": TEXT,
    "help": TEXT,
    "required": {"type": "boolean"},
    "min": {"type": "number"},
    "max": {"type": "number"},
    "max_length": {"type": "integer", "minimum": 1},
    "choices": {"type": "array", "minItems": 1},
    "max_size": {"anyOf": [{"type": "integer", "minimum": 1}, {
        "type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KkMmGg]?[Bb])?\s*$"}],
                 "description": "Most bytes of a file: 5MB, 500KB or a number"},
    "accept": {"type": "array", "minItems": 1, "items": {"type": "string"},
               "description": "Content types and extensions: [text/csv, .csv, image/*]"},
    "default": {},
    "hidden": {"type": "boolean"},
}

# An action argument's declared kind (`actions.PARAM_KINDS`) as a value schema. Strings
# with a `{` are templates rendered to the number when the action runs.
TEMPLATED = {"type": "string", "pattern": r"\{"}
PARAM_VALUES: dict[str, Any] = {
    "text": TEXT,
    "int": {"anyOf": [{"type": "integer"}, TEMPLATED]},
    "number": {"anyOf": [{"type": "number"}, TEMPLATED]},
    "bool": {"type": "boolean"},
    "mapping": {"type": "object"},
    "list": {"type": "array"},
    "any": {},
    "duration": {"$ref": "#/definitions/duration"},
    "field": {"type": "string", "pattern": NAME.pattern},
    "file": {"anyOf": [{"type": "string", "pattern": NAME.pattern},
                       {"type": "array", "minItems": 1,
                        "items": {"type": "string", "pattern": NAME.pattern}}]},
}


def builtin_actions() -> dict[str, actions.ActionSpec]:
    """The actions formrules itself registers (what the committed schema knows)."""
    return {name: spec for name, spec in actions.registry().items()
            if spec.fn.__module__.split(".")[0] == "formrules"}


def _action(spec: actions.ActionSpec) -> dict:
    """`- <name>: <args>` for one registered action."""
    if spec.params is None:
        args: dict[str, Any] = {}
    else:
        args = {"type": "object", "additionalProperties": False,
                "properties": {k: PARAM_VALUES[p.kind] for k, p in spec.params.items()}}
        required = [k for k, p in spec.params.items() if p.required]
        if required:
            args["required"] = required
        else:  # `- log_something:` with no arguments at all
            args = {"anyOf": [args, {"type": "null"}]}
        if spec.positional:
            args = {"anyOf": [args, PARAM_VALUES[spec.params[spec.positional].kind]]}
    doc = (spec.fn.__doc__ or "").strip().splitlines()
    node = {"type": "object", "additionalProperties": False, "required": [spec.name],
            "properties": {spec.name: args}}
    if doc:
        node["description"] = doc[0]
    return node


def _defer(kind: str) -> dict:
    options = _object(DEFER_KEYS[kind], RUN_VALUES, required=("do",))
    if kind == "delay":
        options["oneOf"] = [{"required": ["for"]}, {"required": ["at"]}]
    what = {"background": "Run the steps under `do:` on a worker, now",
            "delay": "Run the steps under `do:` on a worker, later"}[kind]
    return {"type": "object", "additionalProperties": False, "required": [kind],
            "description": what, "properties": {kind: {**options, "description": what}}}


def rules_schema(registered: dict[str, actions.ActionSpec] | None = None) -> dict:
    """The JSON Schema of one rule file, knowing `registered` actions (default: all loaded)."""
    registered = actions.registry() if registered is None else registered
    node_kinds = [
        _object(IF_KEYS, {"if": EXPRESSION, "then": NODES, "else": NODES},
                required=("if", "then"), description="Take `then:` or `else:` by an expression"),
        _object(TRY_KEYS, {"try": NODES, "catch": NODES,
                           "error_field": {"type": "string", "pattern": NAME.pattern}},
                required=("try",), description="Run `try:`; if a step fails, store its safe "
                "message, run `catch:` and go on"),
        {"type": "object", "additionalProperties": False, "required": ["call"],
         "description": "Run a named tree (`trees:`) here, with inputs",
         "properties": {"call": _object(CALL_KEYS, {
             "tree": {"type": "string", "pattern": NAME.pattern},
             "with": {"type": "object", "propertyNames": {"pattern": NAME.pattern}}},
             required=("tree",))}},
        _defer("background"),
        _defer("delay"),
        {"type": "object", "additionalProperties": False, "required": ["progress"],
         "description": "Report progress from the tree itself",
         "properties": {"progress": _object(PROGRESS_KEYS, {
             "done": EXPRESSION, "total": EXPRESSION, "message": TEXT, "title": TEXT})}},
        *(_action(registered[name]) for name in sorted(registered)),
    ]
    form_values = {
        "form": {"type": "string", "pattern": FORM_ID.pattern,
                 "description": "The form's id; it lives at /forms/<id>"},
        "title": TEXT,
        "description": TEXT,
        "fields": {"type": ["array", "null"], "items": {"$ref": "#/definitions/field"}},
        "events": _object(EVENTS, {event: NODES for event in EVENTS}),
        "after_submit": _object(("message",), {"message": TEXT}),
        "batches": BATCHES,
        "schedules": {"type": ["array", "null"],
                      "items": _object(SCHEDULE_KEYS, RUN_VALUES, required=("cron", "do"))},
        "retention": {"description": "How long finished Runs are kept (then purged): one "
                                     "period for all, or one per status",
                      "anyOf": [{"$ref": "#/definitions/period"},
                                _object(retention.STATUSES, dict.fromkeys(
                                    retention.STATUSES, {"$ref": "#/definitions/period"}))]},
        "trees": {"type": ["object", "null"], "propertyNames": {"pattern": NAME.pattern},
                  "description": "Named trees that `call:` nodes run with inputs",
                  "additionalProperties": _object(TREE_KEYS, {
                      "do": NODES,
                      "inputs": {"type": ["object", "null"],
                                 "propertyNames": {"pattern": NAME.pattern},
                                 "additionalProperties": {"anyOf": [{"type": "null"}, _object(
                                     INPUT_KEYS, {"type": {"enum": list(INPUT_TYPES)},
                                                  "required": {"type": "boolean"},
                                                  "default": {}})]}}},
                      required=("do",))},
    }
    retry = _object(RETRY_KEYS, {
        "attempts": {"type": "integer", "minimum": 1},
        "backoff": {"anyOf": [{"const": "exponential"},
                              {"type": "array", "minItems": 1,
                               "items": {"$ref": "#/definitions/duration"}}]},
        "base": {"$ref": "#/definitions/duration"},
        "max": {"$ref": "#/definitions/duration"},
        "jitter": {"type": "number", "minimum": 0, "maximum": 1},
    })
    retry["if"] = {"not": {"required": ["backoff"], "properties": {
        "backoff": {"const": "exponential"}}}}
    retry["then"] = {"not": {"anyOf": [{"required": ["base"]}, {"required": ["max"]}]},
                     "description": "'base' and 'max' go with 'backoff: exponential'"}
    return {
        "$schema": DIALECT,
        "title": "formrules rule file",
        "description": "One form: its fields and the event trees that run when it is used. "
                       "Generated by `formrules schema`; `formrules check` says more.",
        **_form_object(form_values),
        "definitions": {
            "duration": _duration(),
            "period": {"anyOf": [{"const": retention.FOREVER},
                                 {"$ref": "#/definitions/duration"}]},
            "field": _object(FIELD_KEYS, FIELD_VALUES, required=("name",)),
            "nodes": {"type": ["array", "null"], "items": {"$ref": "#/definitions/node"}},
            "node": {"anyOf": node_kinds},
            "retry": {"anyOf": [{"const": False}, {"const": 0}, retry]},
        },
    }


def schema_text(registered: dict[str, actions.ActionSpec] | None = None) -> str:
    """The schema as the committed file holds it (stable key order, a final newline)."""
    return json.dumps(rules_schema(registered), indent=2, ensure_ascii=False) + "\n"
