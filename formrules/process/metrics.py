"""Prometheus metrics: what the processes count, plus the database's view at scrape time.

Counted where they happen: submits and their latency (web), each Run attempt's duration by
form and node, retries and dead Runs (the job), reconciler passes and what they did.
Read from the database and Redis on each scrape: Runs by status, due Runs waiting and
the age of the oldest, the RQ queue's depth, registered workers.

Gunicorn workers and RQ work-horses are separate processes, so metrics use
prometheus_client's multiprocess mode: every process writes to PROMETHEUS_MULTIPROC_DIR
and a scrape sums the files. That variable must be set before prometheus_client is
imported, so this module imports it only on first use and the entry points call
`use_multiprocess_dir` first.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from formrules.process.runtime import Runtime

ENV = "PROMETHEUS_MULTIPROC_DIR"
OWNER_ENV = "FORMRULES_METRICS_DIR_OWNER"  # the pid that made the private directory
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def use_multiprocess_dir() -> str:
    """Make sure PROMETHEUS_MULTIPROC_DIR is set; returns it.

    An operator's directory is used as given (it should be empty when the service
    starts: systemd's RuntimeDirectory does that). Otherwise a private one is made for
    this process and its children, removed when this process exits.
    """
    if os.environ.get(ENV):
        os.makedirs(os.environ[ENV], exist_ok=True)
        return os.environ[ENV]
    path = tempfile.mkdtemp(prefix="formrules-metrics-")
    os.environ[ENV] = path
    owner = os.getpid()
    # Said in the environment too: a process exec'd in this one's place (a worker's
    # guard, `formrules.process.guard`) has no atexit handlers, yet the same pid.
    os.environ[OWNER_ENV] = str(owner)
    # Forked children (gunicorn workers) inherit atexit handlers: only the maker removes it.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


_built: SimpleNamespace | None = None
_building = threading.Lock()


def _m() -> SimpleNamespace:
    """The metrics, registered on first use, once per process: the first uses may come
    at once from two threads (a worker's job and its leader thread, two web requests)."""
    global _built
    if _built is None:
        with _building:
            if _built is None:
                _built = _register()
    return _built


def _register() -> SimpleNamespace:
    from prometheus_client import Counter, Histogram, disable_created_metrics

    disable_created_metrics()  # *_created series double the output and say little here
    return SimpleNamespace(
        submits=Counter("formrules_submits", "Form submissions (web form or API).",
                        ["form", "channel", "outcome"]),
        submit_seconds=Histogram("formrules_submit_seconds",
                                 "Time to answer a submission, inline actions included.",
                                 ["form", "channel"]),
        run_seconds=Histogram("formrules_run_duration_seconds",
                              "One attempt of a Run, from its claim to its end.",
                              ["form", "node", "status"], buckets=RUN_BUCKETS),
        retries=Counter("formrules_run_retries", "Failed attempts that will be retried.",
                        ["form", "node"]),
        dead=Counter("formrules_runs_dead", "Runs that went dead (need an operator).",
                     ["form", "node"]),
        passes=Counter("formrules_reconciler_passes", "Reconciler passes.", ["result"]),
        pass_seconds=Histogram("formrules_reconciler_pass_seconds",
                               "Duration of one reconciler pass."),
        reconciled=Counter("formrules_reconciler_actions",
                           "What reconciler passes did, by kind.", ["action"]),
        purged=Counter("formrules_purged", "What retention removed: finished Runs, "
                       "their trace lines and result files.", ["kind"]),
        callbacks=Counter("formrules_callbacks", "Completion callback deliveries.",
                          ["outcome"]),
    )


def submitted(form: str, channel: str, status_code: int, seconds: float) -> None:
    """Count one answered submission (accepted, rejected or failed) and its latency."""
    outcome = "failed" if status_code >= 500 else "rejected" if status_code >= 400 \
        else "accepted"
    _m().submits.labels(form, channel, outcome).inc()
    _m().submit_seconds.labels(form, channel).observe(seconds)


def run_attempt(form: str, node: str, status: str, seconds: float) -> None:
    """Record the end of one attempt; `status` is the Run's status after it."""
    _m().run_seconds.labels(form, node, status).observe(seconds)
    if status == "retrying":
        _m().retries.labels(form, node).inc()
    elif status == "dead":
        _m().dead.labels(form, node).inc()


def reconciled(done: Any, seconds: float) -> None:
    """Record one reconciler pass: its `Pass` counts, or None when it failed."""
    _m().passes.labels("failed" if done is None else "ok").inc()
    _m().pass_seconds.observe(seconds)
    for action in ("recovered", "dispatched", "dead", "schedules"):
        count = getattr(done, action, 0)
        if count:
            _m().reconciled.labels(action).inc(count)


def purged(runs: int, events: int, files: int) -> None:
    """Count what one purge pass removed (`formrules_purged_total{kind}`)."""
    for kind, count in (("runs", runs), ("events", events), ("files", files)):
        if count:
            _m().purged.labels(kind).inc(count)


def callback(outcome: str) -> None:
    """Count one callback delivery attempt: delivered, retry or failed."""
    _m().callbacks.labels(outcome).inc()


def exposition(rt: Runtime | None = None) -> bytes:
    """The text a Prometheus scrape gets: this process (or all, in multiprocess mode),
    plus, given a runtime, the database's and Redis's state right now."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    _m()
    if os.environ.get(ENV):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    out = generate_latest(registry)
    if rt is not None:
        state = CollectorRegistry()
        state.register(StateCollector(rt))
        out += generate_latest(state)
    return out


class StateCollector:
    """Gauges read from the database and Redis at scrape time (true for every process)."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def collect(self):
        """Yield the state gauges; a store that is down shows as `*_up 0`."""
        from prometheus_client.core import GaugeMetricFamily
        from redis.exceptions import RedisError
        from rq import Worker
        from sqlalchemy import func, select
        from sqlalchemy.exc import SQLAlchemyError

        from formrules.store.models import PENDING, Run, RunStatus, utcnow

        db_up = GaugeMetricFamily("formrules_database_up", "1 when the database answered.")
        try:
            now = utcnow()
            with self.rt.store.session() as s:
                counts = dict(s.execute(select(Run.status, func.count())
                                        .group_by(Run.status)).all())
                due = s.execute(select(func.count(), func.min(Run.due_at)).where(
                    Run.status.in_([p.value for p in PENDING]), Run.due_at <= now)).one()
        except SQLAlchemyError:
            db_up.add_metric([], 0)
            yield db_up
        else:
            db_up.add_metric([], 1)
            yield db_up
            runs = GaugeMetricFamily("formrules_runs", "Runs by status.", labels=["status"])
            for status in RunStatus:
                runs.add_metric([status.value], counts.get(status.value, 0))
            yield runs
            yield GaugeMetricFamily("formrules_due_runs", "Pending Runs whose time has come "
                                    "(queued, or a retry or delay now due).", value=due[0])
            age = (now - due[1]).total_seconds() if due[1] is not None else 0.0
            yield GaugeMetricFamily("formrules_oldest_due_run_age_seconds",
                                    "How long the longest-waiting due Run has waited.",
                                    value=max(0.0, age))
        redis_up = GaugeMetricFamily("formrules_redis_up", "1 when Redis answered.")
        try:
            dispatcher = self.rt.dispatcher
            lanes = [(lane, dispatcher.lane(lane)) for lane in dispatcher.lanes()]
            counts = [(lane, q.count, Worker.count(queue=q)) for lane, q in lanes]
        except RedisError:
            redis_up.add_metric([], 0)
            yield redis_up
            return
        redis_up.add_metric([], 1)
        yield redis_up
        depth = GaugeMetricFamily("formrules_queue_depth", "Jobs waiting in the RQ queue, "
                                  "per lane (`queue:`).", labels=["queue"])
        workers = GaugeMetricFamily("formrules_workers", "RQ workers registered on the "
                                    "queue, per lane.", labels=["queue"])
        for lane, jobs, serving in counts:
            depth.add_metric([lane], jobs)
            workers.add_metric([lane], serving)
        yield depth
        yield workers

