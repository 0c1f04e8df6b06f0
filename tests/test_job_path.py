"""The worker's job path stays cheap and keeps its promises (issue 9): a Run whose steps
only write fields is claimed, run and ended in one transaction; a `set` goes with the next
step's transaction but is visible before that step starts; a failure on the one-transaction
path leaves nothing behind and the ordinary path decides; jobs carry what the claim would
otherwise read. Real Redis, real databases, a real RQ worker; counts, never timings."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from rq import Queue
from rq.serializers import JSONSerializer
from sqlalchemy import event, select

from formrules.process import runtime
from formrules.runs.queue import JOB_FUNCTION
from formrules.store.models import Record, Run, RunEvent, RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import submit, token_of, wait_until, work

FORMS = {
    "quick": """
form: quick
fields:
  - {name: name, type: string, required: true}
  - {name: status, type: string, hidden: true}
  - {name: greeting, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Quick
        flag: done
        do:
          - set: {status: worked}
          - set: {greeting: "Hello {{ record.name }}"}
""",
    "broken": """
form: broken
fields:
  - {name: name, type: string, required: true}
  - {name: n, type: integer, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Broken
        flag: done
        retry: false
        do:
          - set: {n: "{{ record.name + 1 }}"}
""",
    "mixed": """
form: mixed
fields:
  - {name: name, type: string, required: true}
  - {name: status, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Mixed
        flag: done
        retry: {attempts: 2, backoff: [1s]}
        do:
          - set: {status: working}
          - hold: {name: mixed}
          - set: {status: checked}
          - flaky: {fail_times: 1}
          - set: {status: finished}
""",
}


@pytest.fixture
def rules_dir(rules_dir):
    for name, text in FORMS.items():
        (rules_dir / f"{name}.yaml").write_text(text.lstrip())
    return rules_dir


@contextmanager
def transactions(rt):
    """Commits and statements sent while the block runs (PRAGMAs left out)."""
    seen = {"commits": 0, "statements": []}

    def statement(conn, cursor, text, *args):
        if not text.lstrip().upper().startswith("PRAGMA"):
            seen["statements"].append(text.split(None, 1)[0].upper())

    def commit(conn):
        seen["commits"] += 1

    engine = runtime.current().store.engine  # the one jobs run with here
    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)


def trace(rt, token: str) -> tuple[Run, list[tuple[str, str]], dict]:
    with rt.store.session() as s:
        record = s.scalar(select(Record).where(Record.token == token))
        run = s.scalar(select(Run).where(Run.record_id == record.id))
        events = [(e.event, e.path) for e in s.scalars(
            select(RunEvent).where(RunEvent.run_id == run.id).order_by(RunEvent.id))]
        return run, events, dict(record.data)


def test_a_run_that_only_writes_fields_is_one_transaction_with_its_whole_trace(client, rt):
    token = token_of(submit(client, "quick", {"name": "Ann"}))
    with transactions(rt) as seen:
        work(rt)
    run, events, data = trace(rt, token)
    assert run.status == RunStatus.DONE and run.attempt == 1
    assert data["status"] == "worked" and data["greeting"] == "Hello Ann" and data["done"]
    path = run.node_path
    assert events == [("start", ""), ("checkpoint", f"{path}/do/0"),
                      ("checkpoint", f"{path}/do/1"), ("finish", "")]
    assert seen["commits"] == 1
    assert "SELECT" not in seen["statements"]  # the claim read the record with the Run
    # Claim, ending, the whole trace in one INSERT, the record, the owner's notice.
    assert seen["statements"] == ["UPDATE", "UPDATE", "INSERT", "UPDATE", "INSERT"]


def test_a_failure_at_once_leaves_nothing_and_the_ordinary_path_records_it(client, rt):
    token = token_of(submit(client, "broken", {"name": "Bo"}))
    work(rt)
    run, events, data = trace(rt, token)
    assert run.status == RunStatus.DEAD and run.attempt == 1  # one attempt, counted once
    assert [kind for kind, _ in events] == ["start", "error", "dead"]
    assert data["n"] is None and not data["done"]  # as submitted


def test_a_set_is_visible_before_the_next_step_and_a_retry_skips_it(client, rt, worker):
    token = token_of(submit(client, "mixed", {"name": "Cy"}))
    # The slow step runs: the set before it has been saved already.
    wait_until(lambda: any(line.startswith("mixed") for line in
                           read_calls(rt.settings.instance_dir)), timeout=60)
    assert trace(rt, token)[2]["status"] == "working"
    (Path(rt.settings.instance_dir) / "release-mixed").touch()
    wait_until(lambda: trace(rt, token)[0].status == RunStatus.DONE, timeout=60)
    run, events, data = trace(rt, token)
    assert run.attempt == 2 and data["status"] == "finished" and data["done"]
    # Each step checkpointed once: the first attempt's sets were saved with its failure,
    # and the retry resumed after them (the held step did not run again).
    checkpoints = [path for kind, path in events if kind == "checkpoint"]
    assert sorted(checkpoints) == sorted(f"{run.node_path}/do/{i}" for i in range(5))
    assert [line.split()[0] for line in read_calls(rt.settings.instance_dir)] == ["mixed"]


def test_jobs_carry_the_nodes_limit_and_shape_and_older_jobs_still_run(client, rt):
    token = token_of(submit(client, "quick", {"name": "Di"}))
    run, _, _ = trace(rt, token)
    job = rt.dispatcher.lane("default").fetch_job(run.id)
    assert job.kwargs == {"concurrency": 0, "at_once": True}
    work(rt)
    assert trace(rt, token)[0].status == RunStatus.DONE

    # A job as the previous version enqueued it, the Run id alone: the ordinary path.
    token = token_of(submit(client, "quick", {"name": "Ed"}))
    run, _, _ = trace(rt, token)
    queue = Queue(rt.dispatcher.lane("default").name, connection=rt.redis,
                  serializer=JSONSerializer)
    queue.remove(run.id)
    rt.redis.delete(f"rq:job:{run.id}")
    queue.enqueue(JOB_FUNCTION, run.id, job_id=run.id)
    with transactions(rt) as seen:
        work(rt)
    run, events, data = trace(rt, token)
    assert run.status == RunStatus.DONE and data["greeting"] == "Hello Ed"
    # Its node's limit read first (not in the job), the claim, the steps with the ending.
    assert seen["commits"] == 3
    assert [kind for kind, _ in events] == ["start", "checkpoint", "checkpoint", "finish"]


def test_metrics_register_once_when_two_threads_use_them_first(monkeypatch):
    """An in-process worker's job and its leader thread may both be first: one set of
    metrics is registered, never two (prometheus_client refuses a duplicate)."""
    from formrules.process import metrics
    monkeypatch.setattr(metrics, "_built", None)
    calls, start = [], threading.Barrier(8)

    def slow_register():  # stands in for prometheus_client's registration, which raises
        calls.append(1)   # on a second one: what is counted here is how often it runs
        time.sleep(0.05)  # a wide window for a second thread to build them too
        return object()

    monkeypatch.setattr(metrics, "_register", slow_register)
    seen = []

    def use():
        start.wait()
        seen.append(metrics._m())
    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(seen) == 8 and all(m is seen[0] for m in seen)


def test_a_delay_moves_to_its_queue_when_due_to_the_millisecond_never_before(client, rt):
    """RQ scores a scheduled job by the whole second, so its scheduler moves it up to a
    second early; the leader's mover goes by the exact due time."""
    from formrules.runs.reconciler import dispatch_due
    (Path(rt.settings.rules_dir) / "soon.yaml").write_text(
        "form: soon\nfields: [{name: name, type: string}]\nevents:\n  submit:\n"
        "    - delay: {title: Soon, for: 1500ms, do: [{log: fired}]}\n")
    wait_until(lambda: client.get("/forms/soon").status_code == 200)
    token = token_of(submit(client, "soon", {"name": "Fay"}))
    run = trace(rt, token)[0]
    due = run.due_at.timestamp()
    registry = rt.dispatcher.lane("default").scheduled_job_registry
    assert rt.redis.zscore(registry.key, run.id) == pytest.approx(due, abs=1e-6)
    assert rt.dispatcher.next_scheduled() == pytest.approx(due, abs=1e-6)
    while True:
        began = time.time()
        dispatch_due(rt)  # the leader's tick (it wakes for the next Delay's due time)
        ended = time.time()
        if rt.dispatcher.lane("default").get_job_ids():
            break
        assert began < due, "a pass that began after its due time left it waiting"
        time.sleep(0.005)
    # Moved by the first pass that began once it was due (above), never by one that
    # ended before its due time. Load-proof: no bound on how long a pass takes.
    assert ended >= due
    assert rt.dispatcher.lane("default").get_job_ids() == [run.id]
    work(rt)
    run = trace(rt, token)[0]
    assert run.status == RunStatus.DONE and run.started_at >= run.due_at
