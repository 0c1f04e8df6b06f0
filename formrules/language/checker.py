"""Validation of event-tree nodes: raw YAML in, frozen tree nodes and problems out.

A node's kind is decided by its single key; an unknown kind is an error, never ignored.
Every problem carries file:line:col and the node path. `formrules.language.loader` drives this over
whole files.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from jinja2 import TemplateSyntaxError, meta

from formrules.actions import registry as actions
from formrules.errors import Problem
from formrules.language import sandbox
from formrules.language.duration import parse_duration
from formrules.language.fieldtypes import REGISTRY
from formrules.language.source import Map, Pos, Seq, plain
from formrules.language.tree import (
    DEFAULT_QUEUE,
    DEFAULT_RETRY,
    FIELD_TYPES,
    INPUT_TYPES,
    NO_RETRY,
    NOTIFY_EVENTS,
    QUEUE_NAME,
    ActionNode,
    CallNode,
    DeferNode,
    IfNode,
    InputDef,
    Node,
    Notify,
    ProgressNode,
    RetryPolicy,
    TryNode,
    walk,
)
from formrules.language.variables import FORM_NAMES, RUN_NAMES

DEFER_KEYS = {
    "background": ("title", "flag", "await", "timeout", "retry", "do", "on_error",
                   "inline_for", "queue", "concurrency", "user_retry", "notify"),
    "delay": ("title", "flag", "await", "timeout", "retry", "do", "on_error", "for", "at",
              "on_change", "cancel_if", "when", "queue", "concurrency", "user_retry", "notify"),
}
NOTIFY_KEYS = ("events", "email")
KINDS = ("if", "background", "delay", "progress", "call", "try")
IF_KEYS = ("if", "then", "else")
TRY_KEYS = ("try", "catch", "error_field")
CALL_KEYS = ("tree", "with")
TREE_KEYS = ("inputs", "do")
INPUT_KEYS = ("type", "required", "default")
ERROR_FIELD_TYPES = ("string", "text")  # a caught error's message is text
PROGRESS_KEYS = ("done", "total", "message", "title")
RETRY_KEYS = ("attempts", "backoff", "base", "max", "jitter")
AWAIT_VALUES = (True, False, "optional")
ON_CHANGE_VALUES = ("recompute", "keep")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Names templates and expressions may use besides the sandbox globals.
VARIABLES = ("record", "old", "changed", "form", "run", "error", "response", "inputs", "loop",
             "range", "true", "false", "none", "True", "False", "None")


def did_you_mean(word: str, options) -> str:
    """` (did you mean 'x'?)` when a close option exists, else ``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Checker:
    """Validates one file's raw YAML and builds tree nodes, collecting problems."""

    def __init__(self, file: str, fields: dict[str, str] | None = None):
        self.file = file
        self.fields: dict[str, str] = dict(fields or {})
        self.problems: list[Problem] = []
        # Named trees (`trees:`): their raw YAML and declared inputs, for `call:` nodes.
        self.trees: dict[str, Any] = {}
        self.tree_inputs: dict[str, dict[str, InputDef]] = {}
        self.calls: list[str] = []  # the trees being expanded, outermost first
        self.expanding = 0  # >0 while a call's tree is checked again at its call site
        self.seen: set[tuple[str, int, int, str]] = set()

    # -- reporting ---------------------------------------------------------------------
    def error(self, pos: Pos | None, path: str, message: str) -> None:
        """Record a problem at `pos` (the file's start when unknown).

        A tree's nodes are checked where it is defined and again at each call site (where
        `old`, `error` or `run` may or may not be set): a problem already reported at the
        same place with the same words is not reported again.
        """
        pos = pos or Pos(self.file, 1, 1)
        key = (pos.file, pos.line, pos.col, message)
        if self.expanding and key in self.seen:
            return
        self.seen.add(key)
        self.problems.append(Problem(pos.file, pos.line, pos.col, path, message))

    def warn(self, pos: Pos | None, path: str, message: str) -> None:
        """Record a warning at `pos`: shown by `check` and the editor, the file still loads."""
        pos = pos or Pos(self.file, 1, 1)
        self.problems.append(Problem(pos.file, pos.line, pos.col, path, message,
                                     severity="warning"))

    @staticmethod
    def key_pos(mapping: Any, key: Any) -> Pos | None:
        """Where `key` is written in `mapping`."""
        return getattr(mapping, "key_pos", {}).get(key) or getattr(mapping, "pos", None)

    @staticmethod
    def value_pos(container: Any, key: Any) -> Pos | None:
        """Where the value of `key` (or item `key`) is written."""
        if isinstance(container, Seq) and isinstance(key, int):
            return container.item_pos[key] if key < len(container.item_pos) else container.pos
        return getattr(container, "value_pos", {}).get(key) or getattr(container, "pos", None)

    def known_keys(self, mapping: Map, allowed, path: str, what: str,
                   deprecated=()) -> None:
        """Report keys of `mapping` not in `allowed`, with a suggestion (never one of the
        `deprecated` keys, which are accepted and reported by their caller)."""
        for key in mapping:
            if key not in allowed and key not in deprecated:
                self.error(self.key_pos(mapping, key), path,
                           f"unknown {what} option '{key}'{did_you_mean(key, allowed)}")

    def mapping(self, value: Any, pos: Pos | None, path: str, what: str) -> Map | None:
        """`value` when it is a mapping; else report and return None."""
        if isinstance(value, dict):
            return value
        self.error(pos, path, f"{what} must be a mapping, got {_kind(value)}")
        return None

    # -- scalars -----------------------------------------------------------------------
    def text(self, value: Any, pos: Pos | None, path: str, *, template: bool = True) -> str:
        """A string (numbers allowed); checked as a template when `template`."""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.error(pos, path, f"expected text, got {_kind(value)}")
            return ""
        value = str(value)
        if template:
            self.template(value, pos, path, expression=False)
        return value

    def template(self, source: str, pos: Pos | None, path: str, *, expression: bool,
                 edit: bool = False) -> None:
        """Compile a template or expression and check the fields it names.

        `edit`: it is evaluated when a record is edited (`cancel_if`), so `old` and
        `changed` are set wherever its node is.
        """
        what = "expression" if expression else "template"
        message, used = sandbox.check(source, expression=expression)
        if expression:  # judged as it will run: no wrapper in the verdict or the wording
            message = _expression_error(source) or message
        if message:
            self.error(pos, path, f"{what} does not compile: {message}")
            return
        for variable, attr in used:
            if variable in ("record", "old", "changed") and self.fields and \
                    attr not in self.fields:
                self.error(pos, path, f"unknown field '{attr}' in {what}"
                                      f"{did_you_mean(attr, self.fields)}")
            elif variable == "inputs" and self.calls and \
                    attr not in (declared := self.tree_inputs.get(self.calls[-1], {})):
                self.error(pos, path, f"tree '{self.calls[-1]}' has no input '{attr}'"
                                      f"{did_you_mean(attr, declared)}")
            elif (names := {"form": FORM_NAMES, "run": RUN_NAMES}.get(variable)) and \
                    attr not in names:
                self.error(pos, path, f"'{variable}' has no '{attr}' in {what} (it has "
                                      f"{', '.join(names)}){did_you_mean(attr, names)}")
        env = sandbox.environment()
        ast = env.parse("{{ (" + source + ") }}" if expression else source)
        for name in meta.find_undeclared_variables(ast):
            if name not in VARIABLES and name not in sandbox.GLOBALS:
                self.error(pos, path, f"unknown name '{name}' in {what}"
                                      f"{did_you_mean(name, VARIABLES + tuple(sandbox.GLOBALS))}")
            elif name == "inputs" and not self.calls:
                self.error(pos, path, "'inputs' is only set inside a named tree (trees:)")
            elif not (edit and name in ("old", "changed")) and \
                    (where := _only_in(name, path)) is not None:
                self.error(pos, path, f"'{name}' is only set {where}")

    def expression(self, value: Any, pos: Pos | None, path: str, *, edit: bool = False) -> str:
        """An expression string (a bool or number is accepted as its literal)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, str | int | float):
            self.error(pos, path, f"expected an expression, got {_kind(value)}")
            return "false"
        self.template(str(value), pos, path, expression=True, edit=edit)
        return str(value)

    def duration(self, value: Any, pos: Pos | None, path: str) -> timedelta | None:
        """A duration, or None after reporting a bad one."""
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(pos, path, str(exc))
            return None

    def boolean(self, value: Any, pos: Pos | None, path: str) -> bool:
        """A YAML boolean."""
        if not isinstance(value, bool):
            self.error(pos, path, f"expected true or false, got {_kind(value)}")
            return False
        return value

    def integer(self, value: Any, pos: Pos | None, path: str, minimum: int = 0) -> int:
        """A whole number no smaller than `minimum`."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.error(pos, path, f"expected a whole number >= {minimum}, got {value!r}")
            return minimum
        return value

    def field_name(self, name: Any, pos: Pos | None, path: str, *, boolean: bool = False) -> str:
        """A declared field's name (a boolean one when `boolean`)."""
        if not isinstance(name, str):  # a list here would not even be comparable to names
            self.error(pos, path, f"expected a field name, got {_kind(name)}")
        elif name not in self.fields:
            self.error(pos, path, f"unknown field '{name}'{did_you_mean(name, self.fields)}")
        elif boolean and self.fields[name] != "boolean" and self.fields[name] in FIELD_TYPES:
            self.error(pos, path, f"flag field '{name}' must have type boolean, "
                                  f"not {self.fields[name]}")
        return str(name)

    # -- nodes -------------------------------------------------------------------------
    def nodes(self, value: Any, pos: Pos | None, path: str) -> tuple[Node, ...]:
        """A list of nodes."""
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error(pos, path, f"expected a list of nodes, got {_kind(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            node = self.node(item, self.value_pos(value, i), f"{path}/{i}")
            if node is not None:
                out.append(node)
        return tuple(out)

    def node(self, item: Any, pos: Pos | None, path: str) -> Node | None:
        """One node; its kind is its single key (`if` takes `then`/`else` beside it)."""
        if not isinstance(item, dict) or not item:
            self.error(pos, path, "a node must be a mapping like '- set: {field: value}', "
                                  f"got {_kind(item)}")
            return None
        if "if" in item:
            return self.if_node(item, pos, path)
        if "try" in item:
            return self.try_node(item, pos, path)
        if len(item) != 1:
            self.several_keys(item, pos, path)
            return None
        (kind, args), = item.items()
        kpos, vpos = self.key_pos(item, kind), self.value_pos(item, kind)
        if kind in DEFER_KEYS:
            return self.defer_node(kind, args, kpos, vpos, f"{path}/{kind}", item)
        if kind == "progress":
            return self.progress_node(args, kpos, vpos, path)
        if kind == "call":
            return self.call_node(args, kpos, vpos, path)
        if kind in ("then", "else"):
            self.error(kpos, path, f"'{kind}' belongs beside an 'if:' key")
            return None
        if kind in ("catch", "error_field"):
            self.error(kpos, path, f"'{kind}' belongs beside a 'try:' key")
            return None
        spec = actions.get(kind)
        if spec is None:
            known = list(actions.registry()) + list(KINDS)
            self.error(kpos, path, f"unknown action '{kind}'{did_you_mean(kind, known)}")
            return None
        args = self.action_args(spec, args, vpos, path)
        return ActionNode(path, kpos, kind, args)

    def several_keys(self, item: Map, pos: Pos | None, path: str) -> None:
        """Report a node with several keys, then check each part as a compiler would.

        The usual cause is an option of a `background:`/`delay:` (`on_error:`) indented
        beside it instead of under it: say so, and still check what it holds, so one
        misplaced line does not hide every other mistake in the node.
        """
        kinds = [k for k in item if k in DEFER_KEYS]
        kind = kinds[0] if len(kinds) == 1 else None
        options = [k for k in item if kind and k != kind and k in DEFER_KEYS[kind]]
        for key in options:
            self.error(self.key_pos(item, key), path,
                       f"'{key}' is an option of '{kind}:' but is written beside it: indent "
                       f"it under '{kind}:', level with its 'do:'")
        if len(options) != len(item) - 1:
            keys = ", ".join(map(str, item))
            self.error(pos, path, f"a node has exactly one key naming its kind (an action, "
                                  f"if, background, delay or progress); got {keys}")
        for key, value in item.items():
            vpos = self.value_pos(item, key)
            if key in options and key in ("do", "on_error"):
                self.nodes(value, vpos, f"{path}/{kind}/{key}")
            elif key in options:
                continue  # its value is checked once it is in its place
            elif key in ("then", "else"):
                self.nodes(value, vpos, f"{path}/{key}")
            else:
                part = Map({key: value})
                part.pos, part.key_pos = pos, {key: self.key_pos(item, key)}
                part.value_pos = {key: vpos}
                self.node(part, pos, path)

    def if_node(self, item: Map, pos: Pos | None, path: str) -> IfNode:
        """`if:` with `then:` and optional `else:`."""
        self.known_keys(item, IF_KEYS, path, "if")
        test = self.expression(item["if"], self.value_pos(item, "if"), path)
        if "then" not in item:
            self.error(self.key_pos(item, "if"), path, "'if' needs a 'then:' list")
        then = self.nodes(item.get("then"), self.value_pos(item, "then"), f"{path}/then")
        other = self.nodes(item.get("else"), self.value_pos(item, "else"), f"{path}/else")
        return IfNode(path, self.key_pos(item, "if") or pos, test, then, other)

    def try_node(self, item: Map, pos: Pos | None, path: str) -> TryNode:
        """`try:` with `catch:` and optional `error_field:` beside it (like `if`)."""
        self.known_keys(item, TRY_KEYS, path, "try")
        kpos = self.key_pos(item, "try") or pos
        if "catch" not in item and "error_field" not in item:
            self.error(kpos, path, "'try' needs a 'catch:' list of nodes (or an 'error_field:' "
                                   "to store the error in), beside it")
        if not item.get("try"):
            self.error(self.value_pos(item, "try"), path,
                       "'try' takes a non-empty list of nodes")
        error_field = None
        if "error_field" in item:
            vpos = self.value_pos(item, "error_field")
            error_field = self.field_name(item["error_field"], vpos, path)
            ftype = self.fields.get(error_field)
            if ftype is not None and ftype in FIELD_TYPES and ftype not in ERROR_FIELD_TYPES:
                self.error(vpos, path, f"'error_field' must name a string or text field, "
                                       f"not {ftype}")
        body = self.nodes(item.get("try"), self.value_pos(item, "try"), f"{path}/try")
        handler = self.nodes(item.get("catch"), self.value_pos(item, "catch"), f"{path}/catch")
        return TryNode(path, kpos, body, handler, error_field)

    def declare_trees(self, value: Any, pos: Pos | None) -> None:
        """Note every named tree and its inputs (before any node is checked: a tree may
        call one written after it)."""
        if value is None or self.mapping(value, pos, "trees", "trees") is None:
            return
        for name, _path, body in self.named_trees(value, "trees", "tree", TREE_KEYS):
            self.trees[name] = body

    def named_trees(self, value: Map, section: str, noun: str,
                    keys: tuple[str, ...]) -> Iterator[tuple[str, str, Map]]:
        """The entries of a `name: {…, do: [...]}` section (`trees:`, `batches:`) whose
        name and body are usable: (name, path, body); problems reported on the way."""
        for name, body in value.items():
            path = f"{section}/{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                self.error(self.key_pos(value, name), path,
                           f"a {noun} name is lowercase letters, digits and '_'")
                continue
            body = self.mapping(body, self.value_pos(value, name), path, f"a {noun}")
            if body is None:
                continue
            self.known_keys(body, keys, path, noun)
            if "do" not in body:
                self.error(self.key_pos(value, name), path,
                           f"a {noun} needs a 'do:' list of nodes")
            yield name, path, body
            self.tree_inputs[name] = self.inputs(body.get("inputs"),
                                                 self.value_pos(body, "inputs"), path)

    def inputs(self, value: Any, pos: Pos | None, path: str) -> dict[str, InputDef]:
        """A tree's `inputs: {name: {type, required, default}}`."""
        if value is None or self.mapping(value, pos, f"{path}/inputs", "inputs") is None:
            return {}
        out: dict[str, InputDef] = {}
        for name, spec in value.items():
            ipath = f"{path}/inputs/{name}"
            if not isinstance(name, str) or not _NAME.match(name):
                self.error(self.key_pos(value, name), ipath,
                           "an input name is lowercase letters, digits and '_'")
                continue
            if spec is None:
                spec = {}
            spec = self.mapping(spec, self.value_pos(value, name), ipath, "an input")
            if spec is None:
                continue
            self.known_keys(spec, INPUT_KEYS, ipath, "input")
            itype = spec.get("type", "any")
            if itype not in INPUT_TYPES:
                self.error(self.value_pos(spec, "type"), ipath,
                           f"unknown input type '{itype}'{did_you_mean(itype, INPUT_TYPES)}; "
                           f"expected one of {', '.join(INPUT_TYPES)}")
                itype = "any"
            required = self.boolean(spec["required"], self.value_pos(spec, "required"), ipath) \
                if "required" in spec else False
            default = plain(spec.get("default"))
            if default is not None and not _fits(default, itype):
                self.error(self.value_pos(spec, "default"), ipath,
                           f"'default' {default!r} is not a {itype}")
            out[name] = InputDef(name, itype, required, default)
        return out

    def tree_bodies(self) -> dict[str, tuple[Node, ...]]:
        """Check each named tree's nodes where it is defined (`trees/<name>/do/…`)."""
        out = {}
        for name, body in self.trees.items():
            self.calls.append(name)
            out[name] = self.nodes(body.get("do"), self.value_pos(body, "do"),
                                   f"trees/{name}/do")
            self.calls.pop()
        return out

    def call_node(self, args: Any, kpos: Pos | None, vpos: Pos | None, path: str):
        """`call: {tree: name, with: {input: value}}`: the tree checked again in place."""
        args = self.mapping(args, vpos, path, "call")
        if args is None:
            return None
        self.known_keys(args, CALL_KEYS, path, "call")
        name = args.get("tree")
        tpos = self.value_pos(args, "tree") if "tree" in args else kpos
        if not isinstance(name, str) or not name:
            self.error(tpos, path, "'call' needs 'tree:' naming a tree under 'trees:'")
            return None
        if name not in self.trees:
            if "." in name:
                self.error(tpos, path, f"'{name}': a call names a tree of this file; another "
                                       f"form's trees cannot be called (copy the tree, or "
                                       f"move the shared steps into a custom action)")
            else:
                known = did_you_mean(name, self.trees) if self.trees \
                    else " (this file has no 'trees:')"
                self.error(tpos, path, f"unknown tree '{name}'{known}")
            return None
        declared = self.tree_inputs.get(name, {})
        given = args.get("with")
        wpos = self.value_pos(args, "with") if "with" in args else kpos
        if given is None or self.mapping(given, wpos, path, "'with'") is None:
            given = {}
        for key, value in given.items():
            spec = declared.get(key)
            ipos = self.value_pos(given, key)
            if spec is None:
                self.error(self.key_pos(given, key), path,
                           f"tree '{name}' has no input '{key}'{did_you_mean(key, declared)}")
            elif isinstance(value, str):
                self.template(value, ipos, path, expression=False)
            elif not _fits(plain(value), spec.type):
                self.error(ipos, path, f"input '{key}' of tree '{name}' must be a "
                                       f"{spec.type}, got {_kind(value)}")
            else:
                self._templates_in(value, ipos, path)
        for key, spec in declared.items():
            if spec.required and key not in given:
                self.error(wpos, path, f"call of tree '{name}' needs input '{key}'")
        if name in self.calls:
            cycle = " -> ".join([*self.calls[self.calls.index(name):], name])
            self.error(tpos, path, f"call cycle: {cycle} (a tree may not call itself, "
                                   f"directly or through other trees)")
            return None
        tree = self.trees[name]
        self.calls.append(name)
        self.expanding += 1
        try:
            body = self.nodes(tree.get("do"), self.value_pos(tree, "do"), f"{path}/call")
        finally:
            self.expanding -= 1
            self.calls.pop()
        return CallNode(path, kpos, name, plain(given), body, declared)

    def progress_node(self, args: Any, kpos: Pos | None, vpos: Pos | None, path: str):
        """`progress: {done, total, message, title}`."""
        args = self.mapping(args, vpos, path, "progress") or {}
        self.known_keys(args, PROGRESS_KEYS, path, "progress")
        for key in ("done", "total"):
            if key in args and not isinstance(args[key], int | float):
                self.expression(args[key], self.value_pos(args, key), path)
        for key in ("message", "title"):
            if key in args:
                self.text(args[key], self.value_pos(args, key), path)
        return ProgressNode(path, kpos, args.get("done"), args.get("total"),
                            args.get("message"), args.get("title"))

    def defer_node(self, kind: str, args: Any, kpos, vpos, path: str, item: Any):
        """`background:` or `delay:`; a background is a delay of `now`."""
        args = self.mapping(args, vpos, path, kind)
        if args is None:
            return None
        self.known_keys(args, DEFER_KEYS[kind], path, kind)
        pos = lambda k: self.value_pos(args, k)  # noqa: E731
        delay_for, when_at = (timedelta(0), None) if kind == "background" else (None, None)
        if kind == "delay":
            if ("for" in args) == ("at" in args):
                self.error(kpos, path, "a delay needs exactly one of 'for:' or 'at:'")
            if "for" in args:
                delay_for = self.duration(args["for"], pos("for"), path)
            elif "at" in args and str(args["at"]).strip() == "now":
                delay_for = timedelta(0)
            elif "at" in args:
                when_at = self.expression(args["at"], pos("at"), path)
        if "do" not in args:
            self.error(kpos, path, f"'{kind}' needs a 'do:' list of nodes")
        awaited = args.get("await", kind == "background" or delay_for == timedelta(0))
        if awaited not in AWAIT_VALUES:
            self.error(pos("await"), path, f"'await' must be true, false or optional, "
                                           f"got {awaited!r}")
        on_change = args.get("on_change", "recompute" if when_at else "keep")
        if on_change not in ON_CHANGE_VALUES:
            self.error(pos("on_change"), path, "'on_change' must be recompute or keep")
        elif on_change == "recompute" and not when_at and "on_change" in args:
            self.error(pos("on_change"), path, "'on_change: recompute' needs an 'at:' "
                                               "expression; a 'for:' delay counts from its start")
        title = self.text(args.get("title", "Working on it"), pos("title"), path)
        flag = args.get("flag")
        if flag is not None:
            self.field_name(flag, pos("flag"), path, boolean=True)
        do = self.nodes(args.get("do"), pos("do"), f"{path}/do")
        on_error = self.nodes(args.get("on_error"), pos("on_error"), f"{path}/on_error")
        # Its Runs carry the trees their calls run, so an edit never changes them.
        trees = {n.tree: plain(self.trees[n.tree]) for n in walk(do + on_error)
                 if isinstance(n, CallNode) and n.tree in self.trees}
        return DeferNode(
            path=path, pos=kpos, kind=kind, title=title,
            do=do,
            flag=flag, awaited=str(awaited).lower(), delay_for=delay_for, at=when_at,
            timeout=self.duration(args["timeout"], pos("timeout"), path)
            if "timeout" in args else None,
            retry=self.retry(args["retry"], pos("retry"), path) if "retry" in args
            else DEFAULT_RETRY,
            on_error=on_error,
            inline_for=self.duration(args["inline_for"], pos("inline_for"), path)
            if "inline_for" in args else None,
            on_change=on_change,
            cancel_if=self.expression(args["cancel_if"], pos("cancel_if"), path, edit=True)
            if "cancel_if" in args else None,
            when=self.expression(args["when"], pos("when"), path) if "when" in args else None,
            queue=self.queue(args["queue"], pos("queue"), path) if "queue" in args
            else DEFAULT_QUEUE,
            concurrency=self.integer(args["concurrency"], pos("concurrency"), path, 1)
            if "concurrency" in args else None,
            user_retry=self.boolean(args["user_retry"], pos("user_retry"), path)
            if "user_retry" in args else False,
            notify=self.notify(args["notify"], pos("notify"), path)
            if "notify" in args else Notify(),
            raw=plain(item), trees=trees,
        )

    def queue(self, value: Any, pos: Pos | None, path: str) -> str:
        """`queue: slow`: a lane name workers serve (`formrules worker --queues slow`)."""
        if not isinstance(value, str) or not QUEUE_NAME.match(value):
            self.error(pos, path, f"'queue' must be a name of lowercase letters, digits, '_' "
                                  f"or '-' (at most 40, starting with a letter), got {value!r}")
            return DEFAULT_QUEUE
        return value

    def notify(self, value: Any, pos: Pos | None, path: str) -> Notify:
        """`notify: [start, end]`, `notify: false`, or `notify: {events: [...], email: …}`
        where `email` is true (the owner's address) or a template giving an address."""
        npath = f"{path}/notify"
        email: str | None = None
        on: Any = value
        if value is False:
            on = []
        elif isinstance(value, dict):
            if True in value:  # YAML 1.1 reads a key `on:` as true
                self.error(self.key_pos(value, True), npath,
                           "YAML reads 'on' as true here: name the moments with 'events:'")
            self.known_keys({k: v for k, v in value.items() if k is not True},
                            NOTIFY_KEYS, npath, "notify")
            on = value.get("events", ["end"])
            pos = self.value_pos(value, "events") if "events" in value else pos
            if "email" in value:
                mail, mpos = value["email"], self.value_pos(value, "email")
                if mail is True:
                    email = "owner"
                elif isinstance(mail, str) and mail.strip() and mail != "owner":
                    email = self.text(mail, mpos, npath)
                elif mail is not False:
                    self.error(mpos, npath, "'email' must be true (the owner's address) or "
                                            f"a template giving an address, got {_kind(mail)}")
        if isinstance(on, str):
            on = [on]
        if not isinstance(on, list):
            self.error(pos, npath, "'notify' takes a list of moments (start, end), false, "
                                   f"or a mapping of events and email; got {_kind(on)}")
            return Notify(explicit=True)
        moments = []
        for i, moment in enumerate(on):
            if moment not in NOTIFY_EVENTS:
                where = self.value_pos(on, i) if isinstance(on, Seq) else pos
                self.error(where, npath, f"unknown moment '{moment}' (notify on start or "
                                         f"end){did_you_mean(moment, NOTIFY_EVENTS)}")
            elif moment not in moments:
                moments.append(moment)
        ordered = tuple(m for m in NOTIFY_EVENTS if m in moments)
        return Notify(events=ordered, email=email, explicit=True)

    def retry(self, value: Any, pos: Pos | None, path: str) -> RetryPolicy:
        """`retry: {attempts, backoff: [..] | exponential, base, max, jitter}`."""
        if value is False or value == 0:
            return NO_RETRY
        value = self.mapping(value, pos, f"{path}/retry", "retry")
        if value is None:
            return DEFAULT_RETRY
        rpath = f"{path}/retry"
        self.known_keys(value, RETRY_KEYS, rpath, "retry")
        vp = lambda k: self.value_pos(value, k)  # noqa: E731
        attempts = self.integer(value.get("attempts", DEFAULT_RETRY.attempts), vp("attempts"),
                                rpath, minimum=1)
        jitter = value.get("jitter", 0.1)
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) \
                or not 0 <= jitter <= 1:
            self.error(vp("jitter"), rpath, "'jitter' must be a fraction from 0 to 1")
            jitter = 0.1
        backoff = value.get("backoff")
        if backoff == "exponential":
            base = self.duration(value.get("base", "10s"), vp("base"), rpath)
            cap = self.duration(value.get("max", "1d"), vp("max"), rpath)
            return RetryPolicy(attempts, (), (base or timedelta(10)).total_seconds(),
                               (cap or timedelta(1)).total_seconds(), float(jitter))
        for key in ("base", "max"):
            if key in value:
                self.error(self.key_pos(value, key), rpath,
                           f"'{key}' goes with 'backoff: exponential'")
        if backoff is None:
            steps = DEFAULT_RETRY.backoff
        elif isinstance(backoff, list) and backoff:
            steps = tuple((self.duration(b, self.value_pos(backoff, i), rpath)
                           or timedelta(0)).total_seconds() for i, b in enumerate(backoff))
        else:
            self.error(vp("backoff"), rpath,
                       "'backoff' must be a list of durations or 'exponential'")
            steps = DEFAULT_RETRY.backoff
        return RetryPolicy(attempts, steps, None, None, float(jitter))

    def action_args(self, spec: actions.ActionSpec, args: Any, pos: Pos | None, path: str):
        """Check an action's arguments against what it declares."""
        if spec.extra_check is not None:
            for message in spec.extra_check(self, args, pos, path):
                self.error(pos, path, message)
            return plain(args)
        if spec.params is None:
            self._templates_in(args, pos, path)
            return plain(args)
        if not isinstance(args, dict):
            if spec.positional and args is not None:
                args = Map({spec.positional: args})
                args.pos, args.key_pos, args.value_pos = pos, {}, {}
            elif args is None and not any(p.required for p in spec.params.values()):
                return {}
            else:
                self.error(pos, path, f"'{spec.name}' takes a mapping of "
                                      f"{', '.join(spec.params)}; got {_kind(args)}")
                return {}
        for key, value in args.items():
            param = spec.params.get(key)
            kpos = self.value_pos(args, key)
            if param is None:
                self.error(self.key_pos(args, key), path,
                           f"'{spec.name}' has no option '{key}'{did_you_mean(key, spec.params)}")
            else:
                self._param(spec.name, key, param, value, kpos, path)
        for key, param in spec.params.items():
            if param.required and key not in args:
                self.error(pos, path, f"'{spec.name}' needs '{key}'")
        return plain(args)

    def _param(self, action: str, key: str, param: actions.Param, value: Any, pos, path):
        kind = param.kind
        ok = {
            "text": lambda v: isinstance(v, str | int | float) and not isinstance(v, bool),
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool) or
            isinstance(v, str) and "{" in v,
            "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) or
            isinstance(v, str) and "{" in v,
            "bool": lambda v: isinstance(v, bool),
            "mapping": lambda v: isinstance(v, dict),
            "list": lambda v: isinstance(v, list),
            "any": lambda v: True,
            "duration": lambda v: True,
            "field": lambda v: isinstance(v, str),
            "file": lambda v: isinstance(v, str) or isinstance(v, list) and v
            and all(isinstance(x, str) for x in v),
        }[kind]
        if not ok(value):
            expects = {"field": "a field name",
                       "file": "a file field's name or a list of them"}.get(kind, kind)
            self.error(pos, path, f"'{action}' option '{key}' expects {expects}, "
                                  f"got {_kind(value)}")
        elif kind in ("field", "file"):
            names = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, name in names:
                where = pos if i is None else self.value_pos(value, i) or pos
                self.field_name(name, where, path)
                declared = REGISTRY.get(self.fields.get(name, ""))
                if kind == "file" and declared is not None and not declared.upload:
                    self.error(where, path, f"'{action}' option '{key}': '{name}' is not a "
                                            f"file field (it is {self.fields[name]})")
        elif kind == "duration":
            self.duration(value, pos, path)
        else:
            self._templates_in(value, pos, path)

    def _templates_in(self, value: Any, pos: Pos | None, path: str) -> None:
        if isinstance(value, str):
            self.template(value, pos, path, expression=False)
        elif isinstance(value, dict):
            for k, v in value.items():
                self._templates_in(v, self.value_pos(value, k), path)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self._templates_in(v, self.value_pos(value, i), path)


