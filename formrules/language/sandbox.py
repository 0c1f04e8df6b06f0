"""The sandbox for rule templates and expressions: Jinja's immutable sandbox, nothing else.

Rule files are code written by authors who are not operators, so nothing in them may
reach Python internals: no `eval`, attribute access checked by Jinja's sandbox, lists and
dicts read-only. Templates render to plain text; HTML escaping happens where it is shown.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, date, datetime, timedelta
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from formrules.language.duration import parse_duration

# A simulated clock for `formrules preview --at` (None: the real one). A context variable,
# so a preview in one thread never moves the clock of requests in others.
_CLOCK: ContextVar[datetime | None] = ContextVar("formrules_clock", default=None)


@contextmanager
def clock(at: datetime):
    """Make `now()` and `today()` in templates and expressions answer `at` meanwhile."""
    token = _CLOCK.set(at.astimezone(UTC))
    try:
        yield
    finally:
        _CLOCK.reset(token)


def _now() -> datetime:
    return _CLOCK.get() or datetime.now(UTC)


def _today() -> date:
    return _now().date()


def _parse_datetime(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


GLOBALS: dict[str, Any] = {
    "now": _now,
    "today": _today,
    "days": lambda n=1: timedelta(days=n),
    "hours": lambda n=1: timedelta(hours=n),
    "minutes": lambda n=1: timedelta(minutes=n),
    "seconds": lambda n=1: timedelta(seconds=n),
    "duration": parse_duration,
    "datetime": _parse_datetime,
}


MAX_REPEAT = 100_000  # longest text or list `*` may build
MAX_EXPONENT = 1_000


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with `*` and `**` bounded so a rule cannot exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right!r} is larger than {MAX_EXPONENT}")
            return left ** right
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int) and \
                    len(seq) * times > MAX_REPEAT:
                raise SecurityError(f"'*' would build {len(seq) * times} items; "
                                    f"the limit is {MAX_REPEAT}")
        return left * right


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    """The one sandboxed environment shared by every template and expression."""
    # An empty optional field is None: render it as nothing, not as the word "None".
    env = _Sandbox(autoescape=False, keep_trailing_newline=True,
                                        finalize=lambda v: "" if v is None else v)
    env.globals.update(GLOBALS)
    env.filters["datetime"] = _parse_datetime
    return env


@functools.lru_cache(maxsize=4096)
def _template(source: str):
    return environment().from_string(source)


@functools.lru_cache(maxsize=4096)
def _expression(source: str):
    return environment().compile_expression(source, undefined_to_none=True)


def render(source: str, variables: dict[str, Any]) -> str:
    """Render a template string in the sandbox."""
    if "{" not in source:  # the common plain-text case costs nothing
        return source
    return _template(source).render(variables)


def evaluate(source: str, variables: dict[str, Any]) -> Any:
    """Evaluate an expression in the sandbox."""
    return _expression(source)(**variables)


def render_value(value: Any, variables: dict[str, Any]) -> Any:
    """Render every string inside nested lists/dicts; leave other values as they are."""
    if isinstance(value, str):
        return render(value, variables)
    if isinstance(value, dict):
        return {k: render_value(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, variables) for v in value]
    return value


def check(source: str, *, expression: bool) -> tuple[str | None, set[tuple[str, str]]]:
    """Compile without running: (error message or None, {(variable, attribute)} used).

    The attribute pairs let validation catch `record.romo` before anything runs.
    """
    env = environment()
    try:
        if expression:
            ast = env.parse("{{ (" + source + ") }}")
        else:
            ast = env.parse(source)
        env.compile(ast)
    except TemplateSyntaxError as exc:
        return exc.message or "syntax error", set()
    used = {
        (n.node.name, n.attr)
        for n in ast.find_all(nodes.Getattr)
        if isinstance(n.node, nodes.Name)
    }
    return None, used
