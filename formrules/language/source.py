"""Safe YAML loading that remembers where every value came from.

Mappings become `Map` and sequences `Seq`; both remember their own position and those of
their keys and items, so validation can report `file:line:col` for any value. Duplicate
keys (which plain YAML loading silently merges) are reported as problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from formrules.errors import Problem


@dataclass(frozen=True)
class Pos:
    """A 1-based position in a rule file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class Map(dict):
    """A YAML mapping with positions for itself, its keys and its values."""

    pos: Pos
    key_pos: dict[Any, Pos]
    value_pos: dict[Any, Pos]


class Seq(list):
    """A YAML sequence with positions for itself and its items."""

    pos: Pos
    item_pos: list[Pos]


# A rule file is a page or two of YAML; these bounds stop hostile files (a "billion laughs"
# of nested aliases, thousands of nesting levels, megabytes of text) long before they cost
# memory or time, with an error at the place that crossed them.
MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 64  # nesting levels of mappings and lists
MAX_NODES = 100_000  # values in the file once every alias (`*name`) is expanded


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing to nest past MAX_DEPTH.

    Its composer is recursive and its scanner slows down with every open `[`/`{`, so both
    stop at the bound instead of at Python's recursion limit (or after minutes).
    """

    depth = 0

    def fetch_flow_collection_start(self, token_class):  # noqa: D102 — PyYAML's hook
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"values nest deeper than {MAX_DEPTH} "
                                            "levels", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):  # noqa: D102 — PyYAML's hook
        if self.check_event(yaml.CollectionStartEvent):
            if self.depth >= MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"values nest deeper than {MAX_DEPTH} levels", mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
        return super().compose_node(parent, index)


class _TooBig(Exception):
    """The expanded file crossed a bound; carries the problem that says where."""

    def __init__(self, problem: Problem):
        self.problem = problem


def _pos(file: str, mark: yaml.Mark) -> Pos:
    return Pos(file, mark.line + 1, mark.column + 1)


class _Converter:
    def __init__(self, file: str, loader: yaml.SafeLoader):
        self.file = file
        self.loader = loader
        self.problems: list[Problem] = []
        self.count = 0
        self.open: set[int] = set()  # nodes being converted: an alias to one is a cycle

    def _stop(self, node: yaml.Node, message: str) -> _TooBig:
        where = _pos(self.file, node.start_mark)
        return _TooBig(Problem(self.file, where.line, where.col, "", message))

    def convert(self, node: yaml.Node) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self._stop(node, f"the file holds more than {MAX_NODES} values once its "
                                   "aliases (*name) are expanded; split it or use fewer aliases")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if id(node) in self.open:
            raise self._stop(node, "an alias (*name) refers to a value that contains it; "
                                   "such a value would never end")
        if len(self.open) >= MAX_DEPTH:
            raise self._stop(node, f"values nest deeper than {MAX_DEPTH} levels "
                                   "once aliases (*name) are expanded")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node)
            seq = Seq(self.convert(item) for item in node.value)
            seq.pos = _pos(self.file, node.start_mark)
            seq.item_pos = [_pos(self.file, item.start_mark) for item in node.value]
            return seq
        finally:
            self.open.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except ValueError as exc:  # e.g. an impossible date such as 2024-02-30
            where = _pos(self.file, node.start_mark)
            self.problems.append(Problem(self.file, where.line, where.col, "",
                                         f"cannot read {node.value!r}: {exc}"))
            return node.value

    def _mapping(self, node: yaml.MappingNode) -> Map:
        try:
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
        except RecursionError:
            raise self._stop(node, "a merge (<<: *name) includes itself") from None
        out = Map()
        out.pos = _pos(self.file, node.start_mark)
        out.key_pos, out.value_pos = {}, {}
        for key_node, value_node in node.value:
            where = _pos(self.file, key_node.start_mark)
            # A key that is a list or mapping is never meaningful here, and constructing
            # one would expand whatever aliases it holds: refuse before building it.
            key = self._scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str | int | float | bool) or key is None:
                self.problems.append(Problem(self.file, where.line, where.col, "",
                                             "mapping keys must be plain text"))
                continue
            if key in out:
                first = out.key_pos[key]
                self.problems.append(Problem(
                    self.file, where.line, where.col, "",
                    f"duplicate key {key!r} (first defined at line {first.line})"))
                continue
            out[key] = self.convert(value_node)
            out.key_pos[key] = where
            out.value_pos[key] = _pos(self.file, value_node.start_mark)
        return out


def load_yaml(text: str, file: str) -> tuple[Any, list[Problem]]:
    """Parse one YAML document safely; return (value, problems). Never executes tags."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_FILE_BYTES:
        return None, [Problem(file, 1, 1, "", f"the file is {size} bytes; a rule file may "
                                              f"have at most {MAX_FILE_BYTES}")]
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        converter = _Converter(file, loader)
        return converter.convert(node), converter.problems
    except _TooBig as exc:
        return None, [exc.problem]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(file, line, col, "", "not valid YAML: " + _plain_words(exc),
                              excerpt=_excerpt(text, line, col))]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 1, 1, "", f"not valid YAML: {exc}")]
    except RecursionError:  # a last guard: the bounds above are meant to come first
        return None, [Problem(file, 1, 1, "", "values nest too deeply to read")]
    finally:
        loader.dispose()


