"""What owners get of their failed and running work: safe error details, their own retry
(`user_retry:`), start/end notices with e-mail copies and live events (SSE), the ETA in
the status JSON, and deleting a running task (issue 13, points 1, 3 and 10).

Real Redis, real databases, real worker processes; the SSE test also serves the app from
a real `formrules web` process.
"""

from __future__ import annotations

import email
import json
import queue
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from sqlalchemy import select

from formrules.errors import GENERIC_FAILURE, PermanentError, RetryableError, user_message
from formrules.language.loader import parse_form
from formrules.runs.status import eta_seconds
from formrules.store import tokens
from formrules.store.models import Notification, Record, Run, RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import submit, token_of, wait_until, work
from tests.helpers import tokens as page_tokens
from tests.journey import ARTIFACTS, WebProcess
from tests.web_helpers import Browser, make_user, post

SECRET = "hunter2"

RETRYABLE = """
form: retryable
title: Retryable
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Booking for {{ record.name }}
        flag: done
        retry: false
        user_retry: true
        do:
          - record_call: {name: first, sleep: 1.5}  # still working when its page opens
          - fail_first_time: {}
          - record_call: {name: second}
"""

NOTIFIED = """
form: notified
title: Notified
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Report for {{ record.name }}
        flag: done
        notify: {events: [start, end], email: true}
        do:
          - record_call: {name: work, sleep: 0.5}
"""

LONG = """
form: long
title: Long
fields:
  - {name: name, type: string, required: true}
  - {name: note, type: string, hidden: true}
events:
  submit:
    - background:
        title: Long work
        do:
          - record_call: {name: before}
          - sleep_then_set: {seconds: 60, hold: long, field: note, value: written}
          - record_call: {name: after}
"""

SLOW = """
form: progressing
title: Progressing
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - background:
        title: Crunching
        do:
          - slow: {seconds: 6, steps: 12}
"""


@pytest.fixture
def rules_dir(rules_dir):
    for name, text in (("retryable", RETRYABLE), ("notified", NOTIFIED), ("long", LONG),
                       ("progressing", SLOW)):
        (rules_dir / f"{name}.yaml").write_text(text)
    return rules_dir


def release(rt) -> None:
    """Let the held step of the `long` form end (`sleep_then_set` with `hold: long`)."""
    path = Path(rt.settings.instance_dir) / "release-long"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def runs(rt, token: str) -> list[Run]:
    with rt.store.session() as s:
        record_id = s.scalar(select(Record.id).where(Record.token == token))
        return list(s.scalars(select(Run).where(Run.record_id == record_id)))


def status_of(rt, token: str) -> str | None:
    found = runs(rt, token)
    return found[0].status if found else None


# -- the ETA: a pure function on a controllable clock ---------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_eta_is_null_before_progress_moves_and_after_it_is_complete():
    assert eta_seconds(None, T0, 0.5) is None  # not started
    assert eta_seconds(T0, T0 + timedelta(seconds=30), 0.0) is None  # no progress yet
    assert eta_seconds(T0, T0 + timedelta(seconds=30), 1.0) is None  # nothing left
    assert eta_seconds(T0, T0 + timedelta(seconds=30), 0.25) == 90  # 30 s for a quarter
    assert eta_seconds(T0, T0 - timedelta(seconds=5), 0.5) == 0  # a clock behind: no time


@given(elapsed=st.floats(min_value=0, max_value=10 ** 7, allow_nan=False),
       fraction=st.floats(min_value=0.001, max_value=0.999))
def test_eta_is_the_remaining_share_at_the_rate_so_far(elapsed, fraction):
    now = T0 + timedelta(seconds=elapsed)
    eta = eta_seconds(T0, now, fraction)
    assert isinstance(eta, int) and eta >= 0
    elapsed = (now - T0).total_seconds()  # what the clock can tell (microseconds)
    exact = elapsed * (1 - fraction) / fraction
    assert exact <= eta < exact + 1 + 1e-6 * exact  # rounded up, never down
    # More progress in the same time never means more time left.
    assert eta_seconds(T0, now, min(0.999, fraction + 0.0005)) <= eta


