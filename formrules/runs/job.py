"""The job entry point RQ workers run: execute one Run, step by step, with checkpoints.

    execute_run(run_id)
      a slot of the node's `concurrency:` (none free: stay pending, waiting for a slot,
      woken when one is given back; no attempt used) ── `formrules.runs.slots`
      claim the Run (a lease: only one execution may own it; one statement, which also
      reads its record) ── not due yet? wait or leave
      for each action of the subtree: skip if checkpointed, else run it, then commit its
      field writes + files + checkpoint in one transaction (lease checked, a requested
      cancel read and the record re-read in the same one: no step starts after a cancel);
      a step that only writes fields (`set`) is committed with the next transaction, which
      comes before any other step starts;
      a `call:` walks its tree (steps under the call's path), a `try:` that catches
      checkpoints the catch with its error field, then runs `catch:` (`RunWalker`)
      success ── set the flag field, status done, notify (a cancel asked for meanwhile wins)
      failure ── retryable and attempts left: status retrying, due after its wait
              └─ otherwise: on_error branch (once), status dead, notify
A Run whose steps all only write fields, on its first attempt: claim, steps and success
in one transaction (`Execution.run_at_once`).
Every status change goes through `formrules.runs.lifecycle`.

The process's heartbeat thread (`runs.heartbeat`) keeps the lease alive (also through
steps far longer than the stale limit); the reconciler resumes Runs whose heartbeat stops
(a killed worker), and an execution that lost its lease stops at its next write. The
node's `timeout:` (default `default_timeout_seconds`) is enforced at every
progress/cancel check inside a step and between steps; RQ's own job timeout, a little
longer, is the backstop for actions that never check. RQ does not retry: a retrying Run's
next attempt is due at `Run.due_at`, and the leader enqueues it then
(`formrules.process.leader`).
Nothing here imports the web layer.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from formrules.actions import registry as actions
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
from formrules.language.tree import ActionNode, CallNode, DeferNode, ProgressNode, TryNode, walk
from formrules.language.variables import form_title_of, run_info
from formrules.process import runtime as runtime_mod
from formrules.runs import control, lifecycle, notifications, observe, pause
from formrules.runs.engine import Walker, call_action, call_of, new_run, writes_fields_only
from formrules.runs.heartbeat import heartbeats
from formrules.runs.slots import FULL, TAKEN, Slots
from formrules.runs.snapshot import Snapshot
from formrules.store.db import KNOWN_RECORDS, RecordFacts, merge_record
from formrules.store.models import (
    CHECKPOINT_KINDS,
    EventKind,
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
LOST_WORKER = "This task stopped unexpectedly several times."
CATCH = "/catch"  # a `try:` node's path + this: the checkpoint of an error it caught


def execute_run(run_id: str, concurrency: int | None = None, at_once: bool = False) -> str:
    """RQ job function: run one Run; returns the outcome as text.

    What the job carries besides the id (`Dispatcher.job_kwargs`): `concurrency`, the
    node's `concurrency:` (0: none), so that a Run without a limit is not read before
    its claim (None, a job enqueued by an older version: read from the Run); `at_once`,
    the node's steps only write fields (see `Execution.run_at_once`)."""
    rt = runtime_mod.current()
    execution = Execution(rt, run_id, concurrency, at_once)
    with observe.attempt(run_id) as attempt:  # log context and metrics
        execution.attempt = attempt
        attempt.outcome = execution.execute()
        return attempt.outcome


