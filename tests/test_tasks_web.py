"""My tasks: cancel (queued, scheduled, running on both worker classes), delete, download,
notifications, and that no user ever reaches another user's Runs or files."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from sqlalchemy import select, update

from formrules.runs.queue import JOB_FUNCTION
from formrules.runs.reconciler import reconcile_once
from formrules.store.models import Notification, ResultFile, Run, RunStatus, utcnow
from tests.fixture_actions import read_calls
from tests.helpers import (
    WorkerProcess,
    events_of,
    runs_of,
    submit,
    token_of,
    wait_until,
    work,
)
from tests.web_helpers import add_web_rules, login, make_user, post

WORKER_CLASSES = {"SimpleWorker": ("--simple",), "Worker": ()}


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


def run_of(rt, token: str) -> Run:
    """The one Run of a record."""
    (run,) = runs_of(rt, token)
    return run


def status_of(rt, run_id: str) -> str:
    """A Run's status, fresh from the database."""
    with rt.store.session() as s:
        return s.get(Run, run_id).status


def leave_stale_job(rt, run_id: str) -> None:
    """Put the Run's job back on RQ, as if Redis had missed the cancel (it was down)."""
    assert rt.dispatcher.job_status(run_id) in (None, JobStatus.CANCELED)
    with contextlib.suppress(NoSuchJobError):
        Job.fetch(run_id, connection=rt.redis, serializer=JSONSerializer).delete()
    rt.dispatcher.queue.enqueue(JOB_FUNCTION, run_id, job_id=run_id)


def drain(env: dict, worker_args: tuple[str, ...]) -> None:
    """Run a real worker of the given class until the queue is empty."""
    worker = WorkerProcess(env, "--burst", "--no-reconciler", *worker_args).start()
    worker.process.wait(60)
    worker.stop()


def assert_stale_job_does_nothing(rt, run_id: str, env, worker_args) -> None:
    """A job RQ still held for a cancelled Run runs on a real worker and changes nothing."""
    leave_stale_job(rt, run_id)
    drain(env, worker_args)
    assert read_calls(rt.settings.instance_dir) == []
    assert status_of(rt, run_id) == RunStatus.CANCELLED


@pytest.mark.slow
@pytest.mark.parametrize("worker_args", WORKER_CLASSES.values(), ids=WORKER_CLASSES.keys())
def test_cancel_queued_run_takes_it_off_the_queue(client, rt, subprocess_env, worker_args):
    run = run_of(rt, token_of(submit(client, "crunch", {"name": "Ann"})))
    assert rt.dispatcher.job_status(run.id) == JobStatus.QUEUED

    response = post(client, f"/tasks/{run.id}/cancel")

    assert response.status_code == 303
    assert status_of(rt, run.id) == RunStatus.CANCELLED
    assert rt.dispatcher.queue.count == 0  # taken off RQ, not just marked
    assert "was cancelled" in client.get("/tasks").get_data(as_text=True)
    # Even a job RQ still held would find the Run cancelled and do nothing.
    assert_stale_job_does_nothing(rt, run.id, subprocess_env, worker_args)


@pytest.mark.slow
@pytest.mark.parametrize("worker_args", WORKER_CLASSES.values(), ids=WORKER_CLASSES.keys())
def test_cancel_scheduled_run_removes_it_from_the_schedule(client, rt, subprocess_env,
                                                           worker_args):
    run = run_of(rt, token_of(submit(client, "later", {"name": "Bo"})))
    scheduled = rt.dispatcher.queue.scheduled_job_registry
    assert run.status == RunStatus.SCHEDULED and run.id in scheduled.get_job_ids()
    page = client.get("/tasks").get_data(as_text=True)
    assert "Scheduled" in page and "Reminder for Bo" in page and "scheduled for" in page

    assert post(client, f"/tasks/{run.id}/cancel").status_code == 303

    assert status_of(rt, run.id) == RunStatus.CANCELLED
    assert run.id not in scheduled.get_job_ids()
    with rt.store.session() as s:  # its time comes: nothing brings it back
        s.execute(update(Run).where(Run.id == run.id).values(due_at=utcnow()))
    assert reconcile_once(rt, schedules=False).dispatched == 0
    assert_stale_job_does_nothing(rt, run.id, subprocess_env, worker_args)


