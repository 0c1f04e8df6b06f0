"""Batch runs: one batch def over many records, a child Run per record, `concurrency` at a time.

    start(s, form, name, ...)   a Batch row and one *waiting* child Run per record (by an
                                operator over any records, or by a user over their own)
    advance(rt, batch_id)       promote waiting children to queued up to `concurrency` and
                                dispatch them; finish the batch when nothing is left
    cancel(rt, batch_id, who)   waiting and pending children cancelled, running ones stopped
    progress(s, batch)          "n of m", percent, counts
    current_items(s, batch)     the children running now, for "the current item's progress"
    results_zip(s, batch)       every child's result files in one zip

Waiting children are not pending, so the reconciler leaves them alone; `advance` runs when
a child ends (the job's hook) and on every reconciler pass, so a lost hook cannot stall a
batch. A child runs like a Background whose snapshot is the batch def's (`batches/<name>`).
"""

from __future__ import annotations

import io
import logging
import zipfile
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from formrules.errors import BatchError
from formrules.language import sandbox
from formrules.language.checker import did_you_mean
from formrules.language.loader import rebuild_defer
from formrules.language.tree import Form
from formrules.language.variables import form_variables
from formrules.process.runtime import Runtime
from formrules.runs import lifecycle, notifications
from formrules.runs.engine import new_run
from formrules.store.models import (
    ACTIVE,
    FINAL,
    OPEN_BATCH,
    Batch,
    BatchStatus,
    Record,
    ResultFile,
    Run,
    RunStatus,
    utcnow,
)

log = logging.getLogger("formrules.runs.batch")
WAITING = RunStatus.WAITING


def matching_records(s: Session, form: Form, *, record_ids: list[int] | None = None,
                     where: str | None = None, owner: str | None = None) -> list[Record]:
    """The form's records, optionally only `record_ids` (and only `owner`'s), filtered by
    the `where` expression."""
    query = select(Record).where(Record.form_id == form.id).order_by(Record.id)
    if record_ids is not None:
        query = query.where(Record.id.in_(record_ids))
    if owner is not None:
        query = query.where(Record.owner == owner)
    records = list(s.scalars(query))
    if not where:
        return records
    message, used = sandbox.check(where, expression=True)
    if message:
        raise BatchError(f"the filter {where!r} does not compile: {message}")
    for variable, attr in used:
        if variable == "record" and attr not in form.field_types:
            raise BatchError(f"unknown field '{attr}' in the filter"
                             f"{did_you_mean(attr, form.field_types)}")
    out = []
    for record in records:
        try:
            if sandbox.evaluate(where, form_variables(form, record.data)):
                out.append(record)
        except Exception as exc:  # None > 3, say: name the record so it can be fixed
            raise BatchError(f"the filter failed on record {record.id}: {exc}") from exc
    return out


def start(s: Session, form: Form, name: str, *, owner: str, settings,
          record_ids: list[int] | None = None, where: str | None = None,
          starter: str | None = None) -> Batch:
    """Create the batch and its waiting children in `s`; call `advance` after commit.

    `starter` is who starts it from the pages, checked against the def's `started_by`:
    "operators" (any records), or "users" (`record_ids` only, every one `owner`'s own:
    one that is not refuses the whole batch). None is the CLI, which may start any.
    """
    definition = form.batches.get(name)
    if definition is None:
        raise BatchError(f"form {form.id} has no batch '{name}'"
                         f"{did_you_mean(name, form.batches)}")
    if starter is not None and starter not in definition.started_by:
        raise BatchError(f"{starter} cannot start the batch '{name}' of form {form.id}")
    self_service = starter == "users"
    if self_service:
        wanted = set(record_ids or ())
        if not wanted or where:
            raise BatchError("select the records to run it on")
        records = matching_records(s, form, record_ids=sorted(wanted), owner=owner)
        if len(records) != len(wanted):  # never say whose the others are, or if they exist
            raise BatchError("some of the selected records are not yours to use")
    else:
        records = matching_records(s, form, record_ids=record_ids, where=where)
    if not records:
        raise BatchError("no records match: nothing to run")
    node = rebuild_defer(definition.raw, f"batches/{definition.name}", form.field_types,
                         form.tree_sources)
    # A title naming the record ("Export {{ record.name }}") is for the children.
    batch = Batch(form_id=form.id, name=definition.name, title=definition.label, owner=owner,
                  total=len(records), concurrency=definition.concurrency,
                  stop_on_error=definition.stop_on_error, self_service=self_service,
                  status=BatchStatus.RUNNING.value)
    s.add(batch)
    s.flush()
    now = utcnow()
    for record in records:
        variables = form_variables(form, record.data)
        run = new_run(node, form_id=form.id, field_types=form.field_types, owner=owner,
                      variables=variables, record_id=record.id, now=now,
                      tz=settings.timezone, kind="batch", batch_id=batch.id, waiting=True)
        s.add(run)
    return batch


