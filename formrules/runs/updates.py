"""Editing a record: checked field changes, the update tree, and the Delay policies.

    apply_edit(s, form, record_id, values)     in the caller's transaction
      lock the record ── coerce values by field type ── write what changed
      run events.update inline (`record`, `old`, `changed`); new deferred nodes become Runs
      the record's Delays that have not fired yet:
        cancel_if true              ── cancelled, the reason in the Run's trace
        on_change: recompute (at:)  ── due_at follows the fields it names
    after_edit(dispatcher, edit)               after commit: RQ follows the database

Used by the operator's edit page and the JSON API; nothing here imports Flask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session

from formrules.errors import InvalidValues, PermanentError, RuleError
from formrules.language import sandbox
from formrules.language.fieldtypes import field_type
from formrules.language.tree import DeferNode, Form
from formrules.language.values import to_storage, typed, typed_record
from formrules.language.variables import form_title_of, template_variables
from formrules.runs import engine, lifecycle
from formrules.runs.queue import Dispatcher
from formrules.runs.snapshot import Snapshot
from formrules.store.db import lock_record
from formrules.store.models import NOT_FIRED, EventKind, Record, Run, utcnow

log = logging.getLogger("formrules.runs.updates")


@dataclass
class Edit:
    """What an edit did, for the caller's message and for `after_edit`."""

    record: Record
    changed: dict[str, Any] = field(default_factory=dict)  # field -> new stored value
    edited: tuple[str, ...] = ()  # the fields the person (or client) changed
    new_runs: list[Run] = field(default_factory=list)  # started by the update tree
    moved: list[Run] = field(default_factory=list)  # Delays whose due time moved
    stopped: list[Run] = field(default_factory=list)  # Delays cancelled or skipped


def coerce(form: Form, values: dict[str, Any]) -> dict[str, Any]:
    """Values in their stored form, checked against each field's declaration."""
    errors: dict[str, list[str]] = {}
    out: dict[str, Any] = {}
    for name, value in values.items():
        fd = form.field(name)
        if fd is None:
            errors[name] = ["There is no such field."]
            continue
        try:
            stored = to_storage(value, fd.type)
        except (TypeError, ValueError):
            errors[name] = [f"Not a valid {fd.type} value."]
            continue
        problem = field_type(fd.type).problem(fd, stored)
        if problem:
            errors[name] = [problem]
        out[name] = stored
    if errors:
        raise InvalidValues(errors)
    return out


def apply_edit(s: Session, form: Form, record_id: int, values: dict[str, Any], *,
               settings, who: str = "an operator") -> Edit:
    """Change a record's fields and run what an edit triggers, in `s`'s transaction."""
    record = lock_record(s, record_id)  # first: a worker's field write waits for us
    if record.form_id != form.id:
        raise ValueError(f"record {record_id} belongs to form {record.form_id}, not {form.id}")
    values = coerce(form, values)
    old = dict(record.data)
    changes = {k: v for k, v in values.items() if old.get(k) != v}
    edit = Edit(record, edited=tuple(sorted(changes)))
    if not changes:
        return edit  # saving an unchanged form is not an update event
    record.data = {**old, **changes}
    edit.new_runs = engine.run_inline(s, form, record, form.events.get("update", ()),
                                      settings=settings,
                                      inputs={"old": old, "changed": changes})
    # Fields the update tree set are changes too: a Delay may follow them as well.
    edit.changed = {k: v for k, v in record.data.items() if old.get(k) != v}
    apply_policies(s, record, old, edit, settings=settings, who=who)
    return edit


