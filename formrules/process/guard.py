"""The worker's guard: a small parent that keeps one in-process worker running.

RQ's forking `Worker` forks a work-horse for every job: a job that crashes the
interpreter, leaks memory or blocks in C code ends with its work-horse, but the fork and
the work-horse's start and exit cost more than a short Run itself (measured:
`tests/bench_compare.py`). RQ's `SimpleWorker` runs jobs in its own process, several
times faster, with none of that isolation. The default worker is both: this guard
starts the in-process worker as its child and

- starts it again when it dies (a crash, the kernel's OOM killer), after a backoff that
  grows while it keeps dying and resets once it has run a minute;
- replaces it, between jobs, after `max_jobs` jobs or once its memory passes
  `max_memory` MiB at the end of a job (a leak in an action stays bounded);
- kills it, and what it started, when a job outlives its hard time limit by
  `KILL_GRACE` seconds (RQ's alarm cannot interrupt C code; the child reports each
  job's limit through a pipe);
- passes a stop on (SIGTERM, SIGINT: warm, the job finishes; a second one: cold).

A Run cut short by any of these is resumed from its last checkpoint by the reconciler
once its heartbeat stops, as after any lost worker. The guard imports only the standard
library (it runs as `python -m formrules.process.guard`, exec'd by `worker.main`), so it
costs about 15 MiB: the worker's Python code and the SQL it compiles live once, in the
child, warm for every job.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from formrules.process.children import die_with_parent

GUARD_FD = "FORMRULES_GUARD_FD"  # the child's end of the report pipe (environment)
KILL_GRACE = 15.0  # seconds past a job's hard limit before the child is killed
STABLE = 60.0  # a child that ran this long resets the restart backoff
MAX_BACKOFF = 30.0


class Guard:
    """Runs `command` (the in-process worker) as a child and keeps it healthy."""

    def __init__(self, command: list[str], *, max_jobs: int = 0, max_memory: int = 0,
                 kill_grace: float = KILL_GRACE):
        self.command = command
        self.kill_grace = kill_grace
        self.max_jobs = max_jobs
        self.max_memory = max_memory  # MiB; 0: no limit
        self.stops = 0  # stop signals received
        self.child: subprocess.Popen | None = None
        self.deadline: float | None = None  # monotonic; the current job's kill time
        self.jobs = 0
        self.retiring = False  # asked the child to stop between jobs (not a shutdown)
        self.once = "--burst" in command  # a burst worker ends when its queues are empty

    def log(self, message: str) -> None:
        """One line to stderr, where the child's log lines go too."""
        print(f"formrules guard: {message}", file=sys.stderr, flush=True)

    def on_signal(self, signum: int, _frame) -> None:
        """Warm stop first, cold on a second signal (RQ's own rule), for the child."""
        self.stops += 1
        if self.retiring and self.stops == 1:
            return  # being replaced, it was told to stop warm already: a second would be cold
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Start, watch and restart the child until a stop; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        backoff = 1.0
        while not self.stops:
            started = time.monotonic()
            code, ready = self.run_child()
            if self.stops or self.once:
                return 0 if code in (0, -signal.SIGTERM) else exit_code(code)
            if not ready and code > 0:  # it gave up before working (bad settings, a
                self.log(f"the worker could not start (exit code {code})")  # schema behind)
                return code
            if self.retiring:
                self.retiring = False
                continue  # replaced on purpose: a new one at once
            if time.monotonic() - started > STABLE:
                backoff = 1.0
            self.log(f"the worker exited (code {code}); starting another in {backoff:.0f} s")
            self.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)
        return 0

    def sleep(self, seconds: float) -> None:
        """Wait, but not through a stop signal."""
        until = time.monotonic() + seconds
        while not self.stops and time.monotonic() < until:
            time.sleep(0.1)

    def run_child(self) -> tuple[int, bool]:
        """One child's life: (its exit code, whether it reported ready)."""
        read_end, write_end = os.pipe()
        env = {**os.environ, GUARD_FD: str(write_end)}
        # Its own session: a terminal's Ctrl-C reaches the guard, which passes on one stop.
        self.child = subprocess.Popen(self.command, env=env, pass_fds=(write_end,),
                                      start_new_session=True, preexec_fn=die_with_parent)
        os.close(write_end)
        if self.stops:  # a stop came while it was being started: it has not seen it
            self.child.send_signal(signal.SIGTERM)
        self.deadline, self.jobs, ready = None, 0, False
        buffer = b""
        try:
            while True:
                readable, _, _ = select.select([read_end], [], [], 1.0)
                if readable:
                    chunk = os.read(read_end, 4096)
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        ready = self.report(line.decode(errors="replace")) or ready
                    if not chunk:  # the child closed its end: it is exiting
                        return self.child.wait(), ready
                code = self.child.poll()
                if code is not None:
                    return code, ready
                self.check()
        finally:
            os.close(read_end)

    def report(self, line: str) -> bool:
        """Take one line from the child: R (ready), B <limit s> (a job began), E (ended).
        True when it said it is ready."""
        kind, _, value = line.partition(" ")
        if kind == "B":
            with contextlib.suppress(ValueError):
                self.deadline = time.monotonic() + float(value) + self.kill_grace
        elif kind == "E":
            self.deadline = None
            self.jobs += 1
            if self.retiring:
                pass
            elif self.max_jobs and self.jobs >= self.max_jobs:
                self.retire(f"after {self.jobs} jobs")
            elif self.max_memory:  # between jobs: what a job leaked shows now
                used = rss_mib(self.child.pid)
                if used > self.max_memory:
                    self.retire(f"at {used:.0f} MiB (limit {self.max_memory} MiB)")
        return kind == "R"

    def check(self) -> None:
        """Kill a child stuck in a job past its limit, with what it started (its session)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.log("a job outlived its time limit; killing the worker (its Run resumes "
                     "elsewhere from its last checkpoint)")
            self.deadline = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)

    def retire(self, why: str) -> None:
        """Ask the child to stop after its current job; a fresh one replaces it."""
        self.log(f"replacing the worker {why}")
        self.retiring = True
        self.child.send_signal(signal.SIGTERM)


def exit_code(code: int) -> int:
    """A child's return code as a shell would say it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code


