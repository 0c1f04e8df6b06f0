"""Redis transport: putting Runs on RQ queues, and asking RQ about them.

A Run's RQ job id is the Run id; the job's only argument is that id (JSON serializer), so
`rq info`, `rq worker` and rq-dashboard see ordinary jobs. The database decides what
runs; RQ only carries it, so every call here may fail without losing work.

What RQ does on its own, and how each is kept from doing harm here:
- a job whose worker died stays "started" until someone cleans the started registry
  (60–90 s later); replacing it (`dispatch(replace_started=True)`) removes the dead
  worker's registry entries too, so that later cleanup cannot fail or re-run the new job;
- re-enqueueing an id runs it twice: every enqueue is `unique` (scheduling too: RQ's
  `enqueue_at` ignores `unique`, so jobs are created and then scheduled uniquely), and a
  leftover job is removed first inside a WATCH transaction, so two dispatchers never
  both replace it;
- RQ's own Retry fires whatever the database says: the job aligns it on each failure
  (`formrules.runs.job`), and a job that fires for a Run that is not due simply does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import str_to_date

from formrules.store.models import Run

log = logging.getLogger("formrules.runs.queue")
JOB_FUNCTION = "formrules.runs.job.execute_run"
GRACE_SECONDS = 60  # RQ's hard timeout sits this far beyond the node's own
# RQ's scheduler moves due jobs every second; a job this overdue has no scheduler (the
# worker holding the scheduler lock died, and RQ waits up to 10 minutes to take over).
SCHEDULER_SLACK = 10.0
STARTED_GRACE = 60.0  # a started job whose Run is still pending after this is orphaned
CHUNK = 500  # ids per pipelined round trip


def connect(url: str) -> Redis:
    """A Redis client for `url` with short timeouts, so a dead Redis fails fast."""
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10,
                          health_check_interval=30)


@dataclass(frozen=True)
class JobState:
    """What Redis holds for one Run's job (read for many Runs in one round trip)."""

    exists: bool  # a job hash exists (possibly a partial one without a status)
    status: JobStatus | None = None
    scheduled_at: float | None = None  # epoch seconds, when in the scheduled registry
    started_at: datetime | None = None

    def live(self, due_at: datetime, now: float | None = None,
             started_grace: float = STARTED_GRACE) -> bool:
        """True when RQ will run this job by itself, on time, for a pending Run due then."""
        now = datetime.now(UTC).timestamp() if now is None else now
        due = (due_at if due_at.tzinfo else due_at.replace(tzinfo=UTC)).timestamp()
        if self.status in (JobStatus.QUEUED, JobStatus.DEFERRED):
            return True
        if self.status == JobStatus.SCHEDULED:
            # Scheduled much later than due (a stale RQ Retry), or overdue with nobody
            # to move it: either way it would not run when the database says.
            return self.scheduled_at is not None \
                and self.scheduled_at <= due + SCHEDULER_SLACK \
                and self.scheduled_at > now - SCHEDULER_SLACK
        if self.status == JobStatus.STARTED:
            # A worker that took the job claims its pending Run within seconds; a job
            # started long ago for a Run that is still pending lost its worker.
            return self.started_at is None or self.started_at.timestamp() > now - started_grace
        return False


NEW_JOB = JobState(exists=False)  # a Run created just now: Redis cannot hold its job yet


