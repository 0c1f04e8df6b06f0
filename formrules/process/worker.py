"""The worker: an RQ worker that rides out Redis outages, plus a leader-election thread.

RQ's worker loop ends (or raises) when Redis goes away in the middle of a job; here it is
started again once Redis answers, with backoff and one log line per outage, after any
work-horse still running its job has finished (the Run's checkpoints are in the
database; a job cut short is resumed by the reconciler from its last one). RQ's own
scheduler is not started: the elected leader (`formrules.process.leader`) moves due jobs
and reconciles, for the whole deployment. Nothing here imports the web layer.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from redis.exceptions import RedisError
from rq import SimpleWorker, Worker
from rq.serializers import JSONSerializer

from formrules.config import Settings, from_env, parse_queues
from formrules.errors import ConfigError, FormrulesError
from formrules.language.registry import current_rules
from formrules.language.tree import DEFAULT_QUEUE, queues_of
from formrules.process import health as health_mod
from formrules.process import logs
from formrules.process.guard import Reporter
from formrules.process.leader import QUIET, Leader
from formrules.process.outage import Outage, QuietOutage
from formrules.process.runtime import Runtime, install
from formrules.process.warmup import warm

log = logging.getLogger("formrules.process.worker")


class _Stoppable:
    """Notes a stop request (SIGTERM/SIGINT) so the restart loop does not restart."""

    stopping: threading.Event

    def request_stop(self, signum, frame) -> None:
        """RQ's warm shutdown, remembered."""
        self.stopping.set()
        super().request_stop(signum, frame)  # type: ignore[misc]


class ForkingWorker(_Stoppable, Worker):
    """RQ's forking worker (a work-horse per job), forking only while the leader rests."""

    def fork_work_horse(self, job, queue) -> None:
        """Fork with `QUIET` held: no lock of the leader thread is copied mid-use."""
        with QUIET:
            super().fork_work_horse(job, queue)


class InProcessWorker(_Stoppable, SimpleWorker):
    """RQ's worker that runs jobs in its own process; under a guard (the default worker,
    `formrules.process.guard`) it reports each job's start and end to it."""

    reporter: Reporter = Reporter(None)

    def execute_job(self, job, queue) -> None:
        """Run the job, with its hard time limit told to the guard first."""
        self.reporter.began(job.timeout if job.timeout and job.timeout > 0
                            else self.default_worker_ttl)
        try:
            super().execute_job(job, queue)
        finally:
            self.reporter.ended()


def served_lanes(settings: Settings) -> list[str]:
    """The lanes this worker serves, in priority order: `settings.queues`, where `*`
    stands for every queue the rules name (default first)."""
    lanes: list[str] = []
    for name in settings.queues:
        if name == "*":
            named = queues_of(current_rules(settings.rules_dir, max_age=0))
            lanes += [DEFAULT_QUEUE, *sorted(named - {DEFAULT_QUEUE})]
        else:
            lanes.append(name)
    return list(dict.fromkeys(lanes))