# -- the safe message rule ------------------------------------------------------------------

def test_only_messages_meant_for_users_reach_them():
    assert user_message(PermanentError(f"db {SECRET}", "The room is taken."), "book") \
        == "The room is taken."
    assert user_message(RetryableError(f"HTTP 503 from {SECRET}.internal"), "http_request") \
        == "The step “http request” failed."
    assert user_message(RuntimeError(SECRET), "send_email") == "The step “send email” failed."
    assert user_message(RuntimeError(SECRET), None) == GENERIC_FAILURE


# -- the checker ----------------------------------------------------------------------------

def test_the_checker_reports_bad_user_retry_and_notify_with_positions():
    text = ("form: x\nfields: [{name: ok, type: boolean, hidden: true}]\nevents:\n"
            "  submit:\n    - background:\n        user_retry: yes please\n"
            "        notify: {events: [start, ending], email: 3, when: x}\n"
            "        do: [{log: hi}]\n")
    _, problems = parse_form(text, "x.yaml")
    said = [str(p) for p in problems]
    assert any(s.startswith("x.yaml:6:21: events/submit/0/background: expected true or "
                            "false") for s in said), said
    assert any("x.yaml:7:" in s and "unknown moment 'ending'" in s
               and "did you mean 'end'" in s for s in said), said
    assert any("'email' must be true" in s for s in said), said
    assert any("unknown notify option 'when'" in s for s in said), said
    _, problems = parse_form(text.replace("events: [start, ending], email: 3, when: x",
                                          "on: [start]"), "x.yaml")
    assert any("x.yaml:7:18:" in str(p) and "name the moments with 'events:'" in str(p)
               for p in problems), [str(p) for p in problems]
    form, problems = parse_form(text.replace("yes please", "true").replace(
        "[start, ending], email: 3, when: x", "[end, start], email: '{{ record.ok }}'"),
        "x.yaml")
    assert problems == []
    node = form.events["submit"][0]
    assert node.user_retry and node.notify.events == ("start", "end")
    assert node.notify.email == "{{ record.ok }}"


# -- 1: the owner sees what went wrong and tries again ---------------------------------------

def test_owner_sees_safe_details_and_retries_after_the_completed_steps(
        app, client, rt, worker):
    token = token_of(submit(client, "retryable", {"name": "Ann"}))
    wait_until(lambda: status_of(rt, token) == RunStatus.DEAD, timeout=60)
    status = client.get(f"/r/{token}/status").json
    (run,) = status["runs"]
    assert status["state"] == "failed" and run["user_retry"] is True
    assert run["error"] == "The step “fail first time” failed."
    assert run["error_step"] == "fail first time"
    assert SECRET not in json.dumps(status)
    page = client.get(f"/r/{token}").get_data(as_text=True)
    assert "Try again" in page and "fail first time" in page and SECRET not in page
    tasks = client.get("/tasks").get_data(as_text=True)
    assert "Try again" in tasks and SECRET not in tasks

    # No CSRF token: refused. Someone else: 404, as for anything not theirs.
    assert client.post(f"/tasks/{run['id']}/retry").status_code == 400
    stranger = app.test_client()
    submit(stranger, "retryable", {"name": "Eve"})  # has an owner cookie of her own
    assert post(stranger, f"/tasks/{run['id']}/retry", {}, headers={
        "Referer": "http://localhost/tasks"}).status_code == 404
    assert status_of(rt, token) == RunStatus.DEAD

    answer = post(client, f"/tasks/{run['id']}/retry", {},
                  headers={"Referer": f"http://localhost/r/{token}"})
    assert answer.status_code == 303 and answer.headers["Location"] == f"/r/{token}"
    wait_until(lambda: status_of(rt, token) == RunStatus.DONE, timeout=60)
    with rt.store.session() as s:
        assert s.scalar(select(Record.data).where(Record.token == token))["done"] is True
    # This Run's own steps: "first" ran once (checkpointed before the failure), "second"
    # once, after the retry.
    run_id = run["id"]
    own = [line for line in read_calls(rt.settings.instance_dir) if run_id in line]
    assert [line.split()[0] for line in own] == ["first", "second"]
    assert client.get(f"/r/{token}/status").json["runs"][0]["user_retry"] is False


