"""A real browser (Debian's headless Chromium, driven by Playwright) against the real app
and a real worker: live progress with JavaScript, the meta-refresh loop without it.

Screenshots go to test-artifacts/ (kept by CI). A missing browser fails the test: a
skipped browser test would hide that the pages were never seen.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from formrules.store.models import Record, Run
from tests.helpers import WorkerProcess, wait_until
from tests.web_helpers import PASSWORD, add_web_rules, make_user, workers_alive

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 900}}
DONE = '.status-body[data-state="done"]'


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


@pytest.fixture
def base_url(app):
    """The app served over real HTTP on a free local port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture
def worker(rt, subprocess_env):
    """A real worker process (forking work-horses, scheduler, reconciler), ready."""
    with WorkerProcess(subprocess_env) as process:
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, timeout=60)
        yield process


SECURITY_HEADERS = {"content-security-policy": "frame-ancestors 'none'",
                    "x-frame-options": "DENY", "x-content-type-options": "nosniff",
                    "referrer-policy": "same-origin"}


class CheckedBrowser:
    """Chromium whose every context records Content Security Policy violations from the
    console and pages served without the security headers (checked after each test)."""

    def __init__(self, chromium):
        self.chromium = chromium
        self.violations: list[str] = []
        self.unprotected: list[str] = []

    def new_context(self, **kwargs):
        """A browser context, watched."""
        context = self.chromium.new_context(**kwargs)
        context.on("console", self._console)
        context.on("response", self._response)
        return context

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text:
            self.violations.append(message.text)

    def _response(self, response) -> None:
        if response.request.resource_type != "document":
            return
        headers = response.headers
        missing = [name for name, value in SECURITY_HEADERS.items()
                   if value not in headers.get(name, "")]
        if missing:
            self.unprotected.append(f"{response.url}: {missing}")


