"""Fault injection for durable background Runs (issue 3), on real Redis and real databases.

Workers are SIGKILLed mid-step, Redis is stopped during a submit and flushed with work
queued and delayed, actions fail and time out; each test then checks that the work got
done, once, and that users saw only safe messages. Time is short by configuration
(heartbeat 0.2 s, stale after 2 s, reconcile every 0.5 s, backoff 0–2 s): every wait is a
`wait_until` on the database with a generous limit, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from sqlalchemy import select

from formrules.cli import cli
from formrules.errors import TIMED_OUT
from formrules.language.loader import parse_form
from formrules.language.tree import DAY, DEFAULT_RETRY, RetryPolicy
from formrules.process import runtime as runtime_mod
from formrules.process.redis_server import RedisServer
from formrules.process.runtime import install
from formrules.runs.job import LOST_WORKER, execute_run
from formrules.runs.queue import GRACE_SECONDS
from formrules.runs.reconciler import dispatch_due, reconcile_once, run_forever
from formrules.store.models import Notification, Record, Run, RunStatus, utcnow
from tests.fixture_actions import read_calls
from tests.helpers import (
    WorkerProcess,
    events_of,
    finishes,
    record_of,
    runs_of,
    submit,
    token_of,
    wait_until,
    work,
)

SECRET = "hunter2"  # in the text `explode` raises: operators may see it, users never
EXPLODE_FAILED = "The step “explode” failed."  # what users read instead (errors.user_message)
INTERNAL = (SECRET, "OperationalError", "db.internal", "Traceback")
BG = "events/submit/0/background"

RULES = {
    "crash": """
form: crash
title: Crash
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
  - {name: status, type: string, hidden: true}
events:
  submit:
    - background:
        title: Four steps
        flag: done
        do:
          - record_call: {name: a}
          - record_call: {name: b, sleep: 2.5}
          - set: {status: halfway}
          - record_call: {name: c, sleep: 2.5}
          - record_call: {name: d}
""",
    "retrying": """
form: retrying
title: Retrying
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Booking
        flag: done
        retry: {attempts: 3, backoff: [1s, 2s], jitter: 0}
        do:
          - record_call: {name: before}
          - flaky: {fail_times: 2}
          - record_call: {name: after}
""",
    "doomed": """
form: doomed
title: Doomed
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
  - {name: status, type: string, hidden: true}
events:
  submit:
    - background:
        title: Doomed work
        flag: done
        retry: {attempts: 2, backoff: [1s], jitter: 0}
        do:
          - record_call: {name: before}
          - explode: {}
        on_error:
          - set: {status: "failed: {{ error.message }}"}
          - record_call: {name: on_error}
""",
    "declined": """
form: declined
title: Declined
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Charging
        flag: done
        retry: {attempts: 5, backoff: [1m]}
        do:
          - explode: {permanent: true, safe: "Your card was declined."}
""",
    "repair": """
form: repair
title: Repair
fields:
  - {name: name, type: string, required: true}
  - {name: fixed, type: boolean, hidden: true, default: false}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Needs a fix
        flag: done
        retry: {attempts: 3, backoff: [0s], jitter: 0}
        do:
          - record_call: {name: a}
          - if: "record.fixed"
            then: [{record_call: {name: b}}]
            else: [{explode: {permanent: true, safe: "We could not finish this yet."}}]
          - record_call: {name: c}
""",
    "hook": """
form: hook
title: Hook
fields:
  - {name: port, type: integer, required: true, min: 1, max: 65535}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Calling the hook
        flag: done
        retry: {attempts: 3, backoff: [0s], jitter: 0}
        do:
          - record_call: {name: before}
          - http_request: {url: "http://127.0.0.1:{{ record.port }}/hook",
                           json: {port: "{{ record.port }}"}}
""",
    "slowpoke": """
form: slowpoke
title: Slowpoke
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
  - {name: status, type: string, hidden: true}
events:
  submit:
    - background:
        title: Too slow
        flag: done
        timeout: 1s
        retry: false
        do:
          - slow: {seconds: 60, steps: 600}
        on_error:
          - set: {status: "{{ error.message }}"}
