"""The engine: walks event trees. Actions run, `if` branches, deferred nodes become Runs.

At submit time (`submit`) everything runs inline in the request's transaction and each
Background/Delay node becomes a Run row in that same transaction (the outbox); the caller
enqueues them after commit. Workers (`formrules.runs.job`) use the same walker for a Run's
children, with checkpoints around each action.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from formrules.actions import registry as actions
from formrules.actions.context import Context
from formrules.errors import GENERIC_FAILURE, STEP_FAILED, ActionError, Cancelled, PermanentError
from formrules.language import sandbox
from formrules.language.tree import (
    ActionNode,
    CallNode,
    DeferNode,
    Form,
    IfNode,
    Node,
    ProgressNode,
    TryNode,
)
from formrules.language.variables import call_inputs
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


def writes_fields_only(node: DeferNode) -> bool:
    """Whether every step of a deferred node only writes fields (`set`, and custom actions
    declared `fields_only`), with no `when:` to check at fire time: such a Run needs no
    checkpoint of its own between its claim and its end (see `formrules.runs.job`)."""
    if node.when or not node.do:
        return False
    for step in node.do:
        spec = actions.get(step.action) if isinstance(step, ActionNode) else None
        if spec is None or not spec.fields_only:
            return False
    return True


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


class Walker:
    """Visits nodes in order: `if` branches against fresh variables, `call:` walks its tree
    with `inputs`, `try:` catches; what an action, a deferred node or a progress node does
    is the subclass's (inline at submit, a checkpointed step on a worker, …).

    `scope` holds the variables a place in the tree adds to the record's: `inputs` inside
    a called tree, `error` in a catch handler or an on_error branch.
    """

    def __init__(self, tree: str | None = None):
        self.calls: list[str] = [tree] if tree else []  # the named trees we are inside
        self.current: Node | None = None  # the node running (the failing one, on error)

    # -- what the subclass decides ------------------------------------------------------
    def variables(self, scope: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def action(self, node: ActionNode, scope: dict[str, Any]) -> None:
        raise NotImplementedError

    def defer(self, node: DeferNode, scope: dict[str, Any]) -> None:
        raise NotImplementedError

    def progress(self, node: ProgressNode, scope: dict[str, Any]) -> None:
        """A `progress:` node; nothing to report outside a Run."""

    def enter_call(self, node: CallNode, inputs: dict[str, Any]) -> None:
        """A call starts (a worker writes a trace line)."""

    def catches(self, exc: Exception) -> bool:
        """Whether a `try:` catches `exc`; a cancel never is."""
        return not isinstance(exc, Cancelled)

    def caught(self, node: TryNode, error: dict[str, str], exc: Exception,
               scope: dict[str, Any]) -> None:
        """Keep a caught error (its field written) before the handler runs."""

    def resumed_catch(self, node: TryNode) -> dict[str, str] | None:
        """The error an earlier attempt caught here (its handler is what is left)."""
        return None

    # -- the walk -----------------------------------------------------------------------
    def walk(self, nodes: tuple[Node, ...], scope: dict[str, Any]) -> None:
        for node in nodes:
            self.current = node
            if isinstance(node, ActionNode):
                self.action(node, scope)
            elif isinstance(node, IfNode):
                branch = node.then if test(node, self.variables(scope)) else node.otherwise
                self.walk(branch, scope)
            elif isinstance(node, CallNode):
                inputs = call_inputs(node, self.variables(scope))
                self.enter_call(node, inputs)
                self.calls.append(node.tree)
                try:
                    # The tree sees its own inputs; the caller's `error` stays visible.
                    self.walk(node.body, {**scope, "inputs": inputs})
                finally:
                    self.calls.pop()
            elif isinstance(node, TryNode):
                self.attempt(node, scope)
            elif isinstance(node, DeferNode):
                self.defer(node, scope)
            elif isinstance(node, ProgressNode):
                self.progress(node, scope)

    def attempt(self, node: TryNode, scope: dict[str, Any]) -> None:
        """`try:`: the body; on an error it catches, keep the error, run the handler."""
        error = self.resumed_catch(node)
        if error is None:
            try:
                self.walk(node.body, scope)
                return
            except Exception as exc:  # noqa: BLE001 — `catches` decides, else re-raised
                if not self.catches(exc):
                    raise
                failed = self.current or node
                error = {"message": safe_message(exc, failed), "step": failed.path}
                self.caught(node, error, exc, scope)
        self.walk(node.handler, {**scope, "error": error})

    @property
    def tree(self) -> str | None:
        """The named tree the walk is in now, if any."""
        return self.calls[-1] if self.calls else None


def safe_message(exc: BaseException, node: Node) -> str:
    """What a `try:` stores for `exc`: formrules' own message for users, else which step
    failed. Never the exception's text (an outside service's words, a traceback)."""
    if isinstance(exc, ActionError) and exc.safe_message != GENERIC_FAILURE:
        return exc.safe_message
    if isinstance(node, ActionNode):
        step = node.action
    elif isinstance(node, DeferNode):
        step = node.kind
    else:
        step = {IfNode: "if", CallNode: "call", ProgressNode: "progress",
                TryNode: "try"}.get(type(node), "step")
    return STEP_FAILED.format(step=step)


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
            waiting: bool = False, call: dict[str, Any] | None = None, **extra: Any) -> Run:
    """A Run row for a deferred node; the snapshot carries the subtree it started with.

    `inputs` are an update event's `old` and `changed` (stored forms), carried so the
    worker sees them too; `waiting`: a batch child that waits for a free slot; `call`:
    the named tree the node is written in and that call's inputs (`inputs.` in it).
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
                           form_title=(variables.get("form") or {}).get("title"),
                           call=call).dump()
    return lifecycle.born(Run(
        id=new_id(), record_id=record_id, form_id=form_id, owner=owner, kind=kind or node.kind,
        node_path=node.path, title=title[:300], snapshot=snapshot,
        awaited=node.awaited, flag=node.flag, due_at=due, max_attempts=node.retry.attempts,
        queue=node.queue, created_at=now, **extra,
    ), waiting=waiting)