# PyYAML names tokens as its grammar does (`<block end>`, `'?'`); say what they are.
_TOKENS = {
    "'<block end>'": "the end of the indented block", "<block end>": "the end of the "
    "indented block", "'<block mapping start>'": "a key at a different indentation",
    "'?'": "a key", "'-'": "a list item ('-')", "'<stream end>'": "the end of the file",
    "'<scalar>'": "a value", "'<block sequence start>'": "a list",
}


def _plain_words(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's message for `exc`, in the words of someone writing a rule file."""
    problem = exc.problem or ""
    context = exc.context or ""
    if problem.startswith("expected <block end>") and exc.context_mark is not None and \
            context.startswith("while parsing a block"):
        start = exc.context_mark
        found = problem.rsplit("found ", 1)[-1]
        what = "a list item ('-')" if found == "'-'" else "this line"
        return (f"{what} is not indented like the lines of the "
                f"{'list' if 'collection' in context else 'mapping'} it belongs to "
                f"(which starts at line {start.line + 1}, column {start.column + 1}); "
                "check the indentation: items of one mapping or list start in the same "
                "column")
    if problem == "mapping values are not allowed here":
        return ("a ':' here starts a 'key: value' where none can start: is this line "
                "indented too far, or does a value contain ': ' and need quotes?")
    if "'\\t'" in problem:
        return "a tab character; indent with spaces"
    if problem == "could not find expected ':'":
        return "expected 'key: value' here: is a ':' missing on this line or the one above?"
    if problem.startswith("found undefined alias"):
        return (problem.replace("found undefined alias", "the alias")
                + " (*name) refers to no anchor (&name) defined above it")
    for opener, closer in (("[", "]"), ("{", "}")):
        if problem.startswith(f"expected ',' or '{closer}'") and exc.context_mark is not None:
            start = exc.context_mark
            return (f"the '{opener}' at line {start.line + 1}, column {start.column + 1} is "
                    f"not closed with '{closer}' (or a ',' is missing between its items)")
    if "quoted scalar" in context:
        return "a quote is opened and never closed"
    if problem.startswith("expected the node content"):
        problem = problem.replace("expected the node content", "expected a value here")
    for token, words in _TOKENS.items():
        problem = problem.replace(token, words)
    return problem or context  # "while parsing a flow node" is the parser's business


def _excerpt(text: str, line: int, col: int) -> str:
    """The offending line with a caret under the column (empty past the end)."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    source = lines[line - 1].expandtabs(1)[:200]
    return f"    {source}\n    {' ' * min(col - 1, len(source))}^"


def plain(value: Any) -> Any:
    """Strip positions: Map/Seq become dict/list (for JSON snapshots of a subtree)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
