"""The validated rule tree: frozen dataclasses with source positions and node paths.

Raw YAML stops at validation (`formrules.language.loader`); everything after works on these types.
A node's `path` (`events/submit/2/background/do/0`) is the one name used in errors, traces,
logs, job metadata, idempotency keys and the UI.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from formrules.language.source import Pos

_TEMPLATE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)  # a Jinja part of a title
FIELD_TYPES = ("string", "text", "email", "integer", "decimal", "boolean", "date",
               "datetime", "choice")


@dataclass(frozen=True)
class FieldDef:
    """One form field."""

    name: str
    type: str
    label: str
    help: str = ""
    required: bool = False
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()
    default: Any = None
    hidden: bool = False


@dataclass(frozen=True)
class Node:
    """Base of every node: where it is in the tree and in the file."""

    path: str
    pos: Pos


@dataclass(frozen=True)
class ActionNode(Node):
    """`- <action>: <args>`; string args are templates rendered when it runs."""

    action: str
    args: Any


@dataclass(frozen=True)
class IfNode(Node):
    """`- if: <expression>` with `then:` and optional `else:`."""

    test: str
    then: tuple[Node, ...]
    otherwise: tuple[Node, ...]


@dataclass(frozen=True)
class ProgressNode(Node):
    """`- progress: {done, total, message}`: report progress from the tree itself."""

    done: Any
    total: Any
    message: str | None
    title: str | None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a failing deferred node is tried."""

    attempts: int
    backoff: tuple[float, ...] = ()  # seconds between attempts; the last one repeats
    exponential_base: float | None = None
    exponential_max: float | None = None
    jitter: float = 0.1

    def nominal_waits(self) -> list[float]:
        """Seconds to wait before attempt 2, 3, …, without jitter."""
        waits = []
        for i in range(self.attempts - 1):
            if self.exponential_base is not None:
                wait = self.exponential_base * (2 ** i)
                if self.exponential_max is not None:
                    wait = min(wait, self.exponential_max)
            else:
                wait = self.backoff[min(i, len(self.backoff) - 1)] if self.backoff else 0
            waits.append(wait)
        return waits

    def intervals(self, rng: random.Random | None = None) -> list[int]:
        """Seconds to wait before attempt 2, 3, …, with jitter applied (whole seconds)."""
        rng = rng or random.Random()
        return [max(0, round(base + rng.uniform(-base * self.jitter, base * self.jitter)))
                for base in self.nominal_waits()]


DAY = 86400.0
# The schedule users know from workflow platforms: quick first retries, then once a day.
DEFAULT_RETRY = RetryPolicy(attempts=8, backoff=(10, 60, 600, 3600, 6 * 3600, DAY, DAY))
NO_RETRY = RetryPolicy(attempts=1)


NOTIFY_EVENTS = ("start", "end")


@dataclass(frozen=True)
class Notify:
    """`notify:`: which moments of a Run its owner gets a notice of, and e-mail copies."""

    events: tuple[str, ...] = ("end",)  # a subset of NOTIFY_EVENTS, in that order
    # None: no e-mail from the rule (the owner's own preference may still ask for one);
    # "owner": the owner's account address; else a template giving the address.
    email: str | None = None
    explicit: bool = False  # written in the rule (else the default: a notice at the end)


DEFAULT_NOTIFY = Notify()


@dataclass(frozen=True)
class DeferNode(Node):
    """`background:` or `delay:`: children run later on a worker, as one Run."""

    kind: str  # "background" | "delay"
    title: str
    do: tuple[Node, ...]
    flag: str | None = None
    awaited: str = "true"  # "true" | "false" | "optional"
    delay_for: timedelta | None = None
    at: str | None = None  # expression giving a date/datetime
    timeout: timedelta | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    on_error: tuple[Node, ...] = ()
    inline_for: timedelta | None = None
    on_change: str = "keep"  # "recompute" | "keep"
    cancel_if: str | None = None
    when: str | None = None
    user_retry: bool = False  # the owner may retry it once it failed (after its checkpoints)
    notify: Notify = DEFAULT_NOTIFY
    raw: Any = field(default=None, compare=False, repr=False)  # plain snapshot for the Run


@dataclass(frozen=True)
class TaskDef:
    """A named tree an operator runs over selected records (`tasks:`)."""

    name: str
    title: str
    do: tuple[Node, ...]
    concurrency: int = 1
    stop_on_error: bool = False
    retry: RetryPolicy = NO_RETRY
    raw: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """Its name where no one record is meant (lists, headings, the batch): the title
        without its templates ("Export booking {{ record.requester }}" reads "Export
        booking"), or the task's name when nothing is left."""
        text = " ".join(_TEMPLATE.sub(" ", self.title).split()).strip(" :,;-–—")
        return text or self.name.replace("_", " ").capitalize()


@dataclass(frozen=True)
class ScheduleDef:
    """A tree run on a clock (`schedules:`)."""

    name: str
    cron: str
    timezone: str
    title: str
    do: tuple[Node, ...]
    for_each: str | None = None
    catch_up: str = "latest"  # "latest" | "none"
    raw: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Form:
    """One rule file: a form, its event trees, tasks and schedules."""

    id: str
    title: str
    description: str
    fields: tuple[FieldDef, ...]
    events: dict[str, tuple[Node, ...]]
    after_submit_message: str | None
    file: str
    tasks: dict[str, TaskDef] = field(default_factory=dict)
    schedules: tuple[ScheduleDef, ...] = ()

    def field(self, name: str) -> FieldDef | None:
        """The field called `name`, or None."""
        return next((f for f in self.fields if f.name == name), None)

    @property
    def field_types(self) -> dict[str, str]:
        """Field name to type, as stored with each Run's snapshot."""
        return {f.name: f.type for f in self.fields}


@dataclass(frozen=True)
class RuleSet:
    """Every form loaded from a rules directory."""

    forms: dict[str, Form]
    directory: str = ""

    def form(self, form_id: str) -> Form | None:
        """The form with this id, or None."""
        return self.forms.get(form_id)


def walk(nodes: tuple[Node, ...]):
    """Every node in a tree, depth first, including those under if/defer nodes."""
    for node in nodes:
        yield node
        if isinstance(node, IfNode):
            yield from walk(node.then)
            yield from walk(node.otherwise)
        elif isinstance(node, DeferNode):
            yield from walk(node.do)
            yield from walk(node.on_error)
