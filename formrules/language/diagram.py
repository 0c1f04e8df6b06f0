"""A form's trees as Mermaid flowchart source (the admin's form page draws it).

Pure text from a `Form` and, optionally, how many Runs each deferred node has in each
state right now: no Flask, no database. One flowchart per tree (`events/submit`,
`batches/export`, `schedules/0`), so each reads top to bottom on its own:

- an action is a box, `if` a rhombus with `then`/`else` edges, `progress` a stadium;
- `call` and `try` are parallelograms: the called tree hangs off "runs", a try's steps
  off "try" and its `catch:` off a dotted "on error" edge;
- `background`/`delay` (and the batch or schedule itself) are subroutine boxes: their
  `do` hangs off a dotted "later" edge and `on_error` off a dotted "on_error" edge;
- siblings follow each other with plain arrows, in the order they run.

Labels are author input (titles, expressions, templates): every character outside a
small safe set is written as a Mermaid entity code (`#35;`), so no label can close its
quotes, start a directive or carry markup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from formrules.language.duration import format_duration
from formrules.language.tree import (
    ActionNode,
    CallNode,
    DeferNode,
    Form,
    IfNode,
    Node,
    ProgressNode,
    TryNode,
    walk,
)

# Characters written as they are; `*` and `_` are not (labels are Mermaid markdown
# strings, where they would mean emphasis), nor quotes, backticks, `#`, `<`, `{`, …
SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:/-()'=+?!@$")
MAX_LABEL = 80  # characters of author text per line; longer text is cut with "…"
# The states counted on deferred nodes, in the order they are shown.
STATES = ("queued", "running", "retrying", "waiting", "dead")
# Colours by class (Mermaid writes them into the diagram's own stylesheet).
CLASSES = ("  classDef deferred fill:#eef3ff,stroke:#3b5bdb",
           "  classDef dead fill:#fff0f0,stroke:#c92a2a,stroke-width:3px",
           "  classDef failure stroke:#c92a2a,stroke-dasharray:4")
Counts = Mapping[str, Mapping[str, int]]  # node path -> state -> Runs


@dataclass(frozen=True)
class Chart:
    """One tree's flowchart: its heading, the root node path and the Mermaid source."""

    name: str  # "events/submit", "batches/export", "schedules/0"
    title: str  # what the heading says
    path: str  # the deferred root's path (batches, schedules), or the tree's name
    source: str


def escape(text: str, limit: int = MAX_LABEL) -> str:
    """Author text as one line of a Mermaid label: cut at `limit`, unsafe characters as
    entity codes (`"` -> `#34;`, `<` -> `#60;`, `{` -> `#123;`, `_` -> `#95;`)."""
    flat = " ".join(str(text).split())
    if len(flat) > limit:
        flat = flat[:limit - 1] + "…"
    return "".join(c if c in SAFE else f"#{ord(c)};" for c in flat)


def label(*lines: str) -> str:
    """Lines (already escaped) as a quoted Mermaid markdown string: one line each."""
    return '"`' + "\n".join(lines) + '`"'


def charts(form: Form, counts: Counts | None = None,
           link: Callable[[str], str] | None = None) -> list[Chart]:
    """Every tree of `form` as a flowchart; `counts` adds the Runs per state on deferred
    nodes, `link(path)` makes those nodes links (to the Runs list, for operators)."""
    out = []
    for event, nodes in form.events.items():
        name = f"events/{event}"
        out.append(Chart(name, f"On {event}", name,
                         _Builder(counts, link).chart([], nodes)))
    for batch in form.batches.values():
        path = f"batches/{batch.name}"
        root = DeferNode(path, None, "batch", batch.title, batch.do)  # type: ignore[arg-type]
        out.append(Chart(path, f"Batch {batch.label}", path, _Builder(counts, link).chart(
            [f"batch {batch.title!r}, {batch.concurrency} at a time"], (root,))))
    for index, schedule in enumerate(form.schedules):
        path = f"schedules/{index}"
        root = DeferNode(path, None, "schedule", schedule.name, schedule.do)  # type: ignore[arg-type]
        out.append(Chart(path, f"Schedule {schedule.name} ({schedule.cron})", path,
                         _Builder(counts, link).chart(
                             [f"schedule {schedule.name!r}: cron {schedule.cron}"], (root,))))
    return out