def test_a_failed_run_without_user_retry_offers_no_retry(client, rt):
    form = "form: plain\nfields: [{name: name, type: string}]\nevents:\n  submit:\n" \
           "    - background: {title: Plain, retry: false, do: [{explode: {permanent: true}}]}\n"
    (Path(rt.settings.rules_dir) / "plain.yaml").write_text(form)
    wait_until(lambda: client.get("/forms/plain").status_code == 200)
    token = token_of(submit(client, "plain", {"name": "Bo"}))
    work(rt)
    (run,) = client.get(f"/r/{token}/status").json["runs"]
    assert run["status"] == "dead" and run["user_retry"] is False
    assert run["error"] == "The step “explode” failed." and SECRET not in json.dumps(run)
    assert post(client, f"/tasks/{run['id']}/retry").status_code == 303  # refused, said so
    assert status_of(rt, token) == RunStatus.DEAD


def test_status_json_has_started_updated_and_an_eta_once_progress_moves(client, rt, worker):
    token = token_of(submit(client, "progressing", {"name": "Cy"}))
    first = client.get(f"/r/{token}/status").json
    assert first["eta_seconds"] is None and first["runs"][0]["eta_seconds"] is None
    assert first["updated_at"] is not None

    def moving():
        status = client.get(f"/r/{token}/status").json
        return status if status["state"] == "working" and 0 < status["progress"] < 100 \
            and status["eta_seconds"] is not None else None

    status = wait_until(moving, timeout=60)
    assert status["started_at"] is not None
    assert isinstance(status["eta_seconds"], int) and status["eta_seconds"] >= 0
    assert isinstance(status["runs"][0]["eta_seconds"], int)
    api = tokens_auth(rt)
    body = client.get(f"/api/records/{token}", headers=api).json
    assert {"started_at", "updated_at", "eta_seconds"} <= set(body)
    spec = client.get("/api/openapi.json").json
    Draft202012Validator({"$ref": "#/components/schemas/Record",
                          "components": spec["components"]}).validate(body)
    assert {"started_at", "updated_at", "eta_seconds"} <= set(
        spec["components"]["schemas"]["Record"]["properties"])


def tokens_auth(rt) -> dict[str, str]:
    with rt.store.session() as s:
        return {"Authorization": f"Bearer {tokens.create(s, 'eta-reader')}"}


# -- 3: notices at start and end, by e-mail, pushed live -------------------------------------

class Stream:
    """An SSE client: reads the stream in a thread, one (event, data) per message."""

    def __init__(self, browser: Browser, path: str = "/events"):
        self.response = browser.opener.open(browser.base + path, timeout=60)
        self.events: queue.Queue = queue.Queue()
        self.first = self.response.readline().decode()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind, data = "message", ""
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and data:
                    self.events.put((kind, json.loads(data)))
                    kind, data = "message", ""
        except (OSError, ValueError):
            return

    def next(self, timeout: float = 60) -> tuple[str, dict]:
        return self.events.get(timeout=timeout)


