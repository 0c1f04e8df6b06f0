"""Warm a worker before its first job (and a forking worker's work-horses with it).

RQ's forking `Worker` runs each job in a fresh fork of the worker process: whatever the
parent has not done yet, every job does again (import the job module, configure the ORM
mappers, compile each SQL statement into an empty cache), about a third of a trivial
job's CPU. One trivial Run executed here, inside a transaction that is rolled back, does
all of that once; every fork inherits the result. Nothing of it is ever committed.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, configure_mappers

from formrules.process.runtime import Runtime
from formrules.runs.snapshot import Snapshot
from formrules.store.models import Record, Run, new_id, new_token, utcnow

log = logging.getLogger("formrules.process.warmup")
FIELDS = {"status": "string", "done": "boolean"}
NODE = {"background": {"title": "warm-up", "flag": "done",
                       "do": [{"set": {"status": "warm"}}]}}


@dataclass
class _RolledBackStore:
    """A store whose sessions all share one connection and never commit its transaction."""

    conn: Connection

    @property
    def engine(self):
        return self.conn.engine

    def sessions(self) -> Session:
        # rollback_only: a session's commit flushes but leaves the outer transaction open.
        return Session(bind=self.conn, join_transaction_mode="rollback_only",
                       expire_on_commit=False)

    @contextmanager
    def session(self):
        with self.sessions() as session:
            yield session
            session.commit()


@dataclass
class _WarmRuntime:
    settings: Any
    store: _RolledBackStore
    dispatcher: Any


def warm(rt: Runtime) -> bool:
    """Run one trivial Run in a rolled-back transaction; True when that went through."""
    from formrules.runs import job, lifecycle  # imported here on purpose: forks inherit it

    configure_mappers()
    try:
        with rt.store.engine.connect() as conn:
            outer = conn.begin()
            try:
                now = utcnow()
                # Core inserts first: on SQLite they open the transaction everything after
                # joins, so nothing below can end it.
                record_id = conn.execute(insert(Record).values(
                    token=new_token(), form_id="__warmup__", owner="__warmup__",
                    data={"status": "", "done": False}, version=1, created_at=now,
                    updated_at=now)).inserted_primary_key[0]
                runtime = _WarmRuntime(rt.settings, _RolledBackStore(conn), rt.dispatcher)
                outcomes = []
                # Both paths a trivial Run may take: step by step, and at once.
                for at_once in (False, True):
                    run_id = new_id()
                    conn.execute(insert(Run).values(
                        id=run_id, record_id=record_id, form_id="__warmup__",
                        owner="__warmup__", kind="background",
                        node_path="events/submit/0/background", title="warm-up",
                        status=lifecycle.initial(now, now), awaited="true", flag="done",
                        due_at=now, created_at=now, updated_at=now, max_attempts=1,
                        snapshot=Snapshot(raw=NODE, fields=FIELDS).dump()))
                    outcomes.append(job.Execution(runtime, run_id, concurrency=0,
                                                  at_once=at_once).execute())
                outcome = "done" if outcomes == ["done", "done"] else ", ".join(outcomes)
            finally:
                outer.rollback()
    except Exception:  # a cold worker still works: warming is an optimisation only
        log.warning("warm-up skipped", exc_info=True)
        return False
    finally:
        rt.store.engine.dispose()  # no pooled connection crosses into the forks
    log.debug("warm-up run: %s", outcome)
    # Everything alive now (modules, compiled statements, mappers) is what every fork
    # shares: frozen, the garbage collector in a work-horse never walks it, so its pages
    # are not copied into each fork by the collector's writes (Python's advice for
    # forking servers, `gc.freeze`).
    gc.freeze()
    return outcome == "done"
