"""The action registry: built-in and custom actions, registered by name.

A custom action is a plain function taking a context and keyword arguments:

    from formrules.actions.registry import action

    @action("notify_slack", params={"channel": "text", "text": "text"})
    def notify_slack(ctx, channel, text):
        ctx.log.info("posting to %s", channel)

Modules named in FORMRULES_ACTIONS (comma-separated import paths) are imported before
rules are validated, so an unknown action name is a validation error, custom or not.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Parameter kinds an action may declare. "text" values are templates, rendered before the
# call; "any" values have their strings rendered too; the others are checked, not rendered.
# "field" names a field of the form; "file" names one or more file fields (a list).
PARAM_KINDS = ("text", "int", "number", "bool", "mapping", "list", "any", "duration",
               "field", "file")
NAME_KINDS = ("field", "file")  # field names, never templates


@dataclass(frozen=True)
class Param:
    """One declared action argument."""

    kind: str = "any"
    required: bool = False
    render: bool = True  # False: the action renders this value itself (e.g. with `response`)
    html: bool = False  # True: rendered with HTML autoescaping (values inserted are escaped)


@dataclass(frozen=True)
class ActionSpec:
    """A registered action: its function and what arguments it takes."""

    name: str
    fn: Callable[..., Any]
    params: dict[str, Param] | None = None  # None: any mapping (or a scalar) is accepted
    positional: str | None = None  # a scalar arg is passed as this parameter
    render_args: bool = True  # False: the action renders its own templates (e.g. `set`)
    extra_check: Callable[..., list[str]] | None = field(default=None, compare=False)
    # True: its only effect is its field writes (`ctx.updates`), so running it again
    # after a crash changes nothing outside the record. A worker commits such a step
    # with the next transaction it makes (the next step's, or the ending), not alone.
    fields_only: bool = False


_REGISTRY: dict[str, ActionSpec] = {}


def action(
    name: str,
    params: dict[str, str | Param] | None = None,
    *,
    positional: str | None = None,
    render_args: bool = True,
    extra_check: Callable[..., list[str]] | None = None,
    fields_only: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as the action `name`. Param values are kinds or `Param`s.

    A kind ending in `!` is required: `{"to": "text!"}`.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        declared = None
        if params is not None:
            declared = {}
            for key, spec in params.items():
                if isinstance(spec, str):
                    kind = spec.rstrip("!")
                    if kind not in PARAM_KINDS:
                        raise ValueError(f"action {name}: unknown param kind {spec!r}")
                    spec = Param(kind, spec.endswith("!"), render=kind not in NAME_KINDS)
                declared[key] = spec
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.fn.__module__, existing.fn.__qualname__) != (
                fn.__module__, fn.__qualname__):
            raise ValueError(f"action {name!r} is already registered by "
                             f"{existing.fn.__module__}.{existing.fn.__qualname__}")
        _REGISTRY[name] = ActionSpec(name, fn, declared, positional,
                                     render_args, extra_check, fields_only)
        return fn

    return decorate


def registry() -> dict[str, ActionSpec]:
    """Every registered action by name (built-ins are registered on first use)."""
    from formrules.actions import builtin  # noqa: F401  (registers on import)

    return _REGISTRY


def get(name: str) -> ActionSpec | None:
    """The action called `name`, or None."""
    return registry().get(name)


def load_modules(spec: str | None) -> None:
    """Import the comma-separated custom action modules from FORMRULES_ACTIONS.

    The working directory is importable (as with `flask run`), so a project's own
    `actions.py` next to its rules works without being installed.
    """
    modules = [m.strip() for m in (spec or "").split(",") if m.strip()]
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        importlib.import_module(module)
