"""What a record's owner sees of its work: one view used by the page, the JSON and My tasks.

Users see titles, progress, attempt counts, due times and the safe error a Run carries;
internal error detail (`last_error`, traces) is for operators only, never here.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, defer

from formrules.language import sandbox
from formrules.language.tree import Form
from formrules.language.variables import form_variables
from formrules.store.models import (
    AWAITED,
    CANCELLABLE,
    PENDING,
    FormPause,
    Record,
    ResultFile,
    Run,
    RunStatus,
    utcnow,
)

# What users read for each status (the status itself stays the CSS class and JSON value).
LABELS = {
    "scheduled": "Scheduled", "queued": "Queued", "waiting": "Waiting", "running": "Running",
    "retrying": "Retrying", "done": "Done", "dead": "Failed", "cancelled": "Cancelled",
    "skipped": "Skipped",
}
WAITING_FOR_SLOT = "Waiting for a slot"
log = logging.getLogger("formrules.runs.status")


def _iso(value) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def eta_seconds(started_at: datetime | None, now: datetime, fraction: float) -> int | None:
    """Seconds left at the rate progress moved since `started_at`: elapsed × (1 − f) / f,
    rounded up. None until it has started and moved (or once it is complete: nothing
    is left to estimate); never negative (a clock behind the start counts as no time)."""
    if started_at is None or not 0 < fraction < 1 or math.isnan(fraction):
        return None
    elapsed = max(0.0, (now - started_at).total_seconds())
    return math.ceil(elapsed * (1 - fraction) / fraction)


def fraction_done(run: Run) -> float:
    """How much of a Run is done, 0–1 (1 once done)."""
    if run.status == RunStatus.DONE:
        return 1.0
    if run.progress_total <= 0:
        return 0.0
    return max(0.0, min(1.0, run.progress_done / run.progress_total))


def run_view(run: Run, files: list[ResultFile] | None = None,
             now: datetime | None = None) -> dict[str, Any]:
    """A Run as its owner may see it: no internal error detail, ever."""
    from formrules.runs.control import owner_may_retry
    now = now or utcnow()
    stopping = run.status == RunStatus.RUNNING and run.cancel_requested
    # Due, but its node's `concurrency:` is reached: it runs when a slot frees.
    for_slot = run.waiting_for == "slot" and run.status in PENDING
    view: dict[str, Any] = {
        "id": run.id,
        "title": run.title,
        "kind": run.kind,
        "status": run.status,
        "label": "Stopping" if stopping else WAITING_FOR_SLOT if for_slot
        else LABELS.get(run.status, run.status),
        "final": run.is_final,
        "cancellable": run.status in CANCELLABLE and not stopping,
        "progress": run.percent,
        "message": run.progress_message or (WAITING_FOR_SLOT if for_slot else ""),
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        # JSON booleans: whether the page waits for it, and whether the user may leave it
        # to finish in the background (`await: optional`).
        "awaited": run.awaited != "false",
        "can_continue": run.awaited == "optional",
        "due_at": _iso(run.due_at),
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "updated_at": _iso(run.updated_at),
        "finished_at": _iso(run.finished_at),
        "eta_seconds": eta_seconds(run.started_at, now, fraction_done(run))
        if run.status == RunStatus.RUNNING else None,
        "user_retry": owner_may_retry(run),
        "files": [{"id": f.id, "filename": f.filename} for f in files or []],
    }
    if for_slot:
        view["waiting_for"] = "slot"
    if run.status == RunStatus.RETRYING:
        view["next_retry_at"] = view["due_at"]
    if run.status in (RunStatus.RETRYING, RunStatus.DEAD) and run.safe_error:
        view["error"] = run.safe_error  # the safe message rule: `errors.user_message`
        view["error_step"] = (run.error_step or "").replace("_", " ") or None
    return view


def files_by_run(s: Session, runs: list[Run]) -> dict[str, list[ResultFile]]:
    """The result files of `runs`, oldest first, keyed by Run id."""
    files: dict[str, list[ResultFile]] = {}
    if runs:
        # Ids and names only: this runs on every status poll, the bytes are for downloads.
        for f in s.scalars(select(ResultFile).options(defer(ResultFile.data))
                           .where(ResultFile.run_id.in_([r.id for r in runs]))
                           .order_by(ResultFile.created_at)):
            files.setdefault(f.run_id, []).append(f)
    return files


FAILED_MESSAGE = "Done: everything for your submission has been taken care of."


def _message(record: Record, form: Form | None) -> str:
    if form is None or not form.after_submit_message:
        return "Done."
    try:
        return sandbox.render(form.after_submit_message, form_variables(form, record.data))
    except Exception as exc:  # an author's template bug must not hide the result
        # The person sees a plain sentence; operators find what broke in the log.
        log.error("form %s: after_submit message failed for record %s: %s: %s "
                  "(%s: after_submit/message)", form.id, record.token,
                  type(exc).__name__, exc, form.file)
        return FAILED_MESSAGE


POLL_TAG = (
    select(Record.id, Record.owner, Record.form_id, Record.version, Record.updated_at,
           func.count(Run.id), func.max(Run.updated_at),
           # A pause changes no row of the record or its Runs, but what the page says.
           exists().where(FormPause.form_id == Record.form_id))
    .outerjoin(Run, (Run.record_id == Record.id) & Run.hidden.is_(False)
               & (Run.owner == Record.owner))
    # A record its owner asked to delete is gone for its page already (`_record`).
    .where(Record.token == bindparam("token"), Record.delete_requested.is_(False))
    .group_by(Record.id, Record.owner, Record.form_id, Record.version, Record.updated_at))


# A record with its own visible Runs in tree order, each with whether it has result
# files: one statement, so the record and its Runs come from one snapshot.
STATUS_ROWS = (
    select(Record, Run, exists().where(ResultFile.run_id == Run.id))
    .outerjoin(Run, (Run.record_id == Record.id) & Run.hidden.is_(False)
               & (Run.owner == bindparam("owner")))
    .where(Record.id == bindparam("record_id"))
    .order_by(Run.created_at, Run.node_path, Run.id)
    .execution_options(populate_existing=True))


# A fresh poll (no ETag to revalidate): STATUS_ROWS by token, with the form's pause,
# so the change tag and the view come from one statement and one snapshot.
STATUS_BY_TOKEN = (
    select(Record, Run, exists().where(ResultFile.run_id == Run.id),
           exists().where(FormPause.form_id == Record.form_id))
    .outerjoin(Run, (Run.record_id == Record.id) & Run.hidden.is_(False)
               & (Run.owner == Record.owner))
    .where(Record.token == bindparam("token"), Record.delete_requested.is_(False))
    .order_by(Run.created_at, Run.node_path, Run.id)
    .execution_options(populate_existing=True))


@dataclass
class Polled:
    """What a status poll read first: enough to check the owner and answer 304, and for
    `poll_status` also the record and its Runs (with whether each has files)."""

    record_id: int
    owner: str
    form_id: str
    tag: str  # changes whenever the status view can (see `poll_tag`)
    paused: bool
    record: Record | None = None
    runs: list[tuple[Run, bool]] | None = None


def _tag(version: int, updated: datetime | None, runs: int, last: datetime | None,
         paused: bool) -> str:
    return f"{version}:{updated.timestamp() if updated else ''}:{runs}:" \
           f"{last.timestamp() if last else ''}:{int(bool(paused))}"


def poll_tag(conn: Connection, token: str) -> Polled | None:
    """The record's id, owner, form, change tag and pause for a token, in one statement.

    The tag changes whenever the status view can: every write to a record bumps its
    version (`lock_record`), and every write to a Run bumps its `updated_at` (files are
    added in a step that writes its Run too). An unchanged poll is answered from this
    alone; the tag is read before the view, so a view is never older than its tag.
    """
    # Built once, run on a connection: no statement building or ORM work per poll.
    row = conn.execute(POLL_TAG, {"token": token}).first()
    if row is None:
        return None
    record_id, owner, form_id, version, updated, runs, last, paused = row
    return Polled(record_id, owner, form_id, _tag(version, updated, runs, last, paused),
                  bool(paused))


def poll_status(s: Session, token: str) -> Polled | None:
    """`poll_tag` and the rows of the view together, in one statement: for a poll that
    will be answered in full anyway (it has no ETag to revalidate)."""
    rows = s.execute(STATUS_BY_TOKEN, {"token": token}).all()
    if not rows:
        return None
    record, paused = rows[0][0], bool(rows[0][3])
    runs = [(run, bool(files)) for _, run, files, _ in rows if run is not None]
    last = max((r.updated_at for r, _ in runs if r.updated_at is not None), default=None)
    return Polled(record.id, record.owner, record.form_id,
                  _tag(record.version, record.updated_at, len(runs), last, paused), paused,
                  record, runs)


def polled_status(s: Session, polled: Polled, form: Form | None) -> dict[str, Any]:
    """The status view for a poll: from its rows when `poll_status` read them."""
    if polled.record is None:
        return record_status(s, polled.record_id, form, owner=polled.owner,
                             paused=polled.paused)
    return _status(s, polled.record, polled.runs or [], form, utcnow(), polled.paused)


def etag_for(tag: str, form: Form | None) -> str:
    """The status JSON's ETag: the change tag plus what the form adds (its message)."""
    message = form.after_submit_message if form is not None else ""
    return hashlib.blake2b(f"{tag}|{message}".encode(), digest_size=16).hexdigest()


