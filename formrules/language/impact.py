"""`formrules impact`: what an edit of the rules changes for work already pending.

Pure comparison (no Flask, no database): the forms in use (`old`), the forms on disk
(`new`) and the pending Runs of each form (id, node path, status and the subtree their
snapshot carries). For every form that changed, or whose pending Runs started on a tree
that is not the one on disk, it lists:

- the pending Runs that keep their old tree (a Run always finishes on its snapshot);
- nodes whose paths moved: checkpoints, idempotency keys, trace lines and the admin's
  path filter follow the path, so Runs started before the move stay under the old one.
  Deferred nodes are matched by kind and title, actions by name and arguments, `if` by
  its test: one match on each side, at another path, is a move;
- actions and fields gone from the new form that pending Runs still use (their
  snapshot still calls the action or writes or names the field);
- schedules added, removed, or with a changed cron, zone or `for_each` (matched by name).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from formrules.errors import RuleError
from formrules.language.loader import rebuild_defer
from formrules.language.tree import ActionNode, DeferNode, Form, IfNode, Node, walk

_FIELD_NAME = re.compile(r"\brecord\.([A-Za-z_]\w*)")
SHOWN_RUNS = 10  # Run ids listed per line; the rest are counted


@dataclass(frozen=True)
class PendingRun:
    """A Run that has not finished, as the comparison needs it."""

    id: str
    form_id: str
    path: str  # its node path
    status: str
    raw: dict[str, Any]  # the subtree its snapshot carries
    fields: dict[str, str]  # the field types its snapshot carries
    trees: dict[str, Any] = field(default_factory=dict)  # the named trees its calls reach
    tree: str | None = None  # the named tree its node is written in, if any
    inputs: tuple[str, ...] = ()  # that tree's call inputs

    @property
    def source(self) -> Any:
        """What it runs: its subtree with the named trees it calls."""
        return [self.raw, self.trees] if self.trees else self.raw


@dataclass
class FormImpact:
    """What changes for one form."""

    form_id: str
    change: str  # "changed" | "added" | "removed" | "unchanged"
    keeping_old: list[PendingRun] = field(default_factory=list)
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (old, new, what)
    removed_in_use: list[tuple[str, list[str]]] = field(default_factory=list)  # (what, run ids)
    schedules: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing to say: the form is the same and no pending Run is on another tree."""
        return (self.change == "unchanged" and not self.keeping_old and not self.moved
                and not self.removed_in_use and not self.schedules)


def compare(old: dict[str, Form], new: dict[str, Form],
            pending: Iterable[PendingRun]) -> list[FormImpact]:
    """The impact per form (sorted by id) of replacing `old` with `new`; forms with
    nothing to say are left out."""
    by_form: dict[str, list[PendingRun]] = defaultdict(list)
    for run in pending:
        by_form[run.form_id].append(run)
    out = []
    for form_id in sorted(set(old) | set(new) | set(by_form)):
        impact = _form(form_id, old.get(form_id), new.get(form_id), by_form.get(form_id, []))
        if not impact.empty:
            out.append(impact)
    return out


def lines(impacts: list[FormImpact]) -> list[str]:
    """The report `formrules impact` prints and the admin shows."""
    if not impacts:
        return ["No impact: the rules on disk are the rules in use, and no pending Run "
                "started on another tree."]
    out: list[str] = []
    for impact in impacts:
        change = "in use as on disk" if impact.change == "unchanged" else impact.change
        out.append(f"form {impact.form_id}: {change}")
        if impact.keeping_old:
            out.append(f"  pending Runs keeping their old tree: {len(impact.keeping_old)}")
            for run in impact.keeping_old[:SHOWN_RUNS]:
                out.append(f"    {run.id}  {run.path}  ({run.status})")
            if len(impact.keeping_old) > SHOWN_RUNS:
                out.append(f"    … and {len(impact.keeping_old) - SHOWN_RUNS} more")
        for old_path, new_path, what in impact.moved:
            out.append(f"  moved: {old_path} -> {new_path}  {what}")
        for what, ids in impact.removed_in_use:
            shown = ", ".join(ids[:SHOWN_RUNS]) + (" …" if len(ids) > SHOWN_RUNS else "")
            out.append(f"  removed but used by {len(ids)} pending Run(s): {what}  [{shown}]")
        for text in impact.schedules:
            out.append(f"  schedule {text}")
    return out


