"""Redis outages and killed processes (issue 14: 1, 2, 11, 13), with real workers.

Each test runs a private redis-server it kills (SIGKILL), freezes (SIGSTOP) and brings
back on the same port, and real worker processes; it then checks that every Run is done,
that no completed step ran twice (counted by `record_call`), and that nobody restarted a
worker by hand.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter

import pytest

from formrules.process.leader import leader_of
from formrules.process.redis_server import RedisServer, free_port
from formrules.process.runtime import Runtime, install
from formrules.store.models import RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import (
    ROOT,
    WorkerProcess,
    alive,
    cmdline,
    descendants,
    events_of,
    finishes,
    runs_of,
    submit,
    token_of,
    wait_until,
)

RULES = {
    "steps": """
form: steps
title: Steps
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Three steps
        flag: done
        retry: {attempts: 3, backoff: [0s], jitter: 0}
        do:
          - record_call: {name: "a-{{ record.name }}"}
          - record_call: {name: "b-{{ record.name }}", sleep: 3}
          - record_call: {name: "c-{{ record.name }}"}
""",
    "three": """
form: three
title: Three at once
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - background: {title: One, do: [{record_call: {name: one}}]}
    - background: {title: Two, do: [{record_call: {name: two}}]}
    - background: {title: Three, do: [{record_call: {name: three}}]}
""",
    "later": """
form: later
title: Later
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - delay:
        title: Later
        for: 3s
        do: [{record_call: {name: later}}]
""",
}


@pytest.fixture(autouse=True)
def outage_rules(rules_dir):
    """The forms these tests submit."""
    for name, text in RULES.items():
        (rules_dir / f"{name}.yaml").write_text(text.lstrip())
    return rules_dir


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server this test may kill, freeze and restart (on the same port)."""
    holder = {"server": RedisServer(tmp_path / "own-redis", persist=False).start()}
    yield holder
    process = holder["server"].process
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
    holder["server"].stop()


@pytest.fixture
def on_own_redis(rt, own_redis, subprocess_env):
    """(runtime, web client, worker environment) all on the test's own Redis."""
    from formrules.web import create_app

    url = own_redis["server"].url
    settings = rt.settings.with_overrides(redis_url=url)
    own = install(Runtime(settings))
    client = create_app({"TESTING": True}, settings=settings).test_client()
    env = {**subprocess_env, "REDIS_URL": url, "FORMRULES_LEADER_LEASE": "2"}
    yield own, client, env
    install(rt)


def names(rt) -> Counter:
    """How often each `record_call` step really ran."""
    return Counter(line.split()[0] for line in read_calls(rt.settings.instance_dir))


def all_done(rt, tokens) -> bool:
    """Every Run of these records is done."""
    return all(r.status == RunStatus.DONE for t in tokens for r in runs_of(rt, t))


def horse_of(worker: WorkerProcess) -> int | None:
    """The process executing the worker's job (its in-process child by default)."""
    return worker.runner()


@pytest.mark.slow
def test_worker_rides_out_redis_killed_mid_job_and_restarted_later(on_own_redis, own_redis):
    rt, client, env = on_own_redis
    tokens = [token_of(submit(client, "steps", {"name": n})) for n in ("x", "y")]
    with WorkerProcess(env) as worker:
        wait_until(lambda: names(rt)["b-x"] == 1, timeout=60)  # in the middle of a job
        port = own_redis["server"].port
        own_redis["server"].stop(kill=True)
        down_since = time.monotonic()
        # The step in progress finishes (its checkpoints go to the database) while Redis
        # stays away for 12 s; the worker must neither exit nor need a person.
        wait_until(lambda: time.monotonic() - down_since > 12, timeout=30, interval=0.5)
        assert worker.process.poll() is None
        own_redis["server"] = RedisServer(own_redis["server"].data_dir, port=port,
                                          persist=False).start()
        wait_until(lambda: all_done(rt, tokens), timeout=120)
        assert worker.process.poll() is None
    output = worker.output
    assert names(rt) == Counter({"a-x": 1, "b-x": 1, "c-x": 1, "a-y": 1, "b-y": 1, "c-y": 1})
    # Said once per outage by each part of the worker, not once per retry.
    assert output.count("formrules.process.worker Redis unavailable") <= 1, output
    assert output.count("formrules.process.leader Redis unavailable") <= 1, output
    assert "Redis is back" in output
    assert output.lower().count("could not connect to redis") <= 1, output
    assert "Traceback" not in output, output


@pytest.mark.slow
def test_worker_rides_out_redis_frozen_mid_job(on_own_redis, own_redis):
    rt, client, env = on_own_redis
    tokens = [token_of(submit(client, "steps", {"name": n})) for n in ("x", "y")]
    with WorkerProcess(env) as worker:
        wait_until(lambda: names(rt)["b-x"] == 1, timeout=60)
        redis_pid = own_redis["server"].process.pid
        os.kill(redis_pid, signal.SIGSTOP)  # frozen: connections hang instead of failing
        try:
            frozen_since = time.monotonic()
            # Longer than the leader's 10 s socket timeout.
            wait_until(lambda: time.monotonic() - frozen_since > 12, timeout=30,
                       interval=0.5)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        wait_until(lambda: all_done(rt, tokens), timeout=120)
        assert worker.process.poll() is None
    assert names(rt) == Counter({"a-x": 1, "b-x": 1, "c-x": 1, "a-y": 1, "b-y": 1, "c-y": 1})


