"""Operator pages: login required, Runs with filters and traces, retry/cancel/delete, the
dead list, record timelines, and a queue overview that changes nothing it reads."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner
from redis import Redis
from rq.job import JobStatus
from sqlalchemy import func, select

from formrules.cli import cli
from formrules.store.models import Run, RunEvent, RunStatus, User, utcnow
from tests.helpers import WorkerProcess, runs_of, submit, token_of, wait_until, work
from tests.web_helpers import PASSWORD, add_web_rules, login, make_user, post, workers_alive

PAGES = ("/admin", "/admin/runs/{run}", "/admin/dead", "/admin/records",
         "/admin/records/{record}", "/admin/queues")
ACTIONS = ("/admin/runs/{run}/retry", "/admin/runs/{run}/cancel", "/admin/runs/{run}/delete",
           "/admin/dead/retry")


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


def one_run(rt, token: str) -> Run:
    """The one Run of a record."""
    (run,) = runs_of(rt, token)
    return run


def fresh(rt, run_id: str) -> Run | None:
    """A Run as the database has it now."""
    with rt.store.session() as s:
        return s.get(Run, run_id)


def test_operator_pages_send_visitors_to_login(client, rt):
    run = one_run(rt, token_of(submit(client, "broken", {"name": "Al"})))
    values = {"run": run.id, "record": run.record_id}
    for path in PAGES + ACTIONS:
        url = path.format(**values)
        response = post(client, url) if path in ACTIONS else client.get(url)
        assert response.status_code == 302, url
        assert response.headers["Location"].startswith("/login?next=/admin"), url
    assert fresh(rt, run.id).status == RunStatus.QUEUED  # nothing was done


def test_users_who_are_not_operators_get_403(app, rt):
    make_user(rt, "ursula")
    browser = app.test_client()
    login(browser, "ursula")
    response = browser.get("/admin")
    assert response.status_code == 403 and "Operators only" in response.get_data(as_text=True)
    assert "Operations" not in browser.get("/").get_data(as_text=True)


def test_login_returns_to_the_operator_page_asked_for(app, rt):
    make_user(rt, "otto", operator=True)
    browser = app.test_client()
    first = browser.get("/admin/dead")
    assert first.headers["Location"] == "/login?next=/admin/dead"
    response = login(browser, "otto", next_path="/admin/dead")
    assert response.status_code == 303 and response.headers["Location"] == "/admin/dead"
    assert browser.get("/admin/dead").status_code == 200
    assert "Operations" in browser.get("/").get_data(as_text=True)


def test_demoted_operator_loses_access_at_once(operator, rt):
    assert operator.get("/admin").status_code == 200
    with rt.store.session() as s:
        s.scalar(select(User).where(User.name == "olga")).is_operator = False
    assert operator.get("/admin").status_code == 403


def test_cli_creates_an_operator_with_a_hashed_password(app, rt, subprocess_env):
    result = CliRunner().invoke(cli, ["users", "add", "cli-op", "--operator"],
                                env={**subprocess_env, "FORMRULES_PASSWORD": PASSWORD})
    assert result.exit_code == 0, result.output
    with rt.store.session() as s:
        user = s.scalar(select(User).where(User.name == "cli-op"))
    assert user.is_operator and PASSWORD not in user.password_hash
    browser = app.test_client()
    login(browser, "cli-op")
    assert browser.get("/admin").status_code == 200


def test_runs_page_filters_by_status_form_text_and_date(client, operator, rt):
    broken = one_run(rt, token_of(submit(client, "broken", {"name": "Bo"})))
    work(rt)
    later = one_run(rt, token_of(submit(client, "later", {"name": "Cy"})))
    with rt.store.session() as s:  # an old Run, to filter by date
        s.get(Run, later.id).created_at = utcnow() - timedelta(days=10)

    def titles(query: str) -> str:
        page = operator.get(f"/admin?{query}")
        assert page.status_code == 200, query
        return page.get_data(as_text=True)

    everything = titles("")
    assert "Calling the room service" in everything and "Reminder for Cy" in everything
    assert "Reminder for Cy" not in titles("status=dead")
    assert "Calling the room service" in titles("status=dead")
    assert "Calling the room service" not in titles("form=later")
    assert "Reminder for Cy" in titles("q=reminder")
    assert "Calling the room service" in titles("q=hunter2")  # operators search errors
    today = utcnow().date().isoformat()
    assert "Reminder for Cy" not in titles(f"from={today}")
    assert "Calling the room service" in titles(f"from={today}&to={today}")
    assert broken.id[:12] in titles("status=dead&form=broken")
    assert "No runs match." in titles("q=nothing-like-this")


def test_runs_page_is_paginated(client, operator, rt):
    token = token_of(submit(client, "later", {"name": "Di"}))
    template = one_run(rt, token)
    with rt.store.session() as s:
        for i in range(55):
            s.add(Run(record_id=template.record_id, form_id="later", owner=template.owner,
                      kind="delay", node_path=template.node_path, title=f"Copy {i:02d}",
                      snapshot=template.snapshot, status="scheduled",
                      due_at=template.due_at, created_at=utcnow() + timedelta(seconds=i)))
    first = operator.get("/admin").get_data(as_text=True)
    assert "56 results · page 1 of 2" in first and "Copy 54" in first and "Copy 04" not in first
    second = operator.get("/admin?page=2").get_data(as_text=True)
    assert "Copy 04" in second and "Copy 05" not in second and "Reminder for Di" in second


def test_run_page_shows_trace_and_full_error(client, operator, rt):
    run = one_run(rt, token_of(submit(client, "broken", {"name": "Eli"})))
    work(rt)
    html = operator.get(f"/admin/runs/{run.id}").get_data(as_text=True)
    assert "psycopg.OperationalError: password=hunter2" in html  # full detail, operators only
    assert "Traceback" in html and "The room service said no." in html
    for event in ("start", "error", "dead"):
        assert f'class="ev-{event}">{event}</td>' in html
    assert "events/submit/0/background/do/0" in html  # step by step, by node path
    assert "events/submit/0/background/on_error/0" in html
    assert 'action="/admin/runs/' + run.id + '/retry"' in html
    assert operator.get("/admin/runs/nope").status_code == 404


def test_retry_cancel_delete_from_the_run_page(client, operator, rt):
    run = one_run(rt, token_of(submit(client, "broken", {"name": "Flo"})))
    work(rt)
    assert fresh(rt, run.id).status == RunStatus.DEAD

    assert post(operator, f"/admin/runs/{run.id}/retry").status_code == 303
    assert fresh(rt, run.id).status == RunStatus.QUEUED
    assert rt.dispatcher.job_status(run.id) == JobStatus.QUEUED
    events = [e.detail for e in _events(rt, run.id)]
    assert "retried by operator olga" in events

    assert post(operator, f"/admin/runs/{run.id}/cancel").status_code == 303
    assert fresh(rt, run.id).status == RunStatus.CANCELLED
    assert rt.dispatcher.job_status(run.id) != JobStatus.QUEUED

    assert post(operator, f"/admin/runs/{run.id}/delete").status_code == 303
    assert fresh(rt, run.id) is None and _events(rt, run.id) == []


def test_pending_run_cannot_be_deleted(client, operator, rt):
    run = one_run(rt, token_of(submit(client, "later", {"name": "Gus"})))
    response = post(operator, f"/admin/runs/{run.id}/delete", follow_redirects=True)
    assert "Only finished Runs can be deleted" in response.get_data(as_text=True)
    assert fresh(rt, run.id).status == RunStatus.SCHEDULED


def test_dead_list_retries_the_selected_runs(client, operator, rt):
    dead = [one_run(rt, token_of(submit(client, "broken", {"name": n}))) for n in "ABC"]
    work(rt)
    html = operator.get("/admin/dead").get_data(as_text=True)
    assert all(f'value="{r.id}"' in html for r in dead)
    assert "The room service said no." in html

    response = post(operator, "/admin/dead/retry",
                    {"run_id": [dead[0].id, dead[1].id]}, follow_redirects=True)

    assert "Retrying 2 runs." in response.get_data(as_text=True)
    assert [fresh(rt, r.id).status for r in dead] == ["queued", "queued", "dead"]
    assert rt.dispatcher.queue.count == 2
    html = operator.get("/admin/dead").get_data(as_text=True)
    assert dead[2].id in html and dead[0].id not in html


def test_record_timeline_shows_what_ran_runs_and_waits(client, operator, rt):
    token = token_of(submit(client, "timeline", {"name": "Hu"}))
    work(rt)
    by_title = {r.title: r for r in runs_of(rt, token)}  # created together: order is by id
    confirm, follow_up = by_title["Confirming the order"], by_title["Follow-up call"]
    records = operator.get("/admin/records?form=timeline").get_data(as_text=True)
    assert f'href="/admin/records/{confirm.record_id}"' in records
    assert "1 done" in records and "1 scheduled" in records

    html = operator.get(f"/admin/records/{confirm.record_id}").get_data(as_text=True)
    ran = html.split("<h2>Ran</h2>")[1].split("</section>")[0]
    pending = html.split("<h2>Pending</h2>")[1].split("</section>")[0]
    assert "Confirming the order" in ran and "Follow-up call" in pending
    assert f'datetime="{follow_up.due_at.isoformat(timespec="seconds")}"' in pending
    assert "Nothing is running." in html
    assert "start" in html and "finish" in html  # the timeline of events
    assert f'href="/r/{token}"' in html
    if "updates.edit" in operator.application.view_functions:
        assert f"/records/{confirm.record_id}/edit" in html or "Edit record" in html
    assert operator.get("/admin/records/999999").status_code == 404


def test_queue_page_shows_workers_and_counts(client, operator, rt, subprocess_env):
    token_of(submit(client, "later", {"name": "Ike"}))
    with WorkerProcess(subprocess_env, "--no-reconciler"):
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, timeout=60)
        # A worker registers, then reports itself idle once it listens on its queues.
        html = wait_until(lambda: (page := operator.get("/admin/queues").get_data(
            as_text=True)) and ">idle</span>" in page and page, timeout=30)
    assert "formrules" in html and "No workers are running" not in html
    # The default lane (RQ queue `formrules`): 1 Run pending, its job in `scheduled`.
    scheduled = html.split('<b>default</b> <span class="mono small muted">formrules</span>')[1] \
        .split("</tr>")[0]
    assert scheduled.count('<td class="num">') == 8 and '<td class="num">1</td>' in scheduled
    assert "1 worker" in scheduled


def test_queue_page_reads_without_cleaning_up(operator, rt):
    redis = Redis.from_url(rt.settings.redis_url)
    queue = rt.dispatcher.queue
    # A worker registration whose key expired, and a started entry long past its time:
    # RQ's own readers would remove both; the overview must only look.
    redis.sadd("rq:workers", "rq:worker:gone")
    redis.sadd(f"rq:workers:{queue.name}", "rq:worker:gone")
    redis.zadd(queue.started_job_registry.key, {"stale-job:exec": 1})
    before = {key: redis.type(key) for key in redis.keys("*")}

    html = operator.get("/admin/queues").get_data(as_text=True)

    assert "No workers are running" in html
    assert redis.sismember("rq:workers", "rq:worker:gone")
    assert redis.zscore(queue.started_job_registry.key, "stale-job:exec") == 1
    assert {key: redis.type(key) for key in redis.keys("*")} == before


def test_operator_sees_any_record_page(client, operator, rt):
    token = token_of(submit(client, "later", {"name": "Jo"}))
    assert operator.get(f"/r/{token}").status_code == 200


def _events(rt, run_id: str) -> list[RunEvent]:
    with rt.store.session() as s:
        return list(s.scalars(select(RunEvent).where(RunEvent.run_id == run_id)))


def test_counts_by_status_on_queue_page(client, operator, rt):
    for name in "AB":
        token_of(submit(client, "later", {"name": name}))
    html = operator.get("/admin/queues").get_data(as_text=True)
    with rt.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 2
    assert '<b>2</b><span>scheduled</span>' in html
