"""Cron schedules: one Run per slot however many schedulers run, time zones, for_each, and
what happens to slots missed while everything was down (catch_up: latest | none).

The clock is moved by passing `now`; nothing here waits for a minute to pass."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from formrules.language.loader import load_rules
from formrules.process.runtime import Runtime
from formrules.runs.engine import submit as submit_record
from formrules.runs.reconciler import reconcile_once
from formrules.runs.schedule import fire_due
from formrules.store.models import Record, Run, RunEvent, ScheduleSlot
from tests.fixture_actions import read_calls
from tests.helpers import work

HOUSEKEEPING = """
form: housekeeping
title: Housekeeping
fields:
  - {name: name, type: string, required: true}
  - {name: status, type: string, hidden: true}
events:
  submit:
    - set: {status: open}
schedules:
  - name: nightly
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    title: Nightly cleanup
    do: [{record_call: {name: nightly}}]
  - name: expire
    cron: "30 * * * *"
    catch_up: none
    title: Expire {{ record.name }}
    for_each: "record.status == 'open'"
    do: [{set: {status: expired}}]
"""
# 02:00 in Berlin is 01:00 UTC in winter (and 00:00 UTC in summer).
NIGHT = datetime(2025, 1, 6, 1, 0, tzinfo=UTC)


@pytest.fixture
def rules_dir(rules_dir):
    """The test rules plus a form with two schedules."""
    (rules_dir / "housekeeping.yaml").write_text(HOUSEKEEPING)
    return rules_dir


@pytest.fixture
def records(rt):
    """Three records: two open, one already closed."""
    form = load_rules(rt.settings.rules_dir).form("housekeeping")
    with rt.store.session() as s:
        for name in ("a", "b", "c"):
            record, _ = submit_record(s, form, {"name": name}, owner="anon:x",
                                      settings=rt.settings)
        record.data = {**record.data, "status": "closed"}
    return form


def schedule_runs(rt, title: str) -> list[Run]:
    with rt.store.session() as s:
        return list(s.scalars(select(Run).where(Run.kind == "schedule",
                                                Run.title.startswith(title))
                              .order_by(Run.created_at)))


def slots(rt, key: str) -> list[ScheduleSlot]:
    with rt.store.session() as s:
        return list(s.scalars(select(ScheduleSlot).where(ScheduleSlot.schedule_key == key)
                              .order_by(ScheduleSlot.slot_at)))


def test_two_schedulers_running_together_start_one_run_per_slot(rt, records):
    # Two schedulers with their own connections, as two worker processes would have.
    schedulers = [Runtime(rt.settings), Runtime(rt.settings)]
    # Four nightly slots (one Run each), then an hourly one for two open records.
    passes = [(NIGHT + timedelta(days=d, seconds=20), 1) for d in range(4)]
    passes.append((datetime(2025, 1, 9, 9, 30, 20, tzinfo=UTC), 2))
    try:
        for now, expected in passes:
            barrier = threading.Barrier(2)
            started: list[int] = []
            errors: list[BaseException] = []

            def scheduler(runtime: Runtime) -> None:
                try:
                    barrier.wait(10)
                    started.append(fire_due(runtime, now=now))
                except BaseException as exc:  # surfaced below with the test's assertion
                    errors.append(exc)

            threads = [threading.Thread(target=scheduler, args=(r,)) for r in schedulers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors
            assert sorted(started) == [0, expected], (now, started)
    finally:
        for runtime in schedulers:
            runtime.store.dispose()

    assert len(schedule_runs(rt, "Nightly cleanup")) == 4
    assert len(schedule_runs(rt, "Expire")) == 2
    assert [s.slot_at for s in slots(rt, "housekeeping/nightly")] == \
        [NIGHT + timedelta(days=d) for d in range(4)]
    with rt.store.session() as s:
        traces = s.scalars(select(RunEvent.detail).where(RunEvent.event == "schedule")).all()
    assert "slot 2025-01-06T01:00+00:00 of housekeeping/nightly (0 2 * * * Europe/Berlin)" \
        in traces
    assert slots(rt, "housekeeping/expire")[-1].outcome == "started 2 run(s)"
    work(rt)
    assert [c.split()[0] for c in read_calls(rt.settings.instance_dir)] == ["nightly"] * 4


def test_slots_follow_the_time_zone_across_daylight_saving(rt, records):
    assert fire_due(rt, now=NIGHT + timedelta(seconds=30)) == 1  # 02:00:30 CET
    summer = datetime(2025, 7, 1, 0, 0, 30, tzinfo=UTC)  # 02:00:30 CEST
    assert fire_due(rt, now=summer - timedelta(minutes=1)) == 1  # the day before's, late
    assert fire_due(rt, now=summer) == 1
    assert [s.slot_at for s in slots(rt, "housekeeping/nightly")] == [
        NIGHT, datetime(2025, 6, 30, 0, 0, tzinfo=UTC), datetime(2025, 7, 1, 0, 0, tzinfo=UTC)]


def test_for_each_starts_a_run_per_matching_record(rt, records):
    assert fire_due(rt, now=datetime(2025, 1, 6, 9, 30, 5, tzinfo=UTC)) == 2
    runs = schedule_runs(rt, "Expire")
    assert sorted(r.title for r in runs) == ["Expire a", "Expire b"]
    work(rt)
    with rt.store.session() as s:
        statuses = sorted(r.data["status"] for r in s.scalars(select(Record)))
    assert statuses == ["closed", "expired", "expired"]


def test_catch_up_latest_runs_one_missed_slot_once(rt, records):
    assert fire_due(rt, now=NIGHT + timedelta(seconds=5)) == 1
    assert len(schedule_runs(rt, "Nightly")) == 1
    # Down for three days: the 02:00 slots of days 2, 3 and 4 passed unseen.
    back = NIGHT + timedelta(days=3, hours=5)
    fire_due(rt, now=back)
    fire_due(rt, now=back + timedelta(minutes=1))  # the next pass has nothing to do
    nightly = schedule_runs(rt, "Nightly")
    assert len(nightly) == 2
    assert [s.slot_at for s in slots(rt, "housekeeping/nightly")] == \
        [NIGHT, NIGHT + timedelta(days=3)]
    assert slots(rt, "housekeeping/nightly")[-1].outcome == "started 1 run(s)"


def test_catch_up_none_skips_a_missed_slot_and_says_so(rt, records):
    hour = datetime(2025, 1, 6, 9, 30, tzinfo=UTC)
    assert fire_due(rt, now=hour + timedelta(seconds=10)) == 2  # on time: both open ones
    # Down from 10:00 to 14:50: the latest slot, 14:30, was missed by 20 minutes.
    assert fire_due(rt, now=hour + timedelta(hours=5, minutes=20)) == 0
    assert len(schedule_runs(rt, "Expire")) == 2
    missed = slots(rt, "housekeeping/expire")[-1]
    assert missed.slot_at == hour + timedelta(hours=5)
    assert missed.outcome == "skipped: missed by 20 min and catch_up is none"
    # The next slot seen on time runs as usual (nothing open any more: no runs, but a slot).
    work(rt)
    fire_due(rt, now=hour + timedelta(hours=6, seconds=30))
    assert slots(rt, "housekeeping/expire")[-1].outcome == "started 0 run(s)"


def test_a_schedule_first_seen_long_after_its_slot_waits_for_the_next(rt, records):
    fire_due(rt, now=NIGHT + timedelta(hours=9))  # deployed at 11:00: 02:00 is history
    assert schedule_runs(rt, "Nightly") == []
    assert slots(rt, "housekeeping/nightly")[0].outcome.startswith(
        "skipped: the slot passed 9 h before the schedule was first seen")
    fire_due(rt, now=NIGHT + timedelta(days=1, seconds=3))
    assert len(schedule_runs(rt, "Nightly")) == 1


def test_the_reconciler_fires_schedules_on_the_real_clock(rt, records, rules_dir):
    (rules_dir / "minutely.yaml").write_text(
        "form: minutely\nfields: [{name: n, type: string}]\n"
        "schedules:\n  - {name: tick, cron: '* * * * *', do: [{record_call: {name: tick}}]}\n")
    first = reconcile_once(rt)
    reconcile_once(rt)
    ticks = schedule_runs(rt, "Schedule 0")
    assert first.schedules >= 1
    # A minute boundary may fall between the two passes: then each fired its own slot.
    assert len(ticks) in (1, 2)
    with rt.store.session() as s:
        assert s.scalar(select(func.count()).select_from(ScheduleSlot)
                        .where(ScheduleSlot.schedule_key == "minutely/tick")) == len(ticks)
