"""Editing a record: update events see old and new values; pending Delays follow the record
(on_change: recompute), keep their time, or are cancelled (cancel_if) with the reason in
their trace; `when:` is re-checked when a Delay fires."""

from __future__ import annotations

import html
import re
from datetime import UTC, date, datetime, timedelta

import pytest

from formrules.store.models import Record, RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import events_of, record_of, runs_of, submit, token_of, tokens, work
from tests.web_helpers import login, make_user

BOOKING = """
form: booking
title: Book a desk
fields:
  - {name: name, type: string, required: true, max_length: 40}
  - {name: date, type: date, required: true}
  - {name: room, type: choice, choices: [A, B], default: A}
  - {name: status, type: string, hidden: true}
  - {name: note, type: string, hidden: true}
events:
  submit:
    - set: {status: booked}
    - delay:
        title: Reminder for {{ record.name }}
        at: "record.date - days(1)"
        cancel_if: "record.date > old.date + days(30)"
        do: [{record_call: {name: reminder}}]
    - delay:
        title: Invoice
        at: "record.date + days(1)"
        on_change: keep
        do: [{record_call: {name: invoice}}]
    - delay:
        title: Welcome pack
        for: 0s
        when: "record.room == 'A'"
        do: [{record_call: {name: welcome}}]
  update:
    - if: "'date' in changed"
      then:
        - set: {note: "moved from {{ old.date }} to {{ changed.date }}"}
        - background:
            title: Tell the calendar
            do: [{record_call: {name: calendar}}]
"""


@pytest.fixture
def rules_dir(rules_dir):
    """The test rules plus the booking form."""
    (rules_dir / "booking.yaml").write_text(BOOKING)
    return rules_dir


def book(client, rt, day: date) -> tuple[str, int]:
    """Submit a booking as an end user; returns its token and record id."""
    token = token_of(submit(client, "booking", {"name": "Ann", "date": day.isoformat(),
                                                "room": "A"}))
    return token, record_of(rt, token).id


def edit(operator, record_id: int, **changes):
    """POST the edit page the way a browser does: the prefilled form with some changes."""
    page = operator.get(f"/admin/records/{record_id}/edit")
    assert page.status_code == 200, page.data[:500]
    prefilled = {m[0].decode(): html.unescape(m[1].decode()) for m in re.findall(
        rb'<input[^>]* name="(\w+)" type="text" value="([^"]*)"', page.data)}
    version = re.search(rb'name="version" value="(\d+)"', page.data).group(1).decode()
    data = {**prefilled, "csrf_token": tokens(page.data)["csrf_token"], "version": version,
            "name": "Ann", "room": "A", **changes}
    return operator.post(f"/admin/records/{record_id}/edit", data=data)


def run_titled(rt, token: str, title: str):
    """The record's Run with this title."""
    return next(r for r in runs_of(rt, token) if r.title.startswith(title))


def scheduled_at(rt, run_id: str) -> datetime | None:
    """When RQ's scheduler will enqueue this Run's job (None: not scheduled)."""
    return rt.dispatcher.queue.scheduled_job_registry.get_scheduled_time(run_id) \
        if run_id in rt.dispatcher.queue.scheduled_job_registry.get_job_ids() else None


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def test_editing_the_date_moves_a_pending_at_delay(client, operator, rt):
    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)
    reminder, invoice = run_titled(rt, token, "Reminder"), run_titled(rt, token, "Invoice")
    assert reminder.status == "scheduled" and reminder.due_at == midnight(day - timedelta(1))
    assert scheduled_at(rt, reminder.id) == reminder.due_at

    later = day + timedelta(days=7)
    response = edit(operator, record_id, date=later.isoformat())

    assert response.status_code == 303
    moved = run_titled(rt, token, "Reminder")
    assert moved.status == "scheduled"
    assert moved.due_at == midnight(later - timedelta(days=1))
    assert scheduled_at(rt, moved.id) == moved.due_at  # the RQ job was replaced, not kept
    trace = [e for e in events_of(rt, moved.id) if e.event == "reschedule"]
    assert len(trace) == 1 and trace[0].detail.startswith("moved: date changed at ")
    assert moved.due_at.isoformat(timespec="seconds") in trace[0].detail
    # on_change: keep holds its time, in the database and in RQ.
    kept = run_titled(rt, token, "Invoice")
    assert kept.due_at == invoice.due_at == midnight(day + timedelta(days=1))
    assert scheduled_at(rt, kept.id) == kept.due_at
    # The update tree saw old and new values, and its Background ran on a worker.
    assert record_of(rt, token).data["note"] == f"moved from {day} to {later}"
    assert record_of(rt, token).data["date"] == later.isoformat()
    work(rt)
    assert [c.split()[0] for c in read_calls(rt.settings.instance_dir)].count("calendar") == 1
    page = operator.get(f"/admin/records/{record_id}", follow_redirects=True)
    assert b"now runs at" in page.data  # the flash tells the operator what moved


