"""A worker's /healthz and /metrics, served by a small child process beside it.

`formrules worker --health-port 9101` starts it. It runs in its own (spawned) process:
a `--fork` worker forks a work-horse per job, and forking a process with a busy server
thread can copy held locks. It dies with the worker (PR_SET_PDEATHSIG), so a dead
worker's port stops answering (the guard's next worker serves it again). /healthz is 200
while the worker process lives and RQ lists a worker of that process in Redis (a
registration expires when its heartbeat stops; the worker re-registers after riding out
a Redis outage); /metrics sums the worker's processes (the worker with its leader
thread, earlier workers of the same guard, `--fork` work-horses) from its
PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from redis.exceptions import RedisError
from rq import Worker

from formrules.config import Settings
from formrules.process import logs, metrics
from formrules.process.children import die_with_parent
from formrules.runs.queue import connect

log = logging.getLogger("formrules.process.health")


def worker_health(redis, parent_pid: int) -> tuple[bool, dict[str, str]]:
    """Is the worker process `parent_pid` alive, and registered with RQ?"""
    checks = {"process": "ok" if os.getppid() == parent_pid else "gone"}
    host = socket.gethostname()
    try:
        found = next((w for w in Worker.all(connection=redis)
                      if w.pid == parent_pid and w.hostname == host), None)
        checks["rq"] = f"ok ({found.name}, {found.get_state()})" if found \
            else "not registered"
    except (RedisError, OSError) as exc:
        checks["rq"] = f"redis unreachable ({type(exc).__name__})"
    return all(v.startswith("ok") for v in checks.values()), checks


def serve(settings: Settings, parent_pid: int, host: str, port: int) -> None:
    """Entry point of the health process: answer until the worker goes."""
    die_with_parent()
    if os.getppid() != parent_pid:  # the worker died while we were starting up
        return
    logs.configure()
    redis = connect(settings.redis_url)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/healthz":
                ok, checks = worker_health(redis, parent_pid)
                body = json.dumps({"status": "ok" if ok else "failing",
                                   "checks": checks}).encode()
                self.answer(200 if ok else 503, body, "application/json")
            elif self.path == "/metrics":
                self.answer(200, metrics.exposition(), metrics.CONTENT_TYPE)
            else:
                self.answer(404, b"not found\n", "text/plain")

        def answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # probes every few seconds would drown the worker's own lines

    with ThreadingHTTPServer((host, port), Handler) as server:
        log.info("worker health on http://%s:%d/healthz", host, port)
        server.serve_forever()


def start(settings: Settings, host: str, port: int) -> multiprocessing.Process:
    """Start the health process for the worker in this process."""
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(settings, os.getpid(), host, port),
        name="formrules-health", daemon=True)
    process.start()
    return process
