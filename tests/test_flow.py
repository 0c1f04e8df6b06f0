"""Named trees called with inputs (`trees:` + `call:`) and the per-step error port
(`try:` / `catch:`), issue 13 points 4 and 5: checked with positions, walked by the engine,
carried in Run snapshots, and run end to end through the web form with real workers.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from formrules.errors import (
    GENERIC_FAILURE,
    Cancelled,
    PermanentError,
    RetryableError,
)
from formrules.language.loader import parse_form
from formrules.language.lsp import completions
from formrules.language.outline import outline
from formrules.language.tree import ActionNode, CallNode, TryNode
from formrules.language.variables import convert_input
from formrules.runs.engine import Walker, safe_message
from formrules.runs.preview import preview
from formrules.runs.snapshot import VERSION_KEY, Snapshot
from formrules.store.models import RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import (
    WorkerProcess,
    events_of,
    record_of,
    runs_of,
    submit,
    token_of,
    tokens,
    wait_until,
    work,
)

SECRET = "hunter2"  # in the text `explode` raises: never stored for users
BG = "events/submit/0/background"

LEDGER = """
form: ledger
title: Ledger
fields:
  - {name: name, type: string, required: true}
  - {name: amount, type: decimal}
  - {name: done, type: boolean, hidden: true, default: false}
  - {name: last_error, type: string, hidden: true}
  - {name: status, type: string, hidden: true}
trees:
  notify:
    inputs:
      who: {type: string, required: true}
      amount: {type: number, default: 0}
    do:
      - record_call: {name: "notify-{{ inputs.who }}-{{ inputs.amount * 2 }}"}
events:
  submit:
    - background:
        title: Ledger
        flag: done
        retry: {attempts: 2, backoff: [1s], jitter: 0}
        do:
          - try:
              - record_call: {name: body}
              - explode: {safe: The ledger is down.}
              - record_call: {name: never}
            catch:
              - set: {status: "caught at {{ error.step }}"}
              - call:
                  tree: notify
                  with: {who: "{{ record.name }}", amount: "{{ record.amount }}"}
            error_field: last_error
          - record_call: {name: after}
"""

INLINE = """
form: inline
title: Inline
fields:
  - {name: name, type: string, required: true}
  - {name: last_error, type: string, hidden: true}
  - {name: status, type: string, hidden: true}
trees:
  notify:
    inputs:
      who: {type: string, required: true}
    do:
      - record_call: {name: "notify-{{ inputs.who }}"}
      - set: {status: "notified {{ inputs.who }}"}
events:
  submit:
    - try:
        - explode: {permanent: true}
      catch:
        - set: {status: handled}
      error_field: last_error
    - call: {tree: notify, with: {who: "{{ record.name }}"}}
"""

HANDLER_CRASH = """
form: handler_crash
title: Handler crash
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
  - {name: last_error, type: string, hidden: true}
events:
  submit:
    - background:
        title: Crash in the handler
        flag: done
        retry: false
        do:
          - try:
              - record_call: {name: body}
              - explode: {permanent: true, safe: No ledger today.}
            catch:
              - record_call: {name: h1}
              - hold: {name: h2}
              - record_call: {name: h3}
            error_field: last_error
          - record_call: {name: after}
"""

NESTED = """
form: nested
title: Nested
fields:
  - {name: name, type: string, required: true}
trees:
  later:
    inputs: {who: {type: string, required: true}}
    do:
      - background:
          title: "For {{ inputs.who }}"
          retry: {attempts: 3, backoff: [1s]}
          do:
            - record_call: {name: "later-{{ inputs.who }}"}
            - try:
                - explode: {permanent: true, safe: "No {{ inputs.who }} today."}
              catch:
                - record_call: {name: "caught-{{ inputs.who }}"}
events:
  submit:
    - call: {tree: later, with: {who: "{{ record.name }}"}}
"""


BATCHY = """
form: batchy
title: Tasky
fields:
  - {name: name, type: string, required: true}
