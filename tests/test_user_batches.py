"""Batches for end users (issue 13.2): a user ticks some of their own records on My tasks,
starts one of the form's batches (`started_by: users`) over them, follows the overall
progress and the current item's, and downloads one zip; a notice says when it is done.
Another user's records, batches and zip are out of reach."""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from formrules.store.models import Batch, Notification, Record, Run
from tests.helpers import record_of, submit, token_of, tokens, wait_until, work
from tests.web_helpers import login, make_user, post

CLAIMS = """
form: claims
title: Claims
fields:
  - {name: name, type: string, required: true}
events:
  submit: []
batches:
  receipts:
    title: Receipt {{ record.name }}
    started_by: users
    do:
      - progress: {done: 1, total: 2, message: "Halfway through {{ record.name }}"}
      - hold: {name: "{{ record.name }}"}
      - report: {filename: "{{ record.name }}.txt", content: "receipt for {{ record.name }}"}
  quick:
    title: Quick receipt
    started_by: [users, operators]
    concurrency: 2
    do:
      - report: {filename: "{{ record.name }}.txt", content: "quick {{ record.name }}"}
  audit:
    title: Audit
    do: [{log: "audit {{ record.name }}"}]
"""


@pytest.fixture
def rules_dir(rules_dir):
    """The test forms plus one whose users may run batches over their own claims."""
    (rules_dir / "claims.yaml").write_text(CLAIMS)
    return rules_dir


@pytest.fixture
def ann(app, rt):
    """A user with an account."""
    make_user(rt, "ann")
    browser = app.test_client()
    assert login(browser, "ann").status_code == 303
    return browser


def claim(rt, client, name: str) -> int:
    """Submit a claim; returns its record id."""
    return record_of(rt, token_of(submit(client, "claims", {"name": name}))).id


def start(client, name: str, record_ids: list[int]):
    """Tick `record_ids` on the start page and press the button."""
    page = client.get(f"/tasks/batches/new/claims/{name}")
    assert page.status_code == 200, page.data[:500]
    return client.post(f"/tasks/batches/new/claims/{name}", data={
        "csrf_token": tokens(page.data)["csrf_token"],
        "record": [str(i) for i in record_ids]})


def release(rt, name: str) -> None:
    """Let the `hold` step of record `name` finish."""
    (Path(rt.settings.instance_dir) / f"release-{name}").touch()


def progress(client, batch_id: str) -> dict:
    response = client.get(f"/tasks/batches/{batch_id}/progress")
    assert response.status_code == 200
    return response.json


def test_a_user_runs_a_batch_over_their_own_records_with_a_worker(ann, client, operator,
                                                                  rt, worker):
    a1, a2 = claim(rt, ann, "A1"), claim(rt, ann, "A2")
    bob_record = claim(rt, client, "B1")  # `client`: another, anonymous browser

    tasks = ann.get("/tasks").get_data(as_text=True)
    assert "/tasks/batches/new/claims/receipts" in tasks
    assert "/tasks/batches/new/claims/audit" not in tasks  # operators only (the default)
    picker = ann.get("/tasks/batches/new/claims/receipts").get_data(as_text=True)
    assert f'value="{a1}"' in picker and f'value="{a2}"' in picker
    assert f'value="{bob_record}"' not in picker  # only one's own records are listed

    # Another user's record id, sent by hand, refuses the whole batch (server-side).
    refused = start(ann, "receipts", [a1, bob_record])
    assert refused.status_code == 422
    assert "Some of the selected records are not yours to use." in refused.get_data(as_text=True)
    with rt.store.session() as s:
        assert s.scalars(select(Batch)).all() == []

    started = start(ann, "receipts", [a2, a1])
    assert started.status_code == 303, started.data[:1000]
    batch_id = started.headers["Location"].rsplit("/", 1)[-1]

    # One at a time: the first item reports its own progress while the second waits.
    def first_halfway():
        view = progress(ann, batch_id)
        current = view["current"]
        # (the two figures are read a moment apart: wait until both show the report)
        return view if current and current[0]["progress"] == 50 and \
            view["progress"]["percent"] == 25 else None
    view = wait_until(first_halfway, timeout=60)
    assert view["progress"]["text"] == "0 of 2" and view["status"] == "running"
    assert [c["title"] for c in view["current"]] == ["Receipt A1"]
    assert view["current"][0]["message"] == "Halfway through A1"
    # 25%: half of one item out of two
    with rt.store.session() as s:
        statuses = dict(s.execute(select(Run.record_id, Run.status)
                                  .where(Run.batch_id == batch_id)).all())
    assert statuses[a2] == "waiting"
    listed = ann.get("/tasks").get_data(as_text=True)
    assert "Now: Receipt A1 (50%, Halfway through A1)" in listed
    page = ann.get(f"/tasks/batches/{batch_id}").get_data(as_text=True)
    assert "0 of 2" in page and "Halfway through A1" in page

    # Nobody else reaches it: not its page, progress, zip or cancel (404, never 403).
    for path in ("", "/progress", "/part", "/results.zip"):
        assert client.get(f"/tasks/batches/{batch_id}{path}").status_code == 404
    assert post(client, f"/tasks/batches/{batch_id}/cancel").status_code == 404
    others = client.get("/tasks").get_data(as_text=True)
    assert batch_id not in others and "Receipt A1" not in others

    release(rt, "A1")
    view = wait_until(lambda: (v := progress(ann, batch_id))["current"] and
                      v["current"][0]["title"] == "Receipt A2" and
                      v["current"][0]["progress"] == 50 and v, timeout=60)
    assert view["progress"]["text"] == "1 of 2"
    release(rt, "A2")
    view = wait_until(lambda: (v := progress(ann, batch_id))["progress"]["ended"] and v,
                      timeout=60)
    assert view["status"] == "done" and view["progress"]["text"] == "2 of 2"
    assert view["current"] == [] and view["progress"]["percent"] == 100

    # The notice shows above an ordinary page and links to the batch.
    form_page = ann.get("/forms/claims").get_data(as_text=True)
    assert "Receipt: done; 2 of 2 done" in form_page
    assert f'href="/tasks/batches/{batch_id}"' in form_page
    with rt.store.session() as s:
        (note,) = s.scalars(select(Notification).where(Notification.batch_id == batch_id))
        assert note.owner.startswith("user:") and note.read_at is None
    ann.get(f"/tasks/batches/{batch_id}")  # looking at the ended batch reads its notice
    with rt.store.session() as s:
        assert s.get(Notification, note.id).read_at is not None

    download = ann.get(f"/tasks/batches/{batch_id}/results.zip")
    assert download.status_code == 200 and download.mimetype == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.data))
    assert sorted(archive.namelist()) == [f"record-{a1}/A1.txt", f"record-{a2}/A2.txt"]
    assert archive.read(f"record-{a1}/A1.txt") == b"receipt for A1"
    assert client.get(f"/tasks/batches/{batch_id}/results.zip").status_code == 404

    # The operator view stays: the batch is listed there, with its owner.
    assert "Receipt" in operator.get("/admin/batches").get_data(as_text=True)
    assert "by ann" in operator.get(f"/admin/batches/{batch_id}").get_data(as_text=True)