def run_worker(settings: Settings, *, simple: bool = True, burst: bool = False,
               with_reconciler: bool = True, health: tuple[str, int] | None = None) -> bool:
    """Run an RQ worker on the lanes `settings.queues` names until stopped (or drained,
    with `burst`). RQ takes jobs from the first non-empty queue in that order.

    `simple`: jobs run in this process (RQ's `SimpleWorker`; under a guard, see `main`),
    else in a forked work-horse each (RQ's `Worker`).
    `health` (host, port): serve /healthz and /metrics there (see `process.health`).
    """
    reporter = Reporter.from_env()
    logs.configure(replace=False)  # here, not in one caller: `formrules worker` and worker.py alike
    rt = install(Runtime(settings))
    current_rules(settings.rules_dir, max_age=0)  # load now: problems are logged at start
    rt.store.check_schema()  # a worker never changes the schema: `formrules db upgrade` does
    warm(rt)  # before threads and the first fork: every work-horse inherits it warm
    stopping = threading.Event()
    leader = Leader(settings) if with_reconciler and not burst else None
    if leader is not None:
        leader.start()
    probe = health_mod.start(settings, *health) if health else None
    lanes = served_lanes(settings)
    queues = [rt.dispatcher.lane(name) for name in lanes]
    log.info("serving queue(s) %s", ", ".join(lanes))
    worker_class = InProcessWorker if simple else ForkingWorker
    reporter.ready()
    outage = Outage("Redis", log)
    logging.getLogger("rq.worker").addFilter(QuietOutage())
    worked = False
    if burst:  # no leader in a burst: move what is due once, as RQ's burst scheduler did
        from formrules.runs.reconciler import dispatch_due
        with contextlib.suppress(RedisError):
            dispatch_due(rt)
    try:
        while not stopping.is_set():
            worker = worker_class(queues, connection=rt.redis, serializer=JSONSerializer)
            worker.stopping = stopping
            worker.reporter = reporter
            try:
                worked = worker.work(burst=burst, logging_level=logs.level_name()) or worked
                if burst or stopping.is_set():
                    return worked
                # RQ's loop gave up (a Redis timeout or error it logged): start again.
            except RedisError as exc:
                outage.failed(exc)
            with contextlib.suppress(Exception):  # its reconnect loop would log every 2 s
                if worker.pubsub_thread is not None:
                    worker.pubsub_thread.stop()
            _await_horse(worker)
            _await_redis(rt, outage, stopping)
        return worked
    finally:
        if leader is not None:
            leader.stop.set()
            leader.join(10)
        if probe is not None and probe.is_alive():
            probe.terminate()
            probe.join(5)


def _await_horse(worker: Worker) -> None:
    """Wait for a work-horse RQ left running when its loop broke: it finishes its job."""
    pid = getattr(worker, "horse_pid", 0)
    if not pid:
        return
    log.warning("waiting for work-horse %s to finish its job", pid)
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _await_redis(rt: Runtime, outage: Outage, stopping: threading.Event) -> None:
    """Back off until Redis answers (or a stop is requested), logging once."""
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping.is_set():
            try:
                rt.redis.ping()
                outage.ok()
                return
            except RedisError as exc:
                stopping.wait(outage.failed(exc))
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """`python worker.py [--simple | --fork] [--burst] …` (see `formrules worker --help`).

    The default runs jobs in-process under a guard: this process becomes the guard (an
    exec, so none of what was imported here stays), which starts the worker itself as
    its child (`--in-process`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="Run a formrules worker.")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--simple", action="store_true",
                     help="run jobs in this process, with no guard process")
    how.add_argument("--fork", action="store_true",
                     help="fork a work-horse per job (RQ's Worker): slower, isolated per job")
    how.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    parser.add_argument("--no-reconciler", action="store_true",
                        help="never become the leader (leave reconciling to other workers)")
    parser.add_argument("--health-port", type=int, help="serve /healthz and /metrics here")
    parser.add_argument("--health-host", default="127.0.0.1")
    parser.add_argument("--queues", help="queues to serve, in priority order (default: "
                                         "FORMRULES_QUEUES, else 'default'; '*': all named)")
    args = parser.parse_args(argv)
    if not (args.simple or args.fork or args.in_process):
        os.execv(sys.executable, [sys.executable, "-m", "formrules.process.guard", *argv])
    logs.configure()
    settings = from_env()
    if args.queues:
        try:
            settings = settings.with_overrides(queues=parse_queues(args.queues))
        except ConfigError as exc:
            parser.error(str(exc))
    try:
        run_worker(settings, simple=not args.fork, burst=args.burst,
                   with_reconciler=not args.no_reconciler,
                   health=(args.health_host, args.health_port) if args.health_port else None)
    except FormrulesError as exc:  # a database behind, a bad setting: said, not a traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
