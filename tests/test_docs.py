"""Every example in docs/rules.md is checked, and the docs cover the whole language.

Conventions in docs/rules.md (HTML comments directly above a fenced block):

- a ```yaml block starting with `form:` is a complete form, validated as it is;
- any other ```yaml block is a fragment, wrapped into a minimal form: a list of nodes
  becomes the submit tree (`<!-- event: update -->` for the update tree), a list of
  mappings with `name:` becomes `fields:`, a mapping of top-level keys is merged into the
  form, a mapping of background/delay options goes into a background (or delay) node;
- `<!-- fields: email:email, date:date -->` declares the fields a fragment refers to;
- `<!-- file: rules/x.yaml -->` names the file in error messages (default docs.yaml);
- `<!-- invalid: text -->` (one per problem) marks a block that shows a mistake: it must
  produce exactly that many problems, each containing one of the texts;
- a ```text block after `<!-- output -->` must equal the problems of the yaml block before;
- every ```python block is executed (custom action examples register their actions).
"""

from __future__ import annotations

import contextlib
import io
import re
import types
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from formrules.actions import registry as actions
from formrules.actions.context import Context
from formrules.config import _ENV, Settings
from formrules.errors import Cancelled, PermanentError, RetryableError
from formrules.language import sandbox
from formrules.language.checker import DEFER_KEYS, KINDS
from formrules.language.loader import (
    BATCH_KEYS,
    EVENTS,
    FIELD_KEYS,
    FORM_KEYS,
    SCHEDULE_KEYS,
    parse_form,
)
from formrules.language.tree import FIELD_TYPES, DeferNode, Form
from formrules.runs.engine import call_action

ROOT = Path(__file__).resolve().parents[1]
RULES_MD = ROOT / "docs" / "rules.md"
OPERATIONS_MD = ROOT / "docs" / "operations.md"

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(?P<name>[a-z-]+):?(?P<value>.*?)\s*-->$")
PLACEHOLDER = "docs_placeholder"  # keeps a fragment's field list non-empty, so that every
# `record.<name>` it uses must be declared (an empty field list disables that check)
DEFER_OPTIONS = set(DEFER_KEYS["background"]) | set(DEFER_KEYS["delay"])
DELAY_ONLY = set(DEFER_KEYS["delay"]) - set(DEFER_KEYS["background"])


@dataclass
class Block:
    """One fenced block of the markdown, with the marker comments right above it."""

    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    markers: list[tuple[str, str]] = field(default_factory=list)

    def marker(self, name: str) -> str | None:
        return next((v for k, v in self.markers if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.markers if k == name]

    @property
    def id(self) -> str:
        return f"rules.md:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        markers = []
        j = i - 1
        while j >= 0 and (m := MARKER.match(lines[j].strip())):
            markers.insert(0, (m["name"], m["value"].strip()))
            j -= 1
        indent, start = len(fence["indent"]), i + 1
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:])
            i += 1
        out.append(Block(fence["lang"], "\n".join(body) + "\n", start, markers))
        i += 1
    return out


BLOCKS = read_blocks(RULES_MD)
YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml"]


def declared_fields(block: Block) -> list[dict]:
    """The fields named in a `<!-- fields: name:type, ... -->` marker."""
    out = []
    for item in filter(None, (x.strip() for x in (block.marker("fields") or "").split(","))):
        name, _, ftype = item.partition(":")
        spec = {"name": name.strip(), "type": ftype.strip() or "string"}
        if spec["type"] == "choice":
            spec["choices"] = ["Atlas", "Borealis"]
        out.append(spec)
    return out


def classify(data) -> str:
    """What kind of fragment a parsed yaml block is."""
    if isinstance(data, dict) and "form" in data:
        return "form"
    if isinstance(data, list):
        if data and all(isinstance(x, dict) and "name" in x for x in data):
            return "fields"
        return "nodes"
    if isinstance(data, dict) and set(data) <= set(FORM_KEYS):
        return "top-level"
    if isinstance(data, dict) and set(data) <= DEFER_OPTIONS:
        return "options"
    raise AssertionError(f"cannot tell what this fragment is: {data!r}")


