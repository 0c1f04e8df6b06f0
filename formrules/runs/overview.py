"""What RQ holds right now, read without side effects (for the operator pages).

RQ's convenient readers tidy up as they go: `registry.count` runs a cleanup that moves
expired jobs to the failed registry, and `Worker.all` deletes the registrations of workers
whose key has expired. Looking must not change what is looked at, so registries are read
with `cleanup=False` and workers are only loaded when their key still exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from redis import Redis
from rq import Queue, Worker
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer

REGISTRIES = (("started", StartedJobRegistry), ("scheduled", ScheduledJobRegistry),
              ("deferred", DeferredJobRegistry), ("failed", FailedJobRegistry),
              ("finished", FinishedJobRegistry), ("canceled", CanceledJobRegistry))


@dataclass
class QueueInfo:
    """One RQ queue: jobs waiting, and the size of each of its registries."""

    name: str
    queued: int
    registries: dict[str, int] = field(default_factory=dict)
    lane: str | None = None  # the `queue:` name rules use for it (None: not this app's)
    pending: int = 0  # the database's pending Runs on this lane
    served_by: list[str] = field(default_factory=list)  # live workers listening to it


@dataclass
class WorkerInfo:
    """One live RQ worker as it registered itself."""

    name: str
    state: str
    queues: list[str]
    current_job: str | None
    hostname: str | None
    pid: int | None
    birth: datetime | None
    last_heartbeat: datetime | None
    successful: int
    failed: int


def queues(redis: Redis, names: list[str]) -> list[QueueInfo]:
    """Counts for the named queues plus every queue RQ knows of."""
    known = {q.name for q in Queue.all(connection=redis, serializer=JSONSerializer)}
    infos = []
    for name in sorted(set(names) | known):
        queue = Queue(name, connection=redis, serializer=JSONSerializer)
        info = QueueInfo(name, queue.count)  # LLEN: no side effect
        for key, registry_class in REGISTRIES:
            registry = registry_class(queue=queue)
            info.registries[key] = registry.get_job_count(cleanup=False)
        infos.append(info)
    return infos


def lanes(redis: Redis, base: str, named: set[str], pending: dict[str, int],
          worker_infos: list[WorkerInfo]) -> list[QueueInfo]:
    """Every lane (named by the rules, holding pending Runs, or known to RQ) with its
    depth, its pending Runs and the workers serving it; RQ's other queues follow."""
    from formrules.runs.queue import lane_of, rq_name
    wanted = [rq_name(base, lane) for lane in set(named) | set(pending)]
    infos = queues(redis, wanted)
    for info in infos:
        info.lane = lane_of(base, info.name)
        info.pending = pending.get(info.lane, 0) if info.lane else 0
        info.served_by = [w.name for w in worker_infos if info.name in w.queues]
    return sorted(infos, key=lambda i: (i.lane is None, i.lane or i.name))


def workers(redis: Redis) -> list[WorkerInfo]:
    """Every worker whose registration is alive, sorted by name."""
    infos = []
    for key in sorted(Worker.all_keys(connection=redis)):
        if not redis.exists(key):
            continue  # expired: RQ's own cleanup will drop it; we only look
        worker = Worker.find_by_key(key, connection=redis, serializer=JSONSerializer)
        if worker is None:
            continue
        infos.append(WorkerInfo(
            name=worker.name, state=worker.get_state(),
            queues=[q.name for q in worker.queues], current_job=worker.get_current_job_id(),
            hostname=worker.hostname, pid=worker.pid, birth=worker.birth_date,
            last_heartbeat=worker.last_heartbeat, successful=worker.successful_job_count,
            failed=worker.failed_job_count))
    return infos
