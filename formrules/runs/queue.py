"""Redis transport: putting Runs on RQ queues, and asking RQ about them.

A Run's RQ job id is the Run id; the job's argument is that id, with what its claim would
otherwise read (`job_kwargs`; JSON serializer), so `rq info`, `rq worker` and
rq-dashboard see ordinary jobs. The database decides what
runs; RQ only carries it, so every call here may fail without losing work.

What RQ does on its own, and how each is kept from doing harm here (through RQ's public
API only: `Job.delete`, `Queue.enqueue_job`/`schedule_job`, the registries):
- a job whose worker died stays "started" until someone cleans the started registry
  (60–90 s later); replacing it (`dispatch(replace_started=True)`) deletes the job with
  `Job.delete`, which also drops the dead worker's executions, so that later cleanup
  cannot fail or re-run the new job;
- re-enqueueing an id runs it twice: every enqueue is `unique` (scheduling too: RQ's
  `enqueue_at` ignores `unique`, so jobs are created and then scheduled uniquely), and a
  leftover job is deleted first inside a WATCH transaction, so two dispatchers never
  both replace it;
- lanes: a node's `queue:` names the lane its Runs wait in; lane `default` is the RQ
  queue `settings.queue` itself, lane `slow` the RQ queue `<settings.queue>:slow`
  (`rq_name`). A Run's job always goes to its own lane (`Run.queue`), whoever dispatches
  it (a submit, the reconciler, a retry), and the leader moves delayed jobs of every
  lane (the lanes RQ registered, `lanes`) when due (`enqueue_due_scheduled`).
- RQ's Retry is not used: the database owns retry timing (`Run.due_at`), and the leader
  (`formrules.process.leader`) enqueues a retrying Run when it is due. A failed attempt
  leaves RQ's job failed; the retry replaces it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import str_to_date

from formrules.errors import RuleError
from formrules.language.tree import DEFAULT_QUEUE
from formrules.runs.snapshot import Snapshot
from formrules.store.models import Run

log = logging.getLogger("formrules.runs.queue")
JOB_FUNCTION = "formrules.runs.job.execute_run"
GRACE_SECONDS = 60  # RQ's hard timeout sits this far beyond the node's own
# RQ's scheduler moves due jobs every second; a job this overdue has no scheduler (the
# worker holding the scheduler lock died, and RQ waits up to 10 minutes to take over).
SCHEDULER_SLACK = 10.0
STARTED_GRACE = 60.0  # a started job whose Run is still pending after this is orphaned
CHUNK = 500  # ids per pipelined round trip


def rq_name(base: str, lane: str) -> str:
    """The RQ queue of lane `lane`: the app's queue for `default`, else `<base>:<lane>`."""
    return base if lane in ("", DEFAULT_QUEUE) else f"{base}:{lane}"


def lane_of(base: str, rq_queue: str) -> str | None:
    """The lane an RQ queue carries (None: not one of this app's queues)."""
    if rq_queue == base:
        return DEFAULT_QUEUE
    prefix = f"{base}:"
    return rq_queue[len(prefix):] if rq_queue.startswith(prefix) else None