def as_form(block: Block) -> str:
    """The block as the text of a complete form file."""
    if block.text.lstrip().startswith("form:"):
        return block.text
    data = yaml.safe_load(block.text)
    kind = classify(data)
    form: dict = {"form": "docs_example"}
    if kind == "fields":
        form["fields"] = data
    elif kind == "nodes":
        form["events"] = {block.marker("event") or "submit": data}
    elif kind == "top-level":
        form.update(data)
    else:  # options of a background or delay node
        node_kind = "delay" if set(data) & DELAY_ONLY else "background"
        options = dict(data)
        options.setdefault("do", [{"log": "example"}])
        if node_kind == "delay" and not {"for", "at"} & set(options):
            options["for"] = "1h"
        form["events"] = {"submit": [{node_kind: options}]}
    fields = list(form.get("fields") or []) + declared_fields(block)
    form["fields"] = fields or [{"name": PLACEHOLDER, "type": "string"}]
    return yaml.safe_dump(form, sort_keys=False, allow_unicode=True)


def problems_of(block: Block) -> list[str]:
    """Every problem `formrules check` would report for the block, sorted."""
    _form, found = parse_form(as_form(block), block.marker("file") or "docs.yaml")
    return [str(p) for p in sorted(found)]


@contextlib.contextmanager
def docs_actions_registered():
    """Run the docs' Python examples (registering their actions); then undo exactly that.

    Actions registered meanwhile by others stay (a worker's FORMRULES_ACTIONS module is
    imported once per process: removing its actions would break later tests in the same
    pytest-xdist process).
    """
    before = dict(actions.registry())
    modules = []
    for block in (b for b in BLOCKS if b.lang == "python"):
        module = types.ModuleType(f"docs_example_{block.line}")
        exec(compile(block.text, f"{RULES_MD}:{block.line}", "exec"), module.__dict__)
        modules.append(module)
    added = {n: spec for n, spec in actions.registry().items() if before.get(n) is not spec}
    try:
        yield modules
    finally:
        for name, spec in added.items():
            if actions._REGISTRY.get(name) is spec:
                if name in before:
                    actions._REGISTRY[name] = before[name]
                else:
                    del actions._REGISTRY[name]


@pytest.fixture(scope="module")
def doc_actions():
    """The docs' actions, registered for this module's tests."""
    with docs_actions_registered() as modules:
        yield modules


# -- every example validates (or fails exactly as documented) -------------------------------

@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[b.id for b in YAML_BLOCKS])
def test_yaml_example(block: Block, doc_actions):
    found = problems_of(block)
    expected = block.all("invalid")
    if not expected:
        assert found == [], f"{block.id}: the example does not validate:\n" + "\n".join(found)
        return
    assert len(found) == len(expected), \
        f"{block.id}: expected {len(expected)} problem(s), got:\n" + "\n".join(found)
    for text in expected:
        assert any(text in line for line in found), \
            f"{block.id}: no problem says {text!r}; got:\n" + "\n".join(found)
    for line in found:
        assert any(text in line for text in expected), f"{block.id}: unexpected {line!r}"


OUTPUTS = [(BLOCKS[i - 1], b) for i, b in enumerate(BLOCKS)
           if i and b.marker("output") is not None]


@pytest.mark.parametrize("source, output", OUTPUTS, ids=[o.id for _, o in OUTPUTS])
def test_documented_output_is_exact(source: Block, output: Block, doc_actions):
    assert source.lang == "yaml" and source.all("invalid")
    assert output.text.splitlines() == problems_of(source)


def test_the_docs_have_examples_of_both_kinds():
    assert len(YAML_BLOCKS) > 40
    assert sum(1 for b in YAML_BLOCKS if b.all("invalid")) >= 10
    assert OUTPUTS


