"""The engine: walks event trees. Actions run, `if` branches, deferred nodes become Runs.

At submit time (`submit`) everything runs inline in the request's transaction and each
Background/Delay node becomes a Run row in that same transaction (the outbox); the caller
enqueues them after commit. Workers (`formrules.runs.job`) use the same walker for a Run's
children, with checkpoints around each action.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from formrules.actions import registry as actions
from formrules.actions.context import Context
from formrules.errors import PermanentError
from formrules.language import sandbox
from formrules.language.tree import ActionNode, DeferNode, Form, IfNode, Node, ProgressNode
from formrules.runs import lifecycle
from formrules.runs.snapshot import Snapshot
from formrules.store.models import Record, Run, new_id, new_token, utcnow

log = logging.getLogger("formrules.runs.engine")


def call_action(node: ActionNode, ctx: Context) -> None:
    """Render an action node's arguments and call its function."""
    spec = actions.get(node.action)
    if spec is None:  # validated away; only a snapshot from another version gets here
        raise PermanentError(f"unknown action {node.action!r}")
    args = render_args(node, ctx.variables())
    if spec.params is None:
        spec.fn(ctx, args)
    else:
        spec.fn(ctx, **(args or {}))


def render_args(node: ActionNode, variables: dict[str, Any]) -> Any:
    """An action node's arguments with their templates rendered, as the action gets them."""
    spec = actions.get(node.action)
    args = node.args
    if spec is None or not spec.render_args:
        return args
    if spec.params is not None and isinstance(args, dict):
        return {k: v if (p := spec.params.get(k)) is not None and not p.render
                else sandbox.render_value(v, variables, html=p is not None and p.html)
                for k, v in args.items()}
    return sandbox.render_value(args, variables)


def test(node: IfNode, variables: dict[str, Any]) -> bool:
    """Evaluate an `if` node's condition."""
    try:
        return bool(sandbox.evaluate(node.test, variables))
    except Exception as exc:  # a TypeError from comparing None, say: the author's to fix
        raise PermanentError(f"{node.path}: condition {node.test!r} failed: {exc}",
                             "This form's rules could not be evaluated.") from exc


def walk(nodes: tuple[Node, ...], variables: Callable[[], dict[str, Any]],
         on_action: Callable[[ActionNode], None], on_defer: Callable[[DeferNode], None],
         on_progress: Callable[[ProgressNode], None]) -> None:
    """Visit nodes in order, choosing `if` branches against fresh variables."""
    for node in nodes:
        if isinstance(node, ActionNode):
            on_action(node)
        elif isinstance(node, IfNode):
            branch = node.then if test(node, variables()) else node.otherwise
            walk(branch, variables, on_action, on_defer, on_progress)
        elif isinstance(node, DeferNode):
            on_defer(node)
        elif isinstance(node, ProgressNode):
            on_progress(node)


def due_time(node: DeferNode, variables: dict[str, Any], now: datetime, tz: str) -> datetime:
    """When a deferred node's Run is due: now + `for`, or the `at` expression's value."""
    if node.at is None:
        return now + (node.delay_for or timedelta(0))
    try:
        value = sandbox.evaluate(node.at, variables)
    except Exception as exc:
        raise PermanentError(f"{node.path}: 'at' expression failed: {exc}",
                             "A date in this form could not be worked out.") from exc
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=ZoneInfo(tz))
    if not isinstance(value, datetime):
        raise PermanentError(f"{node.path}: 'at' gave {value!r}, not a date or time",
                             "A date in this form could not be worked out.")
    return value if value.tzinfo else value.replace(tzinfo=ZoneInfo(tz))


