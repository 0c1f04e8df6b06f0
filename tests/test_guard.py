"""The worker's guard (`formrules.process.guard`): a real guard process around a real
child, both ways: a scripted child that plays a worker's part of the protocol (so each
rule is tested in a second, not a job's time limit), and the real default worker, whose
in-process child is SIGKILLed under a running Run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import alive, cmdline, wait_until
from tests.web_helpers import workers_alive

pytestmark = pytest.mark.integration  # real processes

# A stand-in worker: says ready, then does what its first argument says.
CHILD = textwrap.dedent('''
    import os, signal, sys, time
    fd = int(os.environ["FORMRULES_GUARD_FD"])
    say = lambda line: os.write(fd, line.encode() + b"\\n")
    mode = sys.argv[1]
    log = open(sys.argv[2], "a")
    log.write(f"start {os.getpid()}\\n"); log.flush()
    signal.signal(signal.SIGTERM, lambda *a: (log.write("term\\n"), log.flush(), sys.exit(0)))
    if mode == "broken":
        sys.exit(3)                       # never ready: a bad configuration
    say("R")
    if mode == "stuck":
        say("B 0")                        # a job with no time left, blocked for good
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        time.sleep(600)
    if mode == "jobs":
        for _ in range(3):
            say("B 60"); say("E")
    if mode == "fat":                     # a job that leaks
        say("B 60")
        ballast = bytearray(80 * 1024 * 1024)
        for i in range(0, len(ballast), 4096):
            ballast[i] = 1
        say("E")
    while True:
        time.sleep(0.05)
''')


def guard(tmp_path: Path, mode: str, **options) -> tuple[subprocess.Popen, Path]:
    """A guard process (its own session) around the scripted child; the child's log."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "child.log"
    log.touch()
    code = ("import sys; from formrules.process.guard import Guard; "
            f"sys.exit(Guard({[sys.executable, str(script), mode, str(log)]!r}, "
            + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ").run())")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                               stderr=subprocess.PIPE, text=True)
    return process, log


def starts(log: Path) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines()
            if line.startswith("start")]


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    return process.stderr.read()


def test_a_child_that_dies_is_replaced_after_a_backoff(tmp_path):
    process, log = guard(tmp_path, "idle")
    try:
        first = wait_until(lambda: starts(log), 10)[0]
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: starts(log)[1:], 10)[0]
        assert second != first and alive(second)
    finally:
        err = stop(process)
    assert "the worker exited (code -9); starting another in 1 s" in err
    assert process.returncode == 0
    assert not alive(second)  # the stop reached the child


def test_a_job_past_its_limit_gets_the_child_killed_and_replaced(tmp_path):
    process, log = guard(tmp_path, "stuck", kill_grace=0.5)
    try:
        first = wait_until(lambda: starts(log), 10)[0]
        wait_until(lambda: not alive(first), 10)  # SIGTERM is blocked: only a kill works
        wait_until(lambda: starts(log)[1:], 10)
    finally:
        err = stop(process)
    assert "a job outlived its time limit; killing the worker" in err


def test_a_child_is_retired_after_max_jobs_and_replaced_at_once(tmp_path):
    process, log = guard(tmp_path, "jobs", max_jobs=3)
    try:
        wait_until(lambda: starts(log)[1:], 10)
        assert "term" in log.read_text()  # asked to stop between jobs, not killed
    finally:
        err = stop(process)
    assert "replacing the worker after 3 jobs" in err
    assert "starting another in" not in err  # a planned replacement waits for nothing


def test_a_child_over_its_memory_limit_is_retired(tmp_path):
    process, log = guard(tmp_path, "fat", max_memory=50)
    try:
        wait_until(lambda: starts(log)[1:], 15)
    finally:
        err = stop(process)
    assert "replacing the worker at" in err and "(limit 50 MiB)" in err


def test_a_worker_that_cannot_start_stops_the_guard_with_its_code(tmp_path):
    process, log = guard(tmp_path, "broken")
    assert process.wait(10) == 3
    assert "the worker could not start (exit code 3)" in process.stderr.read()
    assert len(starts(log)) == 1  # not restarted in a loop


def test_one_stop_signal_reaches_the_child_once(tmp_path):
    process, log = guard(tmp_path, "idle")
    child = wait_until(lambda: starts(log), 10)[0]
    process.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the guard alone
    assert process.wait(10) == 0
    assert log.read_text().count("term") == 1
    assert not alive(child)


def test_the_guard_stays_small(tmp_path):
    """It imports the standard library only: the worker's code lives in the child."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, formrules.process.guard; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in "
         "('sqlalchemy', 'rq', 'redis', 'flask', 'jinja2', 'yaml')))"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_default_worker_is_a_guard_with_an_in_process_child(rt, subprocess_env):
    """A real default worker: its child is SIGKILLed, a new one takes over by itself."""
    from tests.helpers import WorkerProcess
    with WorkerProcess(subprocess_env) as worker:
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, 60)
        first = wait_until(worker.child, 10)
        assert b"formrules.process.guard" in cmdline(worker.process.pid)
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: (c := worker.child()) not in (None, first) and c, 30)
        from redis import Redis
        from rq import Worker
        redis = Redis.from_url(rt.settings.redis_url)
        wait_until(lambda: second in {w.pid for w in Worker.all(connection=redis)}, 60)
        assert alive(second) and worker.process.poll() is None
