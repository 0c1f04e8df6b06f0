"""Retention: finished Runs older than their form keeps them go, with traces and files.

The leader's reconciler pass calls `purge_due`. Each form's periods (its `retention:`
key, the deployment's FORMRULES_RETENTION for what it leaves out) give, per finished
status, a cut-off; the Runs of that form and status that finished before it are read
oldest first from the index (form_id, status, finished_at, id), so a pass reads what is
due and no more, and at most `purge_batch` Runs go per pass (the next pass goes on).

What users still need is kept, whatever its age:
- the Runs of a record whose awaited work is still open: its waiting page adds up every
  awaited Run of the record, so a finished sibling must stay until the last one ends;
- the Runs of a batch still running: its progress counts them and its zip holds their files.
A record whose Runs went gets `purged_at`: its page says the details are no longer kept
(instead of "done"). Records themselves, and their field values, stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import aliased

from formrules.language import retention
from formrules.language.registry import current_rules
from formrules.process.runtime import Runtime
from formrules.store.models import (
    AWAITED,
    OPEN,
    OPEN_BATCH,
    Batch,
    Record,
    ResultFile,
    Run,
    RunEvent,
    utcnow,
)

log = logging.getLogger("formrules.runs.purge")


@dataclass
class Purged:
    """What one purge pass removed."""

    runs: int = 0
    events: int = 0
    files: int = 0


def _still_needed():
    sibling = aliased(Run)
    open_record = exists().where(sibling.record_id == Run.record_id,
                                 sibling.awaited.in_(AWAITED),
                                 sibling.status.in_(sorted(OPEN)))
    open_batch = exists().where(Batch.id == Run.batch_id,
                                Batch.status.in_(sorted(OPEN_BATCH)))
    return [~open_record, ~open_batch]


def due_groups(rt: Runtime, now: datetime) -> list[tuple[list, str]]:
    """(conditions, label) per form and status whose Runs may go: each one an index range."""
    default = retention.parse_setting(rt.settings.retention)
    forms = current_rules(rt.settings.rules_dir).forms
    groups: list[tuple[list, str]] = []
    for form_id in sorted(forms):
        periods = retention.effective(forms[form_id].retention, default)
        for status, period in periods.items():
            if period is not None:
                groups.append(([Run.form_id == form_id, Run.status == status,
                                Run.finished_at < now - period], f"{form_id}/{status}"))
    # Runs of forms no longer in the rules follow the deployment's default.
    for status, period in default.items():
        if period is not None and forms:
            groups.append(([Run.form_id.not_in(sorted(forms)), Run.status == status,
                            Run.finished_at < now - period], f"(removed forms)/{status}"))
        elif period is not None:
            groups.append(([Run.status == status, Run.finished_at < now - period],
                           f"(removed forms)/{status}"))
    return groups


def purge_due(rt: Runtime, now: datetime | None = None, limit: int | None = None) -> Purged:
    """Remove finished Runs past their retention (at most `limit`, default `purge_batch`),
    with their trace lines and result files, each chunk in one transaction."""
    now = now or utcnow()
    budget = rt.settings.purge_batch if limit is None else limit
    result = Purged()
    keep = _still_needed()
    for where, _label in due_groups(rt, now):
        if budget <= 0:
            break
        with rt.store.session() as s:
            rows = s.execute(select(Run.id, Run.record_id).where(*where, *keep)
                             .order_by(Run.finished_at, Run.id).limit(budget)).all()
            if not rows:
                continue
            # Lock them, guarded again: an operator's retry meanwhile keeps its Run (and
            # its checkpoints); one that comes after this waits, then finds nothing.
            ids = list(s.scalars(select(Run.id).where(Run.id.in_([r for r, _ in rows]),
                                                      *where, *keep).with_for_update()))
            # Explicit deletes: the schema cascades, but SQLite only with foreign keys on.
            result.events += s.execute(delete(RunEvent).where(RunEvent.run_id.in_(ids))
                                       ).rowcount or 0
            result.files += s.execute(delete(ResultFile).where(ResultFile.run_id.in_(ids))
                                      ).rowcount or 0
            result.runs += s.execute(delete(Run).where(Run.id.in_(ids))
                                     .execution_options(synchronize_session=False)
                                     ).rowcount or 0
            records = sorted({rid for _, rid in rows if rid is not None})
            if records:
                s.execute(update(Record).where(Record.id.in_(records)).values(purged_at=now)
                          .execution_options(synchronize_session=False))
        budget -= len(rows)
    # One line per pass: INFO when something went, DEBUG when nothing was due.
    log.log(logging.INFO if result.runs else logging.DEBUG,
            "retention: purged %d run(s), %d trace line(s), %d file(s)%s",
            result.runs, result.events, result.files,
            " (batch limit reached; the next pass goes on)" if budget <= 0 else "")
    return result