""",
    "long": """
form: long
title: Long
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: A long step
        flag: done
        timeout: 15m
        do:
          - record_call: {name: long, sleep: 5}
""",
    "mixed": """
form: mixed
title: Now and later
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Now
        flag: done
        do: [{record_call: {name: now}}]
    - delay:
        title: Later
        for: 3s
        do: [{record_call: {name: later}}]
""",
    "many": "form: many\ntitle: Twenty writers\nfields:\n"
            + "".join(f"  - {{name: f{i:02}, type: string}}\n" for i in range(20))
            + "events:\n  submit:\n"
            + "".join(f"    - background:\n        title: Field {i:02}\n        do:\n"
                      f"          - record_call: {{name: f{i:02}}}\n"
                      f"          - set: {{f{i:02}: value-{i:02}}}\n" for i in range(20)),
}


@pytest.fixture(autouse=True)
def durable_rules(rules_dir):
    """The forms these tests submit (written before the app or any worker loads rules)."""
    for name, text in RULES.items():
        (rules_dir / f"{name}.yaml").write_text(text.lstrip())
    return rules_dir


# -- helpers -----------------------------------------------------------------------------

def calls(rt) -> list[tuple[str, str, int]]:
    """(name, idempotency key, attempt) of every real execution of `record_call`."""
    out = []
    for line in read_calls(rt.settings.instance_dir):
        name, key, attempt = line.split()
        out.append((name, key, int(attempt.split("=")[1])))
    return out


def names(rt) -> Counter:
    """How often each `record_call` step really ran."""
    return Counter(name for name, _, _ in calls(rt))


def the_run(rt, token: str) -> Run:
    """The only Run of a record."""
    (run,) = runs_of(rt, token)
    return run


def done_checkpoints(rt, run_id: str) -> Counter:
    """How often each step path was checkpointed (must be once at most)."""
    return Counter(e.path for e in events_of(rt, run_id) if e.event == "checkpoint")


def scheduled_at(rt, run_id: str) -> float | None:
    """Where RQ's scheduled registry has the Run's job (epoch seconds), if there."""
    return rt.redis.zscore(rt.dispatcher.queue.scheduled_job_registry.key, run_id)


def job_of(rt, run_id: str) -> Job:
    """The Run's RQ job."""
    return Job.fetch(run_id, connection=rt.redis, serializer=JSONSerializer)


def wait_for_due(rt, run_id: str) -> None:
    """Wait until the Run's retry is due, then enqueue it as the leader's tick does."""
    with rt.store.session() as s:
        due = s.get(Run, run_id).due_at
    wait_until(lambda: utcnow() >= due + timedelta(seconds=0.05), timeout=30)
    wait_until(lambda: dispatch_due(rt), timeout=30)


def assert_user_safe(client, token: str) -> dict:
    """Everything the owner can see of a record: never internal error text."""
    status = client.get(f"/r/{token}/status")
    pages = [status, client.get(f"/r/{token}"), client.get(f"/r/{token}/part"),
             client.get("/tasks"), client.get("/notifications")]
    for page in pages:
        assert page.status_code == 200
        for text in INTERNAL:
            assert text.encode() not in page.data
    return status.json


def run_cli(rt, env: dict, *args: str):
    """`formrules <args>` through click, with the subprocess environment."""
    result = CliRunner().invoke(cli, list(args), env=env)
    # The command installed its own runtime in this process: give the tests theirs back.
    if runtime_mod.current() is not rt:
        runtime_mod.current().store.dispose()
        install(rt)
    return result


# -- 1 and 5: a worker SIGKILLed mid-step --------------------------------------------------

def horse_of(worker: WorkerProcess) -> int | None:
    """The process executing the worker's job (its in-process child by default)."""
    return worker.runner()