trees:
  greet:
    inputs: {who: {type: string, required: true}}
    do: [{record_call: {name: "greet-{{ inputs.who }}"}}]
batches:
  greet_all:
    title: Greet everyone
    do: [{call: {tree: greet, with: {who: "{{ record.name }}"}}}]
"""


CANCELLED = """
form: cancelled_try
title: Cancelled in a try
fields:
  - {name: name, type: string, required: true}
  - {name: last_error, type: string, hidden: true}
events:
  submit:
    - background:
        title: Cancelled meanwhile
        retry: false
        do:
          - try:
              - cancelled_meanwhile: {}
            catch:
              - record_call: {name: handler}
            error_field: last_error
          - record_call: {name: after}
"""


@pytest.fixture(autouse=True)
def flow_rules(rules_dir):
    """The forms these tests submit (written before the app or any worker loads rules)."""
    kept = LEDGER.replace("form: ledger", "form: kept").replace(
        "retry: {attempts: 2, backoff: [1s], jitter: 0}", "retry: false")
    example = Path(__file__).resolve().parents[1] / "rules" / "expense_report.yaml"
    (rules_dir / "expense_report.yaml").write_text(example.read_text())
    for name, text in {"ledger": LEDGER, "inline": INLINE, "kept": kept, "nested": NESTED,
                       "batchy": BATCHY, "cancelled_try": CANCELLED,
                       "handler_crash": HANDLER_CRASH}.items():
        (rules_dir / f"{name}.yaml").write_text(text.lstrip())
    return rules_dir


def names(rt) -> Counter:
    """How often each `record_call` step really ran."""
    return Counter(line.split()[0] for line in read_calls(rt.settings.instance_dir))


def keys(rt, name: str) -> set[str]:
    """The idempotency keys `record_call` saw for `name`."""
    return {line.split()[1] for line in read_calls(rt.settings.instance_dir)
            if line.split()[0] == name}


def form_of(text: str, file: str = "rules/calls.yaml"):
    form, problems = parse_form(textwrap.dedent(text).lstrip(), file)
    return form, [str(p) for p in sorted(problems)]


# -- the checker ----------------------------------------------------------------------------

CHECKED = """\
form: calls
title: Calls
fields:
  - {name: amount, type: decimal}
  - {name: last_error, type: string, hidden: true}
  - {name: count, type: integer}
trees:
  notify:
    inputs:
      amount: {type: number, required: true}
      who: {type: string}
      level: {type: numbr}
    do:
      - log: "{{ inputs.amout }}"
  ping:
    do: [{call: {tree: pong}}]
  pong:
    do: [{call: {tree: ping}}]
events:
  submit:
    - call: {tree: notfy}
    - call: {tree: notify, with: {amount: "{{ record.amount }}", whom: x}}
    - call: {tree: notify, with: {who: ann}}
    - call: {tree: notify, with: {amount: [1], who: "{{ record.nme }}"}}
    - call: {tree: other_form.notify}
    - log: "{{ inputs.amount }}"
    - try:
        - log: a
    - try: [{log: b}]
      catch: [{log: "{{ error.message }}"}]
      error_field: count
    - log: "{{ error.message }}"
    - catch: []