def call_of(tree: str | None, scope: dict[str, Any]) -> dict[str, Any] | None:
    """What a Run started inside a named tree carries of its call (see `Snapshot.call`)."""
    return {"tree": tree, "inputs": scope.get("inputs") or {}} if tree else None


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
        if isinstance(node, CallNode) and not _pure(node.body):
            return False
        if isinstance(node, TryNode) and not (_pure(node.body) and _pure(node.handler)):
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

    class Inline(Walker):
        def variables(self, scope: dict[str, Any]) -> dict[str, Any]:
            return {**ctx.variables(), **scope}

        def action(self, node: ActionNode, scope: dict[str, Any]) -> None:
            ctx.path = node.path
            ctx.extra = {**extra, **scope}
            try:
                call_action(node, ctx)
            finally:
                ctx.extra = dict(extra)

        def defer(self, node: DeferNode, scope: dict[str, Any]) -> None:
            # Not added to the session yet: a record inserted after the walk gives its id.
            runs.append(new_run(node, form_id=form.id, field_types=form.field_types,
                                owner=record.owner, variables=self.variables(scope),
                                record_id=record.id, now=now, tz=settings.timezone,
                                inputs=inputs, call=call_of(self.tree, scope)))

        def caught(self, node: TryNode, error: dict[str, str], exc: Exception,
                   scope: dict[str, Any]) -> None:
            # Inline there are no retries: the error is caught at once (docs/rules.md).
            log.info("%s: caught %s: %s", node.path, error["step"], exc)
            if node.error_field:
                ctx.set(node.error_field, error["message"])

    Inline().walk(nodes, {})
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