@pytest.mark.slow
def test_sigkilled_workers_resume_from_checkpoint_and_completed_steps_run_once(
        client, rt, subprocess_env):
    token = token_of(submit(client, "crash", {"name": "Kim"}))
    with WorkerProcess(subprocess_env) as worker:
        wait_until(lambda: names(rt)["b"] == 1, timeout=60)
        # The OOM killer takes the work-horse in the middle of step b; the worker lives on
        # (RQ would retry the job on its own schedule: the Run's heartbeat decides instead).
        os.kill(wait_until(lambda: horse_of(worker), timeout=10), signal.SIGKILL)
        wait_until(lambda: names(rt)["c"] == 1, timeout=60)
        worker.kill()  # then the whole worker (horse, reconciler too), in the middle of c
    with WorkerProcess(subprocess_env):
        wait_until(lambda: the_run(rt, token).status == RunStatus.DONE, timeout=60)

    run = the_run(rt, token)
    # Completed steps ran exactly once; each interrupted step ran again (same key).
    assert names(rt) == Counter(a=1, b=2, c=2, d=1)
    keys = {name: {key for n, key, _ in calls(rt) if n == name} for name in "abcd"}
    assert keys["b"] == {f"{run.id}:{BG}/do/1"} and keys["c"] == {f"{run.id}:{BG}/do/3"}
    assert set(done_checkpoints(rt, run.id).values()) == {1}
    assert len(done_checkpoints(rt, run.id)) == 5
    record = record_of(rt, token)
    assert record.data["done"] is True and record.data["status"] == "halfway"
    # Recovered by the Run's heartbeat (not RQ's 60–90 s cleanup); the lost attempts do
    # not count against the retry policy.
    recovered = [e for e in events_of(rt, run.id) if e.event == "recover"]
    assert len(recovered) == 2 and all("no heartbeat" in e.detail for e in recovered)
    assert run.recoveries == 2 and run.attempt == 1

    # RQ's own cleanup of the dead workers' started entries, whenever it comes, finds
    # nothing of this Run: it can neither fail the job that replaced it nor run it again.
    registry = StartedJobRegistry(rt.settings.queue, connection=rt.redis,
                                  serializer=JSONSerializer)
    registry.cleanup(timestamp=time.time() + 10 ** 6)
    assert job_of(rt, run.id).get_status() == JobStatus.FINISHED
    assert run.id not in rt.dispatcher.queue.failed_job_registry.get_job_ids()
    assert rt.dispatcher.queue.count == 0 and scheduled_at(rt, run.id) is None
    assert reconcile_once(rt).dispatched == 0
    assert the_run(rt, token).status == RunStatus.DONE


def test_reconciler_gives_up_on_crash_loops_and_finishes_cancels(client, rt):
    """What the reconciler decides for a silent Run, short of killing workers 5 times."""
    looping, hopeless, stopping = (
        the_run(rt, token_of(submit(client, "doomed", {"name": n}))) for n in "LHS")
    silent = utcnow() - timedelta(seconds=60)  # its worker died a minute ago
    with rt.store.session() as s:
        for run, recoveries, cancel in ((looping, 4, False), (hopeless, 5, False),
                                        (stopping, 0, True)):
            row = s.get(Run, run.id)
            row.status, row.lease, row.heartbeat_at = RunStatus.RUNNING.value, "gone", silent
            row.attempt, row.recoveries, row.cancel_requested = 1, recoveries, cancel
    done = reconcile_once(rt, schedules=False)
    assert (done.recovered, done.dead) == (1, 1)
    # The 5th loss: queued once more, but only to run on_error and tell the owner.
    with rt.store.session() as s:
        assert s.get(Run, looping.id).status == RunStatus.QUEUED
        assert s.get(Run, hopeless.id).status == RunStatus.DEAD
        assert s.get(Run, stopping.id).status == RunStatus.CANCELLED
    assert set(rt.dispatcher.queue.get_job_ids()) == {looping.id}  # the others' jobs: gone
    work(rt)
    with rt.store.session() as s:
        looped = s.get(Run, looping.id)
        record = s.get(Record, looped.record_id)
        notes = list(s.scalars(select(Notification.message)))
    assert looped.status == RunStatus.DEAD and looped.safe_error == LOST_WORKER
    assert record.data["status"] == f"failed: {LOST_WORKER}"
    assert names(rt) == Counter(on_error=1)  # the steps that kill workers did not run again
    assert notes == [f"Doomed work: {LOST_WORKER}"] * 2  # both crash loops told their owner


