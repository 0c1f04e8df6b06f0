"""`formrules preview --until`: what a form will do over time, on a simulated clock.

From the submit (or `--at`, as if submitted then) to `until` later, in time order:

- when each Background and Delay the tree creates becomes due (`preview` decides which
  branches are taken and evaluates `at:` expressions on the simulated clock);
- what its retries look like if every attempt keeps failing: attempt n at its nominal
  wait (the real waits vary by the node's jitter), then `on_error` and a dead Run;
- which slots of the form's cron schedules fire.

Nothing is run, written, sent or enqueued: this only reads the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from formrules.config import Settings
from formrules.language.duration import format_duration
from formrules.language.tree import Form, RetryPolicy
from formrules.runs.preview import Deferred, preview

SLOTS_SHOWN = 10  # per schedule: a minutely schedule over a month is 43,200 lines
SLOTS_COUNTED = 1000  # beyond this, "and more"


@dataclass(frozen=True)
class Moment:
    """One thing that happens at a time: what, at which node path."""

    at: datetime
    path: str
    text: str


def nominal_waits(policy: RetryPolicy) -> list[float]:
    """Seconds before attempt 2, 3, … without jitter (what `intervals` centres on)."""
    waits = []
    for i in range(policy.attempts - 1):
        if policy.exponential_base is not None:
            wait = policy.exponential_base * (2 ** i)
            if policy.exponential_max is not None:
                wait = min(wait, policy.exponential_max)
        else:
            wait = policy.backoff[min(i, len(policy.backoff) - 1)] if policy.backoff else 0
        waits.append(wait)
    return waits


def timeline(form: Form, values: dict[str, Any], settings: Settings, *, start: datetime,
             until: timedelta, event: str = "submit",
             old: dict[str, Any] | None = None) -> list[str]:
    """The lines of `preview --until`: a header, then every moment up to `start + until`."""
    end = start + until
    deferred: list[Deferred] = []
    preview(form, values, settings, event=event, old=old, now=start, deferred=deferred)
    moments = [Moment(start, f"events/{event}", f"{event} (the tree's inline steps run)")]
    for item in deferred:
        moments += _runs(item)
    for index, schedule in enumerate(form.schedules):
        moments += _slots(index, schedule, start, end)
    moments.sort(key=lambda m: m.at)  # stable: same time keeps tree order
    shown = [m for m in moments if m.at <= end]
    later = [m for m in moments if m.at > end]
    lines = [f"{form.id}: {event} at {_utc(start)}, until {_utc(end)} "
             f"({format_duration(until)}); nothing is done"]
    for m in shown:
        lines.append(f"{_utc(m.at)} (+{_offset(m.at - start)})  {m.path}: {m.text}")
    if later:
        lines.append(f"… {len(later)} more after {_utc(end)}, the next at {_utc(later[0].at)}: "
                     f"{later[0].path}")
    return lines


def _runs(item: Deferred) -> list[Moment]:
    node, policy = item.node, item.node.retry
    conditions = "".join(f"; only if {getattr(node, k)}" if k == "when" else
                         f"; cancelled if {getattr(node, k)}"
                         for k in ("when", "cancel_if") if getattr(node, k))
    if policy.attempts <= 1:
        first = f"{node.kind} {item.title!r} runs (no retries){conditions}"
    else:
        first = f"{node.kind} {item.title!r} runs, attempt 1 of {policy.attempts}{conditions}"
    out = [Moment(item.due, node.path, first)]
    at = item.due
    jitter = f" (±{round(policy.jitter * 100)}%)" if policy.jitter else ""
    for attempt, wait in enumerate(nominal_waits(policy), start=2):
        at = at + timedelta(seconds=wait)
        gap = format_duration(timedelta(seconds=wait))
        out.append(Moment(at, node.path, f"if it keeps failing: attempt {attempt} of "
                                         f"{policy.attempts}, {gap}{jitter} after the last"))
    ending = (f"on_error runs ({len(node.on_error)} node(s)) and the Run is dead"
              if node.on_error else "the Run is dead")
    last = "if it fails" if policy.attempts <= 1 else f"if attempt {policy.attempts} fails too"
    out.append(Moment(at, node.path, f"{last}: {ending}"))
    return out


def _slots(index: int, schedule, start: datetime, end: datetime) -> list[Moment]:
    zone = ZoneInfo(schedule.timezone)
    # get_next is strictly after its base: nudge so a slot at the start itself counts.
    slots = croniter(schedule.cron, start.astimezone(zone) - timedelta(microseconds=1))
    each = f", one Run per record where {schedule.for_each}" if schedule.for_each else ""
    out: list[Moment] = []
    count = 0
    while count < SLOTS_COUNTED:
        slot = slots.get_next(datetime)
        if slot.astimezone(UTC) > end:
            break
        count += 1
        if count <= SLOTS_SHOWN:
            local = f" ({slot:%H:%M} {schedule.timezone})" if schedule.timezone != "UTC" else ""
            out.append(Moment(slot.astimezone(UTC), f"schedules/{index}",
                              f"schedule {schedule.name!r} fires{local}{each}"))
    if count > SLOTS_SHOWN:
        more = f"{count - SLOTS_SHOWN}" + ("+" if count >= SLOTS_COUNTED else "")
        last = out[-1]
        out.append(Moment(last.at, last.path, f"… and {more} more slot(s) of "
                                              f"{schedule.name!r} in the window"))
    return out


def _utc(at: datetime) -> str:
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _offset(delta: timedelta) -> str:
    return "0s" if delta <= timedelta(0) else format_duration(delta)