@pytest.mark.slow
def test_submit_does_not_wait_on_a_frozen_redis_and_work_is_done_after(on_own_redis,
                                                                         own_redis):
    rt, client, env = on_own_redis
    redis_pid = own_redis["server"].process.pid
    client.get("/forms/three")  # the form page itself needs no Redis
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        # Three Runs used to wait the 10 s socket timeout each; now one 0.5 s bound in all.
        token = token_of(finishes(lambda: submit(client, "three", {"name": "Fay"}), 5))
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert {r.status for r in runs_of(rt, token)} == {RunStatus.QUEUED}
    with WorkerProcess(env):
        wait_until(lambda: all_done(rt, [token]), timeout=60)
    assert names(rt) == Counter(one=1, two=1, three=1)


@pytest.mark.slow
def test_run_of_a_killed_work_horse_resumes_at_the_front_of_the_queue(on_own_redis):
    rt, client, env = on_own_redis
    first = token_of(submit(client, "steps", {"name": "first"}))
    with WorkerProcess(env) as worker:
        wait_until(lambda: names(rt)["b-first"] == 1, timeout=60)
        # A backlog arrives while the first Run works; then the OOM killer takes its horse.
        backlog = [token_of(submit(client, "steps", {"name": f"q{i}"})) for i in range(5)]
        os.kill(wait_until(lambda: horse_of(worker), timeout=10), signal.SIGKILL)
        wait_until(lambda: all_done(rt, [first, *backlog]), timeout=180)
    (run,) = runs_of(rt, first)
    resumed = [e.at for e in events_of(rt, run.id) if e.event == "start" and e.path == ""][1]
    starts = sorted(e.at for t in backlog for r in runs_of(rt, t)
                    for e in events_of(rt, r.id) if e.event == "start" and e.path == "")
    # Recovered within the stale limit, it runs next, not after the whole backlog.
    assert resumed < starts[3], (resumed, starts)
    assert names(rt)["a-first"] == 1 and names(rt)["c-first"] == 1


@pytest.mark.slow
def test_delay_is_on_time_after_the_leader_is_killed(on_own_redis):
    rt, client, env = on_own_redis
    with WorkerProcess(env) as first:
        wait_until(lambda: leader_of(rt) == f"{os.uname().nodename}:{first.pid}",
                   timeout=60)
        with WorkerProcess(env) as second:
            wait_until(lambda: len(rt.redis.smembers("rq:workers")) >= 2, timeout=60)
            token = token_of(submit(client, "later", {"name": "Del"}))
            first.kill()  # the leader, which would have moved the delayed job when due
            wait_until(lambda: leader_of(rt) == f"{os.uname().nodename}:"
                                                f"{second.pid}", timeout=30)
            wait_until(lambda: all_done(rt, [token]), timeout=60)
    (run,) = runs_of(rt, token)
    started = next(e.at for e in events_of(rt, run.id) if e.event == "start")
    # Never early; late by at most the lease (2 s) and a tick, not RQ's scheduler lock
    # (60 s) or the reconciler's 10 s slack for a scheduler that died.
    assert run.due_at <= started
    assert (started - run.due_at).total_seconds() < 6
    assert names(rt) == Counter(later=1)


def _child(process, needle: bytes) -> int | None:
    """A live descendant of `process` whose command line holds `needle`."""
    return next((p for p in descendants(process.pid)
                 if needle in cmdline(p).replace(b"\0", b" ") and alive(p)), None)


@pytest.mark.slow
def test_one_command_run_restarts_its_killed_worker_and_redis(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "SECRET_KEY")}
    env.update({"FORMRULES_INSTANCE": str(tmp_path / "instance"),
                "FORMRULES_RULES": str(ROOT / "tests" / "rules"),
                "FORMRULES_ACTIONS": "tests.fixture_actions", "PYTHONPATH": str(ROOT)})
    process = subprocess.Popen([sys.executable, "-m", "formrules.cli", "run", "--port",
                                str(port)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        def form_page():
            try:
                with opener.open(f"{base}/forms/slow", timeout=2) as response:
                    return response.read()
            except OSError:
                return None

        wait_until(form_page, timeout=60, interval=0.2)
        worker = wait_until(lambda: _child(process, b"formrules.process.worker"), timeout=30)
        server = wait_until(lambda: _child(process, b"-server"), timeout=30)
        os.kill(worker, signal.SIGKILL)  # the OOM killer, say
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: (_child(process, b"formrules.process.worker") or worker) != worker,
                   timeout=60)
        wait_until(lambda: (_child(process, b"-server") or server) != server, timeout=60)

        page = form_page()
        data = {name: re.search(rb'name="' + name.encode() + rb'" type="hidden" value="([^"]*)"',
                                page).group(1).decode() for name in ("csrf_token", "submit_key")}
        data["name"] = "Again"
        with opener.open(f"{base}/forms/slow", urllib.parse.urlencode(data).encode(),
                         timeout=10) as response:
            status_url = response.url + "/status"

        def done():
            with opener.open(status_url, timeout=5) as response:
                return json.loads(response.read())["done"]

        wait_until(done, timeout=120, interval=0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "the worker exited" in output and "the private Redis exited" in output
