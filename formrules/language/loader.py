"""Load a rules directory: every `*.yaml` file is one form, validated like a compiler.

`load_rules` returns a `RuleSet` or raises `RuleError` with every problem of every file,
sorted by file, line and column. Nothing here imports Flask.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from croniter import croniter

from formrules.errors import Problem, RuleError, errors_in
from formrules.language import retention
from formrules.language.checker import Checker, did_you_mean
from formrules.language.fieldtypes import REGISTRY, option_keys, types_with
from formrules.language.source import Map, load_yaml, plain
from formrules.language.tree import (
    FIELD_TYPES,
    STARTERS,
    BatchDef,
    DeferNode,
    FieldDef,
    Form,
    InputDef,
    RuleSet,
    ScheduleDef,
    TreeDef,
)

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
FORM_ID = re.compile(r"^[a-z][a-z0-9_-]*$")
FORM_KEYS = ("form", "title", "description", "fields", "events", "after_submit", "batches",
             "schedules", "retention", "trees")
OLD_BATCHES_KEY = "tasks"  # what `batches:` was called; still read, with a warning
FIELD_KEYS = option_keys()  # the common keys and every registered type's own
TYPE_OPTIONS = tuple(k for k in FIELD_KEYS if types_with(k))
EVENTS = ("submit", "update")
# Most characters a text field takes when the rule sets no `max_length` (docs/rules.md):
# no field accepts megabytes by default; an e-mail address is at most 254 (RFC 5321).
DEFAULT_MAX_LENGTH = {n: t.default_max_length for n, t in REGISTRY.items()
                      if t.default_max_length}
RESERVED_FIELD_NAMES = frozenset(n for n in dir(dict) if not n.startswith("_"))
# Body keys the JSON API takes for itself (docs/api.md): a field of that name would be hidden.
API_FIELD_NAMES = frozenset({"callback_url"})
# A batch or a schedule runs as a Background: these keys mean what they mean there.
RUN_KEYS = ("title", "do", "retry", "timeout", "on_error", "queue", "concurrency")
BATCH_KEYS = (*RUN_KEYS, "stop_on_error", "started_by")
SCHEDULE_KEYS = (*RUN_KEYS, "name", "cron", "timezone", "for_each", "catch_up")
CATCH_UP_VALUES = ("latest", "none")


def load_rules(directory: str | Path) -> RuleSet:
    """Load and validate every form in `directory`; raise RuleError listing all problems."""
    ruleset, problems = check_rules(directory)
    if errors_in(problems):
        raise RuleError(problems)
    return ruleset


def check_rules(directory: str | Path) -> tuple[RuleSet, list[Problem]]:
    """Load what is valid and collect every problem (sorted) instead of raising."""
    root = Path(directory)
    problems: list[Problem] = []
    forms: dict[str, Form] = {}
    if not root.is_dir():
        return RuleSet({}, str(root)), [Problem(str(root), 1, 1, "", "no such directory")]
    files = sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
    for path in files:
        name = str(path)
        form, found = parse_form(path.read_text(encoding="utf-8", errors="replace"), name)
        problems.extend(found)
        if form is None:
            continue
        if form.id in forms:
            problems.append(Problem(name, 1, 1, "form",
                                    f"form id '{form.id}' is also used by {forms[form.id].file}"))
        else:
            forms[form.id] = form
    return RuleSet(forms, str(root)), sorted(problems)


def parse_form(text: str, file: str) -> tuple[Form | None, list[Problem]]:
    """Validate one form file's text; the Form is None when the file is unusable."""
    raw, problems = load_yaml(text, file)
    if raw is None and problems:
        return None, problems
    checker = Checker(file)
    checker.problems.extend(problems)
    if not isinstance(raw, dict):
        checker.error(getattr(raw, "pos", None), "",
                      "a rule file must be a mapping with 'form:', 'fields:' and 'events:'")
        return None, checker.problems
    form = _form(checker, raw)
    return form, checker.problems


