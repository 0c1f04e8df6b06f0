"""The typed, versioned Run snapshot: old snapshots load, nodes are rebuilt once per
snapshot, and retry timing has one owner."""

from __future__ import annotations

from datetime import date

import pytest

from formrules.errors import RuleError
from formrules.language.loader import parse_form
from formrules.runs.snapshot import VERSION, VERSION_KEY, Snapshot

FORM = """
form: s
title: S
fields:
  - {name: day, type: date}
  - {name: note, type: string}
events:
  submit:
    - background:
        title: Work
        retry: {attempts: 4, backoff: [10s, 1m], jitter: 0}
        timeout: 2m
        do: [{log: "on {{ record.day }}"}]
"""


def node():
    form, problems = parse_form(FORM, "s.yaml")
    assert not problems
    return form.events["submit"][0]


def test_a_new_snapshot_is_versioned_and_round_trips():
    snap = Snapshot.of(node(), {"day": "date"}, {"old": {"day": "2030-01-02"},
                                               "changed": {"day": "2030-02-03"}, "x": {}})
    data = snap.dump()
    assert data[VERSION_KEY] == VERSION == 3
    assert data["intervals"] == [10, 60, 60] and data["timeout"] == 120
    assert set(data["inputs"]) == {"old", "changed"}
    assert Snapshot.load(data) == snap


def test_an_unversioned_snapshot_loads_as_version_1():
    old = {"raw": node().raw, "fields": {"day": "date"}, "intervals": [5], "timeout": None,
           "inputs": {"old": {"day": "2030-01-02"}}}  # inputs did not exist in version 1
    snap = Snapshot.load(old)
    assert snap.intervals == (5,) and snap.inputs == {} and snap.variables() == {}
    assert snap.node("events/submit/0/background").title == "Work"
    assert snap.timeout_seconds(3600) == 3600


def test_a_snapshot_from_newer_code_is_refused():
    with pytest.raises(RuleError, match="snapshot version 4 is newer"):
        Snapshot.load({VERSION_KEY: VERSION + 1, "raw": {}, "fields": {}})


def test_nodes_are_rebuilt_once_per_snapshot():
    first = Snapshot.load(Snapshot.of(node(), {"day": "date"}).dump())
    again = Snapshot.load(Snapshot.of(node(), {"day": "date"}).dump())
    path = "events/submit/0/background"
    assert first.node(path) is again.node(path)
    assert first.node(path) is not first.node("events/submit/1/background")


def test_carried_update_variables_are_typed():
    snap = Snapshot(raw={}, fields={"day": "date"},
                    inputs={"old": {"day": "2030-01-02"}, "changed": {"day": None}})
    assert snap.variables() == {"old": {"day": date(2030, 1, 2)}, "changed": {"day": None}}


@pytest.mark.parametrize("attempt, waits", [(1, [10, 60, 60]), (2, [60, 60]), (3, [60]),
                                            (4, [])])
def test_waits_after_each_attempt(attempt, waits):
    snap = Snapshot(raw={}, fields={}, intervals=(10, 60, 60))
    assert snap.waits_after(attempt, 4) == waits


OLD_TASKS_FORM = """
form: s
title: S
fields:
  - {name: note, type: string}
tasks:
  export:
    title: Export {{ record.note }}
    do:
      - http_request:
          url: "https://example.com/{{ record.note }}"
          save: {note: "{{ response.status }}"}
"""


def test_a_snapshot_stored_when_batches_were_tasks_still_loads():
    """A batch child started before the rename: node path `tasks/<name>`, kind "task"."""
    form, problems = parse_form(OLD_TASKS_FORM, "s.yaml")
    assert [p.severity for p in problems] == ["warning"]
    stored = {VERSION_KEY: 2, "raw": form.batches["export"].raw, "fields": {"note": "string"},
              "intervals": [], "timeout": None, "form_title": "S"}
    node = Snapshot.load(stored).node("tasks/export")  # `response` is allowed there too
    assert node.path == "tasks/export" and node.title == "Export {{ record.note }}"
    assert node.do[0].path == "tasks/export/do/0"


def test_retry_jitter_differs_between_forked_processes():
    """Jitter comes from the module's generator (no reseeding per Run); a forked worker
    child must still draw its own, or every child would retry in lockstep."""
    import os

    from formrules.language.tree import RetryPolicy
    policy = RetryPolicy(attempts=6, backoff=(10_000,), jitter=0.5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, repr(policy.intervals()).encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 4096).decode()
    os.waitpid(pid, 0)
    ours = policy.intervals()
    assert all(5_000 <= wait <= 15_000 for wait in ours)
    assert repr(ours) != theirs