def new_run(node: DeferNode, *, form_id: str, field_types: dict[str, str], owner: str,
            variables: dict[str, Any], record_id: int | None, now: datetime, tz: str,
            kind: str | None = None, inputs: dict[str, dict[str, Any]] | None = None,
            waiting: bool = False, **extra: Any) -> Run:
    """A Run row for a deferred node; the snapshot carries the subtree it started with.

    `inputs` are an update event's `old` and `changed` (stored forms), carried so the
    worker sees them too; `waiting`: a batch child that waits for a free slot.
    """
    due = due_time(node, variables, now, tz).astimezone(UTC)
    try:
        title = sandbox.render(node.title, variables)
    except Exception as exc:  # a title must never stop work from being recorded
        log.warning("%s: title %r did not render (%s); kept as written",
                    node.path, node.title, exc)
        title = node.title
    # Templates inside the Run name the form as it was when the work was started.
    snapshot = Snapshot.of(node, field_types, inputs,
                           form_title=(variables.get("form") or {}).get("title")).dump()
    return lifecycle.born(Run(
        id=new_id(), record_id=record_id, form_id=form_id, owner=owner, kind=kind or node.kind,
        node_path=node.path, title=title[:300], snapshot=snapshot,
        awaited=node.awaited, flag=node.flag, due_at=due, max_attempts=node.retry.attempts,
        queue=node.queue, created_at=now, **extra,
    ), waiting=waiting)


# Inline actions that only change the record being written (or log): a submit tree made
# of these can run before the record's INSERT, so its writes go into that one statement.
PURE_ACTIONS = frozenset({"set", "log"})


def _pure(nodes: tuple[Node, ...]) -> bool:
    """True when running `nodes` inline has no effect outside the record (no e-mail, no
    HTTP): then a double submit may run it and still be refused by the INSERT alone."""
    for node in nodes:
        if isinstance(node, ActionNode) and node.action not in PURE_ACTIONS:
            return False
        if isinstance(node, IfNode) and not (_pure(node.then) and _pure(node.otherwise)):
            return False
    return True


def submit(session: Session, form: Form, values: dict[str, Any], *, owner: str,
           settings, submit_key: str | None = None, fingerprint: str | None = None,
           event: str = "submit") -> tuple[Record, list[Run]]:
    """Store a record and run its submit tree inline; return it with its new Runs.

    Everything happens in `session`'s transaction: when a synchronous action fails the
    caller rolls back, and nothing of the submission is half-written. A tree of `set`s
    and `if`s runs first and its writes go into the record's one INSERT; a tree with
    outside effects (e-mail, HTTP) inserts the record first, so a duplicate `submit_key`
    is refused by the unique constraint before anything is sent. `fingerprint`: what a
    repeat of `submit_key` must match (the API's idempotency), stored in the same INSERT.
    """
    nodes = form.events.get(event, ())
    record = Record(form_id=form.id, owner=owner, data=dict(values), submit_key=submit_key,
                    submit_fingerprint=fingerprint if submit_key else None, token=new_token())
    if not _pure(nodes):
        session.add(record)
        session.flush()
    runs = run_inline(session, form, record, nodes, settings=settings)
    return record, runs


def run_inline(session: Session, form: Form, record: Record, nodes: tuple[Node, ...], *,
               settings, inputs: dict[str, dict[str, Any]] | None = None) -> list[Run]:
    """Run `nodes` inline against `record` (in the caller's transaction).

    `inputs` are an update event's `old` and `changed` in stored form; the tree sees them
    typed, and its deferred nodes carry them to the worker. A record not inserted yet is
    inserted after the walk, with the walk's writes in it.
    """
    extra = Snapshot(raw={}, fields=form.field_types, inputs=dict(inputs or {})).variables()
    ctx = Context(settings=settings, form_id=form.id, field_types=form.field_types,
                  data=dict(record.data), record_token=record.token, extra=dict(extra or {}),
                  form_title=form.title)
    runs: list[Run] = []
    now = utcnow()

    def on_action(node: ActionNode) -> None:
        ctx.path = node.path
        call_action(node, ctx)

    def on_defer(node: DeferNode) -> None:
        # Not added to the session yet: a record inserted after the walk gives its id first.
        runs.append(new_run(node, form_id=form.id, field_types=form.field_types,
                            owner=record.owner, variables=ctx.variables(),
                            record_id=record.id, now=now, tz=settings.timezone,
                            inputs=inputs))

    walk(nodes, ctx.variables, on_action, on_defer, lambda node: None)
    if ctx.updates:
        record.data = {**record.data, **ctx.updates}
    if record.id is None:
        session.add(record)
        session.flush()  # one INSERT, the walk's writes included; its id is the Runs'
        for run in runs:
            run.record_id = record.id
    session.add_all(runs)
    session.flush()
    return runs