@pytest.mark.slow
@pytest.mark.parametrize("worker_args", WORKER_CLASSES.values(), ids=WORKER_CLASSES.keys())
def test_cancel_running_run_stops_at_next_progress_report(client, rt, subprocess_env,
                                                          worker_args):
    with WorkerProcess(subprocess_env, "--no-reconciler", *worker_args):
        run = run_of(rt, token_of(submit(client, "crunch", {"name": "Cy"})))

        def running_with_progress():
            with rt.store.session() as s:
                row = s.get(Run, run.id)
                return row.status == RunStatus.RUNNING and row.progress_done > 0

        wait_until(running_with_progress, timeout=60)
        response = post(client, f"/tasks/{run.id}/cancel", follow_redirects=True)
        assert "Stopping" in response.get_data(as_text=True)

        wait_until(lambda: status_of(rt, run.id) == RunStatus.CANCELLED, timeout=30)

    calls = [line.split()[0] for line in read_calls(rt.settings.instance_dir)]
    assert calls == ["before"]  # the step after the cancelled one never ran
    events = [e.event for e in events_of(rt, run.id)]
    assert events[-1] == "cancel" and "finish" not in events
    with rt.store.session() as s:
        assert s.get(Run, run.id).progress_done < 600  # stopped midway, not at the end
    page = client.get("/tasks").get_data(as_text=True)
    assert "Cancelled" in page and "Crunching for Cy" in page


def test_delete_finished_run_hides_it_and_its_files(client, rt):
    token = token_of(submit(client, "report", {"name": "Di"}))
    work(rt)
    run = run_of(rt, token)
    with rt.store.session() as s:
        file_id = s.scalar(select(ResultFile.id).where(ResultFile.run_id == run.id))
    tasks = client.get("/tasks").get_data(as_text=True)
    assert "Exporting" in tasks and f"/files/{file_id}" in tasks

    download = client.get(f"/files/{file_id}")
    assert download.status_code == 200
    assert download.headers["Content-Disposition"] == 'attachment; filename="answers-Di.csv"'
    assert download.data.decode().splitlines() == ["name", "Di"]

    assert post(client, f"/tasks/{run.id}/delete").status_code == 303
    assert f'data-run="{run.id}"' not in client.get("/tasks").get_data(as_text=True)
    assert client.get(f"/files/{file_id}").status_code == 404


def test_deleting_a_pending_run_cancels_it_then_deletes_it(client, rt):
    run = run_of(rt, token_of(submit(client, "later", {"name": "Ed"})))
    page = client.get("/tasks").get_data(as_text=True)
    assert 'aria-label="Cancel and delete Reminder for Ed"' in page
    response = post(client, f"/tasks/{run.id}/delete", follow_redirects=True)
    assert "“Reminder for Ed” was cancelled and deleted." in response.get_data(as_text=True)
    assert status_of(rt, run.id) == RunStatus.CANCELLED
    assert f'data-run="{run.id}"' not in client.get("/tasks").get_data(as_text=True)
    assert rt.dispatcher.job_status(run.id) in (None, JobStatus.CANCELED)


def test_deleting_a_running_run_stops_it_and_nothing_more_is_said(client, rt, subprocess_env):
    with WorkerProcess(subprocess_env, "--no-reconciler"):
        run = run_of(rt, token_of(submit(client, "crunch", {"name": "Cy"})))

        def running_with_progress():
            with rt.store.session() as s:
                row = s.get(Run, run.id)
                return row.status == RunStatus.RUNNING and row.progress_done > 0

        wait_until(running_with_progress, timeout=60)
        response = post(client, f"/tasks/{run.id}/delete", follow_redirects=True)
        assert "is stopping and was deleted from your list" in response.get_data(as_text=True)
        assert f'data-run="{run.id}"' not in response.get_data(as_text=True)
        wait_until(lambda: status_of(rt, run.id) == RunStatus.CANCELLED, timeout=30)
    calls = [line.split()[0] for line in read_calls(rt.settings.instance_dir)]
    assert calls == ["before"]  # stopped midway
    with rt.store.session() as s:
        assert s.get(Run, run.id).hidden
        assert not s.scalars(select(Notification).where(Notification.run_id == run.id)).all()
    assert "Crunching for Cy" not in client.get("/tasks").get_data(as_text=True)


