"""The sandbox for rule templates and expressions: Jinja's immutable sandbox, bounded.

Rule files are code written by authors who are not operators, so nothing in them may
reach Python internals (attribute access checked by Jinja's sandbox, lists and dicts
read-only) nor exhaust a worker's memory or time. Every value a template builds passes a
hook that bounds its size before it is allocated: `*`, `+`, `%`, `**` and `~`, every call
(string padding, `join`, `format`, ...), every filter, every loop step and every piece of
output. A render also has a budget of work and a deadline. Crossing any bound raises
`TemplateLimit`, a permanent error: retrying the same template cannot help.

Templates render to plain text; `html=True` renders with HTML autoescaping (e-mail bodies).
"""

from __future__ import annotations

import contextvars
import functools
import re
import string
import time
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, date, datetime, timedelta
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from formrules.errors import PermanentError
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

# The bounds. Sizes count characters of text and items of lists and mappings, nested ones
# included (a list holding the same big list twice counts it twice, as printing it would).
MAX_SIZE = 1_000_000  # largest text or list any one value may be
MAX_OUTPUT = 1_000_000  # characters one render may write (set blocks and macros included)
MAX_WORK = 5_000_000  # sizes built plus loop steps plus calls, per render
MAX_SECONDS = 10.0  # wall time of one render
MAX_PAD = 10_000  # widths and precisions in format strings ("{:>10}", "%10s")
MAX_DEPTH = 100  # nested calls (a macro calling itself)
MAX_INT_BITS = 100_000  # about 30 000 decimal digits
MAX_REPEAT = 100_000  # longest text or list `*` may build; widths and counts of filters
MAX_EXPONENT = 1_000


class TemplateLimit(PermanentError, SecurityError):
    """A template or expression would build too much or run too long: never retried.

    A SecurityError too: like the sandbox's own refusals, it is the rule that is wrong.
    """

    def __init__(self, message: str):
        super().__init__(f"template limit: {message}",
                         "This form's rules asked for more work than a step may do.")


class _Budget:
    """What one render has used so far."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_SECONDS
        self.work = 0
        self.output = 0
        self.depth = 0
        self.sizes: dict[int, tuple[Any, int]] = {}

    def spend(self, units: int) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise TemplateLimit(f"the template does more than {MAX_WORK} steps of work")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"the template ran longer than {MAX_SECONDS:g} seconds")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _current() -> _Budget:
    """The running render's budget (a fresh one for code that renders outside `render`)."""
    return _budget.get() or _Budget()


_SIZED = (str, bytes, list, tuple, set, frozenset, dict)


def size(value: Any, limit: int = MAX_SIZE) -> int:
    """The size of `value` with nested containers expanded; TemplateLimit past `limit`.

    Sizes of containers are remembered for the render (templates cannot change them: the
    sandbox is immutable), so a list holding one big list a thousand times costs a
    thousand steps to measure, not a thousand times the big one.
    """
    if isinstance(value, str | bytes):
        total = len(value)
    elif not isinstance(value, _SIZED):
        return 0
    else:
        memo = _current().sizes
        hit = memo.get(id(value))
        if hit is not None and hit[0] is value:
            total = hit[1]
        else:
            inner = value.values() if isinstance(value, dict) else value
            total = len(value)
            if total <= limit:
                keys = [k for k in value if isinstance(k, str)] if isinstance(value, dict) \
                    else ()
                for item in [x for x in inner if isinstance(x, _SIZED)]:
                    total += size(item, limit)
                    if total > limit:
                        break
                total += sum(map(len, keys))
            if total > 1000:  # small ones are cheap to walk again; big ones are kept
                memo[id(value)] = (value, total)  # kept alive, so its id stays its own
    if total > limit:
        raise TemplateLimit(f"a value would hold more than {limit} characters or items")
    return total


def _built(value: Any) -> Any:
    """Check a value just built and charge it to the render's budget."""
    _current().spend(size(value) + 1)
    return value


def _check_width(number: Any, what: str) -> None:
    """Widths and counts (`center(n)`, `batch(n)`, `ljust(n)`) go up to MAX_REPEAT."""
    if isinstance(number, int) and not isinstance(number, bool) and abs(number) > MAX_REPEAT:
        raise TemplateLimit(f"{what} {number} is larger than {MAX_REPEAT}")


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _check_percent(fmt: str) -> None:
    """Refuse `%` formats whose widths or precisions would allocate a lot."""
    for match in _PERCENT.finditer(fmt):
        for number in match.groups():
            if number == "*":
                raise TemplateLimit("'*' widths in % formats are not allowed")
            if number and int(number) > MAX_PAD:
                raise TemplateLimit(f"a width of {number} in a format is larger than {MAX_PAD}")