# -- 4: the outbox and the reconciler -----------------------------------------------------

@pytest.mark.slow
def test_redis_down_at_submit_user_gets_confirmation_and_run_completes_after(
        rt, tmp_path, subprocess_env):
    from formrules.web import create_app

    server = RedisServer(tmp_path / "own-redis", persist=False).start()
    try:
        settings = rt.settings.with_overrides(redis_url=server.url)
        app = create_app({"TESTING": True}, settings=settings)
        client = app.test_client()
        env = {**subprocess_env, "REDIS_URL": server.url}
        with WorkerProcess(env):  # workers keep running through the outage
            server.stop(kill=True)
            # Confirmed, and not after hanging on the dead Redis.
            token = token_of(finishes(lambda: submit(client, "mixed", {"name": "Lou"}), 30))
            page = client.get(f"/r/{token}")
            assert page.status_code == 200 and b"Now" in page.data
            assert client.get(f"/r/{token}/status").json["done"] is False
            # The outbox: both Runs are in the database (the same one `rt` reads).
            assert {r.status for r in runs_of(rt, token)} == \
                {RunStatus.QUEUED, RunStatus.SCHEDULED}

            server = RedisServer(tmp_path / "own-redis", port=server.port,
                                 persist=False).start()
            wait_until(lambda: {r.status for r in runs_of(rt, token)} == {RunStatus.DONE},
                       timeout=90)
        assert names(rt) == Counter(now=1, later=1)
        assert client.get(f"/r/{token}/status").json["done"] is True
        delayed = next(r for r in runs_of(rt, token) if r.kind == "delay")
        started = [e.at for e in events_of(rt, delayed.id) if e.event == "start"]
        assert started[0] >= delayed.due_at
    finally:
        server.stop()
        install(rt)


@pytest.mark.slow
def test_redis_flushed_with_work_queued_and_delayed_all_completes(client, rt,
                                                                   subprocess_env):
    tokens = [token_of(submit(client, "mixed", {"name": f"P{i}"})) for i in range(3)]
    queue = rt.dispatcher.queue
    assert queue.count == 3 and len(queue.scheduled_job_registry) == 3
    rt.redis.flushall()  # Redis restarted without persistence: every job is gone

    with WorkerProcess(subprocess_env):
        wait_until(lambda: all(r.status == RunStatus.DONE for t in tokens
                               for r in runs_of(rt, t)), timeout=90)
    assert names(rt) == Counter(now=3, later=3)  # all of it, each exactly once
    for token in tokens:
        assert record_of(rt, token).data["done"] is True
        delayed = next(r for r in runs_of(rt, token) if r.kind == "delay")
        assert [e.at for e in events_of(rt, delayed.id) if e.event == "start"][0] \
            >= delayed.due_at  # re-created at its stored due time, not early


