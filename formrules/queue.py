"""Redis transport: putting Runs on RQ queues, and asking RQ about them.

A Run's RQ job id is the Run id; the job's only argument is that id (JSON serializer), so
`rq info`, `rq worker` and rq-dashboard see ordinary jobs. The database decides what
runs; RQ only carries it, so every call here may fail without losing work.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from .models import Run

log = logging.getLogger("formrules.queue")
JOB_FUNCTION = "formrules.job.execute_run"
LIVE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STARTED, JobStatus.DEFERRED}
GRACE_SECONDS = 60  # RQ's hard timeout sits this far beyond the node's own


def connect(url: str) -> Redis:
    """A Redis client for `url` with short timeouts, so a dead Redis fails fast."""
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10,
                          health_check_interval=30)


class Dispatcher:
    """Enqueues Runs as RQ jobs and looks jobs up without side effects."""

    def __init__(self, redis: Redis, queue_name: str, default_timeout: float = 3600):
        self.redis = redis
        self.queue = Queue(queue_name, connection=redis, serializer=JSONSerializer)
        self.default_timeout = default_timeout

    def job_status(self, run_id: str) -> JobStatus | None:
        """The RQ status of a Run's job, or None when Redis has no such job."""
        try:
            job = Job.fetch(run_id, connection=self.redis, serializer=JSONSerializer)
            return job.get_status(refresh=False)
        except NoSuchJobError:
            return None

    def is_live(self, run_id: str) -> bool:
        """True when RQ will still run (or is running) this Run's job."""
        return self.job_status(run_id) in LIVE

    def dispatch(self, run: Run, *, replace_started: bool = False) -> bool:
        """Enqueue `run` now or at its due time; False when a live job already has it.

        `replace_started`: the worker holding the job is known dead (its Run stopped
        heartbeating), so its leftover job is removed and the Run enqueued afresh.
        """
        status = self.job_status(run.id)
        if status in LIVE and not (replace_started and status == JobStatus.STARTED):
            return False
        if status is not None:  # a finished/failed/stale job hash blocks `unique`
            Job.fetch(run.id, connection=self.redis, serializer=JSONSerializer).delete()
        intervals = list(run.snapshot.get("intervals", []))[max(0, run.attempt):]
        retry = Retry(max=len(intervals), interval=intervals) if intervals else None
        timeout = run.snapshot.get("timeout") or self.default_timeout
        kwargs = dict(job_id=run.id, job_timeout=int(timeout + GRACE_SECONDS), retry=retry,
                      description=f"{run.form_id} {run.node_path}: {run.title}"[:200],
                      meta={"run": run.id, "path": run.node_path}, unique=True)
        due = run.due_at if run.due_at.tzinfo else run.due_at.replace(tzinfo=UTC)
        try:
            if due > datetime.now(UTC):
                self.queue.enqueue_at(due, JOB_FUNCTION, run.id, **kwargs)
            else:
                self.queue.enqueue(JOB_FUNCTION, run.id, **kwargs)
        except DuplicateJobError:
            return False  # another dispatcher won the race: one job is what we want
        return True

    def dispatch_all(self, runs: list[Run]) -> int:
        """Dispatch after commit; Redis being down is logged, the reconciler retries."""
        sent = 0
        for run in runs:
            try:
                sent += self.dispatch(run)
            except RedisError as exc:
                log.warning("run %s not enqueued (%s); the reconciler will", run.id, exc)
        return sent

    def cancel(self, run_id: str) -> None:
        """Take a queued or scheduled job off RQ (a running one stops via the database)."""
        try:
            job = Job.fetch(run_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return
        if job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.SCHEDULED,
                                              JobStatus.DEFERRED):
            ScheduledJobRegistry(queue=self.queue).remove(job)
            job.cancel()
