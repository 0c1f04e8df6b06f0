"""Update events whose Background/Delay nodes use `old` and `changed` (issue 8.4): the
shipped room_booking update and the docs' "Update events" example run to done through a
real worker, with the values from before the edit."""

from __future__ import annotations

import shutil
from datetime import date, timedelta
from email import message_from_bytes
from pathlib import Path

import pytest

from formrules.language.loader import load_rules
from formrules.runs import control, engine, updates
from formrules.store.models import Record, Run, RunStatus
from tests.helpers import events_of, runs_of, work
from tests.test_docs import YAML_BLOCKS, as_form

ROOT = Path(__file__).resolve().parents[1]
UPDATE_EXAMPLE = next(b for b in YAML_BLOCKS if b.marker("event") == "update")


def store_record(rt, form_id: str, values: dict) -> int:
    """Submit a record the way the web does, then cancel its submit-time Runs."""
    form = load_rules(rt.settings.rules_dir).forms[form_id]
    with rt.store.session() as s:
        record, runs = engine.submit(s, form, values, owner="user:1", settings=rt.settings)
        for run in runs:
            control.cancel(s, run, "the test")
        return record.id


def edit(rt, form_id: str, record_id: int, values: dict) -> list[Run]:
    """Edit a record as the operator's page does; returns the Runs the update started."""
    form = load_rules(rt.settings.rules_dir).forms[form_id]
    with rt.store.session() as s:
        change = updates.apply_edit(s, form, record_id, values, settings=rt.settings)
    updates.after_edit(rt.dispatcher, change)
    return change.new_runs


def ended(rt, run_id: str) -> Run:
    with rt.store.session() as s:
        return s.get(Run, run_id)


def mails(rt) -> list:
    return [message_from_bytes(p.read_bytes()) for p in rt.settings.outbox_dir.glob("*.eml")]


def test_the_shipped_room_booking_update_tells_the_requester(rt):
    shutil.copy(ROOT / "rules" / "room_booking.yaml", rt.settings.rules_dir)
    day = date.today() + timedelta(days=20)
    record_id = store_record(rt, "room_booking", {
        "requester": "Ann", "email": "ann@example.com", "room": "Atlas",
        "date": day.isoformat(), "attendees": 4})

    (run,) = edit(rt, "room_booking", record_id, {"room": "Borealis"})
    work(rt)

    run = ended(rt, run.id)
    assert run.status == RunStatus.DONE, [e.detail for e in events_of(rt, run.id)]
    (mail,) = mails(rt)
    assert f"It was Atlas on {day.isoformat()}." in mail.get_payload()
    assert "Borealis" in mail["Subject"]


def test_the_docs_update_example_runs_through_a_worker(rt):
    (Path(rt.settings.rules_dir) / "docs_update.yaml").write_text(as_form(UPDATE_EXAMPLE))
    record_id = store_record(rt, "docs_example", {
        "status": "booked", "email": "bo@example.com", "date": "2030-05-01"})

    (run,) = edit(rt, "docs_example", record_id, {"status": "cancelled"})
    work(rt)

    assert ended(rt, run.id).status == RunStatus.DONE
    (mail,) = mails(rt)
    assert "(was booked) is cancelled" in mail.get_payload()


@pytest.mark.parametrize("kind", ["background", "delay"])
def test_old_and_changed_reach_deferred_nodes_and_their_children(rt, kind):
    timing = "for: 0s\n        when: \"'place' in changed\"" if kind == "delay" else ""
    (Path(rt.settings.rules_dir) / "moves.yaml").write_text(f"""
form: moves
title: Moves
fields:
  - {{name: place, type: string}}
  - {{name: when, type: date}}
  - {{name: note, type: string, hidden: true}}
  - {{name: later, type: string, hidden: true}}
events:
  update:
    - {kind}:
        title: From {{{{ old.place }}}}
        {timing}
        do:
          - set:
              note: "{{{{ old.place }}}} -> {{{{ changed.place }}}} ({{{{ old.when.year }}}})"
          - background:
              title: Then
              do: [{{set: {{later: "was {{{{ old.place }}}}"}}}}]
""")
    record_id = store_record(rt, "moves", {"place": "Oslo", "when": "2031-02-03"})
    (run,) = edit(rt, "moves", record_id, {"place": "Rome"})
    work(rt)
    work(rt)  # the child Background
    assert ended(rt, run.id).status == RunStatus.DONE
    assert [r.status for r in runs_of(rt) if r.title in ("From Oslo", "Then")] == ["done"] * 2
    with rt.store.session() as s:
        data = s.get(Record, record_id).data
    assert data["note"] == "Oslo -> Rome (2031)" and data["later"] == "was Oslo"
