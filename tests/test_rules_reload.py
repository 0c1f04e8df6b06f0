"""Live reload of rule files with last-good (issue 12, item 1).

The registry unit tests call `refresh()` (no clock involved); the end-to-end test runs a
real web process and a real worker process and edits a rule file under them.
"""

from __future__ import annotations

import http.cookiejar
import logging
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from formrules.language.registry import RuleRegistry
from formrules.runs.schedule import fire_due
from formrules.store.models import Run, ScheduleSlot
from tests.fixture_actions import read_calls
from tests.helpers import ROOT, WorkerProcess, tokens, wait_until
from tests.web_helpers import PASSWORD, login, make_user

GOOD = "form: live\ntitle: Live v1\nfields: [{name: n, type: string}]\n"
EDITED = "form: live\ntitle: Live v2\nfields: [{name: n, type: string}]\n"
BROKEN = ("form: live\ntitle: Live v3\nfields: [{name: n, type: string}]\n"
          "events:\n  submit:\n    - send_emial: {to: x}\n")


def test_a_changed_file_replaces_its_form_and_a_broken_one_keeps_the_last_good(
        tmp_path, caplog):
    (tmp_path / "live.yaml").write_text(GOOD)
    (tmp_path / "other.yaml").write_text("form: other\n")
    registry = RuleRegistry(tmp_path)
    assert registry.rules().form("live").title == "Live v1"
    assert registry.status().ok

    (tmp_path / "live.yaml").write_text(EDITED)
    assert registry.refresh()
    assert registry.rules().form("live").title == "Live v2"

    caplog.set_level(logging.INFO, "formrules.rules")
    (tmp_path / "live.yaml").write_text(BROKEN)
    assert registry.refresh()
    for _ in range(3):
        assert not registry.refresh()  # nothing changed since: no new log line
    assert registry.rules().form("live").title == "Live v2"  # the last good version
    assert sorted(registry.rules().forms) == ["live", "other"]
    status = registry.status()
    assert not status.ok and status.ready
    assert status.stale == (str(tmp_path / "live.yaml"),)
    problem, = status.broken[str(tmp_path / "live.yaml")]
    assert "unknown action 'send_emial' (did you mean 'send_email'?)" in problem.message
    assert [r.getMessage() for r in caplog.records] == [
        f"rules: {tmp_path}/live.yaml has 1 problem(s), keeping the last good version of "
        f"form 'live'; first: {tmp_path}/live.yaml:6:7: events/submit/0: unknown action "
        "'send_emial' (did you mean 'send_email'?)"]

    (tmp_path / "live.yaml").write_text(EDITED.replace("v2", "v4"))
    assert registry.refresh()
    assert registry.rules().form("live").title == "Live v4" and registry.status().ok

    (tmp_path / "other.yaml").unlink()
    (tmp_path / "new.yml").write_text("form: new\n")
    assert registry.refresh()
    assert sorted(registry.rules().forms) == ["live", "new"]


def test_a_file_broken_from_the_start_leaves_the_others_in_use(tmp_path):
    (tmp_path / "a.yaml").write_text("form: a\n")
    (tmp_path / "b.yaml").write_text("form: [unclosed\n")
    (tmp_path / "c.yaml").write_text("form: a\n")  # the same id as a.yaml
    registry = RuleRegistry(tmp_path)
    assert list(registry.rules().forms) == ["a"]
    status = registry.status()
    assert status.stale == () and status.ready
    assert sorted(status.broken) == [str(tmp_path / "b.yaml"), str(tmp_path / "c.yaml")]
    assert status.broken[str(tmp_path / "c.yaml")][0].message == \
        f"form id 'a' is also used by {tmp_path}/a.yaml"
    nothing = RuleRegistry(tmp_path / "b.yaml")  # not a directory
    assert not nothing.status().ready


def test_a_touched_file_is_not_checked_again(tmp_path, caplog):
    (tmp_path / "a.yaml").write_text("form: a\n")
    registry = RuleRegistry(tmp_path)
    before = registry.rules()
    (tmp_path / "a.yaml").write_text("form: a\n")  # same text, new modification time
    assert not registry.refresh()
    assert registry.rules() is before


NIGHT = datetime(2030, 1, 1, 2, 0, tzinfo=UTC)
NIGHTLY = ("form: {id}\nfields: [{{name: n, type: string}}]\nschedules:\n"
           "  - {{name: nightly, cron: '0 2 * * *', do: [{{record_call: {{name: {id}}}}}]}}\n")