def test_reconciler_replaces_vanished_jobs_once_even_when_passes_race(client, rt):
    tokens = [token_of(submit(client, "mixed", {"name": f"R{i}"})) for i in range(3)]
    runs = [r for t in tokens for r in runs_of(rt, t)]
    background = [r for r in runs if r.kind == "background"]
    delayed = [r for r in runs if r.kind == "delay"]
    queue = rt.dispatcher.queue
    job_of(rt, delayed[0].id).delete()  # a delayed job vanished
    job_of(rt, background[0].id).delete()  # and a queued one
    assert queue.count == 2 and len(queue.scheduled_job_registry) == 2
    # A pass reads only what is due: the vanished Delay is replaced when it comes due.
    assert reconcile_once(rt, schedules=False).dispatched == 1
    assert background[0].id in queue.get_job_ids()
    job_of(rt, background[0].id).delete()
    with rt.store.session() as s:
        s.get(Run, delayed[0].id).due_at = utcnow()

    # Four reconcilers (one per worker) run the same pass at the same moment.
    results, barrier = [], threading.Barrier(4)

    def one_pass():
        barrier.wait()
        results.append(reconcile_once(rt, schedules=False))

    threads = [threading.Thread(target=one_pass) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(r.dispatched for r in results) == 2
    assert sorted(queue.get_job_ids()) == sorted(r.id for r in [*background, delayed[0]])
    for run in delayed[1:]:  # once each, and the others still wait for their time
        assert scheduled_at(rt, run.id) == pytest.approx(run.due_at.timestamp(), abs=1)
    assert reconcile_once(rt, schedules=False).dispatched == 0


def test_reconciler_moves_overdue_delayed_job_when_no_scheduler_runs(client, rt):
    token = token_of(submit(client, "mixed", {"name": "Sam"}))
    delayed = next(r for r in runs_of(rt, token) if r.kind == "delay")
    # The worker holding RQ's scheduler lock died: its lock lives 60 s more and the other
    # workers only try to take over every 10 minutes. Here: due 30 s ago, still scheduled.
    with rt.store.session() as s:
        s.get(Run, delayed.id).due_at = utcnow() - timedelta(seconds=30)
    rt.redis.zadd(rt.dispatcher.queue.scheduled_job_registry.key,
                  {delayed.id: time.time() - 30})
    assert reconcile_once(rt, schedules=False).dispatched == 1
    assert delayed.id in rt.dispatcher.queue.get_job_ids()
    assert scheduled_at(rt, delayed.id) is None
    work(rt)
    assert names(rt) == Counter(now=1, later=1)


def test_job_states_reads_every_job_in_one_pipeline(client, rt):
    token = token_of(submit(client, "mixed", {"name": "Ida"}))
    now_run, later_run = sorted(runs_of(rt, token), key=lambda r: r.kind)
    states = rt.dispatcher.job_states([now_run.id, later_run.id, "no-such-run"])
    assert states[now_run.id].status == JobStatus.QUEUED
    assert states[later_run.id].status == JobStatus.SCHEDULED
    assert states[later_run.id].scheduled_at == pytest.approx(later_run.due_at.timestamp(),
                                                              abs=1)
    assert not states["no-such-run"].exists
    assert states[now_run.id].live(now_run.due_at)
    assert states[later_run.id].live(later_run.due_at)
    work(rt)
    finished = rt.dispatcher.job_states([now_run.id])[now_run.id]
    assert finished.status == JobStatus.FINISHED and not finished.live(now_run.due_at)


# -- 2: retries with backoff ---------------------------------------------------------------

def test_flaky_action_is_done_on_attempt_3_with_backoff_honoured(client, rt):
    token = token_of(submit(client, "retrying", {"name": "Flo"}))
    run = the_run(rt, token)
    for attempt, backoff in ((1, 1.0), (2, 2.0)):
        work(rt)
        run = the_run(rt, token)
        assert run.status == RunStatus.RETRYING and run.attempt == attempt
        starts = [e.at for e in events_of(rt, run.id) if e.event == "start" and e.path == ""]
        # The next attempt is due `backoff` after this one failed (jitter: 0) …
        assert run.due_at - starts[-1] >= timedelta(seconds=backoff)
        assert run.due_at - utcnow() <= timedelta(seconds=backoff)
        # … and RQ does not retry on its own: the database's due time decides.
        assert job_of(rt, run.id).get_status() == JobStatus.FAILED
        assert scheduled_at(rt, run.id) is None and rt.dispatcher.queue.count == 0
        status = client.get(f"/r/{token}/status").json["runs"][0]
        assert status["status"] == "retrying" and status["attempt"] == attempt
        assert status["max_attempts"] == 3
        assert status["next_retry_at"] == run.due_at.isoformat(timespec="seconds")
        assert status["error"] == "The booking service is busy; we will try again."
        # The internal message is not shown; which step failed (its action) is.
        assert "upstream 503" not in json.dumps(status) and status["error_step"] == "flaky"
        wait_for_due(rt, run.id)

    work(rt)
    run = the_run(rt, token)
    assert run.status == RunStatus.DONE and run.attempt == 3
    starts = [e.at for e in events_of(rt, run.id) if e.event == "start" and e.path == ""]
    retries = [e for e in events_of(rt, run.id) if e.event == "retry"]
    assert len(starts) == 3 and len(retries) == 2
    assert starts[1] - starts[0] >= timedelta(seconds=1)  # never earlier than the backoff
    assert starts[2] - starts[1] >= timedelta(seconds=2)
    assert names(rt) == Counter(before=1, after=1)  # the step before the flaky one: once
    assert record_of(rt, token).data["done"] is True


def test_retry_policy_intervals_exponential_capped_and_jittered():
    exact = RetryPolicy(attempts=12, exponential_base=10, exponential_max=DAY, jitter=0)
    assert exact.intervals() == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240]
    capped = RetryPolicy(attempts=20, exponential_base=60, exponential_max=3600, jitter=0)
    assert capped.intervals()[-5:] == [3600] * 5
    rng = random.Random(7)
    for _ in range(200):
        jittered = RetryPolicy(attempts=15, exponential_base=10, exponential_max=DAY,
                               jitter=0.25).intervals(rng)
        for i, wait in enumerate(jittered):
            base = min(10 * 2 ** i, DAY)
            assert base * 0.75 - 1 <= wait <= base * 1.25 + 1
    spread = {tuple(RetryPolicy(5, (100,), jitter=0.5).intervals(rng)) for _ in range(20)}
    assert len(spread) > 1  # jitter really spreads retries apart
    # The default: increasing quickly, then once a day.
    plain = RetryPolicy(DEFAULT_RETRY.attempts, DEFAULT_RETRY.backoff, jitter=0).intervals()
    assert plain == sorted(plain) and plain[0] <= 60 and plain[-1] == DAY
    assert all(b * 0.9 - 1 <= w <= b * 1.1 + 1 for w, b in
               zip(DEFAULT_RETRY.intervals(rng), plain, strict=True))