def test_start_and_end_are_pushed_live_noticed_and_emailed(rt, subprocess_env, worker):
    make_user(rt, "nina")
    make_user(rt, "otto")
    server = WebProcess(subprocess_env).start()
    try:
        person = Browser(server.url)
        person.post_form("/login", {"name": "nina", "password": "correct horse battery"})
        # The preference: an address (the node's `email: true` sends there) and e-mail on end.
        page = person.get("/notifications")
        assert "E-mail me when a task of mine finishes" in page
        status, _, _ = person.request("/notifications/preferences", {
            **page_tokens(page.encode()), "email": "nina@example.com", "email_on_end": "y"})
        assert status == 303
        # Without the CSRF token the preference is refused.
        assert person.request("/notifications/preferences", {"email": "x@example.com"})[0] \
            == 400

        stream = Stream(person)
        assert stream.first.startswith("retry: ")
        other = Browser(server.url)
        other.post_form("/login", {"name": "otto", "password": "correct horse battery"})
        others = Stream(other)
        wait_path = person.post_form("/forms/notified", {"name": "Nina"})
        token = wait_path.rsplit("/", 1)[-1]
        seen = []
        while not seen or seen[-1][0] != "end":
            kind, data = stream.next()
            if data["record"] == token:
                seen.append((kind, data))
        assert seen[0][0] == "start" and seen[0][1]["status"] == "running"
        assert seen[-1][1]["status"] == "done" and seen[-1][1]["title"] == "Report for Nina"
        # Someone else's stream carries nothing of Nina's; no cookie at all: 404.
        assert others.events.empty()
        assert Browser(server.url).request("/events")[0] == 404
        page = person.get(wait_path)
        assert 'data-events-url="/events"' in page
    finally:
        server.stop()
        server.log.close()
    with rt.store.session() as s:
        notes = list(s.scalars(select(Notification).where(
            Notification.record_token == token).order_by(Notification.id)))
    assert [n.message for n in notes] == ["Report for Nina: started.", "Report for Nina: done."]
    assert all(n.email_to == "nina@example.com" for n in notes)

    def mails():
        found = [email.message_from_bytes(p.read_bytes())
                 for p in rt.settings.outbox_dir.glob("notice-*.eml")]
        return found if len(found) == 2 else None

    sent = wait_until(mails, timeout=30)
    assert sorted(m["Subject"] for m in sent) == ["Report for Nina: done.",
                                                  "Report for Nina: started."]
    assert {m["To"] for m in sent} == {"nina@example.com"}