def _form(c: Checker, raw: Map) -> Form:
    c.known_keys(raw, FORM_KEYS, "", "form", deprecated=(OLD_BATCHES_KEY,))
    form_id = raw.get("form")
    if "form" not in raw:
        c.error(raw.pos, "form", "a rule file starts with 'form: <id>', like 'form: room_booking'")
        form_id = Path(c.file).stem
    elif not isinstance(form_id, str) or not FORM_ID.match(form_id):
        c.error(c.value_pos(raw, "form"), "form",
                "'form' must be an id of lowercase letters, digits, '_' or '-'")
        form_id = Path(c.file).stem
    fields = _fields(c, raw.get("fields"), c.value_pos(raw, "fields"))
    c.fields = {f.name: f.type for f in fields}
    # Named trees first: every node list below may call them, in any order of writing.
    c.declare_trees(raw.get("trees"), c.value_pos(raw, "trees"))
    trees = {name: TreeDef(name, c.tree_inputs[name], do, plain(c.trees[name]))
             for name, do in c.tree_bodies().items()}
    events: dict[str, tuple] = {}
    ev = raw.get("events", {})
    if c.mapping(ev, c.value_pos(raw, "events"), "events", "events") is not None:
        for key, value in ev.items():
            if key not in EVENTS:
                c.error(c.key_pos(ev, key), "events",
                        f"unknown event '{key}'{did_you_mean(key, EVENTS)}")
                continue
            events[key] = c.nodes(value, c.value_pos(ev, key), f"events/{key}")
    message = None
    after = raw.get("after_submit")
    if after is not None and c.mapping(after, c.value_pos(raw, "after_submit"),
                                       "after_submit", "after_submit") is not None:
        c.known_keys(after, ("message",), "after_submit", "after_submit")
        if "message" in after:
            message = c.text(after["message"], c.value_pos(after, "message"),
                             "after_submit/message")
    return Form(
        id=form_id,
        title=c.text(raw.get("title", form_id), c.value_pos(raw, "title"), "title"),
        description=c.text(raw.get("description", ""), c.value_pos(raw, "description"),
                           "description", template=False),
        fields=fields, events=events, after_submit_message=message, file=c.file,
        batches=_batches(c, raw),
        schedules=_schedules(c, raw.get("schedules"), c.value_pos(raw, "schedules")),
        retention=_retention(c, raw.get("retention"), c.value_pos(raw, "retention"))
        if "retention" in raw else {},
        trees=trees,
    )


def _retention(c: Checker, value: Any, pos) -> dict:
    """`retention: 30d`, or one period per finished status; `forever` keeps them."""
    def period(v: Any, at, path: str):
        try:
            return retention.parse_period(v)
        except ValueError as exc:
            hint = did_you_mean(v, (retention.FOREVER,)) if isinstance(v, str) else ""
            c.error(at, path, f"{exc} (or '{retention.FOREVER}'){hint}"
                    if hint else str(exc))
            return None
    if not isinstance(value, dict):
        return dict.fromkeys(retention.STATUSES, period(value, pos, "retention"))
    out = {}
    for status, v in value.items():
        if status not in retention.STATUSES:
            c.error(c.key_pos(value, status), "retention",
                    f"unknown status '{status}' (retention applies to "
                    f"{', '.join(retention.STATUSES)})"
                    f"{did_you_mean(str(status), retention.STATUSES)}")
            continue
        out[status] = period(v, c.value_pos(value, status), f"retention/{status}")
    return out


