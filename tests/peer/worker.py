"""The peer's worker script: import the app's jobs once, then run RQ (`--simple`: no fork)."""

from __future__ import annotations

import os
import sys

from redis import Redis
from rq import SimpleWorker, Worker

import tests.peer.tasks  # noqa: F401  (imported once in the parent, as a worker script does)

if __name__ == "__main__":
    worker_class = SimpleWorker if "--simple" in sys.argv else Worker
    worker = worker_class(["peer"], connection=Redis.from_url(os.environ["PEER_REDIS_URL"]))
    worker.work(burst="--burst" in sys.argv, with_scheduler=True)