"""


def test_the_checker_reports_every_call_and_try_mistake_with_its_position():
    _form, problems = form_of(CHECKED)
    cycle = "(a tree may not call itself, directly or through other trees)"
    assert problems == [
        "rules/calls.yaml:12:21: trees/notify/inputs/level: unknown input type 'numbr' "
        "(did you mean 'number'?); expected one of string, number, integer, boolean, any",
        "rules/calls.yaml:14:14: trees/notify/do/0: tree 'notify' has no input 'amout' "
        "(did you mean 'amount'?)",
        f"rules/calls.yaml:16:24: trees/pong/do/0/call/0: call cycle: pong -> ping -> pong "
        f"{cycle}",
        f"rules/calls.yaml:18:24: trees/ping/do/0/call/0: call cycle: ping -> pong -> ping "
        f"{cycle}",
        "rules/calls.yaml:21:20: events/submit/0: unknown tree 'notfy' (did you mean "
        "'notify'?)",
        "rules/calls.yaml:22:66: events/submit/1: tree 'notify' has no input 'whom' "
        "(did you mean 'who'?)",
        "rules/calls.yaml:23:34: events/submit/2: call of tree 'notify' needs input 'amount'",
        "rules/calls.yaml:24:43: events/submit/3: input 'amount' of tree 'notify' must be a "
        "number, got a list",
        "rules/calls.yaml:24:53: events/submit/3: unknown field 'nme' in template",
        "rules/calls.yaml:25:20: events/submit/4: 'other_form.notify': a call names a tree "
        "of this file; another form's trees cannot be called (copy the tree, or move the "
        "shared steps into a custom action)",
        "rules/calls.yaml:26:12: events/submit/5: 'inputs' is only set inside a named tree "
        "(trees:)",
        "rules/calls.yaml:27:7: events/submit/6: 'try' needs a 'catch:' list of nodes (or "
        "an 'error_field:' to store the error in), beside it",
        "rules/calls.yaml:31:20: events/submit/7: 'error_field' must name a string or text "
        "field, not integer",
        "rules/calls.yaml:32:12: events/submit/8: 'error' is only set in on_error branches "
        "and try's catch",
        "rules/calls.yaml:33:7: events/submit/9: 'catch' belongs beside a 'try:' key",
    ]


def test_a_tree_is_judged_again_where_it_is_called():
    # `old` is set in update events only: the tree is fine, its call from submit is not.
    _form, problems = form_of("""
        form: where
        fields: [{name: room, type: string}]
        trees:
          moved:
            do: [{log: "was {{ old.room }}"}]
        events:
          update: [{call: {tree: moved}}]
          submit: [{call: {tree: moved}}]
        """, "rules/where.yaml")
    assert problems == ["rules/where.yaml:5:16: events/submit/0/call/0: 'old' is only set "
                        "in update events"]


def test_call_steps_get_paths_under_the_call_node():
    form, problems = form_of(LEDGER)
    assert problems == []
    (bg,) = form.events["submit"]
    attempt = bg.do[0]
    assert isinstance(attempt, TryNode) and attempt.error_field == "last_error"
    assert [n.path for n in attempt.body] == [f"{BG}/do/0/try/{i}" for i in range(3)]
    call = attempt.handler[1]
    assert isinstance(call, CallNode) and call.path == f"{BG}/do/0/catch/1"
    assert [n.path for n in call.body] == [f"{BG}/do/0/catch/1/call/0"]
    assert set(call.params) == {"who", "amount"}
    # The Run's node carries the tree it calls, for its snapshot.
    assert set(bg.trees) == {"notify"} and bg.trees["notify"]["do"]
    assert set(form.trees) == {"notify"}


# -- the engine's walk, alone ---------------------------------------------------------------

class Recorder(Walker):
    """A walk that records what it would run, failing where told."""

    def __init__(self, fail: dict[str, Exception]):
        super().__init__()
        self.fail, self.ran, self.errors = fail, [], []

    def variables(self, scope):
        return {"record": {"amount": 3}, **scope}

    def action(self, node: ActionNode, scope):
        if node.path in self.fail:
            raise self.fail[node.path]
        self.ran.append((node.path, scope.get("inputs"), scope.get("error")))

    def caught(self, node, error, exc, scope):
        self.errors.append((node.path, error))


WALKED = """
form: walked
fields: [{name: amount, type: decimal}, {name: note, type: string}]
trees:
  double:
    inputs: {n: {type: integer, required: true}, flag: {type: boolean, default: true}}
    do: [{log: "{{ inputs.n * 2 }}"}]
events:
  submit:
    - try:
        - log: one
        - call: {tree: double, with: {n: "{{ record.amount }}"}}
        - log: never
      catch:
        - log: "handled {{ error.message }}"
    - log: after