def test_cancel_if_cancels_the_delay_with_the_reason_in_its_trace(client, operator, rt):
    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)
    reminder = run_titled(rt, token, "Reminder")

    response = edit(operator, record_id, date=(day + timedelta(days=60)).isoformat())

    assert response.status_code == 303
    cancelled = run_titled(rt, token, "Reminder")
    assert cancelled.status == RunStatus.CANCELLED and cancelled.due_at == reminder.due_at
    reasons = [e.detail for e in events_of(rt, cancelled.id) if e.event == "cancel"]
    assert len(reasons) == 1
    assert reasons[0].startswith("cancelled: date changed at ")
    assert "operator olga" in reasons[0] and "cancel_if" in reasons[0]
    assert scheduled_at(rt, cancelled.id) is None  # its RQ job is gone too
    # The trace is what the operator's Run page shows: "why didn't it run" has an answer.
    page = operator.get(f"/admin/runs/{cancelled.id}")
    assert b"cancelled: date changed at" in page.data


def test_when_false_at_fire_time_skips_with_the_reason(client, operator, rt):
    token, record_id = book(client, rt, date.today() + timedelta(days=10))
    welcome = run_titled(rt, token, "Welcome pack")
    assert welcome.status == "queued"
    assert edit(operator, record_id, date=(date.today() + timedelta(days=10)).isoformat(),
                room="B").status_code == 303

    work(rt)

    skipped = run_titled(rt, token, "Welcome pack")
    assert skipped.status == RunStatus.SKIPPED
    reasons = [e.detail for e in events_of(rt, skipped.id) if e.event == "skip"]
    assert reasons == ["when: \"record.room == 'A'\" was false at fire time"]
    assert "welcome" not in [c.split()[0] for c in read_calls(rt.settings.instance_dir)]


def test_saving_without_changes_runs_no_update_event(client, operator, rt):
    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)
    before = record_of(rt, token)

    response = edit(operator, record_id, date=day.isoformat())

    assert response.status_code == 303
    after = record_of(rt, token)
    assert after.data == before.data and "note" not in after.data or after.data["note"] is None
    assert run_titled(rt, token, "Reminder").due_at == midnight(day - timedelta(days=1))
    assert not [r for r in runs_of(rt, token) if r.title == "Tell the calendar"]


def test_invalid_edit_is_refused_with_field_messages_and_changes_nothing(client, operator, rt):
    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)

    response = edit(operator, record_id, date=(day + timedelta(days=1)).isoformat(),
                    name="x" * 41, room="C")

    assert response.status_code == 422
    assert b"Field cannot be longer than 40 characters." in response.data
    assert b"Not a valid choice." in response.data
    assert record_of(rt, token).data["date"] == day.isoformat()


def test_the_edit_page_is_for_operators_only(client, app, rt):
    token, record_id = book(client, rt, date.today() + timedelta(days=3))
    assert client.get(f"/admin/records/{record_id}/edit").status_code == 302  # to login
    make_user(rt, "uma")
    user = app.test_client()
    login(user, "uma")
    assert user.get(f"/admin/records/{record_id}/edit").status_code == 403
    with rt.store.session() as s:
        assert s.get(Record, record_id).version == record_of(rt, token).version


def test_a_delay_that_already_started_is_not_moved(client, operator, rt):
    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)
    reminder = run_titled(rt, token, "Reminder")
    with rt.store.session() as s:  # a worker has claimed it (it fired early, say)
        run = s.get(type(reminder), reminder.id)
        run.status, run.attempt, run.lease = RunStatus.RUNNING.value, 1, "x" * 32

    assert edit(operator, record_id,
                date=(day + timedelta(days=3)).isoformat()).status_code == 303

    same = run_titled(rt, token, "Reminder")
    assert same.status == "running" and same.due_at == reminder.due_at
    assert not [e for e in events_of(rt, same.id) if e.event == "reschedule"]


def test_operators_can_correct_hidden_fields(client, operator, rt):
    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)
    page = operator.get(f"/admin/records/{record_id}/edit")
    assert b'name="status"' in page.data and b"normally set by the form" in page.data

    response = edit(operator, record_id, date=day.isoformat(), status="on hold")

    assert response.status_code == 303
    assert record_of(rt, token).data["status"] == "on hold"
    assert record_of(rt, token).data["date"] == day.isoformat()


def test_an_edit_made_on_a_stale_page_does_not_undo_a_workers_write(client, operator, rt):
    from formrules.store.db import lock_record

    day = date.today() + timedelta(days=10)
    token, record_id = book(client, rt, day)
    page = operator.get(f"/admin/records/{record_id}/edit")
    with rt.store.session() as s:  # a worker's step writes while the operator is typing
        record = lock_record(s, record_id)
        record.data = {**record.data, "status": "confirmed by worker"}
    stale = {m[0].decode(): html.unescape(m[1].decode()) for m in re.findall(
        rb'<input[^>]* name="(\w+)" type="text" value="([^"]*)"', page.data)}
    version = re.search(rb'name="version" value="(\d+)"', page.data).group(1).decode()
    response = operator.post(f"/admin/records/{record_id}/edit", data={
        **stale, "csrf_token": tokens(page.data)["csrf_token"], "version": version,
        "date": day.isoformat(), "room": "B"})
    assert response.status_code == 303
    assert b"changed while you were editing" in operator.get(response.headers["Location"]).data
    data = record_of(rt, token).data
    assert data["status"] == "confirmed by worker" and data["room"] == "A"
