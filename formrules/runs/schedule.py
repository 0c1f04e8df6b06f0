"""Cron schedules: each time slot runs once, however many workers run the reconciler.

    fire_due(rt, now)     for every form's schedule:
      slot = the latest cron time <= now, in the schedule's time zone
      already decided (a ScheduleSlot row at or after it)?  nothing to do
      missed (older than ON_TIME) and catch_up: none, or never seen before?  record the
        slot as skipped, with the reason
      otherwise INSERT the ScheduleSlot row: the unique (schedule_key, slot_at) lets one
        scheduler win; the winner creates the Run(s) in the same transaction and
        dispatches them after commit

After downtime only the latest missed slot is considered, so it runs once (`catch_up:
latest`) or not at all (`catch_up: none`). Tests pass `now` instead of waiting for a clock.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from formrules.language import sandbox
from formrules.language.loader import rebuild_defer
from formrules.language.registry import current_rules
from formrules.language.tree import Form, ScheduleDef
from formrules.language.variables import form_variables
from formrules.process.runtime import Runtime
from formrules.runs.engine import new_run
from formrules.store.models import EventKind, Record, Run, RunEvent, ScheduleSlot, utcnow

log = logging.getLogger("formrules.runs.schedule")
# A slot seen this soon after its time is on time; later, it was missed (downtime).
ON_TIME = timedelta(minutes=2)
OWNER = "schedule"


def schedule_key(form: Form, schedule: ScheduleDef) -> str:
    """The name slots are claimed under: form id and schedule name."""
    return f"{form.id}/{schedule.name}"


def latest_slot(schedule: ScheduleDef, now: datetime) -> datetime:
    """The most recent cron time at or before `now` (UTC), computed in the schedule's zone."""
    local = now.astimezone(ZoneInfo(schedule.timezone))
    # croniter's get_prev is strictly before its base: nudge so a slot at `now` counts.
    previous = croniter(schedule.cron, local + timedelta(microseconds=1)).get_prev(datetime)
    return previous.astimezone(UTC)


def fire_due(rt: Runtime, now: datetime | None = None) -> int:
    """Start a Run for every schedule slot that is due and not yet claimed; count Runs."""
    now = now or utcnow()
    started = 0
    for form in current_rules(rt.settings.rules_dir).forms.values():
        for index, schedule in enumerate(form.schedules):
            try:
                started += fire_one(rt, form, index, schedule, now)
            except Exception:  # one broken schedule must not stop the others
                log.exception("schedule %s failed", schedule_key(form, schedule))
    return started


def fire_one(rt: Runtime, form: Form, index: int, schedule: ScheduleDef,
             now: datetime) -> int:
    """Decide the latest slot of one schedule (fire or skip it) unless already decided."""
    key = schedule_key(form, schedule)
    slot = latest_slot(schedule, now)
    with rt.store.session() as s:  # a read on its own: SQLite then writes without upgrading
        last = s.scalar(select(func.max(ScheduleSlot.slot_at))
                        .where(ScheduleSlot.schedule_key == key))
    if last is not None and slot <= last:
        return 0
    late = now - slot > ON_TIME
    skip = None
    if late and schedule.catch_up == "none":
        skip = f"skipped: missed by {_ago(now - slot)} and catch_up is none"
    elif late and last is None:
        skip = f"skipped: the slot passed {_ago(now - slot)} before the schedule was first seen"
    runs: list[Run] = []
    with rt.store.session() as s:
        claim = ScheduleSlot(schedule_key=key, slot_at=slot, outcome=skip or "starting")
        s.add(claim)
        try:
            s.flush()  # the unique key: a second scheduler fails here, or waits then fails
        except IntegrityError:
            s.rollback()
            log.debug("schedule %s: slot %s taken by another scheduler", key, slot.isoformat())
            return 0
        if skip:
            log.info("schedule %s: slot %s %s", key, slot.isoformat(), skip)
            return 0
        runs = _runs(s, form, index, schedule, slot, now, rt.settings)
        claim.outcome = f"started {len(runs)} run(s)"
    rt.dispatcher.dispatch_all(runs)
    log.info("schedule %s: slot %s started %d run(s)", key, slot.isoformat(), len(runs))
    return len(runs)


def _runs(s, form: Form, index: int, schedule: ScheduleDef, slot: datetime, now: datetime,
          settings) -> list[Run]:
    """The slot's Runs: one, or one per record matching `for_each` (read inside the claim)."""
    node = rebuild_defer(schedule.raw, f"schedules/{index}", form.field_types,
                         form.tree_sources)
    types = form.field_types
    if schedule.for_each is None:
        targets: list[Record | None] = [None]
    else:
        targets = [r for r in s.scalars(select(Record).where(Record.form_id == form.id)
                                        .order_by(Record.id))
                   if sandbox.evaluate(schedule.for_each, form_variables(form, r.data))]
    runs = []
    for record in targets:
        data = record.data if record is not None else {}
        run = new_run(node, form_id=form.id, field_types=types, owner=OWNER,
                      variables=form_variables(form, data),
                      record_id=record.id if record is not None else None, now=now,
                      tz=settings.timezone, kind="schedule")
        s.add(run)
        runs.append(run)
    s.flush()  # the Runs exist before their trace lines (foreign keys)
    for run in runs:
        s.add(RunEvent(run_id=run.id, event=EventKind.SCHEDULE.value, path=run.node_path,
                       detail=f"slot {slot.isoformat(timespec='minutes')} of "
                              f"{schedule_key(form, schedule)} ({schedule.cron} "
                              f"{schedule.timezone})"))
    return runs


def _ago(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h" if minutes < 48 * 60 else f"{minutes // 1440} days"