def test_one_broken_form_does_not_stop_the_schedules_of_the_others(rt, rules_dir):
    (rules_dir / "first.yaml").write_text(NIGHTLY.format(id="first"))
    (rules_dir / "second.yaml").write_text(NIGHTLY.format(id="second"))
    (rules_dir / "broken.yaml").write_text("form: broken\nevents: {submit: [{nope: 1}]}\n")
    assert fire_due(rt, now=NIGHT + timedelta(seconds=5)) == 2
    with rt.store.session() as s:
        keys = sorted(s.scalars(select(ScheduleSlot.schedule_key)
                                .where(ScheduleSlot.outcome.startswith("started"))))
    assert keys == ["first/nightly", "second/nightly"]


def test_the_app_starts_with_a_broken_file_and_operators_see_the_problem(rt, rules_dir,
                                                                         caplog):
    from formrules.web import create_app
    (rules_dir / "broken.yaml").write_text(
        "form: broken\nevents:\n  submit:\n    - send_emial: {to: x}\n")
    app = create_app({"TESTING": True}, settings=rt.settings)
    client = app.test_client()
    assert client.get("/forms/demo").status_code == 200
    assert client.get("/forms/broken").status_code == 404
    make_user(rt, "olga", operator=True)
    assert login(client, "olga").status_code == 303
    page = client.get("/admin").data.decode()
    assert "Rule files with problems" in page
    assert f"{rules_dir}/broken.yaml</code>: not loaded." in page
    assert "unknown action &#39;send_emial&#39;" in page
    visitor = app.test_client()
    assert "Rule files with problems" not in visitor.get("/forms/demo").data.decode()


# --- real processes -------------------------------------------------------------------

V1 = """form: live
title: Live v1
fields: [{name: n, type: string, required: true}]
events:
  submit:
    - delay:
        title: Later
        for: 3s
        do:
          - record_call: {name: old-tree}
"""


class Browser:
    """A cookie-keeping HTTP client for the real web process (no extra dependency)."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect())

    def get(self, path: str) -> tuple[int, str]:
        """GET a page: status and text."""
        try:
            with self.opener.open(self.base + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post(self, path: str, data: dict, form_page: str) -> int:
        """POST with the hidden tokens of `form_page`, as its form would."""
        _, page = self.get(form_page)
        body = urllib.parse.urlencode({**tokens(page.encode()), **data}).encode()
        try:
            with self.opener.open(self.base + path, body, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.fixture
def web_process(subprocess_env, tmp_path):
    """`formrules web` in a process of its own, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "web.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", "from formrules.cli import main; main()", "web",
         "--port", str(port)], env=subprocess_env, cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    browser = Browser(f"http://127.0.0.1:{port}")

    def up() -> bool:
        try:
            return browser.get("/")[0] == 200
        except OSError:
            return False
    wait_until(up, timeout=30)
    yield browser, tmp_path / "web.log"
    process.terminate()
    process.wait(10)
    log.close()


def test_an_edit_under_running_processes_serves_the_new_form_and_old_runs_finish_old(
        rt, rules_dir, subprocess_env, web_process):
    browser, web_log = web_process
    (rules_dir / "live.yaml").write_text(V1)
    with WorkerProcess(subprocess_env) as worker:
        wait_until(lambda: "Live v1" in browser.get("/forms/live")[1])
        assert browser.post("/forms/live", {"n": "first"}, "/forms/live") == 303

        (rules_dir / "live.yaml").write_text(V1.replace("v1", "v2")
                                             .replace("old-tree", "new-tree"))
        wait_until(lambda: "Live v2" in browser.get("/forms/live")[1])
        assert browser.post("/forms/live", {"n": "second"}, "/forms/live") == 303
        wait_until(lambda: len(read_calls(rt.settings.instance_dir)) == 2)
        names = sorted(line.split()[0] for line in read_calls(rt.settings.instance_dir))
        assert names == ["new-tree", "old-tree"]  # the first Run kept its snapshot

        (rules_dir / "live.yaml").write_text(V1.replace("v1", "v3")
                                             .replace("record_call", "record_cal"))
        make_user(rt, "olga", operator=True)
        assert browser.post("/login", {"name": "olga", "password": PASSWORD}, "/login") == 303
        wait_until(lambda: "Rule files with problems" in browser.get("/admin")[1])
        page = browser.get("/admin")[1]
        assert "its last good version is still in use" in page
        assert "Live v2" in browser.get("/forms/live")[1]  # the last good version served
        assert browser.post("/forms/live", {"n": "third"}, "/forms/live") == 303
        wait_until(lambda: len(read_calls(rt.settings.instance_dir)) == 3)
        with rt.store.session() as s:
            assert len(s.scalars(select(Run)).all()) == 3
        output = worker.stop()
    assert "Traceback" not in output
    warnings = [line for line in web_log.read_text().splitlines() if "has 1 problem(s)" in line]
    assert len(warnings) == 1, warnings  # one line per change, however often it is polled