class Dispatcher:
    """Enqueues Runs as RQ jobs and looks jobs up without side effects."""

    def __init__(self, redis: Redis, queue_name: str, default_timeout: float = 3600):
        self.redis = redis
        self.queue = Queue(queue_name, connection=redis, serializer=JSONSerializer)
        self.default_timeout = default_timeout

    def job_states(self, run_ids: Iterable[str]) -> dict[str, JobState]:
        """The RQ state of each Run's job: one pipelined round trip per CHUNK ids."""
        ids = list(run_ids)
        states: dict[str, JobState] = {}
        scheduled_key = self.queue.scheduled_job_registry.key
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            with self.redis.pipeline(transaction=False) as pipe:
                for run_id in chunk:
                    key = Job.key_for(run_id)
                    pipe.exists(key)
                    pipe.hmget(key, "status", "started_at")
                    pipe.zscore(scheduled_key, run_id)
                replies = pipe.execute()
            for i, run_id in enumerate(chunk):
                exists, (status, started), score = replies[3 * i:3 * i + 3]
                states[run_id] = JobState(
                    exists=bool(exists),
                    status=_status(status),
                    scheduled_at=float(score) if score is not None else None,
                    started_at=_date(started))
        return states

    def job_status(self, run_id: str) -> JobStatus | None:
        """The RQ status of a Run's job, or None when Redis has no such job."""
        return self.job_states([run_id])[run_id].status

    def dispatch(self, run: Run, *, replace_started: bool = False,
                 state: JobState | None = None, started_grace: float = STARTED_GRACE) -> bool:
        """Make sure RQ will run pending `run` when due; True when a job was enqueued.

        A job that will run it on time is left alone; any other leftover (finished,
        failed, orphaned, scheduled at the wrong time) is replaced, and the new job goes to
        the front of the queue: that work already waited its turn once (a Run resumed
        after its worker died must not wait behind the whole queue). `replace_started`:
        the worker holding the job is known dead (its Run stopped heartbeating), so only
        a queued job is kept: a started one is the dead worker's, and a scheduled one is
        RQ retrying after the work-horse died, at a time the Run does not know of.
        `state` comes from `job_states` when the caller already read it.
        """
        state = state if state is not None else self.job_states([run.id])[run.id]
        if state.exists:
            keep = state.live(run.due_at, started_grace=started_grace)
            if replace_started and state.status != JobStatus.QUEUED:
                keep = False
            if keep:
                return False
            if not self._remove(run.id, state.status):
                return False  # it changed under us: another dispatcher or a worker has it
        intervals = list(run.snapshot.get("intervals", []))[max(0, run.attempt):]
        retry = Retry(max=len(intervals), interval=intervals) if intervals else None
        kwargs = dict(job_id=run.id, timeout=self.job_timeout(run), retry=retry,
                      description=f"{run.form_id} {run.node_path}: {run.title}"[:200],
                      meta={"run": run.id, "path": run.node_path})
        due = run.due_at if run.due_at.tzinfo else run.due_at.replace(tzinfo=UTC)
        try:
            if due > datetime.now(UTC):
                # `enqueue_at` ignores unique=True (RQ 2.12); `schedule_job` honours it.
                job = self.queue.create_job(JOB_FUNCTION, args=(run.id,),
                                            status=JobStatus.SCHEDULED, **kwargs)
                self.queue.schedule_job(job, due, unique=True)
            else:
                job = self.queue.create_job(JOB_FUNCTION, args=(run.id,), **kwargs)
                self.queue.enqueue_job(job, at_front=state.exists, unique=True)
        except DuplicateJobError:
            return False  # another dispatcher won the race: one job is what we want
        return True

    def job_timeout(self, run: Run) -> int:
        """RQ's hard limit: the node's `timeout:` (or the default) plus a grace period."""
        timeout = run.snapshot.get("timeout") or self.default_timeout
        return int(timeout + GRACE_SECONDS)

    def dispatch_all(self, runs: list[Run], *, new: bool = False) -> int:
        """Dispatch after commit; Redis being down is logged, the reconciler retries.

        `new`: the Runs were created by the caller's transaction just now, so no job can
        exist for them yet and RQ's state is not read first.
        """
        sent = 0
        for i, run in enumerate(runs):
            try:
                sent += self.dispatch(run, state=NEW_JOB if new else None)
            except RedisConnectionError as exc:
                # Redis is away: do not make the user wait once per Run for the same answer.
                log.warning("%d run(s) not enqueued (%s); the reconciler will",
                            len(runs) - i, exc)
                break
            except RedisError as exc:
                log.warning("run %s not enqueued (%s); the reconciler will", run.id, exc)
        return sent

    def cancel(self, run_id: str) -> None:
        """Take a queued or scheduled job off RQ (a running one stops via the database)."""
        status = self.job_status(run_id)
        if status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            self._remove(run_id, status)

    def discard(self, run_id: str) -> None:
        """Remove a Run's job in whatever state, e.g. when the Run went dead elsewhere."""
        state = self.job_states([run_id])[run_id]
        if state.exists:
            self._remove(run_id, state.status)

    def _remove(self, run_id: str, expected: JobStatus | None) -> bool:
        """Delete the job and every registry/queue entry naming it, if still `expected`.

        WATCH makes this all-or-nothing against a worker or another dispatcher changing
        the job meanwhile. The started registry holds `<id>:<execution>` entries: a dead
        worker's entry left there would later make RQ's cleanup fail or retry the job
        that replaces it, so those go too.
        """
        key = Job.key_for(run_id)
        q = self.queue
        started_key = q.started_job_registry.key
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                if _status(pipe.hget(key, "status")) != expected:
                    return False
                prefix = f"{run_id}:".encode()
                executions = [m for m in pipe.zrange(started_key, 0, -1)
                              if m.startswith(prefix)]
                pipe.multi()
                pipe.delete(key, Job.dependents_key_for(run_id), f"rq:executions:{run_id}")
                for registry in (q.scheduled_job_registry, q.finished_job_registry,
                                 q.failed_job_registry, q.canceled_job_registry,
                                 q.deferred_job_registry):
                    pipe.zrem(registry.key, run_id)
                if executions:
                    pipe.zrem(started_key, *executions)
                pipe.lrem(q.key, 0, run_id)
                pipe.lrem(q.intermediate_queue_key, 0, run_id)
                pipe.execute()
            except WatchError:
                return False
        return True


def _status(raw: bytes | None) -> JobStatus | None:
    if not raw:
        return None
    try:
        return JobStatus(raw.decode())
    except ValueError:
        return None


def _date(raw: bytes | None) -> datetime | None:
    if not raw:
        return None
    try:
        return str_to_date(raw)
    except ValueError:
        return None
