"""Database tables. The database is the source of truth; Redis only carries work.

A Record is one submission; each deferred node becomes a Run (the outbox row, written in
the same transaction as the record); RunEvent rows are the Run's trace and checkpoints.
"""

from __future__ import annotations

import enum
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A random id (32 hex chars); Run ids double as RQ job ids."""
    return uuid.uuid4().hex


def new_token() -> str:
    """An unguessable token for status URLs (192 random bits)."""
    return secrets.token_urlsafe(24)


class UTCDateTime(TypeDecorator):
    """Store UTC, always hand back aware datetimes (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class RunStatus(enum.StrEnum):
    """Where a Run is in its life."""

    SCHEDULED = "scheduled"  # waiting for its due time (a Delay, or a retry)
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # failed; another attempt is scheduled
    DONE = "done"
    DEAD = "dead"  # out of attempts or failed permanently: needs an operator
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # a `when:` was false at fire time, or `at:` no longer gives a time
    WAITING = "waiting"  # a batch child waiting for a free slot (`concurrency:`)


# Named sets of statuses, the only definitions every reader uses (the transitions between
# them live in `formrules.runs.lifecycle`).
# PENDING: a worker may claim it when due (RQ carries a job for it).
PENDING = frozenset({RunStatus.SCHEDULED, RunStatus.QUEUED, RunStatus.RETRYING})
# NOT_STARTED: pending, or a batch child waiting for a slot: a cancel ends it at once.
NOT_STARTED = PENDING | {RunStatus.WAITING}
# NOT_FIRED: a Delay an edit may still move or stop (never tried; see `runs.updates`).
NOT_FIRED = frozenset({RunStatus.SCHEDULED, RunStatus.QUEUED})
# ACTIVE: holds a batch slot (pending or running).
ACTIVE = PENDING | {RunStatus.RUNNING}
# OPEN: will still change by itself or with its batch.
OPEN = NOT_STARTED | {RunStatus.RUNNING}
# `await:` values whose Runs the record's page waits for (and its completion callback).
AWAITED = ("true", "optional")
# FINAL: will not change by itself any more (an operator may retry DEAD or CANCELLED).
FINAL = frozenset({RunStatus.DONE, RunStatus.DEAD, RunStatus.CANCELLED, RunStatus.SKIPPED})
RETRYABLE_BY_OPERATOR = frozenset({RunStatus.DEAD, RunStatus.CANCELLED})
CANCELLABLE = OPEN


class EventKind(enum.StrEnum):
    """What a line of a Run's trace records (`RunEvent.event`)."""

    START = "start"  # an attempt claimed the Run
    CHECKPOINT = "checkpoint"  # a step completed; its effects were committed with this line
    FINISH = "finish"  # every step done (the flag set)
    ERROR = "error"
    RETRY = "retry"  # another attempt scheduled, or an operator's retry
    DEAD = "dead"
    CANCEL = "cancel"  # cancelled, or a cancel requested
    SKIP = "skip"
    RECOVER = "recover"  # its worker died; queued again
    RESCHEDULE = "reschedule"  # an edit moved its due time
    SCHEDULE = "schedule"  # started by a schedule slot
    NOTE = "note"
    CALL = "call"  # a `call:` started its named tree (the detail names it and its inputs)
    CAUGHT = "caught"  # a `try:` caught this error (full detail, for operators)


# Checkpoints written before checkpoints had their own kind (still honoured on resume).
CHECKPOINT_KINDS = (EventKind.CHECKPOINT.value, "done")


class BatchStatus(enum.StrEnum):
    """Where a batch (a tree run over many records) is; not a Run status."""

    RUNNING = "running"
    STOPPING = "stopping"  # a child failed and stop_on_error: the rest are cancelled
    CANCELLING = "cancelling"  # cancelled while children still run
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELLED = "cancelled"


OPEN_BATCH = frozenset({BatchStatus.RUNNING, BatchStatus.STOPPING, BatchStatus.CANCELLING})


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Record(Base):
    __tablename__ = "records"
    # The operator's records list: newest first, all forms or one (pages stay flat as the
    # table grows: the index hands over the page instead of a sort of every row).
    __table_args__ = (Index("ix_records_created", "created_at", "id"),
                      Index("ix_records_form_created", "form_id", "created_at", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True, default=new_token)
    form_id: Mapped[str] = mapped_column(String(100))
    owner: Mapped[str] = mapped_column(String(100), index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    submit_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    # What the API request with an Idempotency-Key asked for (a hash of the submitted
    # values): the same key with another body is refused, not answered with this record.
    submit_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # Its deletion was asked for while work of it still ran: that work is cancelled, and
    # the record goes once none of it runs (`runs.control.finish_deletions`).
    delete_requested: Mapped[bool] = mapped_column(Boolean, default=False,
                                                   server_default="0", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When retention last purged Runs of this record: a waiting page with no Runs left
    # says their details are gone instead of "done" (`formrules.runs.purge`).
    purged_at: Mapped[datetime | None] = mapped_column()


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_status_due", "status", "due_at"),
        # Lists sorted newest first without sorting every matching row: the admin runs
        # page (all, by status, by form), a user's My tasks, and the dead list.
        Index("ix_runs_created", "created_at", "id"),
        Index("ix_runs_status_created", "status", "created_at", "id"),
        Index("ix_runs_form_created", "form_id", "created_at", "id"),
        Index("ix_runs_owner_created", "owner", "created_at", "id"),
        Index("ix_runs_status_finished", "status", "finished_at", "id"),
        # Retention: a form's finished Runs of one status, oldest first, so a purge pass
        # reads what is due and no more (`formrules.runs.purge`).
        Index("ix_runs_form_status_finished", "form_id", "status", "finished_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    record_id: Mapped[int | None] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"),
                                                  index=True)
    # form_id and owner: searched through the composite indexes above (revision 0008
    # dropped their single-column ones), which lead with them.
    form_id: Mapped[str] = mapped_column(String(100))
    owner: Mapped[str] = mapped_column(String(100))
    # background | delay | batch | schedule (migration 0004 renamed "task" to "batch")
    kind: Mapped[str] = mapped_column(String(20))
    node_path: Mapped[str] = mapped_column(String(300))
    title: Mapped[str] = mapped_column(String(300))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)  # the subtree it started with
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.QUEUED.value)
    awaited: Mapped[str] = mapped_column(String(10), default="true")
    flag: Mapped[str | None] = mapped_column(String(100))
    due_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # attempts started
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    lease: Mapped[str | None] = mapped_column(String(32))  # the execution that owns it
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    progress_done: Mapped[float] = mapped_column(Float, default=0)
    progress_total: Mapped[float] = mapped_column(Float, default=0)
    progress_message: Mapped[str] = mapped_column(String(500), default="")
    last_error: Mapped[str | None] = mapped_column(Text)  # full detail: operators only
    safe_error: Mapped[str | None] = mapped_column(String(500))  # what the user sees
    error_step: Mapped[str | None] = mapped_column(String(100))  # the failed step's action
    recoveries: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    hidden: Mapped[bool] = mapped_column(Boolean, default=False)  # deleted from "my tasks"
    batch_id: Mapped[str | None] = mapped_column(String(32), index=True)
    parent_id: Mapped[str | None] = mapped_column(String(32))
    # The lane (`queue:` of its node) whose workers run it; see `runs.queue.rq_name`.
    queue: Mapped[str] = mapped_column(String(40), default="default", server_default="default")
    # Why a pending Run is not running yet although due: "slot" (its node's `concurrency:`
    # is reached; it tries again shortly). Cleared when a worker claims it.
    waiting_for: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def percent(self) -> int:
        """Progress 0–100 (100 once done)."""
        if self.status == RunStatus.DONE.value:
            return 100
        if self.progress_total <= 0:
            return 0
        return max(0, min(100, int(100 * self.progress_done / self.progress_total)))

    @property
    def is_final(self) -> bool:
        """True once the Run will not change by itself any more."""
        return self.status in FINAL


class RunEvent(Base):
    """One line of a Run's trace; `checkpoint` lines are also its step checkpoints."""

    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(String(300), default="")
    event: Mapped[str] = mapped_column(String(20))  # an EventKind
    detail: Mapped[str] = mapped_column(Text, default="")
    duration_ms: Mapped[int | None] = mapped_column(Integer)


class ResultFile(Base):
    """A file an action attached to a Run (a report, an export)."""

    __tablename__ = "result_files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    is_operator: Mapped[bool] = mapped_column(Boolean, default=False)
    # Sessions carry the generation they were started in; bumping it (log out everywhere,
    # a new password) ends every session of the account at its next request.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Notification preferences: an address, and whether tasks ending are e-mailed there.
    email: Mapped[str | None] = mapped_column(String(254))
    email_on_end: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RevokedSession(Base):
    """A logged-in session ended by "Log out": its cookie, even a copy, opens nothing more.
    Rows are only needed until the session would have expired anyway (`expires_at`)."""

    __tablename__ = "revoked_sessions"

    sid: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    run_id: Mapped[str | None] = mapped_column(String(32))
    # A batch its owner started over their own records: the notice links to its page and
    # shows on every page (an operator's batch notice has none and stays on theirs).
    batch_id: Mapped[str | None] = mapped_column(String(32))
    record_token: Mapped[str | None] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(20), default="info")  # info | success | error
    message: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    read_at: Mapped[datetime | None] = mapped_column()
    # An e-mail copy: where to (None: none), and when it went (None: not yet; the worker
    # sends after the commit, the reconciler catches up on any left behind).
    email_to: Mapped[str | None] = mapped_column(String(254), index=True)
    emailed_at: Mapped[datetime | None] = mapped_column()


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()