def test_other_users_runs_and_files_are_404(app, client, rt):
    token = token_of(submit(client, "report", {"name": "Fay"}))
    work(rt)
    run = run_of(rt, token)
    with rt.store.session() as s:
        file_id = s.scalar(select(ResultFile.id).where(ResultFile.run_id == run.id))
        note_id = s.scalar(select(Notification.id).where(Notification.run_id == run.id))
    pending = run_of(rt, token_of(submit(client, "later", {"name": "Fay"})))

    other = app.test_client()  # another browser, with tasks of its own
    token_of(submit(other, "later", {"name": "Gus"}))
    make_user(rt, "hal")
    logged_in = app.test_client()
    login(logged_in, "hal")
    for intruder in (other, logged_in, app.test_client()):
        for path in (f"/r/{token}", f"/r/{token}/status", f"/r/{token}/part",
                     f"/files/{file_id}"):
            assert intruder.get(path).status_code == 404, path
        if intruder is not other and intruder is not logged_in:
            continue  # a browser without a session cannot even get a CSRF token pair
        for path in (f"/tasks/{pending.id}/cancel", f"/tasks/{run.id}/delete",
                     f"/notifications/{note_id}/dismiss"):
            assert post(intruder, path).status_code == 404, path
        tasks = intruder.get("/tasks").get_data(as_text=True)
        assert "Fay" not in tasks and "Exporting" not in tasks
        assert "Exporting" not in intruder.get("/notifications").get_data(as_text=True)

    assert status_of(rt, pending.id) == RunStatus.SCHEDULED  # nothing they did took
    assert client.get(f"/files/{file_id}").status_code == 200
    assert client.get(f"/r/{token}").status_code == 200


def test_notice_appears_on_other_pages_when_a_run_finishes(client, rt):
    token = token_of(submit(client, "report", {"name": "Ida"}))
    assert "Exporting: done." not in client.get("/").get_data(as_text=True)
    work(rt)

    home = client.get("/").get_data(as_text=True)
    assert "Exporting: done." in home and f'href="/r/{token}"' in home
    assert 'class="badge"' in home
    listing = client.get("/notifications").get_data(as_text=True)
    assert "Exporting: done." in listing and "View the result" in listing
    # Opening the list read them: the banner is gone, the list keeps them.
    assert "Exporting: done." not in client.get("/").get_data(as_text=True)
    assert "Exporting: done." in client.get("/notifications").get_data(as_text=True)


def test_failure_notice_shows_the_safe_message_only(client, rt):
    token = token_of(submit(client, "broken", {"name": "Jo"}))
    work(rt)
    home = client.get("/forms/demo").get_data(as_text=True)
    assert "Calling the room service: The room service said no." in home
    for path in ("/tasks", "/notifications", f"/r/{token}", f"/r/{token}/status"):
        body = client.get(path).get_data(as_text=True)
        assert "The room service said no." in body, path
        assert "hunter2" not in body and "OperationalError" not in body, path


def test_dismiss_removes_the_banner(client, rt):
    token_of(submit(client, "report", {"name": "Kai"}))
    work(rt)
    with rt.store.session() as s:
        note_id = s.scalar(select(Notification.id))
    response = post(client, f"/notifications/{note_id}/dismiss", follow_redirects=True)
    assert response.status_code == 200
    assert "Exporting: done." not in client.get("/").get_data(as_text=True)


def test_watching_the_result_reads_its_notice(client, rt):
    token = token_of(submit(client, "report", {"name": "Lu"}))
    work(rt)
    assert "Your export is ready." in client.get(f"/r/{token}").get_data(as_text=True)
    assert "Exporting: done." not in client.get("/").get_data(as_text=True)


def test_session_cookie_is_httponly_samesite_and_long_lived(client):
    cookie = client.get("/forms/demo").headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    cookie = submit(client, "later", {"name": "Ned"}).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Expires=" in cookie  # survives closing the browser: the anonymous identity


def test_login_adopts_anonymous_tasks_and_follows_the_user(app, client, rt):
    token = token_of(submit(client, "later", {"name": "Mo"}))
    make_user(rt, "mo")
    assert login(client, "mo").status_code == 303
    assert "Reminder for Mo" in client.get("/tasks").get_data(as_text=True)
    assert client.get(f"/r/{token}").status_code == 200

    laptop = app.test_client()  # the same person on another browser
    assert "Reminder for Mo" not in laptop.get("/tasks").get_data(as_text=True)
    login(laptop, "mo")
    assert "Reminder for Mo" in laptop.get("/tasks").get_data(as_text=True)
    assert laptop.get(f"/r/{token}").status_code == 200
    run = run_of(rt, token)
    assert post(laptop, f"/tasks/{run.id}/cancel").status_code == 303
    assert status_of(rt, run.id) == RunStatus.CANCELLED


