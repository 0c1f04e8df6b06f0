"""Reading a Run's trace: attempts numbered as they happened.

The Run's `attempt` counter restarts at 0 when an operator retries a dead or cancelled
Run (it gets a fresh set of attempts), so trace lines carry 1, 2, 1, 2. People read the
trace as one history: the attempt after an operator's retry of a twice-failed Run is #3.
"""

from __future__ import annotations

from collections.abc import Iterable

from formrules.store.models import EventKind, RunEvent


def attempt_numbers(events: Iterable[RunEvent]) -> list[tuple[RunEvent, int | None]]:
    """Each event (in trace order) with its attempt's number in the whole history, or
    None for lines outside any attempt (scheduling, an operator's retry, a cancel ahead)."""
    numbered: list[tuple[RunEvent, int | None]] = []
    before = highest = 0  # attempts in earlier rounds; highest stored number this round
    for ev in events:
        if ev.event == EventKind.RETRY and not ev.attempt:  # an operator's retry: a new round
            before, highest = before + highest, 0
        highest = max(highest, ev.attempt or 0)
        numbered.append((ev, before + ev.attempt if ev.attempt else None))
    return numbered
