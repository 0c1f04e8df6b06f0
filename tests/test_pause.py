"""Pausing a form's work: with a real worker and Redis, a paused form's Runs wait
(their attempts unused) while submits still answer; resuming lets them run."""

from __future__ import annotations

import subprocess
import sys
import time

from sqlalchemy import select

from formrules.runs import pause
from formrules.runs.reconciler import dispatch_due, dispatch_pending
from formrules.store.models import FormPause, Run
from tests.helpers import ROOT, record_of, runs_of, submit, token_of, tokens, wait_until


def cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "formrules.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_pause_submit_nothing_runs_resume_the_flag_gets_set(worker, operator, client, rt,
                                                           subprocess_env):
    page = operator.get("/admin?form=demo")
    assert b"Pause demo" in page.data
    assert operator.post("/admin/forms/demo/pause",
                         data=tokens(page.data)).status_code == 303
    # Without the CSRF token nothing changes.
    assert operator.post("/admin/forms/demo/resume").status_code == 400
    token = token_of(submit(client, "demo", {"name": "Pia", "email": "p@example.com"}))
    record = record_of(rt, token)
    assert record.data["status"] == "received"  # the inline part ran
    status = client.get(f"/r/{token}/status").get_json()
    assert status["state"] == "working" and status["paused"] is True
    assert b"paused this form" in client.get(f"/r/{token}").data
    # The worker picked the job up and put the Run back to wait: RQ has finished the
    # job, the Run is still queued, no attempt used, no flag.
    job = rt.dispatcher.queue.fetch_job(runs_of(rt, token)[0].id)
    wait_until(lambda: job.get_status(refresh=True) == "finished")
    time.sleep(1.0)  # a few reconciler passes: none may re-dispatch it while paused
    [run] = runs_of(rt, token)
    assert (run.status, run.attempt) == ("queued", 0)
    assert record_of(rt, token).data["ready"] is False
    # Resume from the CLI: the next reconciler pass dispatches what waited.
    out = cli(subprocess_env, "forms", "resume", "demo")
    assert out.returncode == 0 and "demo: resumed" in out.stdout, out.stderr
    wait_until(lambda: record_of(rt, token).data["ready"] is True, timeout=30)
    [run] = runs_of(rt, token)
    assert (run.status, run.attempt) == ("done", 1)
    assert client.get(f"/r/{token}/status").get_json()["paused"] is False


def test_the_pause_survives_in_the_database_and_the_cli_lists_it(rt, subprocess_env):
    out = cli(subprocess_env, "forms", "pause", "demo")
    assert out.returncode == 0 and "demo: paused" in out.stdout, out.stderr
    assert "demo: already paused" in cli(subprocess_env, "forms", "pause", "demo").stdout
    assert "demo\tpaused by the CLI" in cli(subprocess_env, "forms", "paused").stdout
    with rt.store.session() as s:
        assert s.get(FormPause, "demo").paused_by == "the CLI"
        assert pause.resume(s, "demo") and not pause.resume(s, "demo")


def test_due_runs_of_a_paused_form_are_not_dispatched(client, rt):
    """Delays that fall due and queued Runs wait: the reconciler skips a paused form."""
    with rt.store.session() as s:
        pause.pause(s, "demo", "test")
    token = token_of(submit(client, "demo", {"name": "Q", "email": "q@example.com"}))
    [run] = runs_of(rt, token)
    rt.dispatcher.discard(run.id)  # as if Redis lost it: only the reconciler could send it
    from formrules.runs.reconciler import Pass
    result = Pass()
    dispatch_pending(rt, result)
    assert result.dispatched == 0 and dispatch_due(rt) == 0
    with rt.store.session() as s:
        pause.resume(s, "demo")
    dispatch_pending(rt, result)
    assert result.dispatched == 1
    with rt.store.session() as s:
        assert s.scalar(select(Run.status).where(Run.id == run.id)) == "queued"