def _lock(s: Session, batch_id: str) -> Batch | None:
    """Lock the batch row (write first, as `lock_record` does) and return it fresh."""
    s.execute(update(Batch).where(Batch.id == batch_id).values(total=Batch.total))
    return s.get(Batch, batch_id, populate_existing=True)


def _counts(s: Session, batch_id: str) -> dict[str, int]:
    return dict(s.execute(select(Run.status, func.count()).where(Run.batch_id == batch_id)
                          .group_by(Run.status)).all())


def launch(rt: Runtime, s: Session, form: Form, name: str, *, owner: str,
           starter: str, record_ids: list[int] | None = None,
           where: str | None = None) -> Batch:
    """Start a batch from a page (operators or users): create it, commit, then release
    its first records. A `BatchError` leaves nothing behind (rolled back)."""
    try:
        started = start(s, form, name, owner=owner, settings=rt.settings,
                        record_ids=record_ids, where=where, starter=starter)
        s.commit()
    except BatchError:
        s.rollback()
        raise
    advance(rt, started.id)
    return started


def advance(rt: Runtime, batch_id: str) -> int:
    """Start waiting children while slots are free; finish the batch when all have ended."""
    to_dispatch: list[Run] = []
    cancelled: list[str] = []
    with rt.store.session() as s:
        batch = _lock(s, batch_id)
        if batch is None:
            return 0
        counts = _counts(s, batch_id)
        if batch.status == BatchStatus.RUNNING and batch.stop_on_error \
                and counts.get(RunStatus.DEAD):
            batch.status = BatchStatus.STOPPING.value
            cancelled = _stop_pending(s, batch_id, "cancelled: an earlier item failed and "
                                                   "the batch has stop_on_error: true")
            counts = _counts(s, batch_id)
        active = sum(counts.get(st, 0) for st in ACTIVE)
        free = batch.concurrency - active
        if batch.status == BatchStatus.RUNNING and free > 0 and counts.get(WAITING):
            ids = list(s.scalars(select(Run.id).where(Run.batch_id == batch_id,
                                                      Run.status == WAITING)
                                 .order_by(Run.record_id, Run.id).limit(free)))
            to_dispatch = lifecycle.release(s, ids, utcnow())
            active += len(to_dispatch)
        elif not active and not counts.get(WAITING) and batch.finished_at is None:
            _finish(s, batch, counts)
    _tell_rq(rt, cancelled, to_dispatch)
    return len(to_dispatch)


def _finish(s: Session, batch: Batch, counts: dict[str, int]) -> None:
    batch.finished_at = utcnow()
    batch.status = {BatchStatus.CANCELLING: BatchStatus.CANCELLED,
                    BatchStatus.STOPPING: BatchStatus.STOPPED}.get(
        batch.status, BatchStatus.FAILED if counts.get(RunStatus.DEAD) else BatchStatus.DONE
    ).value
    notifications.batch_ended(s, batch, counts)


def _stop_pending(s: Session, batch_id: str, reason: str) -> list[str]:
    """Cancel the children that have not started; returns their ids."""
    # Guarded like the worker's claim: a child that started meanwhile runs on.
    return lifecycle.cancel_not_started(s, [Run.batch_id == batch_id], reason)