class Execution:
    """One attempt at one Run, owning it through a lease.

    Statuses change only through `formrules.runs.lifecycle`; here each step costs one
    transaction (its checkpoint, which also proves the lease, reads a requested cancel and
    re-reads the record for the next step), plus the claim and the ending. A step that
    only writes fields (`set`) goes with the next transaction instead; a Run made of
    such steps alone is claimed, run and ended in one (`run_at_once`).
    """

    def __init__(self, rt: runtime_mod.Runtime, run_id: str, concurrency: int | None = None,
                 at_once: bool = False):
        self.rt = rt
        self.concurrency = concurrency
        self.at_once = at_once
        self.attempt = observe.Attempt()
        self.facts: dict[int, RecordFacts] = {}  # the record's, read by the claim
        self.settings = rt.settings
        self.store = rt.store
        self.run_id = run_id
        self.lease = new_id()
        self.cancel_seen = threading.Event()
        self.lease_lost = threading.Event()
        self.last_progress_write = 0.0
        self.timeout = self.settings.default_timeout_seconds
        self.deadline = float("inf")  # monotonic; set from the node's timeout when it starts
        self.pending_children: list[Run] = []
        self.snapshot = Snapshot(raw={}, fields={})  # loaded once the Run is claimed
        self.data: dict[str, Any] = {}  # the record as of our last transaction
        self.version: int | None = None  # its version then (None: not known)
        self.done_paths: set[str] = set()  # checkpointed steps, this attempt's and earlier
        self.caught: dict[str, str] = {}  # `<try>/catch` checkpoints: path -> detail
        self.dying = False  # in the on_error branch: a `try:` there catches at once
        self.current_path = ""  # the step running (or that ran last)
        self.slots: Slots | None = None  # the node's `concurrency:` slots, one held by us
        self.slot_taken = False  # this execution took it (not one left by a killed one)
        self.slots_form = self.slots_path = ""  # whose slots: the next waiter is woken
        self.current_action = ""  # its action's name (what users read of a failure)
        # Completed fields-only steps (`set`) not committed yet: (path, action, ms, when
        # it ended), and their field writes. They go with the next transaction.
        self.unsaved_steps: list[tuple[str, str, int, datetime]] = []
        self.unsaved: dict[str, Any] = {}

    # -- ownership ---------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction of this execution's, knowing what the claim read of the record.

        Rolled back, it leaves the steps not saved yet (and the record as last written)
        as they were before it: the next transaction saves them."""
        kept = (list(self.unsaved_steps), dict(self.unsaved), dict(self.data), self.version)
        try:
            with self.store.session() as s:
                s.info[KNOWN_RECORDS] = dict(self.facts)
                yield s
        except BaseException:
            self.unsaved_steps, self.unsaved, self.data, self.version = kept
            raise

    def claim(self) -> Run | None:
        """Take the Run if it is due and pending; wait out a slightly early start."""
        while True:
            now = utcnow()
            with self.store.session() as s:
                claimed = lifecycle.claim(s, self.run_id, self.lease, now)
                if claimed is not None:
                    run = claimed.run
                    # Its first start ever (started_at set by this claim) has no
                    # checkpoints to skip; a retry or a resumed Run reads them.
                    done = [] if run.started_at == now else s.execute(
                        select(RunEvent.path, RunEvent.detail).where(
                            RunEvent.run_id == run.id,
                            RunEvent.event.in_(CHECKPOINT_KINDS))).all()
                    self.done_paths = {path for path, _ in done}
                    self.caught = {path: detail or "" for path, detail in done
                                   if path.endswith(CATCH)}
                    return self.adopt(s, claimed)
                run = s.get(Run, self.run_id)
                if run is None:
                    log.warning("run %s: no such run", self.run_id)
                    return None
                if not lifecycle.is_pending(run):
                    log.info("run %s is %s; nothing to do", self.run_id, run.status)
                    return None
                if pause.is_paused(s, run.form_id):
                    # Put back to wait: the reconciler dispatches it again after a resume.
                    log.info("run %s: form %s is paused; the run waits", run.id, run.form_id)
                    return None
                wait = (run.due_at - now).total_seconds()
                if wait > EARLY_WAIT_LIMIT:
                    return None  # the reconciler re-dispatches it when due
            time.sleep(max(0.01, wait))

    def adopt(self, s: Session, claimed: lifecycle.Claimed) -> Run:
        """Take on what the claim read: the record as of then, and its facts."""
        self.data, self.version = claimed.data, claimed.version
        self.facts = dict(s.info.get(KNOWN_RECORDS, {}))
        return claimed.run

    def read_record(self, s: Session, run: Run) -> dict[str, Any]:
        """The record's data in `s`'s transaction ({} for a Run without a record); notes
        its version, so the next write can skip re-reading it."""
        if run.record_id is None:
            return {}
        row = s.execute(select(Record.data, Record.version)
                        .where(Record.id == run.record_id)).first()
        self.version = row.version if row else None
        return dict(row.data) if row and row.data else {}

    def write_record(self, s: Session, run: Run, updates: dict[str, Any]) -> None:
        """Merge `updates` into the record's data (see `merge_record`)."""
        self.data, self.version = merge_record(s, run.record_id, updates,
                                               self.version, self.data)

    def save_unsaved(self, s: Session, run: Run, updates: dict[str, Any] | None = None
                     ) -> None:
        """Commit the fields-only steps run since the last transaction, with `updates`, in
        `s` (whose first statement proved the lease and locked the Run row).

        Until then they are this execution's alone: lost with it (a crash, a lost lease)
        they run again on the resume, which changes nothing but the record, as if they
        ran then. Every transaction after the claim calls this, so a slower step never
        starts before the fields written ahead of it are visible.
        """
        self.trace_unsaved(s, run)
        writes = {**self.unsaved, **(updates or {})}
        self.unsaved = {}
        if writes and run.record_id is not None:
            self.write_record(s, run, writes)

    def hold(self, s: Session, run: Run) -> Run:
        """Prove the lease in `s` (`lifecycle.hold`), then save the steps not saved yet."""
        owned = lifecycle.hold(s, run.id, self.lease)
        self.save_unsaved(s, owned)
        return owned

    def end_done(self, s: Session, run: Run, node: DeferNode,
                 lines: lifecycle.Lines | None = None) -> Run:
        """In `s`: the steps not saved yet, then status done and the flag (`lifecycle.
        succeed`; a cancel asked for wins); their trace lines and its own go in one
        INSERT, after `lines` (gathered earlier in `s`)."""
        lines = [] if lines is None else lines
        self.trace_unsaved(s, run, lines)
        ended = lifecycle.succeed(s, run.id, self.lease, lines)
        lifecycle.write_lines(s, lines)
        self.save_unsaved(s, ended, {node.flag: True} if node.flag else None)
        return ended

    def trace_unsaved(self, s: Session, run: Run, lines: lifecycle.Lines | None = None
                      ) -> None:
        """The checkpoint lines of the steps not committed yet (before an ending's own
        line: they happened first). `lines`: see `lifecycle.trace_line`."""
        for path, action, duration_ms, at in self.unsaved_steps:
            lifecycle.trace_line(s, lines, run_id=run.id, attempt=run.attempt, path=path,
                                 event=EventKind.CHECKPOINT.value, detail=action, at=at,
                                 duration_ms=duration_ms)
        self.unsaved_steps = []

    def beat(self) -> None:
        """Keep the lease alive and notice cancellation (from the heartbeat thread)."""
        if self.lease_lost.is_set():
            return
        try:
            with self.store.session() as s:
                if lifecycle.hold(s, self.run_id, self.lease).cancel_requested:
                    self.cancel_seen.set()
        except LeaseLost:
            self.lease_lost.set()
            return
        except Exception:  # the database blinked; the next beat tries again
            log.exception("run %s: heartbeat failed", self.run_id)
        self.renew_slot()

    def renew_slot(self) -> None:
        """Keep the `concurrency:` slot's lease alive with the Run's own heartbeat."""
        if self.slots is None:
            return
        try:
            if not self.slots.renew(self.run_id) and self.slots.acquire(self.run_id) == FULL:
                log.warning("run %s: its slot's lease ran out and was taken meanwhile",
                            self.run_id)
        except RedisError as exc:
            log.warning("run %s: slot lease not renewed (%s)", self.run_id, exc)

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
    def take_slot(self) -> bool:
        """A slot of the node's `concurrency:` (True with none declared); when all are
        taken the Run stays pending, waiting for a slot, and is dispatched again soon."""
        if self.concurrency == 0:
            return True  # the job says the node has no limit: nothing to read
        try:
            with self.store.session() as s:
                run = s.get(Run, self.run_id)
                if run is None or not lifecycle.is_pending(run):
                    return True  # the claim says why there is nothing to do
                limit = Snapshot.load(run.snapshot).node(run.node_path).concurrency
        except RuleError:
            return True  # a snapshot this code cannot rebuild: the claim path ends it
        if not limit:
            return True
        slots = Slots(self.rt.redis, self.settings.queue, run.form_id, run.node_path,
                      limit, self.settings.stale_seconds)
        got = slots.acquire(run.id)
        if got != FULL:
            self.slots, self.slot_taken = slots, got == TAKEN
            self.slots_form, self.slots_path = run.form_id, run.node_path
            return True
        # Parked: woken when a Run gives its slot back; this recheck is for a slot freed
        # by a lease running out instead (spread out, so parked Runs do not all come at once).
        recheck = self.settings.stale_seconds * random.uniform(1, 1.25)
        with self.store.session() as s:
            lifecycle.wait_for_slot(s, run.id, utcnow() + timedelta(seconds=recheck))
        return False

    def give_slot_back(self, run: Run | None) -> None:
        """Release the slot once this execution is over with the Run (or never got it)."""
        if self.slots is None or (run is None and not self.slot_taken):
            return  # a resumed Run's slot, still held by another execution of it
        try:
            self.slots.release(self.run_id)
        except RedisError as exc:  # its lease runs out by itself
            log.warning("run %s: slot not released (%s)", self.run_id, exc)
            return
        try:  # hand it on: the Run waiting longest for this node's slot is due now
            with self.store.session() as s:
                woken = lifecycle.wake_for_slot(s, self.slots_form, self.slots_path, utcnow())
            if woken is not None:
                self.rt.dispatcher.dispatch_all([woken])
        except Exception:  # noqa: BLE001 — it looks again by itself (`wait_for_slot`)
            log.exception("run %s: could not wake the next Run waiting for a slot",
                          self.run_id)

    def execute(self) -> str:
        """Claim, run every step, then finish as done, retrying, dead or cancelled."""
        if not self.take_slot():
            return "waiting for a slot"
        if self.at_once:
            run = self.run_at_once()
            if run is not None:
                self.after(run)
                return "done"
        run = self.claim()
        if run is None:
            self.give_slot_back(None)
            return "not claimed"
        self.claimed(run)
        heartbeats.add(self, self.settings.heartbeat_seconds)
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
            self.attempt.status = RunStatus.DONE.value
            return "done"
        except LeaseLost:
            log.warning("run %s: lease lost; another execution continues it", run.id)
            self.slots = None  # the slot is the other execution's now
            return "lease lost"
        except Exception as exc:  # noqa: BLE001 — every failure is classified below
            try:
                return self.fail(run, node, exc)
            except LeaseLost:  # recovered elsewhere while failing: theirs to finish
                log.warning("run %s: lease lost while failing", run.id)
                self.slots = None
                return "lease lost"
        finally:
            heartbeats.discard(self)
            self.after(run)

    def claimed(self, run: Run) -> None:
        """Metrics and log lines name the Run's form, node and record from now on."""
        known = self.facts.get(run.record_id) if run.record_id is not None else None
        self.attempt.ran(run.form_id, run.node_path, known.token if known else None)

    def run_at_once(self) -> Run | None:
        """A Run whose steps only write fields (`at_once`, told by its job), on its first
        attempt: claimed, run and ended in one transaction, so it is never seen running
        and needs no checkpoint of its own. None when it is not such a Run after all (a
        retry, a resume, not due, paused) or a step failed: nothing of it was written,
        and the ordinary path takes it (running those steps again changes nothing)."""
        now = utcnow()
        try:
            with self.store.session() as s, s.no_autoflush:  # every INSERT at the end
                lines: lifecycle.Lines = []  # the claim's line, written with the rest
                claimed = lifecycle.claim(s, self.run_id, self.lease, now, lines)
                if claimed is None or claimed.run.started_at != now:
                    raise _NotAtOnce()
                run = self.adopt(s, claimed)
                self.snapshot = Snapshot.load(run.snapshot)
                node = self.snapshot.node(run.node_path)
                if not writes_fields_only(node):  # as this worker's actions say, not the job
                    raise _NotAtOnce()
                self.steps(run, node.do)  # fields only: kept for `save_unsaved`, no session
                self.end_done(s, run, node, lines)  # its whole trace in one INSERT
        except Exception as exc:  # noqa: BLE001 — rolled back; the ordinary path decides
            if not isinstance(exc, _NotAtOnce):
                log.info("run %s: not at once (%s); taking the ordinary path", self.run_id,
                         type(exc).__name__)
            self.unsaved_steps, self.unsaved, self.done_paths = [], {}, set()
            self.facts, self.data, self.version = {}, {}, None
            return None
        self.claimed(run)
        self.attempt.status = RunStatus.DONE.value
        return run

    def after(self, run: Run) -> None:
        """What follows an execution of a claimed Run, however it ended."""
        self.give_slot_back(run)
        if self.pending_children:
            self.rt.dispatcher.dispatch_all(self.pending_children)
        self.send_emails(run)
        # Its owner deleted the record meanwhile: now it can go. (Not after a success: a
        # delete asks running work to stop first, so a Run that ended done had none.)
        if run.record_id is not None and self.attempt.status != RunStatus.DONE.value:
            control.finish_deletions(self.store, self.settings, run.record_id)
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
        with self.session() as s:
            self.attempt.status = lifecycle.skip_at_fire(
                s, run.id, self.lease, path=node.path,
                detail=f"when: {node.when!r} was false at fire time").status
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
        """Walk the subtree; each action is a checkpointed step (see `RunWalker`)."""
        RunWalker(self, run).walk(nodes, extra)

    def step(self, run: Run, node: ActionNode, **extra: Any) -> None:
        """Run one action, then commit its effects with its checkpoint: one transaction."""
        if self.cancelled():  # seen by the last checkpoint, the claim or the heartbeat
            raise Cancelled()
        spec = actions.get(node.action)
        fields_only = spec is not None and spec.fields_only
        if not fields_only and (self.unsaved_steps or self.unsaved):
            with self.session() as s:  # what ran before this step is visible while it runs
                owned = self.hold(s, run)
            if owned.cancel_requested:  # read with that save, as with any checkpoint
                self.cancel_seen.set()
                raise Cancelled()
        ctx = self.context(run, node.path, **extra)
        started = time.monotonic()
        self.current_path = node.path  # a failure's trace line names the step
        self.current_action = node.action
        call_action(node, ctx)
        duration_ms = int((time.monotonic() - started) * 1000)
        if fields_only:  # committed with the next transaction (`save_unsaved`)
            self.unsaved_steps.append((node.path, node.action, duration_ms, utcnow()))
            self.unsaved.update(ctx.updates)
            self.data.update(ctx.updates)
            self.current_path = self.current_action = ""
            return
        with self.session() as s:
            # The checkpoint first: it proves the lease (a lost one writes nothing) and
            # locks the Run row, as before the record row (the order every writer uses).
            owned = self.checkpoint(s, run, node.path, node.action, duration_ms)
            if ctx.updates and run.record_id is not None:
                self.write_record(s, run, ctx.updates)
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
        with self.session() as s:
            written = s.execute(update(Run).where(Run.id == run.id, Run.lease == self.lease)
                                .values(**values, heartbeat_at=utcnow())).rowcount
            if not written:
                raise LeaseLost(f"run {run.id}: lease lost")
            self.save_unsaved(s, run)

    # -- endings -----------------------------------------------------------------------
    def succeed(self, run: Run, node: DeferNode) -> None:
        """All steps done: set the flag and finish, in one transaction (unless cancelled)."""
        if self.cancelled():
            raise Cancelled()
        with self.session() as s:
            # Raises Cancelled (rolling the flag back) when a cancel came during the last
            # step: the Run row is written first, so a cancel racing us waits or loses.
            # The steps not committed yet go with it, in the same record write.
            self.end_done(s, run, node)

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
        with self.session() as s:
            owned = self.hold(s, run)  # the steps before the failure did complete
            # A cancel asked for while this step ran wins over any retry: a cancelled Run
            # must end cancelled, not wait for an attempt nothing will ever claim.
            if isinstance(exc, Cancelled) or owned.cancel_requested:
                self.attempt.status = lifecycle.stop(s, run.id, self.lease).status
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
                outcome = self.attempt.status = RunStatus.RETRYING.value
            else:
                outcome = "dead"
        if outcome == "dead":
            self.dead(run, node, exc, safe)
        raise RunFailed(f"run {run.id}: {outcome}: {exc}") from exc

    def dead(self, run: Run, node: DeferNode | None, exc: BaseException, safe: str) -> None:
        """Run the on_error branch once, then mark the Run dead and tell its owner."""
        self.deadline = float("inf")  # the error port must run even after a timeout
        self.dying = True
        if node is not None and node.on_error:
            error = {"message": safe, "detail": str(exc), "type": type(exc).__name__}
            try:
                self.steps(run, node.on_error, error=error)
            except LeaseLost:
                raise
            except Exception as branch_exc:  # noqa: BLE001 — record it, still go dead
                with self.session() as s:
                    lifecycle.note(s, self.hold(s, run), EventKind.ERROR,
                                   "".join(traceback.format_exception(branch_exc)),
                                   f"{node.path}/on_error")
        with self.session() as s:
            self.trace_unsaved(s, run)
            ended = lifecycle.die(s, run.id, self.lease, run.attempt)
            self.save_unsaved(s, ended)
            self.attempt.status = ended.status