def record_status(s: Session, record: Record | int, form: Form | None,
                  owner: str | None = None, now: datetime | None = None,
                  paused: bool | None = None) -> dict[str, Any]:
    """The waiting page's state: `state` is working, done, failed, cancelled or expired
    (its Runs were removed after the form's retention period).

    Awaited Runs (`await: true | optional`) decide the state and the overall progress;
    the others (`await: false`) are listed as continuing in the background. `record`
    may be an id (with its `owner`): it is read after the Runs either way.
    `started_at` is when the first awaited Run started, `updated_at` the last change to
    the record or any Run listed, `eta_seconds` the time left at the overall rate.
    """
    now = now or utcnow()
    record_id = record if isinstance(record, int) else record.id
    owner = owner if isinstance(record, int) else record.owner
    # Runs of one submit share a creation time: the tree's order (node path) breaks the tie.
    # Only the owner's own work: an operator's batch or a schedule touching this record is
    # not something the person who submitted it is waiting for.
    # The record in the same statement as its Runs: a Run's "done" commits together with
    # its flag, so one snapshot never shows "done" with the flag still unset (a copy
    # loaded before the Runs could predate that commit).
    rows = s.execute(STATUS_ROWS, {"record_id": record_id, "owner": owner}).all()
    return _status(s, rows[0][0], [(run, bool(f)) for _, run, f in rows if run is not None],
                   form, now, paused)


