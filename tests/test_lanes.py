"""Lanes and limits (issue 13.7): a node's `queue:` and `concurrency:`, workers serving
chosen queues, and a rate limit per external host for `http_request`.

Real Redis, real databases and real worker processes; every wait is a `wait_until` with a
generous limit. Short times by configuration (heartbeat 0.2 s, stale after 2 s).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import select

from formrules.actions.context import Context
from formrules.config import from_env
from formrules.errors import ConfigError, RetryableError
from formrules.language.loader import check_rules, load_rules
from formrules.language.source import Pos
from formrules.language.tree import ActionNode, queues_of
from formrules.runs import batch
from formrules.runs.engine import call_action
from formrules.runs.reconciler import dispatch_due, reconcile_once
from formrules.runs.slots import Slots
from formrules.store.models import Run, RunStatus, utcnow
from tests.fixture_actions import ran_under, read_intervals
from tests.helpers import ROOT, WorkerProcess, runs_of, submit, token_of, wait_until, work
from tests.test_ops import sample
from tests.web_helpers import workers_alive

RULES = {
    "lanes": """
form: lanes
title: Lanes
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - background:
        title: Quick lane
        do:
          - timed: {sleep: 0}
    - background:
        title: Slow lane
        queue: slow
        do:
          - timed: {sleep: 0}
""",
    "exclusive": """
form: exclusive
title: One at a time
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - background:
        title: "Exclusive {{ record.name }}"
        concurrency: 1
        do:
          - timed: {sleep: 0.4, hold: "{{ record.name if record.name == 'held' else '' }}"}
""",
    "batched": """
form: batched
title: Records a batch runs over
fields:
  - {name: name, type: string, required: true}
batches:
  one_by_one:
    title: One by one
    queue: slow
    concurrency: 1
    do:
      - timed: {sleep: 0.3}
""",
    "later": """
form: later
title: Later, on the slow lane
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - delay:
        title: Soon
        for: 1s
        queue: slow
        do:
          - timed: {sleep: 0}
""",
    "calls": """
form: calls
title: Calls a limited host
fields:
  - {name: url, type: string, required: true}
events:
  submit:
    - background:
        title: Call it
        do:
          - http_request: {url: "{{ record.url }}", method: GET}
""",
}


@pytest.fixture(autouse=True)
def lane_rules(rules_dir):
    for name, text in RULES.items():
        (rules_dir / f"{name}.yaml").write_text(text.lstrip())


def statuses(rt, token: str) -> dict[str, str]:
    return {run.title: run.status for run in runs_of(rt, token)}


# -- the checker --------------------------------------------------------------------------

def test_queue_and_concurrency_are_checked_with_positions(tmp_path):
    (tmp_path / "bad.yaml").write_text("""
form: bad
title: Bad
fields: [{name: name, type: string}]
events:
  submit:
    - background:
        queue: Slow Lane
        concurrency: 0
        do: [{log: hi}]
    - delay:
        for: 1m
        queues: slow
        do: [{log: hi}]
batches:
  export:
    queue: 7
    do: [{log: hi}]