class Batch(Base):
    """A batch def run over many records: one child Run per record."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    form_id: Mapped[str] = mapped_column(String(100))
    # The batch def's name (`batches: {name: ...}`); the column keeps its first name.
    name: Mapped[str] = mapped_column("task", String(100))
    title: Mapped[str] = mapped_column(String(300))
    owner: Mapped[str] = mapped_column(String(100))
    total: Mapped[int] = mapped_column(Integer, default=0)
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    stop_on_error: Mapped[bool] = mapped_column(Boolean, default=False)
    # Started by a user over records of their own (`started_by: users`), followed on My
    # tasks; otherwise an operator's, followed on the operator pages.
    self_service: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(20), default=BatchStatus.RUNNING.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()


class ScheduleSlot(Base):
    """One claimed time slot of a schedule: the unique key makes each slot run once."""

    __tablename__ = "schedule_slots"
    __table_args__ = (UniqueConstraint("schedule_key", "slot_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schedule_key: Mapped[str] = mapped_column(String(300))
    slot_at: Mapped[datetime] = mapped_column()
    # What became of the slot: "started 3 run(s)", or why it was skipped (catch_up: none).
    outcome: Mapped[str] = mapped_column(String(300), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FormPause(Base):
    """A form whose queued and scheduled work an operator paused (`formrules.runs.pause`):
    workers start none of its Runs until it is resumed; submits still work."""

    __tablename__ = "form_pauses"

    form_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    paused_by: Mapped[str] = mapped_column(String(100))
    paused_at: Mapped[datetime] = mapped_column(default=utcnow)


class CallbackState(enum.StrEnum):
    """Where a completion callback is (`formrules.runs.callbacks`)."""

    WAITING = "waiting"  # registered; the record's awaited work has not ended
    DUE = "due"  # the work ended: the body is written, delivery is due at `next_at`
    DELIVERED = "delivered"
    FAILED = "failed"  # out of attempts: operators see it (`formrules callbacks list`)


class Callback(Base):
    """A URL an API client asked to be called when a record's awaited work ends: the
    outbox row, made due in the same transaction as the ending."""

    __tablename__ = "callbacks"
    __table_args__ = (Index("ix_callbacks_state_next", "state", "next_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"),
                                           index=True)
    url: Mapped[str] = mapped_column(String(2000))
    state: Mapped[str] = mapped_column(String(20), default=CallbackState.WAITING.value)
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()