def setting(name: str, default: float) -> float:
    """A number from the environment; unset or empty: `default`."""
    value = os.environ.get(name) or ""
    try:
        return float(value) if value.strip() else default
    except ValueError:
        sys.exit(f"formrules guard: {name}={value!r} is not a number")


def rss_mib(pid: int) -> float:
    """A process's resident memory in MiB (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Reporter:
    """The child's side: tells the guard it is ready and when each job begins and ends."""

    def __init__(self, fd: int | None):
        self.fd = fd

    @classmethod
    def from_env(cls) -> Reporter:
        """The pipe the guard gave us, if any (none: a worker started without a guard)."""
        value = os.environ.pop(GUARD_FD, "")
        return cls(int(value) if value.isdigit() else None)

    def say(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, line.encode() + b"\n")
        except OSError:  # the guard is gone: the kernel stops us too (die_with_parent)
            self.fd = None

    def ready(self) -> None:
        self.say("R")

    def began(self, limit: float) -> None:
        self.say(f"B {limit:.0f}")

    def ended(self) -> None:
        self.say("E")


def main(argv: list[str] | None = None) -> None:
    """`python -m formrules.process.guard [worker options]`: guard an in-process worker
    started with the same options."""
    args = list(sys.argv[1:] if argv is None else argv)
    max_jobs = int(setting("FORMRULES_WORKER_MAX_JOBS", 0))
    max_memory = int(setting("FORMRULES_WORKER_MAX_MEMORY", 1024))
    grace = setting("FORMRULES_WORKER_KILL_GRACE", KILL_GRACE)
    command = [sys.executable, "-m", "formrules.process.worker", "--in-process", *args]
    try:
        code = Guard(command, max_jobs=max_jobs, max_memory=max_memory,
                     kill_grace=grace).run()
    finally:
        # The metrics directory `worker.py` made before its exec into this guard: it
        # was to go when that process ended, which this one now is.
        if os.environ.get("FORMRULES_METRICS_DIR_OWNER") == str(os.getpid()):
            shutil.rmtree(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""), ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