def test_wrong_password_is_refused_without_saying_which_part(client, rt):
    make_user(rt, "nia")
    for name, password in (("nia", "wrong password"), ("nobody", "wrong password")):
        response = login(client, name, password)
        assert response.status_code == 401
        assert "Unknown user name or wrong password." in response.get_data(as_text=True)


def test_login_redirect_stays_on_this_site(client, rt):
    make_user(rt, "oz")
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        response = login(client, "oz", next_path=target)
        assert response.headers["Location"] == "/", target


def test_every_post_needs_a_csrf_token(app, client, rt):
    """CSRF on every state-changing request (the token API authenticates otherwise)."""
    client.get("/forms/demo")  # a session, so only the token is missing
    checked = []
    for rule in app.url_map.iter_rules():
        if "POST" not in rule.methods or rule.endpoint.startswith("api."):
            continue
        values = {arg: 1 if "int" in type(rule._converters[arg]).__name__.lower() else "x"
                  for arg in rule.arguments}
        path = rule.build(values)[1]
        response = client.post(path, data={"name": "x"})
        assert response.status_code == 400, rule.endpoint
        assert "Form expired" in response.get_data(as_text=True)
        checked.append(rule.endpoint)
    assert {"forms.show", "tasks.cancel", "tasks.delete", "tasks.dismiss", "auth.login",
            "auth.logout", "admin.retry", "admin.cancel", "admin.delete_run",
            "admin.retry_dead"} <= set(checked)


def test_task_list_shows_retrying_attempt_and_next_try(client, rt):
    run = run_of(rt, token_of(submit(client, "flaky", {"name": "Pat"})))
    work(rt)
    assert status_of(rt, run.id) == RunStatus.RETRYING
    page = client.get("/tasks").get_data(as_text=True)
    assert "Attempt 1 of 3 did not work" in page and "Next try" in page
    with rt.store.session() as s:
        due = s.get(Run, run.id).due_at
    assert f'datetime="{due.isoformat(timespec="seconds")}"' in page


def test_my_tasks_without_any_is_friendly(client):
    page = client.get("/tasks").get_data(as_text=True)
    assert "Nothing here yet." in page


def test_cancelled_record_page_says_so(client, rt):
    token = token_of(submit(client, "crunch", {"name": "Quin"}))
    run = run_of(rt, token)
    post(client, f"/tasks/{run.id}/cancel")
    status = client.get(f"/r/{token}/status").json
    assert status["state"] == "cancelled" and status["message"] is None
    assert "Cancelled." in client.get(f"/r/{token}").get_data(as_text=True)


def test_scheduled_time_is_shown(client, rt):
    run = run_of(rt, token_of(submit(client, "later", {"name": "Rex"})))
    assert run.due_at - utcnow() > timedelta(minutes=59)
    page = client.get("/tasks").get_data(as_text=True)
    assert f'datetime="{run.due_at.isoformat(timespec="seconds")}"' in page
    assert "(in 1 hour)" in page
    # Not started yet: the list says when it will, never "started".
    assert "· scheduled for" in page and "· started" not in page



def test_banner_is_one_line_with_the_newest_notice_and_a_count(client, rt):
    for name in ("Ann", "Bob", "Cat", "Dan", "Eve"):
        token_of(submit(client, "report", {"name": name}))
    work(rt)
    home = client.get("/").get_data(as_text=True)
    assert home.count('class="notice notice-success"') == 1
    assert "and 4 more" in home and 'aria-label="5 unread"' in home
    # The Notifications page lists them all, without the banner repeating one.
    listing = client.get("/notifications").get_data(as_text=True)
    assert 'class="notice notice' not in listing and listing.count('class="note note-') == 5


def test_task_list_part_is_the_pages_list_with_etag(client, rt):
    token_of(submit(client, "report", {"name": "Sam"}))
    page = client.get("/tasks").get_data(as_text=True)
    assert 'data-part-url="/tasks/part"' in page and "tasks.js" in page and "data-active" in page
    first = client.get("/tasks/part")
    assert first.status_code == 200 and "Exporting" in first.get_data(as_text=True)
    again = client.get("/tasks/part", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    work(rt)
    changed = client.get("/tasks/part", headers={"If-None-Match": first.headers["ETag"]})
    assert changed.status_code == 200 and "data-active" not in changed.get_data(as_text=True)
