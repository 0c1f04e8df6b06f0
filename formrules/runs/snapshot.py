"""The copy of its subtree a Run keeps, versioned so that its shape can change later.

A Run executes the rules it started with, possibly days after a deploy. Every reader
goes through `read` (or `node`), which turns any older snapshot into the current shape.

Versions:
- 1 (formrules 0.1.0; no "version" key): raw, fields, intervals, timeout.
- 2: the same keys plus "version" and "form_title" (the form's title when the Run was
  made, for templates inside it). Version 1 reads as version 2 with no form title (the
  form id stands in for it).

A snapshot newer than this code (written by a newer formrules sharing the database) is
refused with a RuleError, which sends the Run dead at once, for an operator to retry on a
worker that runs the newer code.
"""

from __future__ import annotations

from typing import Any

from formrules.errors import Problem, RuleError
from formrules.language.loader import rebuild_defer
from formrules.language.tree import DeferNode

VERSION = 2


def make(node: DeferNode, field_types: dict[str, str],
         form_title: str | None = None) -> dict[str, Any]:
    """The snapshot a new Run of `node` stores."""
    return {
        "version": VERSION, "raw": node.raw, "fields": field_types,
        "intervals": node.retry.intervals(),
        "timeout": node.timeout.total_seconds() if node.timeout else None,
        "form_title": form_title,
    }


def read(snapshot: dict[str, Any], path: str = "") -> dict[str, Any]:
    """`snapshot` in the current shape (a copy); RuleError for one this code cannot read."""
    version = snapshot.get("version", 1) if isinstance(snapshot, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise RuleError([Problem(f"<run {path}>", 1, 1, path,
                                 f"snapshot version {version!r} is newer than this formrules "
                                 f"reads (up to {VERSION}); run it on an upgraded worker")])
    current = dict(snapshot)
    if version < 2:
        current.setdefault("form_title", None)
    current["version"] = VERSION
    return current


def node(snapshot: dict[str, Any], path: str) -> DeferNode:
    """Rebuild the deferred node a Run started with."""
    current = read(snapshot, path)
    return rebuild_defer(current["raw"], path, current["fields"])