""".lstrip())
    _, problems = check_rules(tmp_path)
    text = [str(p) for p in problems]
    assert any("bad.yaml:7:16" in t and "'queue' must be a name" in t for t in text), text
    assert any("bad.yaml:8:22" in t and "whole number >= 1" in t for t in text), text
    assert any("bad.yaml:12:9" in t and "did you mean 'queue'" in t for t in text), text
    assert any("bad.yaml:16:12" in t and "'queue' must be a name" in t for t in text), text


def test_the_rules_name_their_queues(rules_dir):
    ruleset, problems = check_rules(rules_dir)
    assert not problems
    assert {"default", "slow"} <= queues_of(ruleset)


def test_worker_queue_settings_are_checked():
    assert from_env({"FORMRULES_QUEUES": "slow, default"}).queues == ("slow", "default")
    assert from_env({}).queues == ("default",)
    with pytest.raises(ConfigError, match="not a queue name"):
        from_env({"FORMRULES_QUEUES": "slow,Fast!"})
    assert from_env({"FORMRULES_HTTP_LIMITS": "api.example.com=10/s"}).http_limits == \
        (("api.example.com", "10/second"),)
    with pytest.raises(ConfigError, match="host=N/second"):
        from_env({"FORMRULES_HTTP_LIMITS": "api.example.com=often"})


def test_a_worker_refuses_a_bad_queue_name(subprocess_env):
    for command in (["-m", "formrules.cli", "worker"], [str(ROOT / "worker.py")]):
        done = subprocess.run([sys.executable, *command, "--queues", "slow,Fast!"],
                              env=subprocess_env, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and "'Fast!' is not a queue name" in done.stderr
        assert "Traceback" not in done.stderr


# -- lanes --------------------------------------------------------------------------------

def test_a_run_records_its_queue_and_waits_on_that_rq_queue(client, operator, rt):
    token = token_of(submit(client, "lanes", {"name": "Kim"}))
    runs = {run.title: run for run in runs_of(rt, token)}
    assert runs["Quick lane"].queue == "default" and runs["Slow lane"].queue == "slow"
    assert runs["Quick lane"].id in rt.dispatcher.queue.get_job_ids()
    slow = rt.dispatcher.lane("slow")
    assert slow.name == f"{rt.settings.queue}:slow"
    assert slow.get_job_ids() == [runs["Slow lane"].id]
    page = operator.get(f"/admin/runs/{runs['Slow lane'].id}").get_data(as_text=True)
    assert "<dt>Queue</dt><dd>slow" in page
    metrics = client.get("/metrics").text
    assert sample(metrics, "formrules_queue_depth", queue="slow") == 1
    assert sample(metrics, "formrules_queue_depth", queue="default") == 1
    assert sample(metrics, "formrules_workers", queue="slow") == 0


def test_delays_and_the_reconciler_keep_a_run_on_its_queue(client, rt):
    token = token_of(submit(client, "later", {"name": "Kim"}))
    run = runs_of(rt, token)[0]
    slow = rt.dispatcher.lane("slow")
    assert slow.scheduled_job_registry.get_job_ids() == [run.id]  # the Delay, on its lane
    assert rt.dispatcher.queue.scheduled_job_registry.get_job_ids() == []
    wait_until(lambda: dispatch_due(rt) >= 0 and slow.get_job_ids() == [run.id], timeout=30)
    Redis.from_url(rt.settings.redis_url).flushall()  # Redis loses everything
    wait_until(lambda: utcnow() >= run.due_at, timeout=30)  # RQ's scheduler may be early
    assert reconcile_once(rt).dispatched == 1
    assert slow.get_job_ids() == [run.id] and rt.dispatcher.queue.get_job_ids() == []
    work(rt)
    assert runs_of(rt, token)[0].status == RunStatus.DONE


def test_two_workers_each_run_only_their_own_queue(client, rt, subprocess_env):
    tokens = [token_of(submit(client, "lanes", {"name": f"n{i}"})) for i in range(3)]
    with WorkerProcess(subprocess_env, "--queues", "slow") as slow_worker:
        # Only the slow lane is served: its Runs finish, the default lane's wait.
        wait_until(lambda: all(statuses(rt, t)["Slow lane"] == "done" for t in tokens),
                   timeout=60)
        assert all(statuses(rt, t)["Quick lane"] == "queued" for t in tokens)
        with WorkerProcess(subprocess_env, "--queues", "default") as default_worker:
            wait_until(lambda: all(statuses(rt, t)["Quick lane"] == "done" for t in tokens),
                       timeout=60)
            more = token_of(submit(client, "lanes", {"name": "later"}))
            wait_until(lambda: set(statuses(rt, more).values()) == {"done"}, timeout=60)
            pids = {"slow": slow_worker.process.pid, "default": default_worker.process.pid}
    by_run = ran_under(rt.settings.instance_dir)
    for token in [*tokens, more]:
        for run in runs_of(rt, token):
            assert by_run[run.id] == {pids[run.queue]}, (run.title, by_run[run.id], pids)


def test_queues_page_shows_depth_and_who_serves_each_queue(client, operator, rt,
                                                           subprocess_env):
    submit(client, "lanes", {"name": "Kim"})
    with WorkerProcess(subprocess_env, "--queues", "default", "--no-reconciler"):
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, timeout=60)

        def page():
            html = operator.get("/admin/queues").get_data(as_text=True)
            return html if "1 worker" in html else None
        html = wait_until(page, timeout=30)
    slow_row = html[html.index("<b>slow</b>"):].split("</tr>")[0]
    assert "no worker" in slow_row and "its Runs wait" in slow_row
    default_row = html[html.index("<b>default</b>"):].split("</tr>")[0]
    assert "1 worker" in default_row


# -- concurrency --------------------------------------------------------------------------

def assert_no_overlap(intervals, killed_at: float | None = None) -> None:
    """No two executions of the step were running at the same time."""
    spans = sorted((start, end if end is not None else killed_at, run_id)
                   for run_id, start, end in intervals)
    for (_, end, before), (start, _, after) in zip(spans, spans[1:], strict=False):
        assert end is not None and end <= start, (before, after, spans)


def test_concurrency_one_never_runs_two_at_once(client, rt, subprocess_env):
    tokens = [token_of(submit(client, "exclusive", {"name": f"n{i}"})) for i in range(4)]
    with WorkerProcess(subprocess_env), WorkerProcess(subprocess_env):
        # With two workers free, the others wait for the slot.
        wait_until(lambda: [r for t in tokens for r in runs_of(rt, t)
                            if r.waiting_for == "slot"], timeout=60)
        wait_until(lambda: all(set(statuses(rt, t).values()) == {"done"} for t in tokens),
                   timeout=90)
    intervals = read_intervals(rt.settings.instance_dir)
    assert len(intervals) == 4 and all(end is not None for _, _, end in intervals)
    assert_no_overlap(intervals)
    for token in tokens:  # waiting used no attempt
        assert [r.attempt for r in runs_of(rt, token)] == [1]
        assert [r.waiting_for for r in runs_of(rt, token)] == [None]


def test_a_slot_given_back_wakes_the_run_waiting_longest(client, rt, subprocess_env):
    # Waiting Runs look again by themselves only after FORMRULES_STALE_AFTER (here 30 s):
    # finishing well within that proves the end of a Run woke the next one.
    env = {**subprocess_env, "FORMRULES_STALE_AFTER": "30"}
    held = token_of(submit(client, "exclusive", {"name": "held"}))
    with WorkerProcess(env), WorkerProcess(env):
        wait_until(lambda: read_intervals(rt.settings.instance_dir), timeout=60)
        later = []
        for name in ("second", "third"):
            later.append(token_of(submit(client, "exclusive", {"name": name})))
            wait_until(lambda: runs_of(rt, later[-1])[0].waiting_for == "slot", timeout=60)
        Path(rt.settings.instance_dir, "release-held").touch()
        wait_until(lambda: {runs_of(rt, t)[0].status for t in (held, *later)} == {"done"},
                   timeout=20)
    started = [run_id for run_id, _, _ in sorted(read_intervals(rt.settings.instance_dir),
                                                 key=lambda i: i[1])]
    assert started == [runs_of(rt, t)[0].id for t in (held, *later)]  # first come, first served
    assert_no_overlap(read_intervals(rt.settings.instance_dir))


def test_a_killed_worker_does_not_keep_its_slot(client, rt, subprocess_env):
    held = token_of(submit(client, "exclusive", {"name": "held"}))
    with WorkerProcess(subprocess_env) as one, WorkerProcess(subprocess_env) as two:
        wait_until(lambda: read_intervals(rt.settings.instance_dir), timeout=60)
        nxt = token_of(submit(client, "exclusive", {"name": "next"}))
        wait_until(lambda: runs_of(rt, nxt)[0].waiting_for == "slot", timeout=60)
        # Not failed, not running: its owner sees it waiting for a slot.
        view = client.get(f"/r/{nxt}/status").json["runs"][0]
        assert view["status"] == "queued" and view["waiting_for"] == "slot"
        assert view["label"] == view["message"] == "Waiting for a slot"
        holder = ran_under(rt.settings.instance_dir)[runs_of(rt, held)[0].id]
        victim = one if holder == {one.process.pid} else two
        victim.kill()  # SIGKILL, work-horse included, mid-step: the slot is not released
        killed_at = time.time()
        Path(rt.settings.instance_dir, "release-held").touch()  # the resumed step goes on
        # The other worker runs both once the dead one's lease has run out.
        wait_until(lambda: {runs_of(rt, t)[0].status for t in (held, nxt)} == {"done"},
                   timeout=90)
    intervals = read_intervals(rt.settings.instance_dir)
    assert_no_overlap(intervals, killed_at)
    assert sum(end is None for _, _, end in intervals) == 1  # the step the kill cut short
    assert runs_of(rt, held)[0].recoveries == 1
    run = runs_of(rt, held)[0]
    slots = Slots(rt.redis, rt.settings.queue, "exclusive", run.node_path, 1, 2)
    assert slots.holders() == []  # every slot given back


def test_a_batch_concurrency_holds_across_batches(client, rt, subprocess_env):
    for i in range(3):
        submit(client, "batched", {"name": f"n{i}"})
    form = load_rules(rt.settings.rules_dir).form("batched")
    batch_ids = []
    for _ in range(2):  # two batches of the same definition at once
        with rt.store.session() as s:
            batch_ids.append(batch.start(s, form, "one_by_one", owner="olga",
                                         settings=rt.settings).id)
    for batch_id in batch_ids:
        batch.advance(rt, batch_id)
    with rt.store.session() as s:
        children = list(s.scalars(select(Run).where(Run.batch_id.in_(batch_ids))))
    assert len(children) == 6 and {run.queue for run in children} == {"slow"}
    with WorkerProcess(subprocess_env, "--queues", "slow"), \
            WorkerProcess(subprocess_env, "--queues", "slow"):
        wait_until(lambda: len([i for i in read_intervals(rt.settings.instance_dir)
                                if i[2] is not None]) == 6, timeout=90)
    assert_no_overlap(read_intervals(rt.settings.instance_dir))


# -- http rate limits ---------------------------------------------------------------------

class Arrivals(BaseHTTPRequestHandler):
    times: list[float] = []

    def do_GET(self):
        Arrivals.times.append(time.time())
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Arrivals.times = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Arrivals)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def call(settings, url: str) -> None:
    ctx = Context(settings=settings, form_id="f", field_types={}, data={},
                  path="events/submit/0", run_id="run1")
    call_action(ActionNode(ctx.path, Pos("t.yaml", 1, 1), "http_request",
                           {"url": url, "method": "GET"}), ctx)


def test_a_request_over_the_limit_waits_its_turn(settings, server):
    limited = settings.with_overrides(http_limits=((f"127.0.0.1:{server}", "2/second"),))
    threads = [threading.Thread(target=call, args=(limited, f"http://127.0.0.1:{server}/"))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    times = sorted(Arrivals.times)
    assert len(times) == 5  # none failed: they waited
    # A moving window of 2 per second: any three requests span a second (less the
    # request's own way from the limiter to the server).
    assert all(times[i + 2] - times[i] >= 0.8 for i in range(3)), times


def test_a_request_that_would_wait_too_long_fails_as_busy(settings, server):
    limited = settings.with_overrides(http_limits=((f"127.0.0.1:{server}", "1/minute"),),
                                      http_limit_wait_seconds=0.2)
    call(limited, f"http://127.0.0.1:{server}/")
    with pytest.raises(RetryableError) as caught:
        call(limited, f"http://127.0.0.1:{server}/")
    assert caught.value.safe_message == "A service needed for this is busy at the moment."
    assert len(Arrivals.times) == 1


def test_the_host_limit_holds_across_workers(client, rt, subprocess_env, server):
    env = {**subprocess_env, "FORMRULES_HTTP_LIMITS": f"127.0.0.1:{server}=1/second"}
    tokens = [token_of(submit(client, "calls", {"url": f"http://127.0.0.1:{server}/"}))
              for _ in range(4)]
    with WorkerProcess(env), WorkerProcess(env):
        wait_until(lambda: all(runs_of(rt, t)[0].status == RunStatus.DONE for t in tokens),
                   timeout=90)
    times = sorted(Arrivals.times)
    assert len(times) == 4
    assert all(b - a >= 0.8 for a, b in zip(times, times[1:], strict=False)), times
