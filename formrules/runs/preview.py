"""Preview what a form's tree would do with some values, without doing any of it.

`set` runs (on a copy of the record: later conditions depend on it); `if` shows which
branch it takes; every other action shows its rendered arguments instead of running;
Background and Delay show when they would run, how they retry, and their children.
Nothing is written, sent or enqueued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from formrules.actions.context import Context
from formrules.config import Settings
from formrules.language import sandbox
from formrules.language.duration import format_duration
from formrules.language.outline import retry_text
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
from formrules.language.values import typed_record
from formrules.language.variables import call_inputs
from formrules.runs import engine
from formrules.store.models import utcnow


@dataclass(frozen=True)
class Deferred:
    """A Background or Delay the preview met: the Run it would create, and when."""

    node: DeferNode
    title: str
    due: datetime


@dataclass(frozen=True)
class Line:
    """One line of a preview: a node path, what happens there, and its depth."""

    path: str
    text: str
    depth: int = 0

    def __str__(self) -> str:
        return f"{'  ' * self.depth}{self.path}: {self.text}"


def preview(form: Form, values: dict[str, Any], settings: Settings, *, event: str = "submit",
            old: dict[str, Any] | None = None, now: datetime | None = None,
            deferred: list[Deferred] | None = None) -> list[Line]:
    """The lines describing what `event`'s tree would do for a record with `values`.

    For `update`, `old` is the record before the edit (`old.` and `changed.` follow).
    `deferred`, when given, receives every Background and Delay with its due time.
    """
    extra: dict[str, Any] = {}
    if event == "update":
        old = dict(old or {})
        extra = {"old": typed_record(old, form.field_types),
                 "changed": {k: v for k, v in typed_record(values, form.field_types).items()
                             if old.get(k) != values.get(k)}}
    ctx = Context(settings=settings, form_id=form.id, field_types=form.field_types,
                  data=dict(values), record_token="preview", extra=extra, form_title=form.title)
    lines: list[Line] = []
    now = now or utcnow()
    with sandbox.clock(now):  # `now()` and `today()` answer the simulated time
        _nodes(form.events.get(event, ()), ctx, lines, 0, now, settings, deferred)
    return lines


def _nodes(nodes: tuple[Node, ...], ctx: Context, lines: list[Line], depth: int,
           now: datetime, settings: Settings, deferred: list[Deferred] | None = None) -> None:
    for node in nodes:
        try:
            _node(node, ctx, lines, depth, now, settings, deferred)
        except Exception as exc:  # show the author where it would fail, then go on
            lines.append(Line(node.path, f"FAILS: {exc}", depth))


def _node(node: Node, ctx: Context, lines: list[Line], depth: int, now: datetime,
          settings: Settings, deferred: list[Deferred] | None) -> None:
    if isinstance(node, IfNode):
        result = engine.test(node, ctx.variables())
        branch = node.then if result else node.otherwise
        taken = "then" if result else "else"
        lines.append(Line(node.path, f"if {node.test} -> {str(result).lower()}: "
                                     f"{taken} ({len(branch)} node(s))", depth))
        _nodes(branch, ctx, lines, depth + 1, now, settings, deferred)
    elif isinstance(node, CallNode):
        inputs = call_inputs(node, ctx.variables())
        given = ", ".join(f"{k} = {v!r}" for k, v in inputs.items())
        lines.append(Line(node.path, f"call tree {node.tree}" + (f" with {given}" if given
                                                                 else ""), depth))
        outer = ctx.extra
        ctx.extra = {**outer, "inputs": inputs}
        try:
            _nodes(node.body, ctx, lines, depth + 1, now, settings, deferred)
        finally:
            ctx.extra = outer
    elif isinstance(node, TryNode):
        stored = f", its message stored in {node.error_field}" if node.error_field else ""
        lines.append(Line(node.path, f"try {len(node.body)} node(s); on an error: catch "
                                     f"{len(node.handler)} node(s){stored}, then go on",
                          depth))
        failed = None
        for step in node.body:  # as at run time: the first failing step ends the body
            body: list[Line] = []
            _nodes((step,), ctx, body, depth + 1, now, settings, deferred)
            lines.extend(body)
            failed = next((line for line in body if line.text.startswith("FAILS")), None)
            if failed is not None:
                break
        if failed is not None:  # the preview saw a step fail: show the handler it runs
            lines.append(Line(f"{node.path}/catch", f"catch: {failed.path} failed", depth + 1))
            if node.error_field:
                ctx.data[node.error_field] = "(the step's safe message)"
            outer = ctx.extra
            ctx.extra = {**outer, "error": {"message": "(the step's safe message)",
                                            "step": failed.path}}
            try:
                _nodes(node.handler, ctx, lines, depth + 2, now, settings, deferred)
            finally:
                ctx.extra = outer
    elif isinstance(node, ActionNode) and node.action == "set":
        ctx.path = node.path
        engine.call_action(node, ctx)
        shown = ", ".join(f"{k} = {ctx.data.get(k)!r}" for k in node.args)
        lines.append(Line(node.path, f"set {shown}", depth))
    elif isinstance(node, ActionNode):
        args = engine.render_args(node, ctx.variables())
        lines.append(Line(node.path, f"would run {node.action} {args!r}", depth))
    elif isinstance(node, ProgressNode):
        variables = ctx.variables()  # rendered as a worker renders them (see runs/job.py)
        done = sandbox.evaluate(str(node.done), variables) if node.done is not None else "-"
        total = sandbox.evaluate(str(node.total), variables) if node.total is not None else "-"
        message = sandbox.render(node.message, variables) if node.message else ""
        title = f" (title {sandbox.render(node.title, variables)!r})" if node.title else ""
        lines.append(Line(node.path, f"progress {done}/{total} {message}".rstrip() + title,
                          depth))
    elif isinstance(node, DeferNode):
        due = engine.due_time(node, ctx.variables(), now, settings.timezone)
        when = "at once" if due <= now else \
            f"at {due.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC (in {_roughly(due - now)})"
        title = sandbox.render(node.title, ctx.variables())
        parts = [f"{node.kind} {title!r} runs {when} on a worker",
                 {"true": "awaited", "false": "not awaited",
                  "optional": "awaited (can continue in background)"}[node.awaited]]
        if node.flag:
            parts.append(f"sets {node.flag} when done")
        parts.append(retry_text(node.retry))
        if node.timeout:
            parts.append(f"timeout {format_duration(node.timeout)}")
        for key in ("when", "cancel_if"):
            if getattr(node, key):
                parts.append(f"{key}: {getattr(node, key)}")
        lines.append(Line(node.path, "; ".join(parts), depth))
        if deferred is not None:
            deferred.append(Deferred(node, title, max(due, now)))
        outer = ctx.extra  # inside the Run its `run.` names are set, as on a worker
        ctx.extra = {**outer, "run": {"id": "preview", "title": title, "attempt": 1}}
        # A Delay inside this Run starts counting when the Run runs.
        with sandbox.clock(max(due, now)):
            _nodes(node.do, ctx, lines, depth + 1, max(due, now), settings, deferred)
        ctx.extra = outer
        if node.on_error:
            lines.append(Line(f"{node.path}/on_error",
                              f"on_error: {len(node.on_error)} node(s) after the last attempt",
                              depth + 1))


def _roughly(delta: timedelta) -> str:
    """A wait as people say it: days and hours, or hours and minutes."""
    unit = 3600 if delta >= timedelta(days=1) else 60 if delta >= timedelta(hours=1) else 1
    return format_duration(timedelta(seconds=delta.total_seconds() // unit * unit))


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