def test_retry_exponential_is_parsed_from_yaml():
    form, problems = parse_form(
        "form: x\nfields: [{name: ok, type: boolean, hidden: true}]\nevents:\n  submit:\n"
        "    - background:\n        flag: ok\n"
        "        retry: {attempts: 6, backoff: exponential, base: 30s, max: 2m, jitter: 0}\n"
        "        do: [{log: hi}]\n", "x.yaml")
    assert problems == []
    policy = form.events["submit"][0].retry
    assert policy.intervals() == [30, 60, 120, 120, 120]


# -- 3: the dead list, on_error, safe messages ----------------------------------------------

def test_always_failing_run_goes_dead_runs_on_error_once_user_sees_safe_message(
        client, rt, subprocess_env):
    token = token_of(submit(client, "doomed", {"name": "Dee"}))
    run = the_run(rt, token)
    work(rt)
    assert the_run(rt, token).status == RunStatus.RETRYING
    assert assert_user_safe(client, token)["runs"][0]["error"] == EXPLODE_FAILED
    wait_for_due(rt, run.id)
    work(rt)

    run = the_run(rt, token)
    assert run.status == RunStatus.DEAD and run.attempt == 2
    assert names(rt) == Counter(before=1, on_error=1)
    # on_error saw the error; the user sees which step failed, never the internal text
    # (the safe message rule: `explode` gave no message meant for users).
    assert record_of(rt, token).data["status"] == f"failed: {EXPLODE_FAILED}"
    status = assert_user_safe(client, token)
    assert status["failed"] is True and status["done"] is True
    assert status["runs"][0]["error"] == EXPLODE_FAILED
    assert EXPLODE_FAILED.encode() in client.get(f"/r/{token}").data
    with rt.store.session() as s:
        notes = list(s.scalars(select(Notification.message)
                               .where(Notification.run_id == run.id)))
    assert notes == [f"Doomed work: {EXPLODE_FAILED}"]
    # Operators see the full detail.
    assert SECRET in run.last_error and "Traceback" in run.last_error
    # Kept for an operator, and not revived: neither by RQ nor by the reconciler.
    job = job_of(rt, run.id)
    assert job.get_status() == JobStatus.FAILED and not job.retries_left
    assert scheduled_at(rt, run.id) is None and rt.dispatcher.queue.count == 0
    assert reconcile_once(rt).dispatched == 0 and dispatch_due(rt) == 0
    # once more from the CLI: the dead list, and the detail for operators
    listed = run_cli(rt, subprocess_env, "runs", "list", "--status", "dead")
    assert listed.exit_code == 0 and run.id in listed.output and "dead" in listed.output
    shown = run_cli(rt, subprocess_env, "runs", "show", run.id)
    assert shown.exit_code == 0, shown.output
    assert SECRET in shown.output and EXPLODE_FAILED in shown.output
    for event in ("start", "checkpoint", "error", "retry", "dead"):
        assert f" {event} " in shown.output