def test_the_extractor_sees_markers():
    block = next(b for b in YAML_BLOCKS if b.marker("file"))
    assert block.marker("file") == "rules/room_booking.yaml"
    assert len(block.all("invalid")) == 5
    assert "fields:" in as_form(Block("yaml", "- log: hi\n", 1, [("fields", "a:date")]))


def test_a_broken_example_would_fail():
    """The checks above catch an example that stops validating, or an undeclared field."""
    broken = Block("yaml", "- send_emial: {to: a@example.com, subject: Hi, body: Yo}\n", 1)
    assert problems_of(broken) == [
        "docs.yaml:4:5: events/submit/0: unknown action 'send_emial' "
        "(did you mean 'send_email'?)"]
    undeclared = Block("yaml", '- log: "{{ record.email }}"\n', 1)
    assert problems_of(undeclared) == [
        "docs.yaml:4:10: events/submit/0: unknown field 'email' in template"]


# -- the custom action example works as described -------------------------------------------

def order_node() -> tuple[DeferNode, Form]:
    """The background node of the docs' `order` form (which uses `create_invoice`)."""
    block = next(b for b in YAML_BLOCKS if b.text.startswith("form: order"))
    form, found = parse_form(block.text, "order.yaml")
    assert not found
    return form.events["submit"][0], form


def invoice_context(form: Form, cancelled: bool = False) -> tuple[Context, list[tuple]]:
    """A worker-like context for one step of a Run, recording progress reports."""
    progress: list[tuple] = []
    ctx = Context(settings=Settings(), form_id=form.id, field_types=form.field_types,
                  data={"customer": "ACME", "amount": "120.50"},
                  path="events/submit/0/background/do/0", run_id="run1",
                  on_progress=lambda d, t, m: progress.append((d, t, m)),
                  is_cancelled=lambda: cancelled)
    return ctx, progress


def test_custom_action_example_runs(doc_actions, monkeypatch):
    node, form = order_node()
    sent = []

    def fake_urlopen(request, timeout):
        sent.append(request)
        return io.BytesIO(b'{"number": "INV-7"}')

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ctx, progress = invoice_context(form)
    call_action(node.do[0], ctx)
    assert sent[0].get_header("Idempotency-key") == "run1:events/submit/0/background/do/0"
    assert sent[0].data == b'{"customer": "ACME", "amount": "120.50"}'
    assert ctx.updates == {"invoice_number": "INV-7"}
    assert [(a.filename, a.data) for a in ctx.attachments] == [
        ("invoice-INV-7.csv", b"item,amount\r\nConsulting,120.50\r\n")]
    assert progress == [(0, 2, "Creating the invoice"), (1, 2, "Line 1 of 1")]


@pytest.mark.parametrize("failure, error, safe", [
    (503, RetryableError, "The billing system is busy; we will try again."),
    (422, PermanentError, "The invoice was refused. Please check the amount."),
    (OSError("connection refused"), RetryableError,
     "The billing system could not be reached; we will try again."),
])
def test_custom_action_example_classifies_failures(doc_actions, monkeypatch, failure, error,
                                                   safe):
    node, form = order_node()

    def fake_urlopen(request, timeout):
        if isinstance(failure, int):
            raise urllib.error.HTTPError(request.full_url, failure, "no", {}, None)
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ctx, _ = invoice_context(form)
    with pytest.raises(error) as caught:
        call_action(node.do[0], ctx)
    assert caught.value.safe_message == safe
    assert not ctx.updates


def test_custom_action_example_stops_when_cancelled(doc_actions):
    node, form = order_node()
    ctx, _ = invoice_context(form, cancelled=True)
    with pytest.raises(Cancelled):
        call_action(node.do[0], ctx)


# -- coverage: the docs name everything the language has ------------------------------------

DOCS_TEXT = RULES_MD.read_text(encoding="utf-8")


def valid_data() -> list[tuple[str, object]]:
    """(kind, parsed yaml) of every example that validates."""
    out = []
    for block in YAML_BLOCKS:
        if not block.all("invalid"):
            data = yaml.safe_load(block.text)
            out.append((classify(data), data))
    return out


