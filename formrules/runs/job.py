"""The job entry point RQ workers run: execute one Run, step by step, with checkpoints.

    execute_run(run_id)
      claim the Run (a lease: only one execution may own it) ── not due yet? wait or leave
      for each action of the subtree: skip if checkpointed, else run it, then commit its
      field writes + files + checkpoint in one transaction (lease checked in the same one)
      success ── set the flag field, status done, notify
      failure ── retryable and attempts left: status retrying, raise so RQ's Retry fires
              └─ otherwise: on_error branch (once), status dead, notify

A heartbeat thread keeps the lease alive (also through steps far longer than the stale
limit); the reconciler resumes Runs whose heartbeat stops (a killed worker), and an
execution that lost its lease stops at its next write. The node's `timeout:` (default
`default_timeout_seconds`) is enforced at every progress/cancel check inside a step and
between steps; RQ's own job timeout, a little longer, is the backstop for actions that
never check. RQ does not retry: a retrying Run's next attempt is due at `Run.due_at`, and
the leader enqueues it then (`formrules.process.leader`).
Nothing here imports the web layer.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from formrules.actions.context import Context
from formrules.errors import (
    GENERIC_FAILURE,
    ActionError,
    Cancelled,
    FormrulesError,
    LeaseLost,
    PermanentError,
    RetryableError,
    RuleError,
)
from formrules.language.loader import rebuild_defer
from formrules.language.sandbox import evaluate, render
from formrules.language.tree import ActionNode, DeferNode, ProgressNode
from formrules.language.variables import form_title_of, run_info
from formrules.process import runtime as runtime_mod
from formrules.runs.engine import call_action, new_run, walk
from formrules.store.db import lock_record
from formrules.store.models import (
    PENDING,
    Notification,
    Record,
    ResultFile,
    Run,
    RunEvent,
    RunStatus,
    new_id,
    utcnow,
)

log = logging.getLogger("formrules.runs.job")
EARLY_WAIT_LIMIT = 5.0  # RQ's scheduler may fire a little early: wait that out in place
TIMED_OUT = "This took longer than allowed and was stopped."
LOST_WORKER = "This task stopped unexpectedly several times."


class RunFailed(FormrulesError):
    """Raised out of the job so RQ records the failure (the database schedules any retry)."""


class TimedOut(RetryableError):
    """The Run went past its node's `timeout:`."""

    def __init__(self, message: str):
        super().__init__(message, TIMED_OUT)


def execute_run(run_id: str) -> str:
    """RQ job function: run one Run; returns the outcome as text."""
    return Execution(runtime_mod.current(), run_id).execute()