class _NotAtOnce(Exception):
    """The Run is not one to run at once after all (see `Execution.run_at_once`)."""


class RunWalker(Walker):
    """The walk of one Run's subtree on a worker: each action a checkpointed step, a
    deferred node a child Run, a call a trace line, a caught error a checkpoint.

    A `try:` catches a retryable error only on the Run's last attempt (earlier, the Run
    retries as its `retry:` says and resumes at the failed step); a permanent error at
    once; a cancel, a timeout or a lost lease never. The catch is checkpointed at
    `<try path>/catch` with the error field's write, so after a crash the handler resumes
    (its completed steps skipped) and the body is not tried again.
    """

    def __init__(self, ex: Execution, run: Run):
        super().__init__(ex.snapshot.call["tree"] if ex.snapshot.call else None)
        self.ex = ex
        self.run = run

    def variables(self, scope: dict[str, Any]) -> dict[str, Any]:
        return self.ex.context(self.run, "", **scope).variables()

    def action(self, node: ActionNode, scope: dict[str, Any]) -> None:
        if node.path in self.ex.done_paths:
            return  # completed by an earlier attempt: never run twice
        self.ex.step(self.run, node, **scope)
        self.ex.done_paths.add(node.path)

    def defer(self, node: DeferNode, scope: dict[str, Any]) -> None:
        ex, run = self.ex, self.run
        if node.path in ex.done_paths:
            return
        if ex.cancelled():
            raise Cancelled()
        child = new_run(node, form_id=run.form_id, field_types=ex.snapshot.fields,
                        owner=run.owner, variables=self.variables(scope),
                        record_id=run.record_id, now=utcnow(), tz=ex.settings.timezone,
                        parent_id=run.id, inputs=ex.snapshot.inputs,
                        call=call_of(self.tree, scope))
        with ex.session() as s:
            ex.trace_unsaved(s, run)  # the sets before it, traced before it
            # The owner as of now: a login may have adopted this Run meanwhile.
            owned = ex.checkpoint(s, run, node.path, f"started run {child.id}")
            ex.save_unsaved(s, owned)
            child.owner = owned.owner
            s.add(child)
        ex.pending_children.append(child)
        ex.done_paths.add(node.path)

    def progress(self, node: ProgressNode, scope: dict[str, Any]) -> None:
        vars_ = self.variables(scope)
        done = evaluate(str(node.done), vars_) if node.done is not None else None
        total = evaluate(str(node.total), vars_) if node.total is not None else None
        message = render(node.message, vars_) if node.message else None
        title = render(node.title, vars_) if node.title else None
        self.ex.progress(self.run, done, total, message, force=True, title=title)

    def enter_call(self, node: CallNode, inputs: dict[str, Any]) -> None:
        """A trace line naming the tree and its inputs (once: not again on a resume)."""
        if any(n.path in self.ex.done_paths for n in walk(node.body)):
            return
        detail = f"call tree {node.tree} with {json.dumps(inputs, default=str, sort_keys=True)}"
        with self.ex.session() as s:
            lifecycle.note(s, self.ex.hold(s, self.run), EventKind.CALL, detail[:2000],
                           node.path)

    def catches(self, exc: Exception) -> bool:
        ex = self.ex
        if isinstance(exc, Cancelled | LeaseLost | TimedOut) or ex.cancel_seen.is_set() \
                or type(exc).__name__ == "JobTimeoutException":
            return False
        retryable = exc.retryable if isinstance(exc, ActionError) \
            else not isinstance(exc, RuleError)
        return not retryable or ex.dying or self.run.attempt >= self.run.max_attempts

    def caught(self, node: TryNode, error: dict[str, str], exc: Exception,
               scope: dict[str, Any]) -> None:
        ex, run = self.ex, self.run
        path = node.path + CATCH
        with ex.session() as s:
            ex.trace_unsaved(s, run)  # the sets before the failure, traced before the catch
            owned = ex.checkpoint(s, run, path, f"caught {error['step']}: {error['message']}")
            if owned.cancel_requested:  # a cancel asked for meanwhile wins: nothing caught
                raise Cancelled()
            ex.save_unsaved(s, owned)
            lifecycle.note(s, owned, EventKind.CAUGHT,
                           "".join(traceback.format_exception(exc)), error["step"])
            if node.error_field and run.record_id is not None:
                ex.write_record(s, run, {node.error_field: error["message"]})
        ex.done_paths.add(path)
        ex.current_path = ""

    def resumed_catch(self, node: TryNode) -> dict[str, str] | None:
        detail = self.ex.caught.get(node.path + CATCH)
        if detail is None:
            return None
        step, _, message = detail.removeprefix("caught ").partition(": ")
        return {"message": message, "step": step}
