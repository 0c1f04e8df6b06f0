"""The core path with real worker processes: background work, the flag, and delays."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest

from formrules.runs.job import Execution
from formrules.store.models import RunStatus, utcnow
from tests.fixture_actions import read_calls
from tests.helpers import (
    WorkerProcess,
    events_of,
    record_of,
    runs_of,
    submit,
    token_of,
    wait_until,
)

pytestmark = pytest.mark.slow


def _delayed(rt, token):
    return next(r for r in runs_of(rt, token) if r.kind == "delay")


def test_slow_background_flips_page_to_done_and_delay_waits(client, rt, subprocess_env):
    submitted = utcnow()
    token = token_of(submit(client, "slow", {"name": "Cy"}))
    # The request returned while the 5 s of work has not even started.
    assert client.get(f"/r/{token}/status").json["done"] is False
    delayed = _delayed(rt, token)
    assert delayed.status == RunStatus.SCHEDULED
    assert delayed.due_at - delayed.created_at >= timedelta(seconds=3)
    scheduled = rt.dispatcher.queue.scheduled_job_registry
    assert scheduled.get_scheduled_time(delayed.id).timestamp() == \
        pytest.approx(delayed.due_at.timestamp(), abs=1)

    with WorkerProcess(subprocess_env) as worker:
        seen = set()

        def progressed():
            status = client.get(f"/r/{token}/status").json
            seen.add(status["runs"][0]["progress"])
            return status["done"] and status

        status = wait_until(progressed, timeout=60)
        assert status["record"]["done"] is True
        assert len({p for p in seen if 0 < p < 100}) >= 1  # progress was visible midway
        page = client.get(f"/r/{token}")
        assert b"Finished for Cy." in page.data and b"http-equiv" not in page.data
        wait_until(lambda: _delayed(rt, token).status == RunStatus.DONE, timeout=60)
        worker.stop()

    delayed = _delayed(rt, token)
    started = [e.at for e in events_of(rt, delayed.id) if e.event == "start"][0]
    assert started >= delayed.due_at >= submitted + timedelta(seconds=3)
    assert [c.split()[0] for c in read_calls(rt.settings.instance_dir)] == ["delayed"]


def test_early_job_waits_for_due_time(client, rt):
    """RQ's scheduler may fire a little early: the job waits instead of running early."""
    token = token_of(submit(client, "slow", {"name": "Di"}))
    delayed = _delayed(rt, token)
    from formrules.store.models import Run
    with rt.store.session() as s:
        s.get(Run, delayed.id).due_at = utcnow() + timedelta(seconds=1.5)
    assert Execution(rt, delayed.id).execute() == "done"
    # Not early, by the Run's own trace (no stopwatch in the test).
    started = [e.at for e in events_of(rt, delayed.id) if e.event == "start"][0]
    assert started >= _delayed(rt, token).due_at


def test_job_fired_long_before_due_leaves_run_scheduled(client, rt):
    token = token_of(submit(client, "slow", {"name": "Ed"}))
    delayed = _delayed(rt, token)
    from formrules.store.models import Run
    with rt.store.session() as s:
        s.get(Run, delayed.id).due_at = utcnow() + timedelta(minutes=10)
    assert Execution(rt, delayed.id).execute() == "not claimed"
    assert _delayed(rt, token).status == RunStatus.SCHEDULED
    assert record_of(rt, token).data["done"] is False


def test_run_whose_tree_no_longer_loads_goes_dead_at_once(client, rt):
    """An in-flight Run naming an action that has since been removed does not retry for days."""
    from formrules.store.models import Run

    token = token_of(submit(client, "demo", {"name": "Flo", "email": "flo@example.com"}))
    run = runs_of(rt, token)[0]
    with rt.store.session() as s:
        stored = s.get(Run, run.id)
        raw = copy.deepcopy(stored.snapshot["raw"])
        raw["background"]["do"][0] = {"retired_action": {"x": 1}}
        stored.snapshot = {**stored.snapshot, "raw": raw}
    from formrules.runs.job import RunFailed
    with pytest.raises(RunFailed):
        Execution(rt, run.id).execute()
    run = runs_of(rt, token)[0]
    assert run.status == RunStatus.DEAD and run.attempt == 1
    assert "unknown action 'retired_action'" in run.last_error
    assert "retired_action" not in (run.safe_error or "")
