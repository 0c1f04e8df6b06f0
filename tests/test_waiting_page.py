"""The waiting page: states, inline_for, await: optional and false, the JSON and its part."""

from __future__ import annotations

import pytest

from formrules.language.loader import load_rules
from formrules.runs.submit import inline_seconds
from formrules.store.models import Run, RunStatus
from tests.helpers import WorkerProcess, finishes, runs_of, submit, token_of, wait_until, work
from tests.web_helpers import add_web_rules, workers_alive

REFRESH = b'<noscript><meta http-equiv="refresh" content="2"></noscript>'


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


def test_working_page_refreshes_without_js_and_names_the_way_out(client, rt):
    token = token_of(submit(client, "report", {"name": "Ann"}))
    page = client.get(f"/r/{token}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert REFRESH.decode() in html  # JS off: reload; JS on: wait.js polls instead
    assert "We are working on it." in html and 'href="/tasks"' in html
    assert 'aria-labelledby="run-' in html and "<progress" in html
    assert 'data-state="working"' in html and "wait.js" in html


def test_done_page_shows_message_and_download_without_refresh(client, rt):
    token = token_of(submit(client, "report", {"name": "Bea"}))
    work(rt)
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert "http-equiv" not in html
    assert "Your export is ready." in html and 'data-state="done"' in html
    assert "Download answers-Bea.csv" in html


def test_part_is_the_same_markup_as_the_page(client, rt):
    token = token_of(submit(client, "report", {"name": "Cal"}))
    for _ in range(2):  # while working, then done
        part = client.get(f"/r/{token}/part")
        assert part.status_code == 200 and part.headers["Cache-Control"] == "no-store"
        assert part.get_data(as_text=True).strip() in client.get(f"/r/{token}").get_data(
            as_text=True)
        work(rt)


def test_status_json_answers_304_when_nothing_changed(client, rt):
    token = token_of(submit(client, "report", {"name": "Dee"}))
    first = client.get(f"/r/{token}/status")
    assert first.status_code == 200 and first.json["state"] == "working"
    assert first.json["runs"][0]["label"] == "Queued"
    again = client.get(f"/r/{token}/status", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    work(rt)
    changed = client.get(f"/r/{token}/status", headers={"If-None-Match": first.headers["ETag"]})
    assert changed.status_code == 200 and changed.json["state"] == "done"
    assert changed.json["progress"] == 100 and changed.json["runs"][0]["files"]


def test_failed_page_shows_safe_error_only(client, rt):
    token = token_of(submit(client, "broken", {"name": "Eve"}))
    work(rt)
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert "We could not finish this." in html and "The room service said no." in html
    assert "hunter2" not in html and "Traceback" not in html
    assert client.get(f"/r/{token}/status").json["state"] == "failed"


def test_retrying_page_shows_attempt_and_next_try(client, rt):
    token = token_of(submit(client, "flaky", {"name": "Flo"}))
    work(rt)
    status = client.get(f"/r/{token}/status").json
    assert status["state"] == "working" and status["runs"][0]["status"] == "retrying"
    assert status["runs"][0]["next_retry_at"]
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert "Attempt 1 of 3 did not work: The booking service is busy" in html
    assert "Next try" in html


def test_await_false_does_not_wait_and_points_to_my_tasks(client, rt):
    token = token_of(submit(client, "fire_forget", {"name": "Gil"}))
    status = client.get(f"/r/{token}/status").json
    assert status["state"] == "done" and status["runs"] == []
    assert [r["title"] for r in status["other_runs"]] == ["Sending receipts"]
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert "Thanks, Gil: we got it." in html and "http-equiv" not in html
    assert "Continuing in the background" in html and 'href="/tasks"' in html
    assert "Sending receipts" in client.get("/tasks").get_data(as_text=True)


def test_await_optional_offers_continue_in_background(client, rt):
    token = token_of(submit(client, "optional", {"name": "Hal"}))
    (run,) = runs_of(rt, token)
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert REFRESH.decode() in html  # it still waits by default
    assert f'href="/tasks?continued={run.id}">Continue in background</a>' in html
    tasks = client.get(f"/tasks?continued={run.id}").get_data(as_text=True)
    assert "“Building the archive” continues in the background." in tasks


def test_delayed_work_is_listed_with_its_time(client, rt):
    token = token_of(submit(client, "later", {"name": "Ivy"}))
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert "We will remind you, Ivy." in html  # nothing awaited: the answer is immediate
    assert "Reminder for Ivy" in html and "Starts" in html and "(in 1 hour)" in html


def test_inline_for_answers_once_quick_work_is_done(client, rt, subprocess_env):
    with WorkerProcess(subprocess_env, "--no-reconciler"):
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, timeout=60)
        response = submit(client, "quick", {"name": "Jay"})
        token = token_of(response)
        # No waiting on our side: the POST itself held on until the work was done.
        (run,) = runs_of(rt, token)
        assert run.status == RunStatus.DONE
        html = client.get(f"/r/{token}").get_data(as_text=True)
        assert "Summary ready for Jay." in html and "http-equiv" not in html


def test_inline_for_gives_up_after_its_limit(client, rt):
    # No worker: the POST answers once its limit has passed, not never.
    token = token_of(finishes(lambda: submit(client, "inline_slow", {"name": "Kim"}), 10))
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.QUEUED  # it continues in the background
    assert client.get(f"/r/{token}/status").json["state"] == "working"


def test_without_inline_for_the_answer_does_not_wait(client, rt):
    # No worker runs, so the answer cannot have waited for the work; and the wait it may
    # take is nothing (no node of the form has inline_for). No clock is read.
    token = token_of(submit(client, "crunch", {"name": "Lee"}))
    runs = runs_of(rt, token)
    assert [r.status for r in runs] == [RunStatus.QUEUED]
    form = load_rules(rt.settings.rules_dir).forms["crunch"]
    assert inline_seconds(form, runs) == 0
    quick = load_rules(rt.settings.rules_dir).forms["quick"]  # the same, with inline_for
    assert inline_seconds(quick, [Run(node_path="events/submit/0/background",
                                      awaited="true")]) == 30


def test_overall_progress_combines_awaited_runs(client, rt):
    token = token_of(submit(client, "two_parts", {"name": "Max"}))
    by_title = {r.title: r for r in runs_of(rt, token)}
    with rt.store.session() as s:
        for run_id, done in ((by_title["Part one"].id, 1), (by_title["Part two"].id, 3)):
            row = s.get(Run, run_id)
            row.status, row.progress_done, row.progress_total = "running", done, 4
    status = client.get(f"/r/{token}/status").json
    assert [(r["title"], r["progress"]) for r in status["runs"]] == [("Part one", 25),
                                                                      ("Part two", 75)]
    assert status["progress"] == 50
    html = client.get(f"/r/{token}").get_data(as_text=True)
    assert 'aria-label="Overall progress"' in html and 'value="50"' in html
