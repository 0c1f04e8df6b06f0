"""Fixes from review: redirects, cancel races, API file scope, sandbox bounds, secrets."""

from __future__ import annotations

import threading

import pytest
from jinja2.exceptions import SecurityError
from sqlalchemy import update

from formrules.config import instance_secret
from formrules.language.sandbox import evaluate
from formrules.runs import control
from formrules.runs.job import Execution
from formrules.runs.reconciler import reconcile_once
from formrules.store.models import ResultFile, Run, RunStatus
from tests.helpers import events_of, runs_of, submit, token_of
from tests.web_helpers import login, make_user

GOOD = {"name": "Ann", "email": "ann@example.com"}


@pytest.mark.parametrize("target", ["/%09/evil.example/x", "//evil.example", "/\\evil.example",
                                    "https://evil.example/", "/%0d%0a/evil.example"])
def test_login_never_redirects_off_site(app, rt, target):
    make_user(rt, "ulla")
    browser = app.test_client()
    response = login(browser, "ulla", next_path=target)
    assert response.status_code == 303
    assert response.headers["Location"] == "/"


def test_cancel_never_overwrites_a_run_a_worker_just_claimed(client, rt):
    token = token_of(submit(client, "demo", GOOD))
    with rt.store.session() as s:
        stale = s.get(Run, runs_of(rt, token)[0].id)  # read as queued by the web request
        with rt.store.session() as worker:  # meanwhile a worker claims it
            worker.execute(update(Run).where(Run.id == stale.id)
                           .values(status=RunStatus.RUNNING.value, lease="w1"))
        assert control.cancel(s, stale, "its owner") == "stopping"
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.RUNNING and run.cancel_requested is True


def test_a_cancel_during_a_failing_step_ends_cancelled_not_retrying(client, rt):
    token = token_of(submit(client, "cancel_race", {"name": "Bo"}))
    (run,) = runs_of(rt, token)
    assert Execution(rt, run.id).execute() == "cancelled"
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.CANCELLED
    assert [e.event for e in events_of(rt, run.id)][-1] == "cancel"


def test_reconciler_ends_a_pending_run_whose_cancel_was_requested(client, rt):
    token = token_of(submit(client, "demo", GOOD))
    (run,) = runs_of(rt, token)
    with rt.store.session() as s:  # the state older code could leave behind
        s.execute(update(Run).where(Run.id == run.id).values(
            status=RunStatus.RETRYING.value, cancel_requested=True))
    reconcile_once(rt, schedules=False)
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.CANCELLED
    assert "between attempts" in events_of(rt, run.id)[-1].detail


def test_api_tokens_cannot_download_operator_files(client, rt):
    from formrules.store import tokens

    token = token_of(submit(client, "demo", GOOD))
    (run,) = runs_of(rt, token)
    with rt.store.session() as s:
        api_token = tokens.create(s, "robot")
        batch_run = Run(record_id=run.record_id, form_id="demo", owner="user:9", kind="batch",
                        node_path="batches/export", title="Export", snapshot={})
        s.add(batch_run)
        s.flush()
        s.add(ResultFile(id="f" * 32, run_id=batch_run.id, owner="user:9",
                         filename="all.csv", content_type="text/csv", data=b"secret"))
    response = client.get("/api/files/" + "f" * 32,
                          headers={"Authorization": f"Bearer {api_token}"})
    assert response.status_code == 404


@pytest.mark.parametrize("expression", ["'x' * 10**8", "[1] * 10**6", "2 ** 5000",
                                        "10 ** y"])
def test_sandbox_bounds_repeat_and_power(expression):
    with pytest.raises(SecurityError):
        evaluate(expression, {"y": 10**6})
    assert evaluate("'ab' * 3", {}) == "ababab" and evaluate("2 ** 10", {}) == 1024


def test_secret_key_is_the_same_for_processes_starting_together(tmp_path):
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(instance_secret(str(tmp_path))))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]
