"""One place where a Run's execution meets logs and metrics.

`attempt` binds the Run id and record token to every log line of the attempt, and
records the attempt's duration and outcome (done, retrying, dead...) by form and node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from formrules.process import logs, metrics
from formrules.process.runtime import Runtime
from formrules.store.models import Record, Run

log = logging.getLogger("formrules.runs.observe")
NOT_RUN = {"not claimed"}  # the job found nothing to do: no attempt to record


@dataclass
class Attempt:
    """What the job sets once it knows how the attempt went (None: it raised)."""

    outcome: str | None = None


@contextmanager
def attempt(rt: Runtime, run_id: str) -> Iterator[Attempt]:
    """Wrap one execution of `run_id` (see `formrules.runs.job.execute_run`)."""
    try:
        with rt.store.session() as s:
            row = s.execute(select(Run.form_id, Run.node_path, Record.token)
                            .outerjoin(Record, Record.id == Run.record_id)
                            .where(Run.id == run_id)).first()
    except SQLAlchemyError as exc:  # the execution meets the same trouble and handles it
        log.warning("run %s: no labels for logs and metrics: %s", run_id, exc)
        row = None
    started = time.monotonic()
    result = Attempt()
    with logs.bound(run_id, row.token if row else None):
        try:
            yield result
        finally:
            if row is not None and result.outcome not in NOT_RUN:
                _record(rt, run_id, row.form_id, row.node_path, time.monotonic() - started)


def _record(rt: Runtime, run_id: str, form: str, node: str, seconds: float) -> None:
    try:
        with rt.store.session() as s:
            status = s.scalar(select(Run.status).where(Run.id == run_id)) or "gone"
    except SQLAlchemyError as exc:  # metrics never fail a job
        log.warning("run %s: status for metrics unavailable: %s", run_id, exc)
        return
    metrics.run_attempt(form, node, status, seconds)