def _check_format_spec(fmt: str) -> None:
    """Refuse `str.format` widths and precisions past MAX_PAD (and nested ones)."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error, with its own words
    for _, _, spec, _ in parsed:
        if spec and "{" in spec:
            raise TemplateLimit("nested '{}' in a format specification is not allowed")
        for number in re.findall(r"\d+", spec or ""):
            if int(number) > MAX_PAD:
                raise TemplateLimit(f"a width of {number} in a format is larger than {MAX_PAD}")


def _estimate_join(separator: Any, items: list[Any]) -> None:
    total = size(separator) * max(0, len(items) - 1)
    for item in items:
        total += size(item) if isinstance(item, str) else len(str(item)) if \
            isinstance(item, int | float | date | timedelta) else size(item)
        if total > MAX_SIZE:
            raise TemplateLimit(f"join would build more than {MAX_SIZE} characters")


def _estimate_replace(text: Any, old: Any, new: Any, count: Any) -> None:
    if not isinstance(text, str | bytes) or not isinstance(new, str | bytes):
        return
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    if len(text) + hits * len(new) > MAX_SIZE:
        raise TemplateLimit(f"replace would build more than {MAX_SIZE} characters")


# str and bytes methods whose result can be far larger than their arguments.
def _before_str_method(name: str, text: Any, args: tuple, kwargs: dict) -> None:
    if name in ("ljust", "rjust", "center", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        _check_width(width, "a width of")
    elif name == "expandtabs":
        tabs = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabs, int) and len(text) * max(tabs, 1) > MAX_SIZE:
            raise TemplateLimit(f"expandtabs would build more than {MAX_SIZE} characters")
    elif name == "replace":
        _estimate_replace(text, *(list(args) + [None, None, -1])[:3])
    elif name == "join":
        items = list(args[0]) if args else []
        _estimate_join(text, items)
        return
    elif name == "translate":
        raise TemplateLimit("translate is not available in templates")


def _checked_filter(name: str, fn):
    """`fn` with its arguments bounded before it runs and its result after."""
    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(fn)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.spend(1)
        values = list(args[skip:])
        for arg in (*values, *kwargs.values()):
            size(arg)
        for arg in (*values[1:], *kwargs.values()):  # not the value filtered: its options
            _check_width(arg, f"'{name}' argument")
        value = values[0] if values else None
        if name == "join" and values:
            items = list(value if isinstance(value, Iterable) else [])
            separator = values[1] if len(values) > 1 else kwargs.get("d", "")
            _estimate_join(separator, items)
            args = (*args[:skip], items, *args[skip + 1:])
        elif name == "replace" and len(values) >= 3:
            _estimate_replace(value, values[1], values[2],
                              values[3] if len(values) > 3 else kwargs.get("count"))
        elif name in ("format",) and isinstance(value, str):
            _check_percent(value)
        elif name == "indent":
            width = values[1] if len(values) > 1 else kwargs.get("width", 4)
            pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            if isinstance(value, str) and (value.count("\n") + 1) * pad + len(value) > MAX_SIZE:
                raise TemplateLimit(f"indent would build more than {MAX_SIZE} characters")
        elif name == "wordwrap":
            wrap = values[3] if len(values) > 3 else kwargs.get("wrapstring") or "\n"
            if isinstance(value, str) and len(value) * (1 + len(str(wrap))) > MAX_SIZE:
                raise TemplateLimit(f"wordwrap would build more than {MAX_SIZE} characters")
        elif name == "sum" and values and isinstance(value, list | tuple):
            size([item for item in value if not isinstance(item, int | float)])
        return _built(fn(*args, **kwargs))

    return bounded


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox whose every operation is bounded (see the module doc)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _current().spend(1)
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
                raise TemplateLimit(f"exponent {right!r} is larger than {MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() * max(right, 0) > MAX_INT_BITS:
                raise TemplateLimit(f"'**' would build a number of more than {MAX_INT_BITS} "
                                    "bits")
            return _built(left ** right)
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and \
                        size(seq) * times > MAX_REPEAT:
                    raise TemplateLimit(f"'*' would build {size(seq) * times} items; "
                                        f"the limit is {MAX_REPEAT}")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimit(f"'*' would build a number of more than {MAX_INT_BITS} "
                                    "bits")
            return _built(left * right)
        if operator == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                size([left, right])
            return _built(left + right)
        if isinstance(left, str):  # "%"
            _check_percent(left)
            size(right)
        return _built(left % right)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _current()
        budget.spend(1)
        for arg in (*args, *kwargs.values()):
            size(arg)
        if isinstance(__obj, types.BuiltinMethodType) and \
                isinstance(getattr(__obj, "__self__", None), str | bytes):
            _before_str_method(__obj.__name__, __obj.__self__, args, kwargs)
        budget.depth += 1
        try:
            if budget.depth > MAX_DEPTH:
                raise TemplateLimit(f"calls nest deeper than {MAX_DEPTH} levels")
            return _built(super().call(__context, __obj, *args, **kwargs))
        finally:
            budget.depth -= 1

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapped)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format_spec(fmt)
            for arg in (*args, *kwargs.values()):
                size(arg)
            return _built(wrapped(*args, **kwargs))

        return bounded

    def _generate(self, source, name, filename, defer_init=False):
        """Compile with every loop, `~` and output routed through the bounds."""
        source = _RouteThroughBounds(markup=self.autoescape is True).visit(source)
        source.set_environment(self)
        return super()._generate(source, name, filename, defer_init=defer_init)


def _iterate(iterable: Any) -> Iterator[Any]:
    """A loop's items, each one a step of the render's work."""
    budget = _current()
    for item in iterable:
        budget.spend(1)
        yield item


def _concat(*pieces: Any) -> str:
    size(list(pieces))
    return _built(str_join(pieces))


def _concat_markup(*pieces: Any) -> str:
    size(list(pieces))
    return _built(markup_join(pieces))


def _output(value: Any) -> Any:
    """Count what a template writes; past MAX_OUTPUT the render stops."""
    budget = _current()
    if isinstance(value, str):
        written = len(value)
    else:
        size(value)  # bounded before it is turned into text
        written = len(str(value))
    budget.output += written
    if budget.output > MAX_OUTPUT:
        raise TemplateLimit(f"the template writes more than {MAX_OUTPUT} characters")
    budget.spend(written + 1)
    return value


class _RouteThroughBounds(NodeTransformer):
    """Rewrite a template: loops iterate through `_iterate`, `~` and output are counted."""

    def __init__(self, markup: bool):
        self.concat = "_fr_concat_markup" if markup else "_fr_concat"

    @staticmethod
    def hook(name: str, *args: nodes.Expr) -> nodes.Call:
        call = nodes.Call(nodes.Name(name, "load"), list(args), [], None, None)
        return call.set_lineno(args[0].lineno if args else 1)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self.hook("_fr_iterate", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return self.hook(self.concat, *node.nodes)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        # Literal text stays literal: never escaped, whatever the autoescape setting.
        node.nodes = [nodes.MarkSafeIfAutoescape(self.hook(
            "_fr_output", nodes.Const(child.data).set_lineno(child.lineno)))
            if isinstance(child, nodes.TemplateData) else self.hook("_fr_output", child)
            for child in node.nodes]
        return node


def _make(*, html: bool) -> ImmutableSandboxedEnvironment:
    # An empty optional field is None: render it as nothing, not as the word "None".
    env = _Sandbox(autoescape=html, keep_trailing_newline=True,
                   finalize=lambda v: "" if v is None else v)
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) is a memory bomb, and of no use here
    env.globals.update(GLOBALS)
    env.globals.update(_fr_iterate=_iterate, _fr_concat=_concat,
                       _fr_concat_markup=_concat_markup, _fr_output=_output)
    env.filters["datetime"] = _parse_datetime
    env.filters = {name: _checked_filter(name, fn) for name, fn in env.filters.items()}
    return env


@functools.cache
def environment(html: bool = False) -> ImmutableSandboxedEnvironment:
    """The sandboxed environment shared by every template and expression (or HTML ones)."""
    return _make(html=html)


@functools.lru_cache(maxsize=4096)
def _template(source: str, html: bool = False):
    return environment(html).from_string(source)


@functools.lru_cache(maxsize=4096)
def _expression(source: str):
    return environment().compile_expression(source, undefined_to_none=True)


def _bounded(fn, *args: Any) -> Any:
    token = _budget.set(_Budget())
    try:
        return fn(*args)
    except RecursionError as exc:
        raise TemplateLimit("the template nests too deeply") from exc
    except MemoryError as exc:  # a last guard: the bounds above are meant to come first
        raise TemplateLimit("the template needs too much memory") from exc
    finally:
        _budget.reset(token)


def render(source: str, variables: dict[str, Any], *, html: bool = False) -> str:
    """Render a template string in the sandbox (`html`: autoescape what it inserts)."""
    if "{" not in source:  # the common plain-text case costs nothing
        return source
    return str(_bounded(_template(source, html).render, variables))


def evaluate(source: str, variables: dict[str, Any]) -> Any:
    """Evaluate an expression in the sandbox."""
    def run() -> Any:
        value = _expression(source)(**variables)
        size(value)  # what it gives is stored or printed: it must be bounded too
        return value

    return _bounded(run)


def render_value(value: Any, variables: dict[str, Any], *, html: bool = False) -> Any:
    """Render every string inside nested lists/dicts; leave other values as they are."""
    if isinstance(value, str):
        return render(value, variables, html=html)
    if isinstance(value, dict):
        return {k: render_value(v, variables, html=html) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, variables, html=html) for v in value]
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
        used = {
            (n.node.name, n.attr)
            for n in ast.find_all(nodes.Getattr)
            if isinstance(n.node, nodes.Name)
        }
        env.compile(ast)
    except TemplateSyntaxError as exc:
        return exc.message or "syntax error", set()
    return None, used
