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


def _pos(file: str, mark: yaml.Mark) -> Pos:
    return Pos(file, mark.line + 1, mark.column + 1)


class _Converter:
    def __init__(self, file: str, loader: yaml.SafeLoader):
        self.file = file
        self.loader = loader
        self.problems: list[Problem] = []

    def convert(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node)
        if isinstance(node, yaml.SequenceNode):
            seq = Seq(self.convert(item) for item in node.value)
            seq.pos = _pos(self.file, node.start_mark)
            seq.item_pos = [_pos(self.file, item.start_mark) for item in node.value]
            return seq
        try:
            return self.loader.construct_object(node, deep=True)
        except ValueError as exc:  # e.g. an impossible date such as 2024-02-30
            where = _pos(self.file, node.start_mark)
            self.problems.append(Problem(self.file, where.line, where.col, "",
                                         f"cannot read {node.value!r}: {exc}"))
            return node.value

    def _mapping(self, node: yaml.MappingNode) -> Map:
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
        out = Map()
        out.pos = _pos(self.file, node.start_mark)
        out.key_pos, out.value_pos = {}, {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            where = _pos(self.file, key_node.start_mark)
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
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        converter = _Converter(file, loader)
        return converter.convert(node), converter.problems
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = ": ".join(x for x in (exc.context, exc.problem) if x)
        return None, [Problem(file, line, col, "", f"not valid YAML: {what}")]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 1, 1, "", f"not valid YAML: {exc}")]
    finally:
        loader.dispose()


def plain(value: Any) -> Any:
    """Strip positions: Map/Seq become dict/list (for JSON snapshots of a subtree)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