def cancel(rt: Runtime, batch_id: str, who: str) -> str:
    """Cancel a whole batch: nothing new starts, running children stop at their next step."""
    with rt.store.session() as s:
        batch = _lock(s, batch_id)
        if batch is None:
            raise BatchError(f"no batch {batch_id}")
        if batch.status not in (BatchStatus.RUNNING, BatchStatus.STOPPING):
            raise BatchError(f"a {batch.status} batch cannot be cancelled")
        batch.status = BatchStatus.CANCELLING.value
        stopped = _stop_pending(s, batch_id, f"cancelled by {who} with the whole batch")
        running = lifecycle.request_cancel(
            s, [Run.batch_id == batch_id],
            f"cancel requested by {who} with the whole batch")
    _tell_rq(rt, stopped, [])
    advance(rt, batch_id)  # nothing running: the batch ends now
    return "cancelled" if not running else "stopping"


def _tell_rq(rt: Runtime, cancelled: list[str], runs: list[Run]) -> None:
    try:
        for run_id in cancelled:
            rt.dispatcher.cancel(run_id)
    except RedisError as exc:  # a cancelled Run's job refuses to run anyway (claim)
        log.warning("batch: Redis unavailable (%s)", exc)
    rt.dispatcher.dispatch_all(runs)


def child_finished(rt: Runtime, run: Run) -> None:
    """Hook for the job: a child ended (or will retry), so a slot may be free."""
    if run.batch_id is None:
        return
    try:
        advance(rt, run.batch_id)
    except Exception:  # the reconciler's pass advances it later; the job's outcome stands
        log.exception("batch %s: advance after run %s failed", run.batch_id, run.id)


def advance_all(rt: Runtime) -> int:
    """Advance every batch that has not ended (the reconciler's safety net)."""
    with rt.store.session() as s:
        ids = list(s.scalars(select(Batch.id).where(Batch.status.in_(sorted(OPEN_BATCH)))))
    return sum(advance(rt, batch_id) for batch_id in ids)


def progress(s: Session, batch: Batch) -> dict[str, Any]:
    """`{"finished", "total", "percent", "counts", "text"}` for pages, the CLI and tests."""
    rows = s.execute(select(Run.status, Run.progress_done, Run.progress_total)
                     .where(Run.batch_id == batch.id)).all()
    final = FINAL
    counts: dict[str, int] = {}
    parts = 0.0
    for status, done, total in rows:
        counts[status] = counts.get(status, 0) + 1
        if status in final:
            parts += 1
        elif total and total > 0:
            parts += min(1.0, done / total)
    finished = sum(n for st, n in counts.items() if st in final)
    total = batch.total or len(rows)
    return {"finished": finished, "total": total, "counts": counts,
            "percent": int(100 * parts / total) if total else 100,
            "text": f"{finished} of {total}", "ended": batch.finished_at is not None}


def current_items(s: Session, batch: Batch) -> list[Run]:
    """The children started and not ended (at most `concurrency` of them), record order."""
    return list(s.scalars(select(Run).where(Run.batch_id == batch.id,
                                            Run.status.in_(sorted(ACTIVE)))
                          .order_by(Run.record_id, Run.id).limit(max(batch.concurrency, 1))))


def results_zip(s: Session, batch: Batch) -> tuple[bytes, int]:
    """Every child's result files in one zip (`record-<id>/<file>`); returns (zip, count)."""
    rows = s.execute(select(ResultFile, Run.record_id).join(Run, Run.id == ResultFile.run_id)
                     .where(Run.batch_id == batch.id)
                     .order_by(Run.record_id, ResultFile.created_at)).all()
    buffer = io.BytesIO()
    names: set[str] = set()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for found, record_id in rows:
            name = f"record-{record_id}/{_safe(found.filename)}"
            stem, n = name, 1
            while name in names:  # two files of one record with the same name
                n += 1
                name = f"{stem}.{n}"
            names.add(name)
            archive.writestr(name, found.data)
    return buffer.getvalue(), len(rows)


def _safe(name: str) -> str:
    return "".join(c for c in name if c.isalnum() or c in "._- ")[:200] or "result"