def _fields(c: Checker, value: Any, pos) -> tuple[FieldDef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        c.error(pos, "fields", "'fields' must be a list of field mappings")
        return ()
    out: list[FieldDef] = []
    seen: set[str] = set()  # a set, not a scan of `out`: checks stay linear in the fields
    for i, item in enumerate(value):
        path = f"fields/{i}"
        item = c.mapping(item, c.value_pos(value, i), path, "a field")
        if item is None:
            continue
        c.known_keys(item, FIELD_KEYS, path, "field")
        vp = lambda k: c.value_pos(item, k)  # noqa: E731
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            c.error(vp("name") if "name" in item else item.pos, path,
                    "a field needs a 'name' of lowercase letters, digits and '_'")
            continue
        if name in RESERVED_FIELD_NAMES:
            # `record.items` would find the dict method, not the field, in every template.
            c.error(vp("name"), path, f"field name '{name}' is reserved (it names a built-in "
                                      "of records); choose another name")
            continue
        if name in API_FIELD_NAMES:
            c.error(vp("name"), path, f"field name '{name}' is reserved by the API (it "
                                      "registers a completion callback); choose another name")
            continue
        if name in seen:
            c.error(vp("name"), path, f"duplicate field name '{name}'")
            continue
        seen.add(name)
        ftype = item.get("type", "string")
        if ftype not in FIELD_TYPES:
            c.error(vp("type"), path, f"unknown field type '{ftype}'"
                                      f"{did_you_mean(ftype, FIELD_TYPES)}; expected one of "
                                      f"{', '.join(FIELD_TYPES)}")
            ftype = str(ftype)  # kept, so checks that need a type skip this field
        kind = REGISTRY.get(ftype)  # options are checked against a known type only
        for key in (k for k in TYPE_OPTIONS if k in item and kind is not None
                    and k not in kind.options):
            c.error(c.key_pos(item, key), path,
                    f"'{key}' goes with type: {_either(types_with(key))} (not {ftype})")
        choices = item.get("choices", [])
        if kind is not None and "choices" in kind.options \
                and (not isinstance(choices, list) or not choices):
            c.error(vp("choices") if "choices" in item else item.pos, path,
                    f"a {ftype} field needs a non-empty 'choices:' list")
            choices = []
        for key in ("min", "max"):
            if key in item and (kind is None or key in kind.options) \
                    and (isinstance(item[key], bool) or not isinstance(item[key], int | float)):
                c.error(vp(key), path, f"'{key}' must be a number")
        if "default" in item and kind is not None and item["default"] is not None:
            problem = kind.default_problem(plain(item["default"]), choices)
            if problem:
                c.error(vp("default"), path, problem)
        for key in ("required", "hidden"):
            if key in item:
                c.boolean(item[key], vp(key), path)
        max_length = kind.default_max_length if kind is not None else None
        if "max_length" in item:
            max_length = c.integer(item["max_length"], vp("max_length"), path, minimum=1)
        def report(key: str, message: str, index: int | None = None) -> None:
            at = c.value_pos(item[key], index) if index is not None else None
            c.error(at or vp(key), path, message)

        own = kind.parse_options(item, report) if kind is not None else {}
        out.append(FieldDef(
            name=name, type=ftype, **own,
            label=c.text(item.get("label", name.replace("_", " ").capitalize()), vp("label"),
                         path, template=False),
            help=c.text(item.get("help", ""), vp("help"), path, template=False),
            required=item.get("required") is True, hidden=item.get("hidden") is True,
            min=_number(item.get("min")), max=_number(item.get("max")),
            max_length=max_length, choices=tuple(str(x) for x in choices or ()),
            default=plain(item.get("default")),
        ))
    return tuple(out)


def _either(names: tuple[str, ...]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _batches(c: Checker, raw: Map) -> dict[str, BatchDef]:
    key = "batches"
    if OLD_BATCHES_KEY in raw:
        if "batches" in raw:
            c.error(c.key_pos(raw, OLD_BATCHES_KEY), OLD_BATCHES_KEY,
                    "a file has either `batches:` or the old `tasks:`, not both; "
                    "move these into `batches:`")
            return _batch_defs(c, raw.get("batches"), c.value_pos(raw, "batches"))
        c.warn(c.key_pos(raw, OLD_BATCHES_KEY), OLD_BATCHES_KEY,
               "`tasks:` is now `batches:`; rename it")
        key = OLD_BATCHES_KEY
    return _batch_defs(c, raw.get(key), c.value_pos(raw, key))


def _batch_defs(c: Checker, value: Any, pos) -> dict[str, BatchDef]:
    if value is None or c.mapping(value, pos, "batches", "batches") is None:
        return {}
    out = {}
    for name, path, body in c.named_trees(value, "batches", "batch", BATCH_KEYS):
        vp = lambda k, body=body: c.value_pos(body, k)  # noqa: E731
        node = _background(c, body, path, c.key_pos(value, name), name)
        out[name] = BatchDef(
            name=name, title=node.title, do=node.do,
            # One `concurrency` for every tree: at most N of its Runs at once, anywhere;
            # a batch also releases its records N at a time (one at a time by default).
            concurrency=node.concurrency or 1,
            stop_on_error=c.boolean(body.get("stop_on_error", False), vp("stop_on_error"), path),
            retry=node.retry, raw=node.raw,
            started_by=_starters(c, body.get("started_by", ["operators"]), vp("started_by"),
                                 path),
        )
    return out


def _starters(c: Checker, value: Any, pos, path: str) -> tuple[str, ...]:
    """`started_by`: one of STARTERS, or a list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        c.error(pos, path, "'started_by' must be operators, users or a list of them, got "
                           f"{value!r}")
        return ("operators",)
    out: list[str] = []
    for i, who in enumerate(items):
        where = c.value_pos(value, i) if isinstance(value, list) else pos
        if who not in STARTERS:
            c.error(where, path, f"unknown starter {who!r} in 'started_by'"
                                 f"{did_you_mean(who, STARTERS)}; expected operators or users")
        elif who not in out:
            out.append(who)
    return tuple(out) or ("operators",)


def _schedules(c: Checker, value: Any, pos) -> tuple[ScheduleDef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        c.error(pos, "schedules", "'schedules' must be a list")
        return ()
    out: list[ScheduleDef] = []
    names: set[str] = set()
    for i, body in enumerate(value):
        path = f"schedules/{i}"
        body = c.mapping(body, c.value_pos(value, i), path, "a schedule")
        if body is None:
            continue
        c.known_keys(body, SCHEDULE_KEYS, path, "schedule")
        vp = lambda k: c.value_pos(body, k)  # noqa: E731
        cron = str(body.get("cron", ""))
        if not croniter.is_valid(cron):
            c.error(vp("cron") if "cron" in body else body.pos, path,
                    f"'cron' must be a cron string like '0 2 * * *', got {cron!r}")
        tz = str(body.get("timezone", "UTC"))
        try:
            from zoneinfo import ZoneInfo
            ZoneInfo(tz)
        except Exception:  # ZoneInfoNotFoundError, ValueError for odd keys
            c.error(vp("timezone"), path, f"unknown time zone {tz!r}")
            tz = "UTC"
        catch_up = body.get("catch_up", "latest")
        if catch_up not in CATCH_UP_VALUES:
            c.error(vp("catch_up"), path, "'catch_up' must be latest or none")
        if "do" not in body:
            c.error(body.pos, path, "a schedule needs a 'do:' list of nodes")
        if "name" in body and str(body["name"]) in names:
            c.error(vp("name"), path, f"duplicate schedule name '{body['name']}'")
        names.add(str(body.get("name", i)))
        node = _background(c, body, path, c.value_pos(value, i), f"Schedule {i}")
        out.append(ScheduleDef(
            name=str(body.get("name", i)), cron=cron, timezone=tz,
            title=node.title, do=node.do,
            for_each=c.expression(body["for_each"], vp("for_each"), path)
            if "for_each" in body else None,
            catch_up=catch_up, raw=node.raw,
        ))
    return tuple(out)


def _background(c: Checker, body: Map, path: str, pos, title: str) -> DeferNode:
    """A batch's or schedule's tree, validated as the Background its Runs execute.

    The node's `raw` (`{"background": {...}}`) is the snapshot each Run carries, so the
    worker rebuilds it with `rebuild_defer` like any other deferred node.
    """
    args = Map({k: body[k] for k in RUN_KEYS if k in body})
    args.pos = getattr(body, "pos", pos)
    args.key_pos = {k: p for k, p in getattr(body, "key_pos", {}).items() if k in args}
    args.value_pos = {k: p for k, p in getattr(body, "value_pos", {}).items() if k in args}
    args.setdefault("title", title)
    args.setdefault("do", [])  # a missing 'do:' is reported by the caller, in its words
    args.setdefault("retry", False)  # once, unless the author asks for retries
    args["await"] = False  # nobody waits on a page for a batch or a schedule
    return c.defer_node("background", args, pos, pos, path, {"background": args})


def rebuild_defer(raw: dict, path: str, fields: dict[str, str],
                  trees: dict[str, Any] | None = None, tree: str | None = None,
                  inputs: list[str] | tuple[str, ...] = ()) -> DeferNode:
    """Rebuild a Run's node from the snapshot it was started with (see `DeferNode.raw`).

    `raw` is `{kind: options}` and `path` the node's path; `trees` the named trees its
    calls reach (as the snapshot carries them) and `tree` the one the node itself sits in,
    when it was written inside a named tree (its templates may name `inputs.`, and
    `inputs` lists the names its call gave, every declared one). The
    snapshot passed validation when the Run was created; failing now means the rule
    language changed incompatibly.
    """
    checker = Checker(f"<run {path}>", fields)
    checker.declare_trees(trees or None, None)
    if tree is not None:
        checker.calls.append(tree)
        checker.tree_inputs.setdefault(tree, {n: InputDef(n, "any") for n in inputs})
    node = None
    if isinstance(raw, dict) and len(raw) == 1:
        (kind, args), = raw.items()
        if kind in ("background", "delay"):
            node = checker.defer_node(kind, args, None, None, path, raw)
    if checker.problems or node is None:
        raise RuleError(checker.problems or [Problem(checker.file, 1, 1, path,
                                                     "snapshot is not a deferred node")])
    return node
