"""The worker: an RQ worker with its scheduler, plus the reconciler in a child process.

The reconciler runs in its own (spawned) process rather than a thread, because RQ forks a
work-horse per job and forking a process with busy threads can copy held locks.
Nothing here imports the web layer.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import threading
import uuid

from rq import SimpleWorker, Worker
from rq.serializers import JSONSerializer

from formrules.config import Settings, from_env
from formrules.language.loader import load_rules
from formrules.process import health as health_mod
from formrules.process import logs
from formrules.process.children import die_with_parent
from formrules.process.runtime import Runtime, install
from formrules.runs import reconciler

log = logging.getLogger("formrules.process.worker")


def reconciler_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of the reconciler process."""
    die_with_parent()
    if os.getppid() != parent_pid:  # the worker died while we were starting up
        return
    logs.configure()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rt = install(Runtime(settings))
    reconciler.run_forever(rt, stop)


def start_reconciler(settings: Settings) -> multiprocessing.Process:
    """Start the reconciler beside this worker."""
    process = multiprocessing.get_context("spawn").Process(
        target=reconciler_main, args=(settings, os.getpid()), name="formrules-reconciler",
        daemon=True)
    process.start()
    return process


def run_worker(settings: Settings, *, simple: bool = False, burst: bool = False,
               with_reconciler: bool = True, health: tuple[str, int] | None = None) -> bool:
    """Run an RQ worker on the app's queue until stopped (or drained, with `burst`).

    `health` (host, port): serve /healthz and /metrics there (see `process.health`).
    """
    rt = install(Runtime(settings))
    load_rules(settings.rules_dir)  # refuse to work with rules that would not load
    rt.store.check_schema()  # a worker never changes the schema: `formrules db upgrade` does
    child = start_reconciler(settings) if with_reconciler else None
    worker_class = SimpleWorker if simple else Worker
    worker = worker_class([rt.dispatcher.queue], connection=rt.redis,
                          serializer=JSONSerializer, name=uuid.uuid4().hex)
    probe = health_mod.start(settings, worker.name, *health) if health else None
    try:
        return worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
    finally:
        for process in (child, probe):
            if process is not None and process.is_alive():
                process.terminate()
                process.join(5)


def main(argv: list[str] | None = None) -> None:
    """`python worker.py [--simple] [--burst]`."""
    parser = argparse.ArgumentParser(description="Run a formrules worker.")
    parser.add_argument("--simple", action="store_true",
                        help="run jobs in this process (no fork per job)")
    parser.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    parser.add_argument("--no-reconciler", action="store_true",
                        help="leave reconciling to other workers")
    parser.add_argument("--health-port", type=int, help="serve /healthz and /metrics here")
    parser.add_argument("--health-host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logs.configure()
    run_worker(from_env(), simple=args.simple, burst=args.burst,
               with_reconciler=not args.no_reconciler,
               health=(args.health_host, args.health_port) if args.health_port else None)


if __name__ == "__main__":
    main()