class Execution:
    """One attempt at one Run, owning it through a lease."""

    def __init__(self, rt: runtime_mod.Runtime, run_id: str):
        self.rt = rt
        self.settings = rt.settings
        self.store = rt.store
        self.run_id = run_id
        self.lease = new_id()
        self.cancel_seen = threading.Event()
        self.lease_lost = threading.Event()
        self.stop_beat = threading.Event()
        self.last_progress_write = 0.0
        self.timeout = self.settings.default_timeout_seconds
        self.deadline = float("inf")  # monotonic; set from the node's timeout when it starts
        self.pending_children: list[Run] = []

    # -- ownership ---------------------------------------------------------------------
    def claim(self) -> Run | None:
        """Take the Run if it is due and pending; wait out a slightly early start."""
        while True:
            now = utcnow()
            with self.store.session() as s:
                claimed = s.execute(
                    update(Run)
                    .where(Run.id == self.run_id,
                           Run.status.in_([p.value for p in PENDING]),
                           Run.due_at <= now, Run.cancel_requested.is_(False))
                    .values(status=RunStatus.RUNNING.value, lease=self.lease,
                            heartbeat_at=now, attempt=Run.attempt + 1, updated_at=now)
                ).rowcount
                run = s.get(Run, self.run_id)
                if run is None:
                    log.warning("run %s: no such run", self.run_id)
                    return None
                if claimed:
                    if run.started_at is None:
                        run.started_at = now
                    self.event(s, run, "", "start", f"attempt {run.attempt}")
                    return run
                if run.status in {p.value for p in PENDING} and not run.cancel_requested:
                    wait = (run.due_at - now).total_seconds()
                    if wait > EARLY_WAIT_LIMIT:
                        return None  # the reconciler re-dispatches it when due
            if run.status not in {p.value for p in PENDING} or run.cancel_requested:
                log.info("run %s is %s; nothing to do", self.run_id, run.status)
                return None
            time.sleep(max(0.01, wait))

    def owned(self, s: Session) -> Run:
        """Prove in this transaction that we still hold the lease (and lock the row)."""
        done = s.execute(update(Run).where(Run.id == self.run_id, Run.lease == self.lease)
                         .values(heartbeat_at=utcnow())).rowcount
        if not done:
            raise LeaseLost(f"run {self.run_id}: lease lost")
        return s.get(Run, self.run_id, populate_existing=True)

    def heartbeat(self) -> None:
        """Keep the lease alive and notice cancellation, until told to stop."""
        while not self.stop_beat.wait(self.settings.heartbeat_seconds):
            try:
                with self.store.session() as s:
                    run = self.owned(s)
                    if run.cancel_requested:
                        self.cancel_seen.set()
            except LeaseLost:
                self.lease_lost.set()
                return
            except Exception:  # the database blinked; the next beat tries again
                log.exception("run %s: heartbeat failed", self.run_id)

    def cancelled(self) -> bool:
        """True once cancellation was requested; raises once the lease or the time is up."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"run {self.run_id}: lease lost")
        if time.monotonic() > self.deadline:
            raise TimedOut(f"run {self.run_id}: timed out after {self.timeout:.0f}s")
        return self.cancel_seen.is_set()

    def event(self, s: Session, run: Run, path: str, kind: str, detail: str = "",
              duration_ms: int | None = None) -> None:
        """Append a line to the Run's trace."""
        s.add(RunEvent(run_id=run.id, attempt=run.attempt, path=path, event=kind,
                       detail=detail[:20000], duration_ms=duration_ms))

    # -- the run -----------------------------------------------------------------------
    def execute(self) -> str:
        """Claim, run every step, then finish as done, retrying, dead or cancelled."""
        run = self.claim()
        if run is None:
            return "not claimed"
        beat = threading.Thread(target=self.heartbeat, name=f"heartbeat-{run.id}", daemon=True)
        beat.start()
        node: DeferNode | None = None
        started = time.monotonic()
        try:
            node = rebuild_defer(run.snapshot["raw"], run.node_path, run.snapshot["fields"])
            self.timeout = run.snapshot.get("timeout") or self.settings.default_timeout_seconds
            self.deadline = started + self.timeout
            if run.recoveries >= self.settings.max_recoveries:
                # Its steps killed the worker again and again: stop trying, but still run
                # on_error and tell the owner (the reconciler gives up if this dies too).
                raise PermanentError(f"run {run.id}: worker lost {run.recoveries} times",
                                     LOST_WORKER)
            with self.store.session() as s:
                done_paths = set(s.scalars(select(RunEvent.path).where(
                    RunEvent.run_id == run.id, RunEvent.event == "done")))
                record = s.get(Record, run.record_id) if run.record_id else None
                if node.when and record is not None and not self.check_when(s, run, node,
                                                                            record):
                    return "skipped"
            self.steps(run, node.do, done_paths)
            self.succeed(run, node)
            return "done"
        except LeaseLost:
            log.warning("run %s: lease lost; another execution continues it", run.id)
            return "lease lost"
        except Exception as exc:  # noqa: BLE001 — every failure is classified below
            try:
                return self.fail(run, node, exc)
            except LeaseLost:  # recovered elsewhere while failing: theirs to finish
                log.warning("run %s: lease lost while failing", run.id)
                return "lease lost"
        finally:
            self.stop_beat.set()
            beat.join(timeout=5)
            self.rt.dispatcher.dispatch_all(self.pending_children)
            if run.batch_id is not None:  # a batch child ended (or will retry): a free slot
                from formrules.runs.batch import child_finished
                child_finished(self.rt, run)

    def check_when(self, s: Session, run: Run, node: DeferNode, record: Record) -> bool:
        """A Delay's `when:` is re-checked at fire time; false means skipped."""
        if evaluate(node.when, self.context(run, record.data, "").variables()):
            return True
        run = self.owned(s)
        run.status, run.finished_at, run.lease = RunStatus.SKIPPED.value, utcnow(), None
        self.event(s, run, node.path, "skip", f"when: {node.when!r} was false at fire time")
        return False

    def context(self, run: Run, data: dict[str, Any], path: str, **extra: Any) -> Context:
        """The action context for one step of this Run."""
        return Context(
            settings=self.settings, form_id=run.form_id, field_types=run.snapshot["fields"],
            data=dict(data), path=path, run_id=run.id, attempt=run.attempt,
            extra={"run": run_info(run), **extra}, form_title=form_title_of(run),
            all_records=lambda: self.form_records(run.form_id),
            on_progress=lambda d, t, m: self.progress(run, d, t, m),
            is_cancelled=self.cancelled,
            log=logging.LoggerAdapter(log, {"run": run.id, "path": path}),
        )

    def record_data(self, run: Run) -> dict[str, Any]:
        """The record's current data (fresh from the database)."""
        if run.record_id is None:
            return {}
        with self.store.session() as s:
            record = s.get(Record, run.record_id)
            return dict(record.data) if record else {}

    def form_records(self, form_id: str) -> list[dict[str, Any]]:
        """Every record of a form, oldest first (for `report: {records: all}`)."""
        with self.store.session() as s:
            return [dict(data) for data in s.scalars(
                select(Record.data).where(Record.form_id == form_id).order_by(Record.id))]

    def steps(self, run: Run, nodes, done_paths: set[str], **extra: Any) -> None:
        """Walk the subtree; each action is a checkpointed step."""
        def variables() -> dict[str, Any]:
            return self.context(run, self.record_data(run), "", **extra).variables()

        def on_action(node: ActionNode) -> None:
            if node.path in done_paths:
                return  # completed by an earlier attempt: never run twice
            self.step(run, node, **extra)
            done_paths.add(node.path)

        def on_defer(node: DeferNode) -> None:
            if node.path in done_paths:
                return
            with self.store.session() as s:
                owned = self.owned(s)
                child = new_run(node, form_id=run.form_id, field_types=run.snapshot["fields"],
                                owner=owned.owner, variables=variables(),
                                record_id=run.record_id, now=utcnow(),
                                tz=self.settings.timezone, parent_id=run.id)
                s.add(child)
                self.event(s, owned, node.path, "done", f"started run {child.id}")
            self.pending_children.append(child)
            done_paths.add(node.path)

        def on_progress(node: ProgressNode) -> None:
            vars_ = variables()
            done = evaluate(str(node.done), vars_) if node.done is not None else None
            total = evaluate(str(node.total), vars_) if node.total is not None else None
            message = render(node.message, vars_) if node.message else None
            title = render(node.title, vars_) if node.title else None
            self.progress(run, done, total, message, force=True, title=title)

        walk(nodes, variables, on_action, on_defer, on_progress)

    def step(self, run: Run, node: ActionNode, **extra: Any) -> None:
        """Run one action and commit its effects together with its checkpoint."""
        if self.cancelled():
            raise Cancelled()
        with self.store.session() as s:
            self.event(s, self.owned(s), node.path, "start", node.action)
        ctx = self.context(run, self.record_data(run), node.path, **extra)
        started = time.monotonic()
        call_action(node, ctx)
        with self.store.session() as s:
            owned = self.owned(s)
            if ctx.updates and run.record_id is not None:
                record = lock_record(s, run.record_id)
                record.data = {**record.data, **ctx.updates}
            for item in ctx.attachments:
                s.add(ResultFile(run_id=run.id, owner=owned.owner, filename=item.filename,
                                 content_type=item.content_type, data=item.data))
            self.event(s, owned, node.path, "done", node.action,
                       int((time.monotonic() - started) * 1000))

    def progress(self, run: Run, done: float | None, total: float | None,
                 message: str | None, force: bool = False, title: str | None = None) -> None:
        """Write progress, at most every `progress_write_seconds` unless forced/final.

        None leaves a value as it was (a `progress:` node may set only a message or title).
        """
        now = time.monotonic()
        final = total is not None and done is not None and done >= total
        if not force and not final and \
                now - self.last_progress_write < self.settings.progress_write_seconds:
            return
        self.last_progress_write = now
        values: dict[str, Any] = {}
        if done is not None:
            values["progress_done"] = float(done)
        if title:
            values["title"] = str(title)[:300]
        if total is not None:
            values["progress_total"] = float(total)
        if message is not None:
            values["progress_message"] = str(message)[:500]
        with self.store.session() as s:
            written = s.execute(update(Run).where(Run.id == run.id, Run.lease == self.lease)
                                .values(**values, heartbeat_at=utcnow())).rowcount
        if not written:
            raise LeaseLost(f"run {run.id}: lease lost")

    # -- endings -----------------------------------------------------------------------
    def succeed(self, run: Run, node: DeferNode) -> None:
        """All steps done: set the flag and finish, in one transaction."""
        with self.store.session() as s:
            owned = self.owned(s)
            if node.flag and run.record_id is not None:
                record = lock_record(s, run.record_id)
                record.data = {**record.data, node.flag: True}
            owned.status, owned.finished_at, owned.lease = RunStatus.DONE.value, utcnow(), None
            if owned.progress_total <= 0:
                owned.progress_total = 1
            owned.progress_done = owned.progress_total
            self.event(s, owned, "", "finish", "done")
            notify(s, owned, "success", f"{owned.title}: done.")

    def fail(self, run: Run, node: DeferNode | None, exc: BaseException) -> str:
        """Classify a failure: cancelled, retry later, or dead (after on_error)."""
        with self.store.session() as s:
            # A cancel asked for while this step ran wins over any retry: a cancelled Run
            # must end cancelled, not wait for an attempt nothing will ever claim.
            cancelled = isinstance(exc, Cancelled) or self.owned(s).cancel_requested
        if cancelled:
            with self.store.session() as s:
                owned = self.owned(s)
                owned.status, owned.finished_at = RunStatus.CANCELLED.value, utcnow()
                owned.lease = None
                self.event(s, owned, "", "cancel", "cancelled while running")
            return "cancelled"
        detail = "".join(traceback.format_exception(exc))
        # A snapshot the current code cannot rebuild (an action since removed, say) will not
        # heal by waiting: dead at once, for an operator to retry once the code is back.
        retryable = exc.retryable if isinstance(exc, ActionError) \
            else not isinstance(exc, RuleError)
        safe = exc.safe_message if isinstance(exc, ActionError) else GENERIC_FAILURE
        if type(exc).__name__ == "JobTimeoutException":  # RQ's backstop fired
            safe = TIMED_OUT
        log.warning("run %s attempt %s failed: %s", run.id, run.attempt, exc)
        with self.store.session() as s:
            owned = self.owned(s)
            owned.last_error, owned.safe_error = detail[-20000:], safe[:500]
            self.event(s, owned, getattr(exc, "path", ""), "error", detail)
            remaining: list[int] = []
            if retryable and owned.attempt < owned.max_attempts:
                intervals = owned.snapshot.get("intervals") or [0]
                remaining = [intervals[min(i, len(intervals) - 1)]
                             for i in range(owned.attempt - 1, owned.max_attempts - 1)]
                wait = remaining[0]
                owned.status, owned.lease = RunStatus.RETRYING.value, None
                owned.due_at = utcnow() + timedelta(seconds=wait)
                self.event(s, owned, "", "retry",
                           f"attempt {owned.attempt + 1} of {owned.max_attempts} "
                           f"at {owned.due_at.isoformat(timespec='seconds')}")
                outcome = "retrying"
            else:
                outcome = "dead"
        if outcome == "dead":
            self.dead(run, node, exc, safe)
        raise RunFailed(f"run {run.id}: {outcome}: {exc}") from exc

    def dead(self, run: Run, node: DeferNode | None, exc: BaseException, safe: str) -> None:
        """Run the on_error branch once, then mark the Run dead and tell its owner."""
        self.deadline = float("inf")  # the error port must run even after a timeout
        if node is not None and node.on_error:
            with self.store.session() as s:
                done_paths = set(s.scalars(select(RunEvent.path).where(
                    RunEvent.run_id == run.id, RunEvent.event == "done")))
            error = {"message": safe, "detail": str(exc), "type": type(exc).__name__}
            try:
                self.steps(run, node.on_error, done_paths, error=error)
            except LeaseLost:
                raise
            except Exception as branch_exc:  # noqa: BLE001 — record it, still go dead
                with self.store.session() as s:
                    self.event(s, self.owned(s), f"{node.path}/on_error", "error",
                               "".join(traceback.format_exception(branch_exc)))
        with self.store.session() as s:
            owned = self.owned(s)
            owned.status, owned.finished_at, owned.lease = RunStatus.DEAD.value, utcnow(), None
            self.event(s, owned, "", "dead", f"after {owned.attempt} attempt(s)")
            notify(s, owned, "error", f"{owned.title}: {safe}")


def notify(s: Session, run: Run, level: str, message: str) -> None:
    """Leave a notice for the Run's owner (shown on their next page)."""
    if run.batch_id is not None:
        return  # the batch tells its owner once, when it ends, not once per record
    if run.hidden:
        return  # its owner deleted it (cancel-and-delete): news of it would only confuse
    if run.awaited == "false" and level == "success" and run.kind == "delay":
        return  # a reminder firing on schedule is not news to the person who submitted
    token = None
    if run.record_id is not None:
        token = s.scalar(select(Record.token).where(Record.id == run.record_id))
    s.add(Notification(owner=run.owner, run_id=run.id, record_token=token, level=level,
                       message=message[:500]))