def test_permanent_error_is_dead_at_once_with_the_actions_safe_message(client, rt):
    token = token_of(submit(client, "declined", {"name": "Pat"}))
    work(rt)
    run = the_run(rt, token)
    assert run.status == RunStatus.DEAD and run.attempt == 1 and run.max_attempts == 5
    assert not [e for e in events_of(rt, run.id) if e.event == "retry"]
    assert scheduled_at(rt, run.id) is None and rt.dispatcher.queue.count == 0
    status = assert_user_safe(client, token)
    assert status["runs"][0]["error"] == "Your card was declined."
    assert SECRET in run.last_error


# -- the CLI: list, show, retry, cancel ----------------------------------------------------

def test_cli_retry_of_dead_run_resumes_after_completed_steps(client, rt, subprocess_env):
    token = token_of(submit(client, "repair", {"name": "Rex"}))
    work(rt)
    run = the_run(rt, token)
    assert run.status == RunStatus.DEAD and names(rt) == Counter(a=1)
    assert assert_user_safe(client, token)["runs"][0]["error"] == \
        "We could not finish this yet."

    with rt.store.session() as s:  # an operator fixes what made it fail …
        record = s.get(Record, run.record_id)
        record.data = {**record.data, "fixed": True}
    retried = run_cli(rt, subprocess_env, "runs", "retry", run.id)  # … and retries it
    assert retried.exit_code == 0 and f"{run.id}: queued" in retried.output
    assert the_run(rt, token).status == RunStatus.QUEUED
    assert rt.dispatcher.queue.get_job_ids() == [run.id]
    work(rt)

    run = the_run(rt, token)
    assert run.status == RunStatus.DONE and run.attempt == 1
    assert names(rt) == Counter(a=1, b=1, c=1)  # `a` was not repeated
    assert record_of(rt, token).data["done"] is True
    again = run_cli(rt, subprocess_env, "runs", "cancel", run.id)
    assert again.exit_code == 1 and "cannot be cancelled" in again.output
    missing = run_cli(rt, subprocess_env, "runs", "retry", "nosuchrun")
    assert missing.exit_code == 1 and "no such run" in missing.output


def test_cli_cancel_of_retrying_run_stops_its_retry(client, rt, subprocess_env):
    token = token_of(submit(client, "retrying", {"name": "Cal"}))
    work(rt)
    run = the_run(rt, token)
    assert run.status == RunStatus.RETRYING
    cancelled = run_cli(rt, subprocess_env, "runs", "cancel", run.id)
    assert cancelled.exit_code == 0 and f"{run.id}: cancelled" in cancelled.output
    wait_until(lambda: utcnow() >= run.due_at + timedelta(seconds=0.05), timeout=30)
    assert dispatch_due(rt) == 0 and rt.dispatcher.queue.count == 0  # the retry never comes
    listed = run_cli(rt, subprocess_env, "runs", "list")
    assert run.id in listed.output and "cancelled" in listed.output

    # Even a job RQ still held would find nothing to do: the database decides.
    rt.dispatcher.dispatch(run)  # a stale job from before the cancel, say
    work(rt)
    assert the_run(rt, token).status == RunStatus.CANCELLED
    assert names(rt) == Counter(before=1)
    assert reconcile_once(rt).dispatched == 0