@pytest.fixture
def browser():
    """Headless Chromium from the system: never downloaded. Every page it opens must
    carry the security headers and run without a single CSP violation."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package "
                    "(apt-get install chromium); the browser test must not be skipped")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        checked = CheckedBrowser(chromium)
        yield checked
        chromium.close()
    assert checked.violations == [], checked.violations
    assert checked.unprotected == [], checked.unprotected


def shot(page, name: str) -> None:
    """Save a full-page screenshot as a CI artifact."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fill_and_submit(page, base_url: str, name: str) -> None:
    """Open the test form, fill it in and send it, as a person would."""
    page.goto(f"{base_url}/forms/watch")
    page.get_by_label("Your name").fill(name)
    page.get_by_label("E-mail").fill(f"{name.lower()}@example.com")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/r/*")


def test_progress_updates_live_and_done_renders_in_place(browser, base_url, worker):
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    try:
        page.goto(f"{base_url}/forms/watch")
        shot(page, "form-desktop")
        fill_and_submit(page, base_url, "Ann")
        # A marker that a reload or navigation would wipe out, and a navigation counter.
        page.evaluate("window.__samePage = 'yes'")
        navigations = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url))

        bar = page.get_by_role("progressbar", name="Preparing the report for Ann")
        values, deadline, mid_shot = [], time.monotonic() + 90, False
        while time.monotonic() < deadline and page.locator(DONE).count() == 0:
            if bar.count():
                values.append(float(bar.get_attribute("value") or 0))
                if not mid_shot and 0 < values[-1] < 100:
                    shot(page, "waiting-progress")
                    mid_shot = True
            page.wait_for_timeout(150)
        page.wait_for_selector(DONE, timeout=30000)

        assert page.evaluate("window.__samePage") == "yes" and navigations == []
        midway = [v for v in values if 0 < v < 100]
        assert len(set(midway)) >= 2, values  # the bar moved, live, more than once
        assert values == sorted(values), values  # and only forward
        assert page.locator("#summary").get_by_text("Your report is ready, Ann.").is_visible()
        assert page.locator("#announce").text_content() == "Your report is ready, Ann."
        shot(page, "waiting-done")

        with page.expect_download() as download:
            page.get_by_role("link", name="Download report.csv").click()
        assert Path(download.value.path()).read_text().splitlines() == [
            "name,email", "Ann,ann@example.com"]

        page.goto(f"{base_url}/tasks")
        assert page.get_by_text("Preparing the report for Ann").is_visible()
        shot(page, "tasks-desktop")
        phone = browser.new_context(**PHONE, storage_state=context.storage_state())
        mobile = phone.new_page()
        mobile.goto(f"{base_url}/forms/watch")
        shot(mobile, "form-phone")
        mobile.goto(f"{base_url}/tasks")
        shot(mobile, "tasks-phone")
        assert mobile.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways
        phone.close()
    except Exception:
        shot(page, "failure-js")
        raise
    finally:
        context.close()


def test_a_failed_part_fetch_is_retried_and_the_page_still_reaches_done(
        browser, base_url, worker):
    """Issue 8: one failed fetch of the part froze the page on "running" until a reload."""
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    failed = []

    def fail_once(route):
        # The fetch that would bring in the result fails: the status says done from then
        # on, so the old script got only 304s and never fetched the part again.
        response = route.fetch()
        if not failed and 'data-state="done"' in response.text():
            failed.append(route.request.url)
            route.fulfill(status=500, body="boom")
        else:
            route.fulfill(response=response)

    try:
        page.route("**/r/*/part", fail_once)
        fill_and_submit(page, base_url, "Eve")
        navigations = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url))
        page.wait_for_selector(DONE, timeout=90000)
        assert failed  # the part did fail once
        assert navigations == []  # and a retry, not a reload, brought the result in place
        assert page.locator("#summary").get_by_text("Your report is ready, Eve.").is_visible()
    except Exception:
        shot(page, "failure-part-retry")
        raise
    finally:
        context.close()


def test_fetches_that_keep_failing_end_in_a_full_reload(browser, base_url, worker):
    """When the script's fetches keep failing, the page reloads whole (the server renders
    the current state) instead of showing "running" for ever."""
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    try:
        fill_and_submit(page, base_url, "Fay")
        page.route("**/r/*/part", lambda route: route.fulfill(status=502, body=""))
        page.route("**/r/*/status", lambda route: route.fulfill(status=502, body=""))
        with page.expect_navigation(timeout=60000):
            pass  # the script gives up on its fetches and reloads the page
        page.wait_for_selector(DONE, timeout=90000)  # reloads until the server says done
        assert page.locator("#summary").get_by_text("Your report is ready, Fay.").is_visible()
    except Exception:
        shot(page, "failure-reload")
        raise
    finally:
        context.close()


def test_my_tasks_follows_a_running_task_in_place(browser, base_url, worker):
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    try:
        fill_and_submit(page, base_url, "Dot")
        page.goto(f"{base_url}/tasks")
        page.evaluate("window.__samePage = 'yes'")
        task = page.locator("li.task", has_text="Preparing the report for Dot")
        assert task.locator(".pill").text_content() in ("Queued", "Running")
        task.locator(".pill-done").wait_for(timeout=90000)
        assert page.evaluate("window.__samePage") == "yes"  # updated without a reload
        assert task.get_by_role("link", name="report.csv").is_visible()
    except Exception:
        shot(page, "failure-tasks")
        raise
    finally:
        context.close()


def test_without_javascript_the_page_reloads_until_done(browser, base_url, worker):
    context = browser.new_context(java_script_enabled=False, **DESKTOP)
    page = context.new_page()
    try:
        fill_and_submit(page, base_url, "Bob")
        navigations = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url))
        assert page.locator('.status-body[data-state="working"]').count() == 1
        shot(page, "waiting-nojs")
        page.wait_for_selector(DONE, timeout=90000)
        assert len(navigations) >= 1  # the meta refresh reloaded it
        assert page.locator("#summary").get_by_text("Your report is ready, Bob.").is_visible()
        assert page.get_by_role("link", name="Download report.csv").is_visible()
        shot(page, "waiting-done-nojs")
    except Exception:
        shot(page, "failure-nojs")
        raise
    finally:
        context.close()


def test_operator_pages_in_the_browser(browser, base_url, worker, rt):
    make_user(rt, "olga", operator=True)
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    try:
        fill_and_submit(page, base_url, "Cat")
        page.wait_for_selector(DONE, timeout=90000)
        page.goto(f"{base_url}/admin")
        assert "/login" in page.url
        page.get_by_label("User name").fill("olga")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/admin")
        shot(page, "admin-runs")
        page.get_by_role("link", name="Preparing the report for Cat").click()
        page.wait_for_url("**/admin/runs/*")
        assert page.get_by_role("cell", name="finish").count() == 1
        shot(page, "admin-run")
        page.goto(f"{base_url}/admin/queues")
        shot(page, "admin-queues")
        for path in ("/admin/dead", "/admin/records", "/notifications", "/login"):
            page.goto(f"{base_url}{path}")
        with rt.store.session() as s:
            record_id = s.scalar(select(Record.id))
        page.goto(f"{base_url}/admin/records/{record_id}")
        page.goto(f"{base_url}/admin/records/{record_id}/edit")
        assert page.get_by_label("Your name").input_value() == "Cat"
        phone = browser.new_context(**PHONE, storage_state=context.storage_state())
        mobile = phone.new_page()
        mobile.goto(f"{base_url}/admin")
        shot(mobile, "admin-runs-phone")
        phone.close()
    except Exception:
        shot(page, "failure-admin")
        raise
    finally:
        context.close()


HOSTILE = """\
form: hostile
title: Hostile titles
fields: [{name: name, type: string}]
events:
  submit:
    - background:
        title: "<img src=x onerror=alert(1)> **bold** \\"]) click n0 call alert(1)"
        do: [{log: "<script>alert(1)</script>"}]
"""


def test_form_diagram_draws_each_tree_with_live_counts(browser, base_url, worker, rt,
                                                        rules_dir):
    """The operator's form page: Mermaid draws the tree (no CSP violation: the browser
    fixture fails on any), the deferred node shows its Runs per state, the counts link
    to the Runs list filtered to that node, and the outline stays as text. Author text
    that looks like markup or Mermaid syntax is drawn as text."""
    make_user(rt, "olga", operator=True)
    (rules_dir / "hostile.yaml").write_text(HOSTILE)
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    try:
        for form in ("broken", "later"):  # one Run ends dead, one waits an hour
            page.goto(f"{base_url}/forms/{form}")
            page.get_by_label("Name").fill("Dora")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url("**/r/*")
        with rt.store.session() as s:
            wait_until(lambda: s.scalar(select(Run.status).where(Run.form_id == "broken"))
                       == "dead" or s.expire_all(), timeout=60)
        page.goto(f"{base_url}/login?next=/admin/forms")
        page.get_by_label("User name").fill("olga")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/admin/forms")
        page.get_by_role("link", name="broken", exact=True).click()
        page.wait_for_selector('#diagrams[data-rendered="true"]', timeout=30000)
        svg = page.locator("#diagram-1 svg")
        assert svg.count() == 1
        assert "background 'Calling the room service'" in svg.text_content()
        assert "dead 1" in svg.text_content()
        dead = page.locator('a[data-path="events/submit/0/background"][data-state="dead"]')
        assert dead.inner_text() == "1"
        assert page.locator("pre.outline").inner_text().startswith("form broken: Broken")
        shot(page, "admin-form-diagram")
        dead.click()
        page.wait_for_url(lambda url: "/admin?" in url and "state=dead" in url)
        assert page.locator("tbody tr").count() == 1
        assert "Calling the room service" in page.locator("tbody tr").inner_text()
        page.goto(f"{base_url}/admin/forms/later")
        page.wait_for_selector('#diagrams[data-rendered="true"]', timeout=30000)
        waiting = page.locator('a[data-path="events/submit/0/delay"][data-state="waiting"]')
        assert waiting.inner_text() == "1"
        assert "waiting 1" in page.locator("#diagram-1 svg").text_content()
        shot(page, "admin-form-diagram-delay")
        page.goto(f"{base_url}/admin/forms/hostile")
        page.wait_for_selector('#diagrams[data-rendered="true"]', timeout=30000)
        drawn = page.locator("#diagram-1")
        assert drawn.locator("svg").count() == 1
        assert drawn.locator("img, script, strong, b").count() == 0
        assert "<img src=x onerror=alert(1)> **bold**" in drawn.text_content()
    except Exception:
        shot(page, "failure-form-diagram")
        raise
    finally:
        context.close()


def test_the_pages_cannot_be_framed(browser, base_url):
    context = browser.chromium.new_context(**DESKTOP)  # unwatched: a violation is expected
    page = context.new_page()
    refused = []
    page.on("console", lambda message: refused.append(message.text))
    try:
        page.goto(f"{base_url}/forms/watch")  # a page of the site itself tries to frame one
        page.evaluate("""(url) => new Promise((done) => {
            const frame = document.createElement('iframe');
            frame.src = url; frame.onload = done; document.body.append(frame);
            setTimeout(done, 5000);
        })""", f"{base_url}/admin/dead")
        assert any("frame-ancestors" in text for text in refused), refused
    finally:
        context.close()
