"""A Run's snapshot: the subtree it started with, typed, versioned, and its retry timing.

Stored as JSON in `runs.snapshot`:

    {"v": 3, "raw": {kind: options}, "fields": {name: type}, "intervals": [s, ...],
     "timeout": seconds | null, "form_title": "…" | null,
     "inputs": {"old": {...}, "changed": {...}},
     "trees": {name: {inputs: ..., do: [...]}}, "call": {"tree": name, "inputs": {...}}}

`v` is the format version (a snapshot without it is version 1, which had no `inputs`;
version 2 had no `trees` or `call`, and all three still load);
`inputs` carries the variables an update event had (`old`, `changed`, as stored), so a
Background or Delay it started sees them on the worker too. `trees` holds the named trees
the node's `call:`s reach, as they were when the Run started (an edit of the rule file
never changes a Run in flight), and `call` the tree the node itself is written in, with
the call's evaluated inputs (its templates may name `inputs.`). `node()` rebuilds the
DeferNode through the checker once per distinct snapshot per process (an LRU keyed by
its canonical JSON), not once per job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from formrules.errors import Problem, RuleError
from formrules.language.loader import rebuild_defer
from formrules.language.tree import DeferNode
from formrules.language.values import typed, typed_record

VERSION_KEY = "v"  # shared with the schema migrations: keep the name
VERSION = 3
INPUT_NAMES = ("old", "changed")  # the update event's variables a Run carries


@dataclass(frozen=True)
class Snapshot:
    """What a Run needs from the rules it started with."""

    raw: dict[str, Any]
    fields: dict[str, str]
    intervals: tuple[int, ...] = ()  # seconds before attempt 2, 3, …
    timeout: float | None = None  # the node's `timeout:` in seconds (None: the default)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # old/changed, stored
    form_title: str | None = None  # the form's title when the work started (templates)
    trees: dict[str, Any] = field(default_factory=dict)  # named trees its calls reach
    call: dict[str, Any] | None = None  # {"tree", "inputs"}: the tree the node sits in
    version: int = VERSION

    @classmethod
    def load(cls, data: dict[str, Any]) -> Snapshot:
        """Read a stored snapshot of any known version (missing `v` means 1)."""
        version = int(data.get(VERSION_KEY, 1))
        if version > VERSION:  # written by newer code: refuse rather than guess
            raise RuleError([Problem("<snapshot>", 1, 1, "", f"snapshot version {version} is "
                                     f"newer than this code understands ({VERSION})")])
        return cls(raw=data.get("raw") or {}, fields=dict(data.get("fields") or {}),
                   intervals=tuple(data.get("intervals") or ()),
                   timeout=data.get("timeout"),
                   inputs=dict(data.get("inputs") or {}) if version >= 2 else {},
                   form_title=data.get("form_title"),
                   trees=dict(data.get("trees") or {}) if version >= 3 else {},
                   call=data.get("call") if version >= 3 else None,
                   version=VERSION)

    @classmethod
    def of(cls, node: DeferNode, fields: dict[str, str],
           inputs: dict[str, dict[str, Any]] | None = None,
           form_title: str | None = None, call: dict[str, Any] | None = None) -> Snapshot:
        """The snapshot for a new Run of `node` (retry jitter is drawn here, once).

        `call`: `{"tree": name, "inputs": {...}}` when `node` is written inside a named
        tree, with the inputs its call was given."""
        return cls(raw=node.raw, fields=dict(fields), intervals=tuple(node.retry.intervals()),
                   timeout=node.timeout.total_seconds() if node.timeout else None,
                   inputs={k: v for k, v in (inputs or {}).items() if k in INPUT_NAMES},
                   form_title=form_title, trees=dict(node.trees), call=call)

    def dump(self) -> dict[str, Any]:
        """The JSON form stored in `runs.snapshot`."""
        out: dict[str, Any] = {VERSION_KEY: self.version, "raw": self.raw,
                               "fields": self.fields, "intervals": list(self.intervals),
                               "timeout": self.timeout, "form_title": self.form_title}
        if self.inputs:
            out["inputs"] = self.inputs
        if self.trees:
            out["trees"] = self.trees
        if self.call:
            out["call"] = self.call
        return out

    def node(self, path: str) -> DeferNode:
        """The deferred node, rebuilt (and checked) once per distinct snapshot and path."""
        tree = self.call["tree"] if self.call else None
        inputs = sorted((self.call or {}).get("inputs") or ())
        return _rebuild(json.dumps([self.raw, self.fields, path, self.trees, tree, inputs],
                                   sort_keys=True))

    def variables(self) -> dict[str, Any]:
        """The carried update-event variables, typed as expressions see them."""
        out: dict[str, Any] = {}
        if "old" in self.inputs:
            out["old"] = typed_record(self.inputs["old"], self.fields)
        if "changed" in self.inputs:
            out["changed"] = {k: typed(v, self.fields.get(k, "string"))
                              for k, v in self.inputs["changed"].items()}
        if self.call:
            out["inputs"] = dict(self.call.get("inputs") or {})
        return out

    def timeout_seconds(self, default: float) -> float:
        """The node's time limit per attempt, or `default`."""
        return self.timeout or default

    def waits_after(self, attempt: int, max_attempts: int) -> list[int]:
        """Seconds to wait before each attempt still allowed once `attempt` has failed.

        The one place retry timing is worked out: the job schedules the next attempt
        (`Run.due_at`) with the first wait; RQ does not retry by itself.
        """
        intervals = list(self.intervals) or [0]
        return [intervals[min(i, len(intervals) - 1)]
                for i in range(max(0, attempt - 1), max_attempts - 1)]


@lru_cache(maxsize=512)
def _rebuild(key: str) -> DeferNode:
    raw, fields, path, trees, tree, inputs = json.loads(key)
    return rebuild_defer(raw, path, fields, trees, tree, inputs)
