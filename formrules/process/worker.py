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

from rq import SimpleWorker, Worker
from rq.serializers import JSONSerializer

from formrules.config import Settings, from_env
from formrules.language.loader import load_rules
from formrules.process.children import die_with_parent
from formrules.process.runtime import Runtime, install
from formrules.process.warmup import warm
from formrules.runs import reconciler

log = logging.getLogger("formrules.process.worker")


def reconciler_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of the reconciler process."""
    die_with_parent()
    if os.getppid() != parent_pid:  # the worker died while we were starting up
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reconciler %(message)s")
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
               with_reconciler: bool = True) -> bool:
    """Run an RQ worker on the app's queue until stopped (or drained, with `burst`)."""
    rt = install(Runtime(settings))
    load_rules(settings.rules_dir)  # refuse to work with rules that would not load
    rt.store.create_all()
    child = start_reconciler(settings) if with_reconciler else None
    warm(rt)  # before the first fork: every work-horse inherits a warm process
    worker_class = SimpleWorker if simple else Worker
    worker = worker_class([rt.dispatcher.queue], connection=rt.redis,
                          serializer=JSONSerializer)
    try:
        return worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
    finally:
        if child is not None and child.is_alive():
            child.terminate()
            child.join(5)


def main(argv: list[str] | None = None) -> None:
    """`python worker.py [--simple] [--burst]`."""
    parser = argparse.ArgumentParser(description="Run a formrules worker.")
    parser.add_argument("--simple", action="store_true",
                        help="run jobs in this process (no fork per job)")
    parser.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    parser.add_argument("--no-reconciler", action="store_true",
                        help="leave reconciling to other workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_worker(from_env(), simple=args.simple, burst=args.burst,
               with_reconciler=not args.no_reconciler)


if __name__ == "__main__":
    main()