def _expression_error(source: str) -> str | None:
    """Why `source` is not an expression, in the words of the compiler that runs it."""
    if not source.strip():
        return "it is empty"
    try:
        sandbox.environment().compile_expression(source)
    except TemplateSyntaxError as exc:
        return (exc.message or "syntax error").replace("end of template", "end of expression") \
            .replace("chunk after expression", "unexpected text after the expression")
    return None


def _fits(value: Any, itype: str) -> bool:
    """Whether a literal (not a template) is a value of an input type."""
    if itype == "any" or value is None:
        return True
    if itype == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return {"string": isinstance(value, str | int | float),
            "number": isinstance(value, int | float),
            "integer": isinstance(value, int)}[itype]


def _only_in(name: str, path: str) -> str | None:
    """Where `name` is set, when it is not set at `path` (a run there would fail on it).

    A named tree's nodes (`trees/…`) are judged at each call site instead, where the
    path says whether the call runs in an update event, an on_error branch or a Run.
    """
    if path.startswith("trees/"):
        return None
    if name in ("old", "changed") and not path.startswith("events/update"):
        return "in update events"
    if name == "error" and "/on_error" not in path and "/catch/" not in path:
        return "in on_error branches and try's catch"
    if name == "run" and "/do/" not in path and "/on_error" not in path:
        return "inside a Run (the `do:` of background, delay, batches and schedules)"
    # "tasks/": the path of batch Runs started before batches were called batches
    if name == "response" and not path.startswith("events/") and \
            not path.startswith(("batches/", "tasks/", "schedules/")):
        return "in http_request's save"
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
