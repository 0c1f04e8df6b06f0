"""Submitting a form: the one service the HTML form and the JSON API both call.

    accept(s, form, values, owner=…, settings=…, submit_key=…)
      store the record + run the submit tree inline + its Runs (the outbox), commit
      the same submit key again (a repeat or a race) ── the unique constraint refuses the
        INSERT: rolled back, the first record (duplicate=True), nothing new
      a synchronous action failed ── rolled back, ActionError raised: nothing is kept
    dispatch(dispatcher, submitted)   after commit: RQ gets the new Runs (no RQ read:
                                      they are new, no job can exist for them yet)
    wait_inline(store, form, runs)    `inline_for:` hold the answer for quick work

Nothing here imports Flask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from formrules.language.tree import DeferNode, Form, walk
from formrules.runs import engine
from formrules.runs.queue import Dispatcher
from formrules.store.db import Store
from formrules.store.models import FINAL, Record, Run


@dataclass
class Submitted:
    """What a submit made: the record, its new Runs, and whether it was a repeat."""

    record: Record
    runs: list[Run] = field(default_factory=list)
    duplicate: bool = False  # the same submit key was seen before: nothing new was made


def accept(s: Session, form: Form, values: dict[str, Any], *, owner: str, settings,
           submit_key: str | None = None, fingerprint: str | None = None,
           callback_url: str | None = None) -> Submitted:
    """Store a submission and run its submit tree, committing `s`; see the module doc.

    No SELECT for the submit key first: a repeat is rare, and the key's unique constraint
    refuses it anyway (the engine inserts the record before any outside effect), so the
    common submit costs one statement less.
    """
    try:
        # `fingerprint`: what a repeat of this key must match (the API); in the INSERT.
        record, runs = engine.submit(s, form, values, owner=owner, settings=settings,
                                     submit_key=submit_key, fingerprint=fingerprint)
        if callback_url:  # in the record's transaction: registered if and only if stored
            from formrules.runs.callbacks import register
            register(s, record, callback_url)
        s.commit()
    except IntegrityError:
        s.rollback()  # the same submit key was stored before (a repeat, or a race)
        existing = _by_key(s, submit_key) if submit_key else None
        if existing is None:
            raise
        return Submitted(existing, duplicate=True)
    except BaseException:
        s.rollback()  # nothing of the submission is kept (an ActionError, say)
        raise
    return Submitted(record, runs)


def _by_key(s: Session, submit_key: str) -> Record | None:
    return s.scalar(select(Record).where(Record.submit_key == submit_key))


def dispatch(dispatcher: Dispatcher, submitted: Submitted) -> None:
    """After commit: put the new Runs on RQ (Redis down: the reconciler will)."""
    dispatcher.dispatch_all(submitted.runs, new=True)


def inline_seconds(form: Form, runs: list[Run]) -> float:
    """How long the answer may wait for `runs`: the largest `inline_for` of the awaited
    Runs' nodes, 0 when none has one."""
    return _inline(form, runs)[0]


def inline_limits(form: Form) -> dict[str, float]:
    """`inline_for:` seconds by node path (computed once per form definition)."""
    cached = _limits.get(id(form))
    if cached is None or cached[0] is not form:  # the form is kept: its id stays unique
        cached = _limits[id(form)] = (form, {
            n.path: n.inline_for.total_seconds() for n in walk(form.events.get("submit", ()))
            if isinstance(n, DeferNode) and n.inline_for})
    return cached[1]


_limits: dict[int, tuple[Form, dict[str, float]]] = {}


def _inline(form: Form, runs: list[Run]) -> tuple[float, list[str]]:
    limits = inline_limits(form)
    if not limits:
        return 0.0, []
    waited = [r for r in runs if r.node_path in limits and r.awaited != "false"]
    return max((limits[r.node_path] for r in waited), default=0.0), [r.id for r in waited]


def wait_inline(store: Store, form: Form, runs: list[Run]) -> None:
    """`inline_for:` hold the answer a little so quick background work shows as done.

    Only awaited Runs are waited for, and never longer than `inline_seconds`; slower work
    simply continues in the background.
    """
    limit, ids = _inline(form, runs)
    if not ids:
        return
    deadline = time.monotonic() + limit
    with store.sessions() as s:
        while True:
            statuses = s.scalars(select(Run.status).where(Run.id.in_(ids))).all()
            s.rollback()  # end the read so the next one sees the worker's commits
            if all(st in FINAL for st in statuses) or time.monotonic() >= deadline:
                return
            time.sleep(0.1)