"""


def test_the_walk_runs_a_call_with_inputs_then_a_catch_and_goes_on():
    form, problems = form_of(WALKED)
    assert problems == []
    walker = Recorder({"events/submit/0/try/1/call/0": PermanentError("db down at x",
                                                                       "Ledger down.")})
    walker.walk(form.events["submit"], {})
    error = {"message": "Ledger down.", "step": "events/submit/0/try/1/call/0"}
    assert walker.errors == [("events/submit/0", error)]
    assert walker.ran == [("events/submit/0/try/0", None, None),
                          ("events/submit/0/catch/0", None, error),
                          ("events/submit/1", None, None)]


def test_the_walk_gives_the_tree_its_typed_inputs_and_never_catches_a_cancel():
    form, _ = form_of(WALKED)
    walker = Recorder({"events/submit/0/try/2": Cancelled()})
    with pytest.raises(Cancelled):
        walker.walk(form.events["submit"], {})
    assert walker.ran[1] == ("events/submit/0/try/1/call/0", {"n": 3, "flag": True}, None)
    assert walker.errors == [] and walker.calls == []


def test_a_caught_error_keeps_only_a_safe_message():
    node = ActionNode("events/submit/0/try/0", None, "http_request", {})
    assert safe_message(RuntimeError(f"password={SECRET}"), node) == \
        "The 'http_request' step failed."
    assert safe_message(RetryableError(SECRET), node) == "The 'http_request' step failed."
    assert safe_message(RetryableError(SECRET, "Busy; try later."), node) == \
        "Busy; try later."
    assert GENERIC_FAILURE not in safe_message(PermanentError(SECRET), node)


@pytest.mark.parametrize("value, itype, expected", [
    ("12.5", "number", 12.5), ("12", "number", 12), (" 7 ", "integer", 7), (4.0, "integer", 4),
    ("yes", "boolean", True), ("", "number", None), (3, "string", "3"), ([1], "any", [1]),
])
def test_inputs_are_converted_to_their_declared_type(value, itype, expected):
    assert convert_input(value, itype) == expected


@pytest.mark.parametrize("value, itype", [("abc", "number"), ("2.5", "integer"),
                                          ("maybe", "boolean"), (True, "number"),
                                          ("nan", "number")])
def test_inputs_that_do_not_fit_their_type_are_refused(value, itype):
    with pytest.raises((TypeError, ValueError)):
        convert_input(value, itype)


# -- snapshots --------------------------------------------------------------------------------

def test_a_snapshot_carries_the_called_trees_and_rebuilds_without_the_rule_file():
    form, _ = form_of(LEDGER)
    (bg,) = form.events["submit"]
    data = json.loads(json.dumps(Snapshot.of(bg, form.field_types).dump()))
    assert data[VERSION_KEY] == 3 and set(data["trees"]) == {"notify"}
    node = Snapshot.load(data).node(bg.path)
    call = node.do[0].handler[1]
    assert isinstance(call, CallNode) and call.body[0].args["name"].startswith("notify-")
    # A version 2 snapshot (before trees) still loads, with no trees.
    old = Snapshot.load({**data, VERSION_KEY: 2})
    assert old.trees == {} and old.call is None


def test_a_run_started_inside_a_tree_keeps_its_inputs():
    form, problems = form_of("""
        form: inner
        fields: [{name: name, type: string}]
        trees:
          later:
            inputs: {who: {type: string, required: true}}
            do:
              - background:
                  title: "For {{ inputs.who }}"
                  do: [{log: "hello {{ inputs.who }}"}]
        events:
          submit: [{call: {tree: later, with: {who: "{{ record.name }}"}}}]
        """)
    assert problems == []
    bg = form.events["submit"][0].body[0]
    assert bg.path == "events/submit/0/call/0/background"
    snap = Snapshot.load(Snapshot.of(bg, form.field_types,
                                     call={"tree": "later", "inputs": {"who": "Ann"}}).dump())
    assert snap.variables()["inputs"] == {"who": "Ann"}
    assert snap.node(bg.path).do[0].path == "events/submit/0/call/0/background/do/0"


# -- show, preview, lsp -----------------------------------------------------------------------

def test_show_and_preview_show_calls_and_try(settings):
    form, _ = form_of(INLINE)
    text = "\n".join(outline(form))
    assert "trees/notify  tree: who (string, required)" in text
    assert "events/submit/0  try 1 node(s); catch 1 node(s); error to last_error" in text
    assert "events/submit/1  call tree notify with who: {{ record.name }}" in text
    assert "events/submit/1/call/0  record_call name" in text
    lines = [str(line) for line in preview(form, {"name": "Ann"}, settings)]
    assert "events/submit/1: call tree notify with who = 'Ann'" in lines
    assert "  events/submit/1/call/1: set status = 'notified Ann'" in lines
    assert any(line.startswith("events/submit/0: try 1 node(s)") for line in lines)


def test_the_language_server_completes_tree_names_in_a_call():
    text = textwrap.dedent(INLINE).lstrip().replace(
        '{tree: notify, with: {who: "{{ record.name }}"}}', "{tree: ")
    line = next(i for i, x in enumerate(text.splitlines()) if "{tree: " in x)
    column = len(text.splitlines()[line])
    labels = [item.label for item in completions(text, line, column, "inline.yaml")]
    assert labels == ["notify"]


# -- end to end: the web form, real workers, Redis and the database ---------------------------

def test_a_sync_try_catches_and_the_submit_goes_on_with_a_call(client, rt):
    token = token_of(submit(client, "inline", {"name": "Ann"}))
    record = record_of(rt, token)
    assert record.data["last_error"] == "The 'explode' step failed."
    assert record.data["status"] == "notified Ann"
    assert SECRET not in json.dumps(record.data)
    assert keys(rt, "notify-Ann") == {f"{token}:events/submit/1/call/0"}


@pytest.mark.slow
def test_a_worker_retries_then_catches_runs_the_handler_and_ends_done(client, rt, worker):
    token = token_of(submit(client, "ledger", {"name": "Kim", "amount": "2.5"}))
    wait_until(lambda: runs_of(rt, token)[0].is_final, timeout=60)
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.DONE and run.attempt == 2  # its retry first, then caught
    record = record_of(rt, token)
    assert record.data["done"] is True
    assert record.data["last_error"] == "The ledger is down."
    assert record.data["status"] == f"caught at {BG}/do/0/try/1"
    assert names(rt) == Counter({"body": 1, "notify-Kim-5.0": 1, "after": 1})
    assert keys(rt, "notify-Kim-5.0") == {f"{run.id}:{BG}/do/0/catch/1/call/0"}
    trace = events_of(rt, run.id)
    (call,) = [e for e in trace if e.event == "call"]
    assert call.path == f"{BG}/do/0/catch/1"
    assert call.detail == 'call tree notify with {"amount": 2.5, "who": "Kim"}'
    (caught,) = [e for e in trace if e.event == "caught"]
    assert caught.path == f"{BG}/do/0/try/1" and SECRET in caught.detail  # operators only
    catches = [e for e in trace if e.event == "checkpoint" and e.path.endswith("/catch")]
    assert [e.detail for e in catches] == [f"caught {BG}/do/0/try/1: The ledger is down."]
    status = client.get(f"/r/{token}/status").get_json()
    assert SECRET not in json.dumps(status)


@pytest.mark.slow
def test_a_worker_killed_in_the_handler_resumes_it_without_catching_again(
        client, rt, subprocess_env):
    token = token_of(submit(client, "handler_crash", {"name": "Kim"}))
    with WorkerProcess(subprocess_env) as first:
        wait_until(lambda: names(rt)["h2"] == 1, timeout=60)
        first.kill()  # in the middle of the handler's second step
    (Path(rt.settings.instance_dir) / "release-h2").touch()
    with WorkerProcess(subprocess_env):
        wait_until(lambda: runs_of(rt, token)[0].status == RunStatus.DONE, timeout=60)
    (run,) = runs_of(rt, token)
    # The body and the handler's completed step ran once; the interrupted one again.
    assert names(rt) == Counter({"body": 1, "h1": 1, "h2": 2, "h3": 1, "after": 1})
    trace = events_of(rt, run.id)
    assert [e.event for e in trace].count("caught") == 1
    catches = [e for e in trace if e.event == "checkpoint" and e.path.endswith("/catch")]
    assert len(catches) == 1 and run.recoveries == 1
    record = record_of(rt, token)
    assert record.data["last_error"] == "No ledger today." and record.data["done"] is True


def test_a_run_in_flight_keeps_its_called_tree_after_the_rule_file_changes(
        client, rt, rules_dir):
    token = token_of(submit(client, "kept", {"name": "Kim", "amount": "1"}))
    kept = rules_dir / "kept.yaml"
    kept.write_text(kept.read_text().replace("notify-", "edited-"))
    work(rt)
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.DONE
    assert names(rt)["notify-Kim-2"] == 1 and not any(n.startswith("edited-")
                                                        for n in names(rt))



def test_a_background_inside_a_called_tree_runs_on_a_worker_with_its_inputs(
        client, rt, operator):
    token = token_of(submit(client, "nested", {"name": "Ann"}))
    work(rt)
    (run,) = runs_of(rt, token)
    path = "events/submit/0/call/0/background"
    assert run.status == RunStatus.DONE and run.node_path == path and run.title == "For Ann"
    assert run.attempt == 1  # a permanent error is caught at once, whatever `retry:` says
    assert keys(rt, "later-Ann") == {f"{run.id}:{path}/do/0"}
    assert keys(rt, "caught-Ann") == {f"{run.id}:{path}/do/1/catch/0"}
    # Operators see the catch in the trace, with the full error.
    html = operator.get(f"/admin/runs/{run.id}").get_data(as_text=True)
    assert "caught" in html and f"{path}/do/1/catch" in html


def test_an_operators_batch_calls_a_named_tree(client, rt, operator):
    token = token_of(submit(client, "batchy", {"name": "Bo"}))
    page = operator.get("/admin/batches/new/batchy/greet_all")
    assert page.status_code == 200, page.data[:500]
    started = operator.post("/admin/batches/new/batchy/greet_all", data={
        "csrf_token": tokens(page.data)["csrf_token"], "where": "", "scope": "filter"})
    assert started.status_code == 303, started.data[:2000]
    work(rt)
    run = next(r for r in runs_of(rt, token) if r.batch_id is not None)
    assert run.status == RunStatus.DONE
    assert keys(rt, "greet-Bo") == {f"{run.id}:batches/greet_all/do/0/call/0"}


@pytest.mark.slow
def test_the_expense_example_calls_its_tree_and_goes_on_past_the_ledger(client, rt):
    token = token_of(submit(client, "expense_report", {
        "employee": "Ann Lee", "email": "ann@example.com", "amount": "900.00",
        "category": "Travel", "spent_on": "2026-01-05"}))
    work(rt)
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.DONE
    record = record_of(rt, token)
    # The ledger host is not allowed here: the step's error is caught, the claim goes on.
    assert record.data["processed"] is True and record.data["route"] == "manager"
    assert record.data["ledger_error"] == "This form is not allowed to contact that service."
    trace = events_of(rt, run.id)
    (call,) = [e for e in trace if e.event == "call"]
    assert call.detail == 'call tree notify_manager with {"amount": 900.0, "category": "Travel"}'
    assert f"{BG.replace('/0/', '/1/')}/do/2/then/0/call/0" in {e.path for e in trace}


def test_a_cancel_is_never_caught(client, rt):
    # The step fails (retryably, on the last attempt) right after a cancel was asked for:
    # the try would catch that error, but the cancel wins and nothing of the catch stays.
    token = token_of(submit(client, "cancelled_try", {"name": "Kim"}))
    work(rt)
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.CANCELLED
    assert names(rt) == Counter()
    assert not [e for e in events_of(rt, run.id) if e.path.endswith("/catch")]
    assert record_of(rt, token).data.get("last_error") is None