def _form(form_id: str, old: Form | None, new: Form | None,
          pending: list[PendingRun]) -> FormImpact:
    if old is None and new is None:
        change = "removed"
    elif old is None:
        change = "added"
    elif new is None:
        change = "removed"
    else:
        change = "unchanged" if _shape(old) == _shape(new) else "changed"
    impact = FormImpact(form_id, change)
    new_raws = _deferred_raws(new) if new is not None else {}
    new_keys = _keys(new) if new is not None else {}
    moved: dict[str, tuple[str, str]] = {}
    if old is not None and new is not None:
        moved.update(_moves(_keys(old), new_keys))
    used_actions: dict[str, list[str]] = defaultdict(list)
    used_fields: dict[str, list[str]] = defaultdict(list)
    new_actions = {n.action for n in _actions(new)} if new is not None else set()
    new_fields = {f.name for f in new.fields} if new is not None else set()
    new_canonical = {path: _canonical(raw) for path, raw in new_raws.items()}
    # Runs of one node version share its subtree: work each distinct one out once.
    seen: dict[tuple[str, str, str], tuple[tuple[str, str] | None, list[str], list[str]]] = {}
    for run in sorted(pending, key=lambda r: (r.path, r.id)):
        raw = _canonical(run.source)
        if raw == new_canonical.get(run.path, _canonical(None)):
            continue  # the tree on disk has this very subtree at this path
        impact.keeping_old.append(run)
        key = (run.path, raw, _canonical(run.fields))
        if key not in seen:
            seen[key] = _uses(run, new_keys, new_actions, new_fields)
        target, actions, fields = seen[key]
        if target is not None:
            moved.setdefault(run.path, target)
        for what in actions:
            used_actions[what].append(run.id)
        for what in fields:
            used_fields[what].append(run.id)
    impact.moved = sorted((o, n, what) for o, (n, what) in moved.items())
    impact.removed_in_use = sorted(used_actions.items()) + sorted(used_fields.items())
    impact.schedules = _schedules(old, new)
    return impact


def _uses(run: PendingRun, new_keys: dict[str, str], new_actions: set[str],
          new_fields: set[str]) -> tuple[tuple[str, str] | None, list[str], list[str]]:
    """For one pending subtree: where its node moved to and what it is (or None), and the
    actions and fields it uses that the new version no longer has."""
    node = _rebuild(run)
    if node is None:
        return None, [], []
    target = None
    if run.path not in new_keys:  # the node itself may have moved
        targets = [p for p, k in new_keys.items() if k == _key(node)]
        if len(targets) == 1:
            target = (targets[0], _what(node))
    actions = [f"action {child.action} at {child.path}" for child in walk((node,))
               if isinstance(child, ActionNode) and child.action not in new_actions]
    fields = [f"field {name}" for name in sorted(_fields_named(run, node))
              if name not in new_fields]
    return target, actions, fields


def _schedules(old: Form | None, new: Form | None) -> list[str]:
    before = {s.name: s for s in (old.schedules if old else ())}
    after = {s.name: s for s in (new.schedules if new else ())}
    out = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None and b is not None:
            out.append(f"{name}: added (cron '{b.cron}' {b.timezone})")
        elif b is None and a is not None:
            out.append(f"{name}: removed (was cron '{a.cron}' {a.timezone})")
        elif a is not None and b is not None:
            for what, x, y in (("cron", a.cron, b.cron), ("timezone", a.timezone, b.timezone),
                               ("for_each", a.for_each, b.for_each)):
                if x != y:
                    out.append(f"{name}: {what} '{x}' -> '{y}'")
            if _canonical(a.raw) != _canonical(b.raw) and (a.cron, a.timezone, a.for_each) == (
                    b.cron, b.timezone, b.for_each):
                out.append(f"{name}: its tree changed (slots from now run the new one)")
    return out


def _rebuild(run: PendingRun) -> DeferNode | None:
    try:
        return rebuild_defer(run.raw, run.path, run.fields, run.trees, run.tree, run.inputs)
    except (RuleError, ValueError, TypeError, KeyError):
        return None  # a snapshot this code cannot read: listed, not analysed


