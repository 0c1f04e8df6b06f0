"""The job entry point RQ workers run: execute one Run, step by step, with checkpoints.

    execute_run(run_id)
      claim the Run (a lease: only one execution may own it) ── not due yet? wait or leave
      for each action of the subtree: skip if checkpointed, else run it, then commit its
      field writes + files + checkpoint in one transaction (lease checked, a requested
      cancel read and the record re-read in the same one: no step starts after a cancel)
      success ── set the flag field, status done, notify (a cancel asked for meanwhile wins)
      failure ── retryable and attempts left: status retrying, due after its wait
              └─ otherwise: on_error branch (once), status dead, notify
Every status change goes through `formrules.runs.lifecycle`.

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
    ActionError,
    Cancelled,
    LeaseLost,
    PermanentError,
    RuleError,
    RunFailed,
    TimedOut,
    user_message,
)
from formrules.language.sandbox import evaluate, render
from formrules.language.tree import ActionNode, DeferNode, ProgressNode
from formrules.language.variables import form_title_of, run_info
from formrules.process import runtime as runtime_mod
from formrules.runs import control, lifecycle, notifications, observe
from formrules.runs.engine import call_action, new_run, walk
from formrules.runs.snapshot import Snapshot
from formrules.store.db import lock_record
from formrules.store.models import (
    CHECKPOINT_KINDS,
    EventKind,
    Record,
    ResultFile,
    Run,
    RunEvent,
    new_id,
    utcnow,
)

log = logging.getLogger("formrules.runs.job")
EARLY_WAIT_LIMIT = 5.0  # RQ's scheduler may fire a little early: wait that out in place
LOST_WORKER = "This task stopped unexpectedly several times."


def execute_run(run_id: str) -> str:
    """RQ job function: run one Run; returns the outcome as text."""
    rt = runtime_mod.current()
    with observe.attempt(rt, run_id) as attempt:  # log context and metrics
        attempt.outcome = Execution(rt, run_id).execute()
        return attempt.outcome


class Execution:
    """One attempt at one Run, owning it through a lease.

    Statuses change only through `formrules.runs.lifecycle`; here each step costs one
    transaction (its checkpoint, which also proves the lease, reads a requested cancel and
    re-reads the record for the next step), plus the claim and the ending.
    """

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
        self.snapshot = Snapshot(raw={}, fields={})  # loaded once the Run is claimed
        self.data: dict[str, Any] = {}  # the record as of our last transaction
        self.done_paths: set[str] = set()  # checkpointed steps, this attempt's and earlier
        self.current_path = ""  # the step running (or that ran last)
        self.current_action = ""  # its action's name (what users read of a failure)

    # -- ownership ---------------------------------------------------------------------
    def claim(self) -> Run | None:
        """Take the Run if it is due and pending; wait out a slightly early start."""
        while True:
            now = utcnow()
            with self.store.session() as s:
                run = lifecycle.claim(s, self.run_id, self.lease, now)
                if run is not None:
                    self.done_paths = set(s.scalars(select(RunEvent.path).where(
                        RunEvent.run_id == run.id, RunEvent.event.in_(CHECKPOINT_KINDS))))
                    self.data = self.read_record(s, run)
                    return run
                run = s.get(Run, self.run_id)
                if run is None:
                    log.warning("run %s: no such run", self.run_id)
                    return None
                if not lifecycle.is_pending(run):
                    log.info("run %s is %s; nothing to do", self.run_id, run.status)
                    return None
                wait = (run.due_at - now).total_seconds()
                if wait > EARLY_WAIT_LIMIT:
                    return None  # the reconciler re-dispatches it when due
            time.sleep(max(0.01, wait))

    def read_record(self, s: Session, run: Run) -> dict[str, Any]:
        """The record's data in `s`'s transaction ({} for a Run without a record)."""
        if run.record_id is None:
            return {}
        data = s.scalar(select(Record.data).where(Record.id == run.record_id))
        return dict(data) if data else {}

    def heartbeat(self) -> None:
        """Keep the lease alive and notice cancellation, until told to stop."""
        while not self.stop_beat.wait(self.settings.heartbeat_seconds):
            try:
                with self.store.session() as s:
                    if lifecycle.hold(s, self.run_id, self.lease).cancel_requested:
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

    def checkpoint(self, s: Session, run: Run, path: str, detail: str,
                   duration_ms: int | None = None) -> Run:
        """Write a step's checkpoint (lease proved); note a cancel asked for meanwhile."""
        owned = lifecycle.checkpoint(s, run.id, self.lease, path, detail, duration_ms)
        if owned.cancel_requested:  # read with the checkpoint: no later step starts
            self.cancel_seen.set()
        return owned

    # -- the run -----------------------------------------------------------------------
    def execute(self) -> str:
        """Claim, run every step, then finish as done, retrying, dead or cancelled."""
        run = self.claim()
        if run is None:
            return "not claimed"
        beat = threading.Thread(target=self.heartbeat, name=f"heartbeat-{run.id}", daemon=True)
        beat.start()
        self.send_emails(run)  # a `notify: {events: [start], email: …}` copy goes now
        node: DeferNode | None = None
        started = time.monotonic()
        try:
            self.snapshot = Snapshot.load(run.snapshot)
            node = self.snapshot.node(run.node_path)
            self.timeout = self.snapshot.timeout_seconds(self.settings.default_timeout_seconds)
            self.deadline = started + self.timeout
            if run.recoveries >= self.settings.max_recoveries:
                # Its steps killed the worker again and again: stop trying, but still run
                # on_error and tell the owner (the reconciler gives up if this dies too).
                raise PermanentError(f"run {run.id}: worker lost {run.recoveries} times",
                                     LOST_WORKER)
            if node.when and run.record_id is not None and not self.check_when(run, node):
                return "skipped"
            self.steps(run, node.do)
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
            self.send_emails(run)
            if run.record_id is not None:  # its owner deleted it meanwhile: now it can go
                control.finish_deletions(self.store, run.record_id)
            if run.batch_id is not None:  # a batch child ended (or will retry): a free slot
                from formrules.runs.batch import child_finished
                child_finished(self.rt, run)

    def send_emails(self, run: Run) -> None:
        """E-mail copies of this Run's notices (the reconciler retries any that fail)."""
        try:
            notifications.send_emails(self.store, self.settings, run.id)
        except Exception:  # the database blinked: the reconciler sends them later
            log.exception("run %s: sending notice e-mails failed", run.id)

    def check_when(self, run: Run, node: DeferNode) -> bool:
        """A Delay's `when:` is re-checked at fire time; false means skipped."""
        if evaluate(node.when, self.context(run, "").variables()):
            return True
        with self.store.session() as s:
            lifecycle.skip_at_fire(s, run.id, self.lease, path=node.path,
                                   detail=f"when: {node.when!r} was false at fire time")
        return False

    def context(self, run: Run, path: str, **extra: Any) -> Context:
        """The action context for one step of this Run."""
        return Context(
            settings=self.settings, form_id=run.form_id, field_types=self.snapshot.fields,
            data=dict(self.data), path=path, run_id=run.id, attempt=run.attempt,
            extra={**self.snapshot.variables(), "run": run_info(run), **extra},
            form_title=form_title_of(run),
            all_records=lambda: self.form_records(run.form_id),
            on_progress=lambda d, t, m: self.progress(run, d, t, m),
            is_cancelled=self.cancelled,
            log=logging.LoggerAdapter(log, {"run": run.id, "path": path}),
        )

    def form_records(self, form_id: str) -> list[dict[str, Any]]:
        """Every record of a form, oldest first (for `report: {records: all}`)."""
        with self.store.session() as s:
            return [dict(data) for data in s.scalars(
                select(Record.data).where(Record.form_id == form_id).order_by(Record.id))]

    def steps(self, run: Run, nodes, **extra: Any) -> None:
        """Walk the subtree; each action is a checkpointed step."""
        def variables() -> dict[str, Any]:
            return self.context(run, "", **extra).variables()

        def on_action(node: ActionNode) -> None:
            if node.path in self.done_paths:
                return  # completed by an earlier attempt: never run twice
            self.step(run, node, **extra)
            self.done_paths.add(node.path)

        def on_defer(node: DeferNode) -> None:
            if node.path in self.done_paths:
                return
            if self.cancelled():
                raise Cancelled()
            child = new_run(node, form_id=run.form_id, field_types=self.snapshot.fields,
                            owner=run.owner, variables=variables(),
                            record_id=run.record_id, now=utcnow(),
                            tz=self.settings.timezone, parent_id=run.id,
                            inputs=self.snapshot.inputs)
            with self.store.session() as s:
                # The owner as of now: a login may have adopted this Run meanwhile.
                child.owner = self.checkpoint(s, run, node.path, f"started run {child.id}").owner
                s.add(child)
            self.pending_children.append(child)
            self.done_paths.add(node.path)

        def on_progress(node: ProgressNode) -> None:
            vars_ = variables()
            done = evaluate(str(node.done), vars_) if node.done is not None else None
            total = evaluate(str(node.total), vars_) if node.total is not None else None
            message = render(node.message, vars_) if node.message else None
            title = render(node.title, vars_) if node.title else None
            self.progress(run, done, total, message, force=True, title=title)

        walk(nodes, variables, on_action, on_defer, on_progress)

    def step(self, run: Run, node: ActionNode, **extra: Any) -> None:
        """Run one action, then commit its effects with its checkpoint: one transaction."""
        if self.cancelled():  # seen by the last checkpoint, the claim or the heartbeat
            raise Cancelled()
        ctx = self.context(run, node.path, **extra)
        started = time.monotonic()
        self.current_path = node.path  # a failure's trace line names the step
        self.current_action = node.action
        call_action(node, ctx)
        with self.store.session() as s:
            # The checkpoint first: it proves the lease (a lost one writes nothing) and
            # locks the Run row, as before the record row (the order every writer uses).
            owned = self.checkpoint(s, run, node.path, node.action,
                                    int((time.monotonic() - started) * 1000))
            if ctx.updates and run.record_id is not None:
                record = lock_record(s, run.record_id)
                record.data = {**record.data, **ctx.updates}
                self.data = dict(record.data)
            else:
                self.data = self.read_record(s, run)
            for item in ctx.attachments:
                s.add(ResultFile(run_id=run.id, owner=owned.owner, filename=item.filename,
                                 content_type=item.content_type, data=item.data))
        self.current_path = self.current_action = ""

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
        """All steps done: set the flag and finish, in one transaction (unless cancelled)."""
        if self.cancelled():
            raise Cancelled()
        with self.store.session() as s:
            # Raises Cancelled (rolling the flag back) when a cancel came during the last
            # step: the Run row is written first, so a cancel racing us waits or loses.
            lifecycle.succeed(s, run.id, self.lease)
            if node.flag and run.record_id is not None:
                record = lock_record(s, run.record_id)
                record.data = {**record.data, node.flag: True}

    def fail(self, run: Run, node: DeferNode | None, exc: BaseException) -> str:
        """Classify a failure: cancelled, retry later, or dead (after on_error)."""
        detail = "".join(traceback.format_exception(exc))
        # A snapshot the current code cannot rebuild (an action since removed, say) will not
        # heal by waiting: dead at once, for an operator to retry once the code is back.
        retryable = exc.retryable if isinstance(exc, ActionError) \
            else not isinstance(exc, RuleError)
        # The safe message rule (`formrules.errors.user_message`): what the owner reads.
        step = self.current_action or None
        safe = user_message(exc, step)
        with self.store.session() as s:
            owned = lifecycle.hold(s, run.id, self.lease)
            # A cancel asked for while this step ran wins over any retry: a cancelled Run
            # must end cancelled, not wait for an attempt nothing will ever claim.
            if isinstance(exc, Cancelled) or owned.cancel_requested:
                lifecycle.stop(s, run.id, self.lease)
                return "cancelled"
            log.warning("run %s attempt %s failed: %s", run.id, run.attempt, exc)
            owned = lifecycle.hold(s, run.id, self.lease, last_error=detail[-20000:],
                                   safe_error=safe[:500], error_step=step)
            lifecycle.note(s, owned, EventKind.ERROR, detail,
                           getattr(exc, "path", "") or self.current_path)
            if retryable and owned.attempt < owned.max_attempts:
                wait = self.snapshot.waits_after(owned.attempt, owned.max_attempts)[0]
                lifecycle.retry_later(s, run.id, self.lease,
                                      utcnow() + timedelta(seconds=wait),
                                      owned.attempt, owned.max_attempts)
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
            error = {"message": safe, "detail": str(exc), "type": type(exc).__name__}
            try:
                self.steps(run, node.on_error, error=error)
            except LeaseLost:
                raise
            except Exception as branch_exc:  # noqa: BLE001 — record it, still go dead
                with self.store.session() as s:
                    lifecycle.note(s, lifecycle.hold(s, run.id, self.lease), EventKind.ERROR,
                                   "".join(traceback.format_exception(branch_exc)),
                                   f"{node.path}/on_error")
        with self.store.session() as s:
            lifecycle.die(s, run.id, self.lease, run.attempt)