def deferred_paths(form: Form) -> list[str]:
    """The paths Runs can carry in `form`, in tree order: every background/delay node,
    then each batch and schedule (where their Runs' `node_path` points)."""
    paths = []
    for nodes in form.events.values():
        paths += [n.path for n in walk(nodes) if isinstance(n, DeferNode)]
    for batch in form.batches.values():
        paths.append(f"batches/{batch.name}")
        paths += [n.path for n in walk(batch.do) if isinstance(n, DeferNode)]
    for index, schedule in enumerate(form.schedules):
        paths.append(f"schedules/{index}")
        paths += [n.path for n in walk(schedule.do) if isinstance(n, DeferNode)]
    return paths


class _Builder:
    """Numbers nodes n0, n1, … in tree order and collects lines."""

    def __init__(self, counts: Counts | None, link: Callable[[str], str] | None):
        self.counts = counts
        self.link = link
        self.lines: list[str] = []
        self.tail: list[str] = []  # class and click lines, after the nodes
        self.next = 0

    def chart(self, header: list[str], nodes: tuple[Node, ...]) -> str:
        self.lines = ["flowchart TD"]
        self.lines += [f"  %% {escape(h)}" for h in header]
        if not nodes:
            self.lines.append(f"  empty[{label('(no nodes)')}]")
        self.sequence(nodes)
        return "\n".join([*self.lines, *self.tail, *CLASSES]) + "\n"

    def sequence(self, nodes: tuple[Node, ...]) -> str | None:
        """Draw `nodes` one after another; the id of the first (None when empty)."""
        first = previous = None
        for node in nodes:
            ident = self.node(node)
            if previous is None:
                first = ident
            else:
                self.lines.append(f"  {previous} --> {ident}")
            previous = ident
        return first

    def node(self, node: Node) -> str:
        ident = f"n{self.next}"
        self.next += 1
        path = escape(node.path, 300)  # kept whole: the node's name everywhere
        if isinstance(node, IfNode):
            self.lines.append(f"  {ident}{{{label('if ' + escape(node.test), path)}}}")
            self.branch(ident, node.then, "then")
            self.branch(ident, node.otherwise, "else")
        elif isinstance(node, DeferNode):
            self.lines.append(f"  {ident}[[{label(*self.deferred(node), path)}]]")
            self.tail += [f"  class {ident} {css}" for css in self.css(node)]
            if self.link is not None:
                url = self.link(node.path).replace('"', "%22").replace("\n", "")
                self.tail.append(f'  click {ident} href "{url}"')
            self.branch(ident, node.do, "later", dotted=True)
            self.branch(ident, node.on_error, "on error", dotted=True, css="failure")
        elif isinstance(node, CallNode):
            self.lines.append(f"  {ident}[/{label(escape('call ' + node.tree), path)}/]")
            self.branch(ident, node.body, "runs")
        elif isinstance(node, TryNode):
            text = "try" + (f", error in {node.error_field}" if node.error_field else "")
            self.lines.append(f"  {ident}[/{label(escape(text), path)}/]")
            self.branch(ident, node.body, "try")
            self.branch(ident, node.handler, "on error", dotted=True, css="failure")
        elif isinstance(node, ProgressNode):
            text = f"progress {node.done}/{node.total}" + (
                f" {node.message}" if node.message else "")
            self.lines.append(f"  {ident}([{label(escape(text), path)}])")
        elif isinstance(node, ActionNode):
            self.lines.append(f"  {ident}[{label(escape(node.action + _args(node.args)), path)}]")
        else:
            self.lines.append(f"  {ident}[{label(escape(type(node).__name__), path)}]")
        return ident

    def branch(self, ident: str, nodes: tuple[Node, ...], label: str, *,
               dotted: bool = False, css: str | None = None) -> None:
        first = self.sequence(nodes)
        if first is None:
            return
        arrow = f"-. {escape(label)} .->" if dotted else f"-->|{label}|"
        self.lines.append(f"  {ident} {arrow} {first}")
        if css:
            self.tail.append(f"  class {first} {css}")

    def deferred(self, node: DeferNode) -> list[str]:
        if node.kind == "delay":
            when = f" at {node.at}" if node.at else (
                f" after {format_duration(node.delay_for)}" if node.delay_for else "")
        else:
            when = ""
        text = escape(f"{node.kind} {node.title!r}{when}")
        if self.counts is None:
            return [text]
        found = self.counts.get(node.path, {})
        return [text, ", ".join(f"{state} {found.get(state, 0)}" for state in STATES)]

    def css(self, node: DeferNode) -> list[str]:
        if self.counts is not None and self.counts.get(node.path, {}).get("dead"):
            return ["deferred", "dead"]
        return ["deferred"]


def _args(args: object) -> str:
    if isinstance(args, dict):
        return (" " + ", ".join(map(str, args))) if args else ""
    return "" if args is None else f" {args}"