def test_a_stream_holds_no_database_connection_and_ends_by_itself(app, client, rt):
    from formrules.runs import control
    from formrules.web import events
    token = token_of(submit(client, "long", {"name": "Hep"}))  # an owner, and a Run
    runtime = app.extensions["formrules"]
    runtime.settings = rt.settings.with_overrides(sse_seconds=1.5)
    response = client.get("/events", buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = iter(response.response)
    assert next(chunks).startswith(b"retry: 3000")
    assert runtime.store.engine.pool.checkedout() == 0  # streaming, no connection held
    assert events._open == 1
    with rt.store.session() as s:  # the Run ends (cancelled): published after the commit
        control.cancel(s, s.get(Run, runs(rt, token)[0].id), "a test")
    rest = b"".join(chunks).decode()  # ends after sse_seconds: the browser reconnects
    response.close()
    assert events._open == 0
    assert "event: end\ndata: " in rest and f'"record": "{token}"' in rest
    assert '"status": "cancelled"' in rest


def test_the_event_stream_is_owner_only_and_refuses_streams_past_the_limit(app, client, rt):
    assert client.get("/events").status_code == 404  # no owner yet: nothing to stream
    submit(client, "long", {"name": "Gus"})  # now this browser owns something
    app.extensions["formrules"].settings = rt.settings.with_overrides(sse_streams=0)
    refused = client.get("/events")
    assert refused.status_code == 204  # SSE's "do not reconnect": the page polls


# -- 10: deleting a running task cancels it first --------------------------------------------

def test_api_delete_of_a_running_record_cancels_then_deletes_without_later_writes(
        client, rt, worker):
    auth = tokens_auth(rt)
    created = client.post("/api/forms/long", headers=auth, json={"name": "Di"})
    token = created.json["token"]
    (run,) = runs(rt, token)
    wait_until(lambda: any(line.startswith("before") and run.id in line
                           for line in read_calls(rt.settings.instance_dir)), timeout=60)
    answer = client.delete(f"/api/records/{token}", headers=auth)  # its step is held
    assert answer.status_code == 202 and answer.json["state"] == "deleting"
    release(rt)  # now the running step ends: it writes, and nothing after it runs
    spec = client.get("/api/openapi.json").json
    Draft202012Validator({"$ref": "#/components/schemas/Deleting",
                          "components": spec["components"]}).validate(answer.json)
    assert set(spec["paths"]["/api/records/{token}"]["delete"]["responses"]) >= {
        "202", "204", "404"}
    assert client.get(f"/api/records/{token}", headers=auth).status_code == 404
    assert client.delete(f"/api/records/{token}", headers=auth).status_code == 404

    def gone():
        with rt.store.session() as s:
            return s.scalar(select(Record.id).where(Record.token == token)) is None and \
                s.get(Run, run.id) is None
    wait_until(gone, timeout=60)
    # The step that was running finished (its write landed before the delete); the next
    # one never started.
    assert not any(line.startswith("after") and run.id in line
                   for line in read_calls(rt.settings.instance_dir))


def test_api_delete_of_an_idle_record_is_immediate(client, rt):
    auth = tokens_auth(rt)
    token = client.post("/api/forms/long", headers=auth, json={"name": "Ed"}).json["token"]
    assert client.delete(f"/api/records/{token}", headers=auth).status_code == 204
    with rt.store.session() as s:
        assert s.scalar(select(Record.id).where(Record.token == token)) is None
        assert not list(s.scalars(select(Run).where(Run.form_id == "long")))


def test_my_tasks_delete_of_a_running_task_cancels_it_first(client, rt, worker):
    token = token_of(submit(client, "long", {"name": "Flo"}))
    (run,) = runs(rt, token)
    wait_until(lambda: status_of(rt, token) == RunStatus.RUNNING, timeout=60)
    answer = post(client, f"/tasks/{run.id}/delete", {}, headers={
        "Referer": "http://localhost/tasks"})
    assert answer.status_code == 303
    release(rt)
    wait_until(lambda: status_of(rt, token) == RunStatus.CANCELLED, timeout=60)
    assert run.id not in client.get("/tasks").get_data(as_text=True)
    assert not any(line.startswith("after") and run.id in line
                   for line in read_calls(rt.settings.instance_dir))


# -- the same in a browser: the failure, Try again, live events, no CSP violation -----------

@pytest.mark.browser
@pytest.mark.slow
def test_in_a_browser_the_owner_tries_again_and_the_page_follows_live(
        browser, web, rt, worker):
    context = browser.new_context()
    page = context.new_page()
    problems, streams = [], []
    ARTIFACTS.mkdir(exist_ok=True)
    page.on("console", lambda m: problems.append(m.text)
            if "Content Security Policy" in m.text or m.type == "error" else None)
    page.on("request", lambda r: streams.append(r.url) if r.url.endswith("/events") else None)
    try:
        page.goto(f"{web.url}/forms/retryable")
        page.get_by_label("Name").fill("Hal")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url("**/r/*")
        page.locator('.status-body[data-state="failed"]').wait_for(timeout=60000)
        assert page.locator("#summary").get_by_text(
            "The step “fail first time” failed.").is_visible()
        page.screenshot(path=str(ARTIFACTS / "user-retry-failed.png"), full_page=True)
        assert SECRET not in page.content()
        assert streams, "the waiting page opened no live event stream"
        page.get_by_role("button", name="Try Booking for Hal again").click()
        page.locator('.status-body[data-state="done"]').wait_for(timeout=60000)
        assert problems == [], problems
    finally:
        context.close()


def test_notify_can_email_an_address_from_the_record_or_stay_quiet(client, rt):
    (Path(rt.settings.rules_dir) / "mailed.yaml").write_text("""
form: mailed
title: Mailed
fields:
  - {name: email, type: email, required: true}
events:
  submit:
    - background:
        title: Export for {{ record.email }}
        notify: {events: [end], email: "{{ record.email }}"}
        do: [{log: exported}]
    - background:
        title: Quiet work
        notify: false
        do: [{log: quiet}]
""")
    wait_until(lambda: client.get("/forms/mailed").status_code == 200)
    token = token_of(submit(client, "mailed", {"email": "ann@example.com"}))
    work(rt)
    assert {r.status for r in runs(rt, token)} == {RunStatus.DONE}
    with rt.store.session() as s:
        notes = list(s.scalars(select(Notification).where(Notification.record_token == token)))
    assert [(n.message, n.email_to) for n in notes] == [
        ("Export for ann@example.com: done.", "ann@example.com")]
    assert notes[0].emailed_at is not None
    (sent,) = [email.message_from_bytes(p.read_bytes())
               for p in rt.settings.outbox_dir.glob("notice-*.eml")]
    assert sent["To"] == "ann@example.com"
    assert sent["Subject"] == "Export for ann@example.com: done."