def test_who_may_start_what(ann, client, operator, rt):
    a1 = claim(rt, ann, "A1")
    # `started_by: users` only: not on the operator pages.
    assert operator.get("/admin/batches/new/claims/receipts").status_code == 404
    assert "Receipt" not in operator.get("/admin/batches").get_data(as_text=True)
    assert "Quick receipt" in operator.get("/admin/batches").get_data(as_text=True)
    # Operators only (the default): not for users, whatever they send.
    assert ann.get("/tasks/batches/new/claims/audit").status_code == 404
    assert post(ann, "/tasks/batches/new/claims/audit",
                {"record": [str(a1)]}).status_code == 404
    # The start page is CSRF-protected.
    assert ann.post("/tasks/batches/new/claims/quick",
                    data={"record": [str(a1)]}).status_code == 400
    # Nothing ticked: said, nothing started.
    empty = start(ann, "quick", [])
    assert empty.status_code == 422
    assert "Select at least one of your records." in empty.get_data(as_text=True)
    # A browser with no records of the form is offered nothing and can start nothing.
    assert "/tasks/batches/new/" not in client.get("/tasks").get_data(as_text=True)
    assert "You have no Claims records yet." in client.get(
        "/tasks/batches/new/claims/quick").get_data(as_text=True)
    assert post(client, "/tasks/batches/new/claims/quick",
                {"record": [str(a1)]}).status_code == 422
    with rt.store.session() as s:
        assert s.scalars(select(Batch)).all() == []
        assert s.get(Record, a1).owner.startswith("user:")


def test_concurrency_and_cancel_by_the_owner(ann, rt):
    ids = [claim(rt, ann, f"C{i}") for i in range(3)]
    response = start(ann, "quick", ids)
    assert response.status_code == 303
    batch_id = response.headers["Location"].rsplit("/", 1)[-1]
    with rt.store.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch.self_service and batch.concurrency == 2
    assert len(progress(ann, batch_id)["current"]) == 2  # two queued at once
    cancelled = post(ann, f"/tasks/batches/{batch_id}/cancel", follow_redirects=True)
    assert "Batch cancelled." in cancelled.get_data(as_text=True)
    work(rt)
    view = progress(ann, batch_id)
    assert view["status"] == "cancelled" and view["progress"]["ended"]
    assert "Cancel the rest" not in ann.get(f"/tasks/batches/{batch_id}").get_data(
        as_text=True)


@pytest.fixture
def base_url(app):
    """The app served over real HTTP on a free local port (for the browser)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.mark.browser
@pytest.mark.slow
def test_in_a_browser_the_batch_page_follows_the_items_in_place(browser, base_url, rt,
                                                                 worker):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        for name in ("D1", "D2"):
            page.goto(f"{base_url}/forms/claims")
            page.get_by_label("Name").fill(name)
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url("**/r/*")
        page.goto(f"{base_url}/tasks")
        page.get_by_role("link", name="Receipt", exact=True).click()
        for box in page.get_by_role("checkbox").all():
            box.check()
        page.get_by_role("button", name="Start on the selected records").click()
        page.wait_for_url("**/tasks/batches/*")
        page.evaluate("window.__samePage = 'yes'")
        page.get_by_text("Halfway through D1").wait_for(timeout=60000)
        assert page.locator("[data-progress-text]").text_content() == "0 of 2"
        release(rt, "D1")
        page.get_by_text("Halfway through D2").wait_for(timeout=60000)
        release(rt, "D2")
        page.get_by_role("link", name="Download all results (zip)").wait_for(timeout=60000)
        page.locator("[data-progress-text]", has_text="2 of 2").wait_for(timeout=60000)
        assert page.evaluate("window.__samePage") == "yes"  # updated without a reload
    finally:
        context.close()