def mappings(value):
    """Every mapping inside a parsed yaml value."""
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from mappings(v)
    elif isinstance(value, list):
        for v in value:
            yield from mappings(v)


def used_keys() -> dict[str, set]:
    """Which keys and values the valid examples use, by where they are used."""
    used: dict[str, set] = {k: set() for k in (
        "node", "defer", "retry", "field", "type", "form", "batch", "schedule", "event",
        "await", "on_change", "catch_up", "backoff")}
    for kind, data in valid_data():
        if kind == "options":
            used["defer"] |= set(data)
        if kind in ("form", "top-level"):
            used["form"] |= set(data)
        if kind == "fields":
            used["field"] |= {k for f in data for k in f}
            used["type"] |= {f.get("type", "string") for f in data}
        for m in mappings(data):
            used["node"] |= set(m)
            for defer in ("background", "delay"):
                if isinstance(m.get(defer), dict):
                    used["defer"] |= set(m[defer])
                    used["await"].add(str(m[defer].get("await", "")).lower())
                    used["on_change"].add(m[defer].get("on_change"))
            if isinstance(m.get("retry"), dict):
                used["retry"] |= set(m["retry"])
                used["backoff"].add(str(m["retry"].get("backoff", ""))[:11])
            elif "retry" in m:
                used["retry"].add(f"retry: {m['retry']}")
            if isinstance(m.get("fields"), list):
                used["field"] |= {k for f in m["fields"] for k in f}
                used["type"] |= {f.get("type", "string") for f in m["fields"]}
            if isinstance(m.get("batches"), dict):
                used["batch"] |= {k for t in m["batches"].values() for k in t}
            if isinstance(m.get("schedules"), list):
                used["schedule"] |= {k for s in m["schedules"] for k in s}
                used["catch_up"] |= {s.get("catch_up") for s in m["schedules"]}
            if isinstance(m.get("events"), dict):
                used["event"] |= set(m["events"])
        if kind == "nodes":
            used["event"].add("submit")
    used["event"] |= {b.marker("event") for b in YAML_BLOCKS if b.marker("event")}
    return used


def mentioned(word: str) -> bool:
    return f"`{word}`" in DOCS_TEXT


def section(heading: str) -> str:
    """The text under a `### heading` up to the next heading."""
    start = DOCS_TEXT.index(f"\n### {heading}\n")
    end = DOCS_TEXT.find("\n#", start + 1)
    return DOCS_TEXT[start:end]


def builtin_actions() -> dict[str, actions.ActionSpec]:
    """Every action formrules itself registers (not the tests' or the docs' examples)."""
    return {name: spec for name, spec in actions.registry().items()
            if spec.fn.__module__.split(".")[0] == "formrules"}


@pytest.mark.parametrize("name", sorted(builtin_actions()))
def test_every_builtin_action_is_documented_with_every_argument(name):
    spec = builtin_actions()[name]
    text = section(f"`{name}`")
    for param in spec.params or {}:
        assert f"`{param}`" in text, f"argument '{param}' of '{name}' is not documented"
    assert name in used_keys()["node"], f"no valid example uses '{name}'"


def test_every_node_kind_and_option_is_documented_and_used():
    used = used_keys()
    for kind in KINDS:
        assert mentioned(kind) and kind in used["node"], kind
    assert "then" in used["node"] and "else" in used["node"]
    for option in sorted(DEFER_OPTIONS):
        assert mentioned(option), f"option '{option}' is not documented"
        assert option in used["defer"], f"no valid example uses option '{option}'"
    assert {"true", "false", "optional"} <= used["await"]
    assert {"recompute", "keep"} & used["on_change"]
    assert mentioned("recompute") and mentioned("keep")