def apply_policies(s: Session, record: Record, old: dict[str, Any], edit: Edit, *,
                   settings, who: str) -> None:
    """cancel_if and on_change for the record's Delays that have not fired yet."""
    fresh = {r.id for r in edit.new_runs}
    delays = [r for r in s.scalars(
        select(Run).where(Run.record_id == record.id, Run.kind == "delay",
                          Run.status.in_(sorted(NOT_FIRED)), Run.attempt == 0,
                          Run.cancel_requested.is_(False)).order_by(Run.created_at))
        if r.id not in fresh]
    now = utcnow()
    stamp = now.strftime("%Y-%m-%d %H:%M:%S UTC")
    names = ", ".join(edit.edited)
    for run in delays:
        snapshot = Snapshot.load(run.snapshot)
        try:
            node = snapshot.node(run.node_path)
        except RuleError as exc:  # a snapshot from an incompatible version: leave it be
            log.warning("run %s: cannot rebuild its node: %s", run.id, exc)
            continue
        types = snapshot.fields
        variables = template_variables(
            form_id=run.form_id, form_title=form_title_of(run), field_types=types,
            data=record.data, old=typed_record(old, types),
            changed={k: typed(v, types.get(k, "string")) for k, v in edit.changed.items()},
            # A Delay written in a named tree may name its call's `inputs.` here too.
            **{k: v for k, v in snapshot.variables().items() if k == "inputs"})
        if node.cancel_if and _matches(s, run, node, variables):
            reason = (f"cancelled: {names} changed at {stamp} ({who}); "
                      f"cancel_if {node.cancel_if!r} is true")
            if lifecycle.edit_stop(s, run, skipped=False, reason=reason, now=now):
                edit.stopped.append(run)
        elif node.on_change == "recompute" and node.at and (followed := _followed(node, edit)):
            _recompute(s, run, node, variables, edit, now=now, stamp=stamp,
                       names=", ".join(followed), settings=settings)


def _matches(s: Session, run: Run, node: DeferNode, variables: dict[str, Any]) -> bool:
    try:
        return bool(sandbox.evaluate(node.cancel_if, variables))
    except Exception as exc:  # the author's expression: note it, keep the Delay
        lifecycle.note(s, run, EventKind.NOTE,
                       f"cancel_if {node.cancel_if!r} failed ({exc}); kept", node.path)
        return False


def _followed(node: DeferNode, edit: Edit) -> list[str]:
    """The changed fields the `at:` expression names (`now()` alone never moves a Delay)."""
    _, used = sandbox.check(node.at, expression=True)
    return sorted({attr for var, attr in used if var == "record" and attr in edit.changed})


def _recompute(s: Session, run: Run, node: DeferNode, variables: dict[str, Any], edit: Edit,
               *, now: datetime, stamp: str, names: str, settings) -> None:
    try:
        due = engine.due_time(node, variables, now, settings.timezone).astimezone(UTC)
    except PermanentError as exc:  # the date was cleared: there is no time to run at
        reason = f"skipped: {names} changed at {stamp}; 'at' gives no time now ({exc})"
        if lifecycle.edit_stop(s, run, skipped=True, reason=reason, now=now):
            edit.stopped.append(run)
        return
    if abs((due - run.due_at).total_seconds()) < 1:
        return
    detail = (f"moved: {names} changed at {stamp}; due "
              f"{run.due_at.isoformat(timespec='seconds')} -> {due.isoformat(timespec='seconds')}")
    # Guarded like the worker's claim: a Delay that started meanwhile is not moved.
    moved = lifecycle.edit_move(s, run, due, reason=detail, path=node.path, now=now)
    if moved is not None:
        edit.moved.append(moved)


def after_edit(dispatcher: Dispatcher, edit: Edit) -> None:
    """After commit: drop RQ jobs of stopped Delays, move moved ones, enqueue new Runs."""
    try:
        for run in edit.stopped:
            dispatcher.cancel(run.id)
        for run in edit.moved:
            dispatcher.cancel(run.id)  # a scheduled job keeps its old time unless replaced
            dispatcher.dispatch(run)
    except RedisError as exc:  # the database is right; the reconciler re-dispatches
        log.warning("edit of record %s: Redis unavailable (%s)", edit.record.id, exc)
    dispatcher.dispatch_all(edit.new_runs)


def describe(edit: Edit) -> str:
    """One sentence for the person who saved: what changed and what followed."""
    if not edit.changed:
        return "Nothing changed."
    parts = [f"Saved ({', '.join(sorted(edit.changed))} changed)."]
    for run in edit.moved:
        parts.append(f"“{run.title}” now runs at {run.due_at:%Y-%m-%d %H:%M} UTC.")
    for run in edit.stopped:
        parts.append(f"“{run.title}” was cancelled.")
    if edit.new_runs:
        parts.append(f"{len(edit.new_runs)} background task(s) started.")
    return " ".join(parts)
