"""Helpers for tests: submit a form the way a browser does, run jobs with real workers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rq import SimpleWorker
from rq.serializers import JSONSerializer
from sqlalchemy import select

from formrules.store.models import Record, Run, RunEvent

ROOT = Path(__file__).resolve().parents[1]


def tokens(html: bytes) -> dict[str, str]:
    """The csrf_token and submit_key hidden inputs of a rendered form."""
    found = {}
    for name in ("csrf_token", "submit_key"):
        match = re.search(rb'name="' + name.encode() + rb'" type="hidden" value="([^"]*)"', html) \
            or re.search(rb'type="hidden" name="' + name.encode() + rb'" value="([^"]*)"', html)
        if match:
            found[name] = match.group(1).decode()
    return found


def submit(client, form_id: str, data: dict, *, follow: bool = False):
    """GET the form, then POST `data` with its CSRF token and submit key."""
    page = client.get(f"/forms/{form_id}")
    assert page.status_code == 200, page.data[:500]
    return client.post(f"/forms/{form_id}", data={**tokens(page.data), **data},
                       follow_redirects=follow)


def token_of(response) -> str:
    """The record token from a submit's 303 Location."""
    assert response.status_code == 303, response.data[:2000]
    return response.headers["Location"].rsplit("/", 1)[-1]


def work(rt, *, max_jobs: int | None = None) -> None:
    """Run queued jobs in this process with a real RQ SimpleWorker until the queues (every
    lane RQ knows of, default first) are empty."""
    lanes = sorted(rt.dispatcher.lanes(), key=lambda lane: lane != "default")
    worker = SimpleWorker([rt.dispatcher.lane(lane) for lane in lanes], connection=rt.redis,
                          serializer=JSONSerializer)
    worker.work(burst=True, max_jobs=max_jobs, logging_level="WARNING")


def enqueue_due_scheduled(rt) -> int:
    """Move due scheduled jobs to the queue (what the leader does every tick); count them."""
    return rt.dispatcher.enqueue_due_scheduled()


def runs_of(rt, token: str | None = None) -> list[Run]:
    """Runs (of one record, by token), oldest first."""
    with rt.store.session() as s:
        query = select(Run).order_by(Run.created_at, Run.id)
        if token:
            record = s.scalar(select(Record).where(Record.token == token))
            query = query.where(Run.record_id == record.id)
        return list(s.scalars(query))


def record_of(rt, token: str) -> Record:
    """The record with this token, fresh."""
    with rt.store.session() as s:
        return s.scalar(select(Record).where(Record.token == token))


def events_of(rt, run_id: str) -> list[RunEvent]:
    """A Run's trace."""
    with rt.store.session() as s:
        return list(s.scalars(select(RunEvent).where(RunEvent.run_id == run_id)
                              .order_by(RunEvent.id)))


def wait_until(predicate, timeout: float = 20, interval: float = 0.05):
    """Poll `predicate` until it is truthy; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")


def examples(count: int) -> int:
    """A Hypothesis `max_examples`: all of them, or a fifth in the inner loop (`-m unit`)."""
    return max(20, count // 5) if os.environ.get("FORMRULES_TEST_INNER_LOOP") else count


def finishes(call, timeout: float):
    """Run `call` in a thread and wait for it with a deadline; return what it returned.

    For "does not hang": the test waits on its own clock instead of timing the call.
    """
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_until(lambda: not thread.is_alive(), timeout=timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class WorkerProcess:
    """A real `python worker.py` in its own process group (so it can be SIGKILLed whole)."""

    def __init__(self, env: dict[str, str], *args: str):
        self.env, self.args = env, args
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        """Start the worker (by default a guard around an in-process worker)."""
        # A file, not a pipe: a chatty worker must never block on a full pipe buffer.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py"), *self.args], env=self.env, cwd=ROOT,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        """The process that runs the jobs and may lead: the guard's in-process child for a
        default worker (waited for; a new one after a restart), else the worker itself."""
        if "--simple" in self.args or "--fork" in self.args:
            return self.process.pid
        return wait_until(lambda: self.child(), timeout=60)

    def child(self) -> int | None:
        """The guard's live in-process worker, if any."""
        return next((p for p in descendants(self.process.pid)
                     if b"--in-process" in cmdline(p) and alive(p)), None)

    def runner(self) -> int | None:
        """The process executing the current job: RQ's work-horse for `--fork` (the
        child in a process group of its own), else the in-process worker."""
        if "--fork" in self.args:
            return next((pid for pid, (ppid, group) in processes().items()
                         if ppid == self.process.pid and group == pid), None)
        return self.process.pid if "--simple" in self.args else self.child()

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (work-horse included)."""
        if self.process and self.process.poll() is None:
            # RQ puts each work-horse in a process group of its own (os.setpgrp), so the
            # worker's group alone would leave the horse running: kill every descendant.
            for pid in descendants(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> str:
        """Stop gracefully; return what it printed."""
        if self.process is None:
            return ""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        self.log.seek(0)
        output = self.log.read().decode(errors="replace")
        self.log.close()
        self.output = output  # what it printed, for tests that check its logs
        return output

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def processes() -> dict[int, tuple[int, int]]:
    """Every process on the machine: pid -> (parent pid, process group), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                continue  # it ended while we looked
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, before they can be orphaned)."""
    children: dict[int, list[int]] = {}
    for child, (ppid, _) in processes().items():
        children.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    """A process's command line, NULs and all (b"" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