def _status(s: Session, record: Record, rows: list[tuple[Run, bool]], form: Form | None,
            now: datetime, paused: bool | None) -> dict[str, Any]:
    runs = [run for run, _ in rows]
    files = files_by_run(s, [run for run, has_files in rows if has_files])
    awaited = [r for r in runs if r.awaited in AWAITED]
    done = all(r.is_final for r in awaited)
    failed = any(r.status == RunStatus.DEAD for r in awaited)
    cancelled = not failed and any(r.status == RunStatus.CANCELLED for r in awaited)
    state = "working" if not done else "failed" if failed else \
        "cancelled" if cancelled else "done"
    if not awaited and record.purged_at is not None:
        state = "expired"  # retention removed its Runs: "done" would be a guess
    if state != "working":
        paused = False
    elif paused is None:  # not known from `poll_tag`
        from formrules.runs.pause import is_paused
        paused = is_paused(s, record.form_id)
    percent = (sum(r.percent for r in awaited) // len(awaited)) if awaited else 100
    starts = [r.started_at for r in awaited if r.started_at is not None]
    started = min(starts) if starts else None
    overall = sum(fraction_done(r) for r in awaited) / len(awaited) if awaited else 1.0
    changes = [record.updated_at, *(r.updated_at for r in runs)]
    updated = max((c for c in changes if c is not None), default=None)
    return {
        "state": state,
        "done": done,
        "failed": failed,
        "progress": percent,
        "record": dict(record.data),
        "started_at": _iso(started),
        "updated_at": _iso(updated),
        "eta_seconds": eta_seconds(started, now, overall) if state == "working" else None,
        "runs": [run_view(r, files.get(r.id), now) for r in awaited],
        "other_runs": [run_view(r, files.get(r.id), now) for r in runs if r not in awaited],
        "message": _message(record, form) if state == "done" else None,
        "paused": paused,  # an operator paused the form's work: it waits for a resume
    }
