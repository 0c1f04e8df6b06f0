"""Custom actions used by the tests (workers import this module by its dotted path).

`record_call` appends one line per real execution to a file in the instance folder
(O_APPEND, so concurrent processes cannot lose a line): the tests count those lines to
prove each step ran exactly once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from formrules.actions.registry import action
from formrules.errors import PermanentError, RetryableError


def calls_file(instance_dir: str) -> Path:
    """Where `record_call` writes."""
    return Path(instance_dir) / "calls.log"


def read_calls(instance_dir: str) -> list[str]:
    """Every line `record_call` wrote."""
    path = calls_file(instance_dir)
    return path.read_text().splitlines() if path.exists() else []


@action("record_call", {"name": "text!", "sleep": "number"})
def record_call(ctx, name: str, sleep: float = 0) -> None:
    """Note that this step really ran (then optionally sleep, reporting progress)."""
    path = calls_file(ctx.settings.instance_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{name} {ctx.idempotency_key} attempt={ctx.attempt}\n".encode())
    finally:
        os.close(fd)
    deadline = time.monotonic() + float(sleep)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        ctx.check_cancelled()


@action("flaky", {"fail_times": "int!", "message": "text"})
def flaky(ctx, fail_times: int, message: str = "upstream 503") -> None:
    """Fail (retryably) on the first `fail_times` attempts."""
    if ctx.attempt <= fail_times:
        raise RetryableError(f"flaky: {message} (attempt {ctx.attempt})",
                             "The booking service is busy; we will try again.")


@action("explode", {"permanent": "bool", "safe": "text"})
def explode(ctx, permanent: bool = False, safe: str = "") -> None:
    """Always fail; the internal text must never reach users."""
    secret = "psycopg.OperationalError: password=hunter2 at db.internal:5432"
    if permanent:
        raise PermanentError(secret, safe or None)
    if safe:
        raise RetryableError(secret, safe)
    raise RuntimeError(secret)


@action("slow", {"seconds": "number!", "steps": "int"})
def slow(ctx, seconds: float, steps: int = 10) -> None:
    """Sleep in steps, reporting progress (each report is a point where cancel applies)."""
    for i in range(steps):
        time.sleep(float(seconds) / steps)
        ctx.progress(i + 1, steps, f"part {i + 1} of {steps}")


@action("cancelled_meanwhile", {})
def cancelled_meanwhile(ctx) -> None:
    """Someone cancels the Run while this step runs; then the step fails retryably."""
    from sqlalchemy import update

    from formrules.process.runtime import current
    from formrules.store.models import Run

    with current().store.session() as s:
        s.execute(update(Run).where(Run.id == ctx.run_id).values(cancel_requested=True))
    raise RetryableError("upstream 503 right after the cancel")


@action("hold", {"name": "text!"})
def hold(ctx, name: str) -> None:
    """A step that ignores cancellation (a long call): note it started, then wait until
    the test creates `<instance>/release-<name>` (at most 60 s)."""
    record_call(ctx, name)
    release = Path(ctx.settings.instance_dir) / f"release-{name}"
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def read_intervals(instance_dir: str) -> list[tuple[str, float, float | None]]:
    """What `timed` wrote: (run id, start, end) per step execution, end None for one cut
    short (its worker killed)."""
    path = Path(instance_dir) / "timed.log"
    done: list[tuple[str, float, float | None]] = []
    open_: dict[str, float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        kind, run_id, at, _ = line.split()
        if kind == "start":
            if run_id in open_:  # started again: the earlier one never ended
                done.append((run_id, open_[run_id], None))
            open_[run_id] = float(at)
        else:
            done.append((run_id, open_.pop(run_id), float(at)))
    return done + [(run_id, start, None) for run_id, start in open_.items()]


def ran_under(instance_dir: str) -> dict[str, set[int]]:
    """What `timed` wrote: run id -> the pids of the workers whose work-horses ran it."""
    path = Path(instance_dir) / "timed.log"
    out: dict[str, set[int]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        _, run_id, _, parent = line.split()
        out.setdefault(run_id, set()).add(int(parent))
    return out


@action("timed", {"sleep": "number", "hold": "text"})
def timed(ctx, sleep: float = 0.5, hold: str = "") -> None:
    """Write when this step starts and ends (epoch seconds, and the worker's pid) to
    `<instance>/timed.log`;
    in between sleep, or with `hold`, wait for `<instance>/release-<hold>` (at most 60 s)."""
    path = Path(ctx.settings.instance_dir) / "timed.log"
    path.parent.mkdir(parents=True, exist_ok=True)

    def note(kind: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # The parent: the guard (or forking worker) running this process (tests tell
            # workers apart by the pid they started).
            os.write(fd, f"{kind} {ctx.run_id} {time.time():.6f} {os.getppid()}\n".encode())
        finally:
            os.close(fd)

    note("start")
    release = Path(ctx.settings.instance_dir) / f"release-{hold}"
    deadline = time.monotonic() + (60 if hold else float(sleep))
    while time.monotonic() < deadline and not (hold and release.exists()):
        time.sleep(0.02)
    note("end")


@action("fail_first_time", {"safe": "text"})
def fail_first_time(ctx, safe: str = "") -> None:
    """Fail for good the first time this step of this Run runs (a marker file remembers),
    then succeed: what a person's retry after a fixed outage looks like."""
    marker = Path(ctx.settings.instance_dir) / f"failed-{ctx.idempotency_key.replace('/', '_')}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("failed once")
        raise PermanentError("psycopg.OperationalError: password=hunter2 at db.internal:5432",
                             safe or None)


@action("sleep_then_set", {"seconds": "number!", "field": "text!", "value": "text!",
                            "hold": "text"})
def sleep_then_set(ctx, seconds: float, field: str, value: str, hold: str = "") -> None:
    """A step that cannot be interrupted (no cancel checks) and then writes the record:
    it sleeps `seconds`, or with `hold` waits (at most `seconds`) for the test to create
    `<instance>/release-<hold>`, so the test knows the step is still running."""
    release = Path(ctx.settings.instance_dir) / f"release-{hold}"
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline and not (hold and release.exists()):
        time.sleep(0.02)
    ctx.set(field, value)
