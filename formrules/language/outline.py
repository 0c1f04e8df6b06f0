"""`formrules show FORM`: a form's trees as an indented outline, one node a line, by path.

The path printed first on each line is the node's name everywhere else (errors, traces,
job metadata, idempotency keys, the admin), so the outline is how authors find a node.
Nothing is evaluated: templates and expressions are shown as written.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from formrules.language.duration import format_duration
from formrules.language.tree import (
    ActionNode,
    CallNode,
    DeferNode,
    FieldDef,
    Form,
    IfNode,
    Node,
    ProgressNode,
    RetryPolicy,
    TryNode,
)

AWAITED = {"true": "awaited", "false": "not awaited",
           "optional": "awaited (can continue in background)"}


def outline(form: Form) -> list[str]:
    """The lines of `formrules show`: header, fields, then every tree, batch and schedule."""
    lines = [f"form {form.id}: {form.title}", f"file: {form.file}"]
    lines.append("fields: " + (", ".join(_field(f) for f in form.fields) or "none"))
    for tree in form.trees.values():
        inputs = ", ".join(f"{i.name} ({i.type}{', required' if i.required else ''})"
                           for i in tree.inputs.values()) or "no inputs"
        lines += ["", f"trees/{tree.name}  tree: {inputs}", *_nodes(tree.do, 1)]
    for event, nodes in form.events.items():
        lines += ["", f"events/{event}", *_nodes(nodes, 1)]
    for batch in form.batches.values():
        lines += ["", f"batches/{batch.name}  batch {batch.title!r}: concurrency "
                      f"{batch.concurrency}{', stop on error' if batch.stop_on_error else ''}; "
                      f"started by {' and '.join(batch.started_by)}; "
                      f"{retry_text(batch.retry)}", *_nodes(batch.do, 1)]
    for index, schedule in enumerate(form.schedules):
        each = f"; for each record where {schedule.for_each}" if schedule.for_each else ""
        lines += ["", f"schedules/{index}  schedule {schedule.name!r}: cron "
                      f"'{schedule.cron}' {schedule.timezone}{each}; catch_up "
                      f"{schedule.catch_up}", *_nodes(schedule.do, 1)]
    return lines


def retry_text(policy: RetryPolicy) -> str:
    """How a deferred node retries, in words: `5 attempts, waiting 10s, 1m, 10m, 1h`."""
    if policy.attempts <= 1:
        return "no retries"
    if policy.exponential_base is not None:
        return (f"{policy.attempts} attempts, exponential from "
                f"{format_duration(_td(policy.exponential_base))} up to "
                f"{format_duration(_td(policy.exponential_max or 0))}")
    waits = [policy.backoff[min(i, len(policy.backoff) - 1)] if policy.backoff else 0
             for i in range(policy.attempts - 1)]
    return f"{policy.attempts} attempts, waiting " + ", ".join(
        format_duration(_td(w)) for w in waits)


def _field(f: FieldDef) -> str:
    notes = [f.type + (": " + " | ".join(f.choices) if f.choices else "")]
    notes += [word for word, on in (("required", f.required), ("hidden", f.hidden)) if on]
    return f"{f.name} ({', '.join(notes)})"


def _nodes(nodes: tuple[Node, ...], depth: int) -> list[str]:
    out: list[str] = []
    for node in nodes:
        out.append(f"{'  ' * depth}{node.path}  {_describe(node)}")
        if isinstance(node, IfNode):
            out += _nodes(node.then, depth + 1)
            out += _nodes(node.otherwise, depth + 1)
        elif isinstance(node, DeferNode):
            out += _nodes(node.do, depth + 1)
            out += _nodes(node.on_error, depth + 1)
        elif isinstance(node, CallNode):
            out += _nodes(node.body, depth + 1)
        elif isinstance(node, TryNode):
            out += _nodes(node.body, depth + 1)
            out += _nodes(node.handler, depth + 1)
    return out


def _describe(node: Node) -> str:
    if isinstance(node, IfNode):
        return f"if {node.test}" + ("" if node.otherwise else " (no else)")
    if isinstance(node, ProgressNode):
        done = "-" if node.done is None else node.done
        total = "-" if node.total is None else node.total
        return f"progress {done}/{total}" + (f" {node.message!r}" if node.message else "")
    if isinstance(node, DeferNode):
        return _defer(node)
    if isinstance(node, CallNode):
        given = ", ".join(f"{k}: {v}" for k, v in node.inputs.items())
        return f"call tree {node.tree}" + (f" with {given}" if given else "")
    if isinstance(node, TryNode):
        stored = f"; error to {node.error_field}" if node.error_field else ""
        return f"try {len(node.body)} node(s); catch {len(node.handler)} node(s){stored}"
    if isinstance(node, ActionNode):
        return f"{node.action}{_args(node.args)}"
    return type(node).__name__


def _args(args: Any) -> str:
    if isinstance(args, dict):
        return (" " + ", ".join(map(str, args))) if args else ""
    return "" if args is None else f" {args!r}"


def _defer(node: DeferNode) -> str:
    if node.kind == "background" or node.delay_for == timedelta(0) and node.at is None:
        when = "at once"
    elif node.at is not None:
        when = f"at {node.at} ({'recomputed on edit' if node.on_change == 'recompute' else 'kept'})"
    else:
        when = f"after {format_duration(node.delay_for or timedelta(0))}"
    parts = [f"{node.kind} {node.title!r} {when}", AWAITED[node.awaited]]
    if node.flag:
        parts.append(f"sets {node.flag} when done")
    parts.append(retry_text(node.retry))
    if node.timeout:
        parts.append(f"timeout {format_duration(node.timeout)}")
    if node.inline_for:
        parts.append(f"inline for {format_duration(node.inline_for)}")
    for key in ("when", "cancel_if"):
        if getattr(node, key):
            parts.append(f"{key}: {getattr(node, key)}")
    if node.on_error:
        parts.append(f"on_error: {len(node.on_error)} node(s)")
    return "; ".join(parts)


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