# -- 6: idempotency keys ------------------------------------------------------------------

class Receiver(BaseHTTPRequestHandler):
    """A service that is busy (503) the first time, then accepts; it notes every call."""

    seen: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 — http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.headers.get("Idempotency-Key", ""), body))
        self.send_response(503 if len(self.seen) == 1 else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        """Quiet."""


def test_http_request_sends_same_idempotency_key_on_every_retry(client, rt):
    Receiver.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        token = token_of(submit(client, "hook", {"port": str(port)}))
        work(rt)  # attempt 1 gets a 503; with the 0 s backoff it is due at once
        assert dispatch_due(rt) == 1
        work(rt)
    finally:
        server.shutdown()
        server.server_close()
    run = the_run(rt, token)
    assert run.status == RunStatus.DONE and run.attempt == 2
    key = f"{run.id}:{BG}/do/1"
    assert Receiver.seen == [(key, {"port": str(port)})] * 2  # a receiver can drop repeats
    assert calls(rt) == [("before", f"{run.id}:{BG}/do/0", 1)]


# -- 7: timeouts and long runs -------------------------------------------------------------

def test_step_exceeding_timeout_fails_with_took_longer(client, rt):
    token = token_of(submit(client, "slowpoke", {"name": "Tim"}))
    assert job_of(rt, the_run(rt, token).id).timeout == 1 + GRACE_SECONDS
    work(rt)  # stopped by its 1 s timeout: the 60 s of work would have ended "done"
    run = the_run(rt, token)
    assert run.status == RunStatus.DEAD and run.safe_error == TIMED_OUT
    assert "took longer" in assert_user_safe(client, token)["runs"][0]["error"]
    assert record_of(rt, token).data["status"] == TIMED_OUT  # on_error ran despite it
    assert "timed out" in run.last_error


def test_long_step_keeps_heartbeating_and_is_never_recovered(client, rt):
    token = token_of(submit(client, "long", {"name": "Lee"}))
    run = the_run(rt, token)
    # RQ's hard limit derives from the node's `timeout: 15m`, not RQ's 180 s default.
    assert job_of(rt, run.id).timeout == 15 * 60 + GRACE_SECONDS
    # A reconciler runs all along (stale after 2 s) while the 5 s step works.
    stop, beats = threading.Event(), set()

    def watch() -> None:
        while not stop.wait(0.25):
            current = the_run(rt, token)
            if current.status == RunStatus.RUNNING:
                beats.add(current.heartbeat_at)

    threads = [threading.Thread(target=run_forever, args=(rt, stop)),
               threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    try:
        work(rt)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    run = the_run(rt, token)
    assert run.status == RunStatus.DONE and run.attempt == 1 and run.recoveries == 0
    assert not [e for e in events_of(rt, run.id) if e.event == "recover"]
    assert names(rt) == Counter(long=1)
    assert len(beats) >= 5 and max(beats) - min(beats) >= timedelta(seconds=3)


# -- 8: concurrent writes -----------------------------------------------------------------

def test_twenty_concurrent_runs_writing_twenty_fields_lose_no_update(client, rt):
    token = token_of(submit(client, "many", {}))
    runs = runs_of(rt, token)
    assert len(runs) == 20
    barrier, outcomes = threading.Barrier(20), {}

    def execute(run_id: str) -> None:
        barrier.wait()
        outcomes[run_id] = execute_run(run_id)

    threads = [threading.Thread(target=execute, args=(r.id,)) for r in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(outcomes.values()) == {"done"}
    data = record_of(rt, token).data
    assert {f"f{i:02}": data[f"f{i:02}"] for i in range(20)} == \
        {f"f{i:02}": f"value-{i:02}" for i in range(20)}
    assert sorted(name for name, _, _ in calls(rt)) == [f"f{i:02}" for i in range(20)]