def _fields_named(run: PendingRun, node: DeferNode) -> set[str]:
    """Fields the Run writes (`set:`, `flag:`) or names (`record.x` in its text)."""
    names = set(_FIELD_NAME.findall(json.dumps(run.source)))
    if node.flag:
        names.add(node.flag)
    for child in walk((node,)):
        if isinstance(child, ActionNode) and child.action == "set" and isinstance(
                child.args, dict):
            names.update(child.args)
    return {n for n in names if n in run.fields}


def _actions(form: Form) -> Iterable[ActionNode]:
    for nodes in _trees(form):
        yield from (n for n in walk(nodes) if isinstance(n, ActionNode))


def _trees(form: Form) -> list[tuple[Node, ...]]:
    return [*form.events.values(), *(b.do for b in form.batches.values()),
            *(s.do for s in form.schedules)]


def _deferred_raws(form: Form) -> dict[str, Any]:
    """Path -> what a new Run of that path would carry (as `PendingRun.source`)."""
    out: dict[str, Any] = {}
    for nodes in form.events.values():
        out.update((n.path, [n.raw, n.trees] if n.trees else n.raw)
                   for n in walk(nodes) if isinstance(n, DeferNode))
    roots = [(f"batches/{b.name}", b.raw) for b in form.batches.values()]
    roots += [(f"schedules/{i}", s.raw) for i, s in enumerate(form.schedules)]
    for path, raw in roots:  # their nodes are built when they start: the trees they reach
        try:
            trees = rebuild_defer(raw, path, form.field_types, form.tree_sources).trees
        except (RuleError, ValueError, TypeError, KeyError):
            trees = {}
        out[path] = [raw, trees] if trees else raw
    return out


def _keys(form: Form) -> dict[str, str]:
    """Path -> identity of every node (what a move keeps)."""
    out = {}
    for nodes in _trees(form):
        out.update((n.path, _key(n)) for n in walk(nodes))
    return out


def _key(node: Node) -> str:
    if isinstance(node, DeferNode):
        return f"{node.kind} {node.title!r}"
    if isinstance(node, ActionNode):
        return f"{node.action} {_canonical(node.args)}"
    if isinstance(node, IfNode):
        return f"if {node.test}"
    return f"{type(node).__name__} {node.path}"  # progress: never matched elsewhere


def _what(node: Node) -> str:
    if isinstance(node, DeferNode):
        return f"({node.kind} {node.title!r})"
    if isinstance(node, ActionNode):
        return f"({node.action})"
    if isinstance(node, IfNode):
        return f"(if {node.test})"
    return ""


def _moves(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Nodes found once on each side by identity, at different paths (outermost only:
    a moved parent's children move with it and are not listed again)."""
    old_count, new_count = Counter(old.values()), Counter(new.values())
    where_new = {k: p for p, k in new.items() if new_count[k] == 1}
    found: dict[str, tuple[str, str]] = {}
    for path, key in old.items():
        if old_count[key] != 1 or key not in where_new or where_new[key] == path:
            continue
        if new.get(path) == key:
            continue
        if any(path.startswith(p + "/") and where_new.get(old[p]) and
               where_new.get(key, "").startswith(where_new[old[p]] + "/") for p in found):
            continue
        found[path] = (where_new[key], _label(key))
    return found


def _label(key: str) -> str:
    """How a moved node is named: deferred nodes and `if` in full, actions by name."""
    kind = key.partition(" ")[0]
    return f"({key})" if kind in ("background", "delay", "if") else f"({kind})"


def _shape(form: Form) -> str:
    """The form as compared: everything but source positions."""
    return _canonical({"title": form.title, "fields": [repr(f) for f in form.fields],
                       "trees": {k: _tree(v) for k, v in form.events.items()},
                       "batches": {k: _canonical(b.raw) for k, b in form.batches.items()},
                       "schedules": [_canonical(s.raw) for s in form.schedules],
                       "message": form.after_submit_message})


def _tree(nodes: tuple[Node, ...]) -> list[str]:
    out = []
    for n in walk(nodes):
        out.append(n.path + " " + (_canonical(n.raw) if isinstance(n, DeferNode) else _key(n)))
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