def test_trees_calls_and_try_are_documented_and_used():
    from formrules.language.checker import CALL_KEYS, INPUT_KEYS, TREE_KEYS, TRY_KEYS
    from formrules.language.tree import INPUT_TYPES

    used = used_keys()["node"]
    for key in (*CALL_KEYS, *TREE_KEYS, *INPUT_KEYS, *TRY_KEYS):
        assert mentioned(key) and key in used, key
    for itype in INPUT_TYPES:
        assert mentioned(itype), f"input type '{itype}' is not documented"
    for name in ("inputs", "error.step", "error.message"):
        assert f"`{name}" in DOCS_TEXT, name
    assert "inputs." in "".join(b.text for b in YAML_BLOCKS if not b.all("invalid"))


def test_retry_options_are_documented_and_used():
    used = used_keys()
    for option in ("attempts", "backoff", "base", "max", "jitter"):
        assert mentioned(option) and option in used["retry"], option
    assert "exponential" in used["backoff"] and "retry: False" in used["retry"]
    assert "[10s, 1m, 10m, 1h, 6h, 1d, 1d]" in DOCS_TEXT  # the default schedule
    from formrules.language.tree import DEFAULT_RETRY
    assert DEFAULT_RETRY.backoff == (10, 60, 600, 3600, 21600, 86400, 86400)
    assert DEFAULT_RETRY.attempts == 8 and DEFAULT_RETRY.jitter == 0.1


def test_every_top_level_key_field_option_and_type_is_documented_and_used():
    used = used_keys()
    for key in FORM_KEYS:
        assert mentioned(key) and key in used["form"], key
    for key in FIELD_KEYS:
        assert mentioned(key) and key in used["field"], key
    for ftype in FIELD_TYPES:
        assert mentioned(ftype) and ftype in used["type"], ftype
    for event in EVENTS:
        assert mentioned(event) and event in used["event"], event


def test_batches_and_schedules_options_are_documented_and_used():
    used = used_keys()
    for key in BATCH_KEYS:
        assert mentioned(key) and key in used["batch"], key
    for key in SCHEDULE_KEYS:
        assert mentioned(key) and key in used["schedule"], key
    assert {"latest", "none"} <= used["catch_up"]


def test_globals_and_variables_are_documented_and_used():
    examples = "".join(b.text for b in YAML_BLOCKS if not b.all("invalid"))
    for name in sandbox.GLOBALS:
        assert f"`{name}(" in DOCS_TEXT, f"global '{name}' is not documented"
        assert f"{name}(" in examples, f"no valid example uses '{name}()'"
    assert "| datetime" in examples
    for name in ("record", "old", "changed", "form", "run", "error", "response"):
        assert f"`{name}`" in DOCS_TEXT and f"{name}." in examples, name


def test_custom_action_api_is_documented():
    for name in ("record", "set(", "progress(", "cancelled()", "check_cancelled()",
                 "idempotency_key", "attach(", "log", "attempt"):
        assert f"`ctx.{name}" in DOCS_TEXT, f"ctx.{name} is not documented"
    for kind in actions.PARAM_KINDS:
        assert f"| `{kind}` |" in DOCS_TEXT, f"param kind '{kind}' is not documented"
    for word in ("PermanentError", "RetryableError", "safe_message", "FORMRULES_ACTIONS",
                 "@action"):
        assert word in DOCS_TEXT, word


def test_operations_guide_names_every_setting():
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    for variable in _ENV.values():
        assert f"`{variable}`" in text, f"{variable} is not in docs/operations.md"


def test_the_readme_module_map_lists_every_module():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    listed, folder = set(), None
    for line in readme[readme.index("| module | what it is |"):].splitlines():
        if not line.startswith("|"):
            break
        if found := re.match(r"\| \*\*`(formrules/(?:\w+/)?)`\*\*", line):
            folder = found[1]
        elif found := re.match(r"\| `([\w.]+\.py)` \|", line):
            listed.add(f"{folder}{found[1]}")
    modules = {str(p.relative_to(root)) for p in (root / "formrules").rglob("*.py")
               if (p.name != "__init__.py" or p.parent.name == "web")
               and "migrations" not in p.parts}  # revision files, not modules
    assert sorted(modules - listed) == [], "README's module map misses these"
    assert sorted(listed - modules) == [], "README's module map names modules that are gone"
