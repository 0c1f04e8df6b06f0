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

from formrules.language.fieldtypes import REGISTRY
from formrules.language.source import Pos

_TEMPLATE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)  # a Jinja part of a title
FIELD_TYPES = tuple(REGISTRY)  # the registered field types (formrules.language.fieldtypes)
# Who may start a batch from the pages (`started_by:`): operators over any records, users
# over records of their own (from My tasks).
STARTERS = ("operators", "users")


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
    max_size: int | None = None  # file: most bytes accepted
    accept: tuple[str, ...] = ()  # file: content types and extensions accepted


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
class InputDef:
    """One declared input of a named tree."""

    name: str
    type: str  # one of INPUT_TYPES
    required: bool = False
    default: Any = None


INPUT_TYPES = ("string", "number", "integer", "boolean", "any")


@dataclass(frozen=True)
class CallNode(Node):
    """`- call: {tree: name, with: {input: value}}`: a named tree (`trees:`), inlined.

    `body` is the tree's nodes validated again under this node's path (`<path>/call/0`,
    …), so checkpoints and idempotency keys name each call site's steps apart.
    `inputs` are the `with:` values as written (templates and literals), evaluated in
    the caller's context when the call runs.
    """

    tree: str
    inputs: dict[str, Any]
    body: tuple[Node, ...]
    params: dict[str, InputDef] = field(default_factory=dict)  # the tree's declared inputs


@dataclass(frozen=True)
class TryNode(Node):
    """`- try: [steps]` with `catch: [steps]` (and `error_field:`): a per-step error port.

    An error in `body` that is not a cancel is caught (on a worker, a retryable one only
    once the Run's attempts are used up), its safe message is stored and `handler` runs;
    the tree then goes on after this node.
    """

    body: tuple[Node, ...]
    handler: tuple[Node, ...]
    error_field: str | None = None


@dataclass(frozen=True)
class TreeDef:
    """A named, reusable tree (`trees:`) that `call:` nodes run with inputs."""

    name: str
    inputs: dict[str, InputDef]
    do: tuple[Node, ...]
    raw: Any = field(default=None, compare=False, repr=False)  # plain, for Run snapshots


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
        # The module's generator, not a new one per call (seeding one reads os.urandom,
        # on every Run a submit creates); Python reseeds it in every forked child.
        uniform = rng.uniform if rng is not None else random.uniform
        return [max(0, round(base + uniform(-base * self.jitter, base * self.jitter)))
                for base in self.nominal_waits()]


DAY = 86400.0
# The schedule users know from workflow platforms: quick first retries, then once a day.
DEFAULT_RETRY = RetryPolicy(attempts=8, backoff=(10, 60, 600, 3600, 6 * 3600, DAY, DAY))
NO_RETRY = RetryPolicy(attempts=1)
DEFAULT_QUEUE = "default"  # the lane of a node that names none; what a plain worker serves
QUEUE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


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
    queue: str = DEFAULT_QUEUE  # the lane its Runs wait in (`formrules worker --queues`)
    concurrency: int | None = None  # at most this many of its Runs at once; None: no limit
    user_retry: bool = False  # the owner may retry it once it failed (after its checkpoints)
    notify: Notify = DEFAULT_NOTIFY
    raw: Any = field(default=None, compare=False, repr=False)  # plain snapshot for the Run
    # The named trees its `call:` nodes reach ({name: plain tree}), carried by its Runs.
    trees: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class BatchDef:
    """A named tree run over many selected records, one Run each (`batches:`)."""

    name: str
    title: str
    do: tuple[Node, ...]
    concurrency: int = 1
    stop_on_error: bool = False
    retry: RetryPolicy = NO_RETRY
    started_by: tuple[str, ...] = ("operators",)  # some of STARTERS
    raw: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """Its name where no one record is meant (lists, headings, the batch): the title
        without its templates ("Export booking {{ record.requester }}" reads "Export
        booking"), or the batch's name when nothing is left."""
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
    """One rule file: a form, its event trees, batches and schedules."""

    id: str
    title: str
    description: str
    fields: tuple[FieldDef, ...]
    events: dict[str, tuple[Node, ...]]
    after_submit_message: str | None
    file: str
    batches: dict[str, BatchDef] = field(default_factory=dict)
    schedules: tuple[ScheduleDef, ...] = ()
    # `retention:`: how long its finished Runs are kept, by status (None: forever); a
    # status left out takes the deployment's default (`formrules.language.retention`).
    retention: dict[str, timedelta | None] = field(default_factory=dict)
    trees: dict[str, TreeDef] = field(default_factory=dict)

    def field(self, name: str) -> FieldDef | None:
        """The field called `name`, or None."""
        return next((f for f in self.fields if f.name == name), None)

    @property
    def field_types(self) -> dict[str, str]:
        """Field name to type, as stored with each Run's snapshot."""
        return {f.name: f.type for f in self.fields}

    @property
    def tree_sources(self) -> dict[str, Any]:
        """Each named tree as written (plain), for rebuilding a batch's or schedule's node."""
        return {name: tree.raw for name, tree in self.trees.items()}


@dataclass(frozen=True)
class RuleSet:
    """Every form loaded from a rules directory."""

    forms: dict[str, Form]
    directory: str = ""

    def form(self, form_id: str) -> Form | None:
        """The form with this id, or None."""
        return self.forms.get(form_id)


def walk(nodes: tuple[Node, ...]):
    """Every node in a tree, depth first, including those under if/defer/call/try nodes."""
    for node in nodes:
        yield node
        if isinstance(node, IfNode):
            yield from walk(node.then)
            yield from walk(node.otherwise)
        elif isinstance(node, CallNode):
            yield from walk(node.body)
        elif isinstance(node, TryNode):
            yield from walk(node.body)
            yield from walk(node.handler)
        elif isinstance(node, DeferNode):
            yield from walk(node.do)
            yield from walk(node.on_error)


def queues_of(ruleset: RuleSet) -> set[str]:
    """Every queue the rules name (the default one always): what `formrules run` serves."""
    found = {DEFAULT_QUEUE}
    for form in ruleset.forms.values():
        trees = [*form.events.values(), *(b.do for b in form.batches.values()),
                 *(s.do for s in form.schedules)]
        roots = [b.raw for b in form.batches.values()] + [s.raw for s in form.schedules]
        for raw in roots:  # a batch's or schedule's own queue is in its Background's options
            options = (raw or {}).get("background") or {}
            found.add(str(options.get("queue", DEFAULT_QUEUE)))
        for tree in trees:
            found.update(node.queue for node in walk(tree) if isinstance(node, DeferNode))
    return found