def connect(url: str, timeout: float = 10.0) -> Redis:
    """A Redis client for `url` with short timeouts, so a dead or frozen Redis fails fast."""
    return Redis.from_url(url, socket_connect_timeout=min(2.0, timeout),
                          socket_timeout=timeout, health_check_interval=30)


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

    def __init__(self, redis: Redis, queue_name: str, default_timeout: float = 3600,
                 budget: float | None = None):
        self.redis = redis
        self.base = queue_name
        self._queues: dict[str, Queue] = {}
        self.queue = self.lane(DEFAULT_QUEUE)  # the default lane's RQ queue
        self.default_timeout = default_timeout
        self.budget = budget  # seconds `dispatch_all` may spend on Redis; None: no bound

    def lane(self, name: str) -> Queue:
        """The RQ queue of lane `name` (`default`, `slow`, …)."""
        return self._named(rq_name(self.base, name or DEFAULT_QUEUE))

    def lanes(self) -> list[str]:
        """The lanes RQ knows of here (queues it registered when jobs went to them)."""
        names = {DEFAULT_QUEUE}
        for key in self.redis.smembers(Queue.redis_queues_keys):
            lane = lane_of(self.base, key.decode().removeprefix(Queue.redis_queue_namespace_prefix))
            if lane is not None:
                names.add(lane)
        return sorted(names)

    def job_states(self, run_ids: Iterable[str]) -> dict[str, JobState]:
        """The RQ state of each Run's job: a pipelined round trip per CHUNK ids (and one
        more for the scheduled ones, whose time is in their own lane's registry)."""
        ids = list(run_ids)
        states: dict[str, JobState] = {}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            with self.redis.pipeline(transaction=False) as pipe:
                for run_id in chunk:
                    key = Job.key_for(run_id)
                    pipe.exists(key)
                    pipe.hmget(key, "status", "started_at", "origin")
                replies = pipe.execute()
            scheduled = [(run_id, origin.decode() if origin else self.queue.name)
                         for run_id, (status, _, origin) in zip(chunk, replies[1::2], strict=True)
                         if _status(status) == JobStatus.SCHEDULED]
            scores: dict[str, float | None] = {}
            if scheduled:
                with self.redis.pipeline(transaction=False) as pipe:
                    for run_id, origin in scheduled:
                        pipe.zscore(self._named(origin).scheduled_job_registry.key, run_id)
                    scores = dict(zip([r for r, _ in scheduled], pipe.execute(), strict=True))
            for i, run_id in enumerate(chunk):
                exists, (status, started, _) = replies[2 * i:2 * i + 2]
                score = scores.get(run_id)
                states[run_id] = JobState(
                    exists=bool(exists),
                    status=_status(status),
                    scheduled_at=float(score) if score is not None else None,
                    started_at=_date(started))
        return states

    def _named(self, rq_queue: str) -> Queue:
        """The RQ queue called `rq_queue`, built once."""
        if rq_queue not in self._queues:
            self._queues[rq_queue] = Queue(rq_queue, connection=self.redis,
                                           serializer=JSONSerializer)
        return self._queues[rq_queue]

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
        the worker holding the job is known dead (its Run stopped heartbeating), so its
        job is always replaced, even a queued one (RQ puts the job of a killed work-horse
        at the back of the queue): the resumed Run goes to the front.
        `state` comes from `job_states` when the caller already read it.
        """
        state = state if state is not None else self.job_states([run.id])[run.id]
        if state.exists:
            keep = state.live(run.due_at, started_grace=started_grace)
            if keep and not replace_started:
                return False
            if not self._remove(run.id, state.status, run.queue):
                return False  # it changed under us: another dispatcher or a worker has it
        queue = self.lane(run.queue)
        snapshot = Snapshot.load(run.snapshot)
        kwargs = dict(job_id=run.id, timeout=self.job_timeout(snapshot),
                      description=f"{run.form_id} {run.node_path}: {run.title}"[:200],
                      meta={"run": run.id, "path": run.node_path})
        due = run.due_at if run.due_at.tzinfo else run.due_at.replace(tzinfo=UTC)
        try:
            if due > datetime.now(UTC):
                # `enqueue_at` ignores unique=True (RQ 2.12); `schedule_job` honours it.
                job = queue.create_job(JOB_FUNCTION, args=(run.id,),
                                       kwargs=self.job_kwargs(run, snapshot),
                                       status=JobStatus.SCHEDULED, **kwargs)
                # RQ scores it by the whole second: the next one (never early), then the
                # exact time (`enqueue_due_scheduled` moves it to the millisecond).
                queue.schedule_job(job, due.replace(microsecond=0) + timedelta(seconds=1)
                                   if due.microsecond else due, unique=True)
                self.redis.zadd(queue.scheduled_job_registry.key,
                                {job.id: due.timestamp()}, xx=True)
            else:
                job = queue.create_job(JOB_FUNCTION, args=(run.id,),
                                       kwargs=self.job_kwargs(run, snapshot), **kwargs)
                queue.enqueue_job(job, at_front=state.exists, unique=True)
        except DuplicateJobError:
            return False  # another dispatcher won the race: one job is what we want
        return True

    def job_timeout(self, snapshot: Snapshot) -> int:
        """RQ's hard limit: the node's `timeout:` (or the default) plus a grace period."""
        return int(snapshot.timeout_seconds(self.default_timeout) + GRACE_SECONDS)

    @staticmethod
    def job_kwargs(run: Run, snapshot: Snapshot) -> dict[str, int | bool]:
        """What the job is told besides the Run id: its node's `concurrency:` (0: none),
        so a Run without a limit is not read before its claim, and whether its steps
        only write fields (`at_once`: claim, steps and end in one transaction)."""
        from formrules.runs.engine import writes_fields_only
        try:
            node = snapshot.node(run.node_path)
        except RuleError:  # a snapshot this code cannot rebuild: the job finds out
            return {}
        return {"concurrency": node.concurrency or 0, "at_once": writes_fields_only(node)}

    def dispatch_all(self, runs: list[Run], *, new: bool = False) -> int:
        """Dispatch after commit; Redis being away is logged, the reconciler delivers.

        Bounded by `budget`: once it is spent, or after the first connection failure or
        timeout, the rest is left to the reconciler (the Runs are safe in the database),
        so a dead or frozen Redis costs a request one short wait, not one per Run.
        `new`: the Runs were created by the caller's transaction just now, so no job can
        exist for them yet and RQ's state is not read first.
        """
        sent = 0
        began = time.monotonic()
        for i, run in enumerate(runs):
            if self.budget is not None and i and time.monotonic() - began > self.budget:
                log.warning("%d run(s) not enqueued (Redis is slow); the reconciler will",
                            len(runs) - i)
                break
            try:
                sent += self.dispatch(run, state=NEW_JOB if new else None)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("%d run(s) not enqueued (%s); the reconciler will",
                            len(runs) - i, exc)
                break
            except RedisError as exc:
                log.warning("run %s not enqueued (%s); the reconciler will", run.id, exc)
        return sent

    def enqueue_due_scheduled(self) -> int:
        """Move due scheduled jobs to their queues (every lane), as RQ's scheduler does
        but to the millisecond: RQ scores a scheduled job with its time truncated to the
        second and moves it once the current second reaches that, up to a second early
        (a worker would then wait for it in place). Here each score is the exact due
        time (`dispatch`) and a job moves when that time has passed. Run by the leader."""
        moved = 0
        now = time.time()
        for name in self.lanes():
            queue = self.lane(name)
            registry = queue.scheduled_job_registry
            ids = [i.decode() for i in self.redis.zrangebyscore(registry.key, 0, now)]
            if not ids:
                continue
            jobs = Job.fetch_many(ids, connection=self.redis, serializer=JSONSerializer)
            with self.redis.pipeline() as pipe:
                for job in jobs:
                    if job is not None:
                        queue.enqueue_job(job, pipeline=pipe)
                pipe.zrem(registry.key, *ids)
                pipe.execute()
            moved += sum(job is not None for job in jobs)
        return moved

    def next_scheduled(self) -> float | None:
        """When the earliest scheduled job (a Delay) comes due, as a Unix time; None when
        none is scheduled. One pipelined round trip over every lane."""
        with self.redis.pipeline(transaction=False) as pipe:
            for name in self.lanes():
                pipe.zrange(self.lane(name).scheduled_job_registry.key, 0, 0, withscores=True)
            firsts = [entries[0][1] for entries in pipe.execute() if entries]
        return min(firsts, default=None)

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

    def _remove(self, run_id: str, expected: JobStatus | None,
                lane: str = DEFAULT_QUEUE) -> bool:
        """Delete the job (`Job.delete`: queue, registries, executions) if still `expected`.

        WATCH makes this all-or-nothing against a worker or another dispatcher changing
        the job meanwhile. `Job.delete` also drops a dead worker's started executions,
        which RQ's later cleanup would otherwise fail, or retry, against the new job.
        """
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(Job.key_for(run_id))
                if _status(pipe.hget(Job.key_for(run_id), "status")) != expected:
                    return False
                try:
                    job = Job.fetch(run_id, connection=self.redis, serializer=JSONSerializer)
                except NoSuchJobError:  # a partial hash (Redis lost half of it)
                    job = Job(run_id, connection=self.redis, serializer=JSONSerializer)
                    job.origin = self.lane(lane).name
                pipe.multi()
                job.delete(pipeline=pipe)
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
