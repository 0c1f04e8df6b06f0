"""The life of a job: for every shipped example form, a person with a browser and one
without JavaScript submit, then keep loading every page they can reach (and an operator
the admin pages of that Run and record) once a second until every Run has ended,
a one-minute Delay included. Zero 5xx, zero console errors, and the waiting page reaches
its done state by itself. Also: cancelling near the end, and an operator edit mid-run.

Real processes throughout: `formrules web`, a worker, a private Redis. Under xdist these
tests run beside the others, so their minute of waiting overlaps the rest of the suite.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from sqlalchemy import select

from formrules.store.models import ResultFile
from tests.helpers import record_of, runs_of, wait_until
from tests.journey import (
    DONE,
    EXAMPLES,
    Watch,
    answers,
    fill,
    short_rules,
    shot,
)
from tests.web_helpers import PASSWORD, make_user

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DESKTOP = {"viewport": {"width": 1280, "height": 900}}
ENDS_WITHIN = 240  # seconds: the longest example waits a minute, then a few seconds' work


@pytest.fixture
def rules_dir(tmp_path):
    """The shipped examples (rules/*.yaml), with waits of days cut to a minute."""
    return short_rules(tmp_path / "rules")


@pytest.fixture
def settings(settings):
    """Production timings for what a person can notice (heartbeat, progress writes)."""
    return dataclasses.replace(settings, heartbeat_seconds=5.0, stale_seconds=30.0,
                               reconcile_seconds=2.0, progress_write_seconds=0.5)


@dataclasses.dataclass
class Person:
    """Someone who submitted a form, in a browser context of their own."""

    name: str
    context: object
    page: object  # the waiting page they stay on
    prober: object  # a second tab they use to look around
    token: str = ""
    navigations: list[str] = dataclasses.field(default_factory=list)
    done_on_arrival: bool = False  # quick work can end before the waiting page first loads

    def paths(self) -> list[str]:
        """Every page this person can reach about their submission."""
        t = self.token
        return [f"/r/{t}", f"/r/{t}/part", f"/r/{t}/status", "/tasks", "/tasks/part",
                "/notifications"]


def submit_as(browser, watch: Watch, base_url: str, form_id: str, name: str, *,
              javascript: bool) -> Person:
    """Open the form, fill it in, send it; the person lands on the waiting page."""
    context = browser.new_context(java_script_enabled=javascript, **DESKTOP)
    watch.attach(context)
    page = context.new_page()
    page.goto(f"{base_url}/forms/{form_id}")
    fill(page, answers(form_id, name))
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/r/*")
    person = Person(name, context, page, context.new_page(), page.url.rsplit("/", 1)[-1],
                    done_on_arrival=page.locator(DONE).count() > 0)
    page.on("framenavigated", lambda frame: frame == page.main_frame
            and person.navigations.append(frame.url))
    return person


def operator_in(browser, watch: Watch, base_url: str):
    """A browser context logged in as the operator olga."""
    context = browser.new_context(**DESKTOP)
    watch.attach(context)
    page = context.new_page()
    page.goto(f"{base_url}/login")
    page.get_by_label("User name").fill("olga")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login" not in url)
    return context, page


def operator_paths(rt, tokens: list[str]) -> list[str]:
    """The admin pages of these records and of each of their Runs."""
    paths = ["/admin", "/admin/records", "/admin/queues", "/admin/dead"]
    for token in tokens:
        record_id = record_of(rt, token).id
        paths += [f"/admin/records/{record_id}", f"/admin/records/{record_id}/edit"]
        paths += [f"/admin/runs/{run.id}" for run in runs_of(rt, token)]
    return paths


def downloads(rt, token: str) -> list[str]:
    """The result files of this record's Runs, as their owner downloads them."""
    ids = [run.id for run in runs_of(rt, token)]
    with rt.store.session() as s:
        return [f"/files/{file_id}" for file_id in
                s.scalars(select(ResultFile.id).where(ResultFile.run_id.in_(ids)))]


def ended(rt, tokens: list[str]) -> bool:
    """True once every Run of these records is over."""
    runs = [run for token in tokens for run in runs_of(rt, token)]
    return bool(runs) and all(run.is_final for run in runs)


def look_around(rt, watch: Watch, base_url: str, people: list[Person], operator, tick: int):
    """One second of a person's (and the operator's) attention: every page, once."""
    for person in people:
        for path in person.paths() + downloads(rt, person.token):
            watch.get(person.context, path, base_url)
        # A real page load too, so page scripts run (and their console errors count).
        tabs = ["/tasks", "/notifications", f"/r/{person.token}"]
        person.prober.goto(base_url + tabs[tick % len(tabs)])
    context, page = operator
    paths = operator_paths(rt, [p.token for p in people])
    for path in paths:
        watch.get(context, path, base_url)
    page.goto(base_url + paths[tick % len(paths)])


def live_until_ended(rt, watch, base_url, people, operator) -> None:
    """Look at every page once a second until every Run of these people has ended."""
    tokens = [p.token for p in people]
    deadline, tick = time.monotonic() + ENDS_WITHIN, 0
    while not ended(rt, tokens):
        runs = [run for token in tokens for run in runs_of(rt, token)]
        # Nothing in the examples is meant to fail: a retry is a defect, said at once.
        assert time.monotonic() < deadline and not any(r.status == "retrying" for r in runs), \
            [(r.title, r.status, r.last_error) for r in runs]
        started = time.monotonic()
        look_around(rt, watch, base_url, people, operator, tick)
        tick += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    look_around(rt, watch, base_url, people, operator, tick)  # and once more, all over


def problems(watch: Watch, web) -> str:
    """What went wrong, with the server's own log for the 5xx."""
    text = "\n".join(watch.server_errors + watch.console_errors)
    if watch.server_errors:
        text += "\n--- server log (tail) ---\n" + web.output()[-4000:]
    return text


@pytest.mark.parametrize("form_id", EXAMPLES)
def test_life_of_a_job(form_id, browser, web, worker, rt):
    make_user(rt, "olga", operator=True)
    watch = Watch()
    people = []
    try:
        people = [submit_as(browser, watch, web.url, form_id, "Ann Lee", javascript=True),
                  submit_as(browser, watch, web.url, form_id, "Bob Stone", javascript=False)]
        operator = operator_in(browser, watch, web.url)
        live_until_ended(rt, watch, web.url, people, operator)

        for person in people:  # the page each stayed on got there by itself
            person.page.wait_for_selector(DONE, timeout=30000)
        with_js, without_js = people
        assert with_js.navigations == [], "the waiting page reloaded instead of updating"
        assert without_js.navigations or without_js.done_on_arrival, \
            "without JavaScript the page never refreshed"
        statuses = [(r.title, r.status) for p in people for r in runs_of(rt, p.token)]
        assert all(status == "done" for _, status in statuses), statuses
        assert not watch.server_errors and not watch.console_errors, problems(watch, web)
    except Exception:
        for person in people:
            shot(person.page, f"life-{form_id}-{person.name.split()[0].lower()}")
        raise


def reserving(rt, token: str):
    """The room_booking Run that reserves the room."""
    return next((r for r in runs_of(rt, token) if r.title.startswith("Reserving")), None)


def test_a_cancel_near_the_end_stops_the_run(browser, web, worker, rt):
    watch = Watch()
    person = submit_as(browser, watch, web.url, "room_booking", "Cid Moss", javascript=True)
    # The last seconds of its work (most of simulate_work's steps are done): the person
    # opens My tasks and presses Cancel.
    wait_until(lambda: (run := reserving(rt, person.token)) and run.percent >= 50,
               timeout=60, interval=0.05)
    page = person.prober
    page.goto(f"{web.url}/tasks")
    page.get_by_role("button", name="Cancel Reserving Atlas").click()
    page.wait_for_load_state()
    run = wait_until(lambda: (r := reserving(rt, person.token)) and r.is_final and r,
                     timeout=60)
    outbox = rt.settings.outbox_dir
    mails = [m.read_text(errors="replace") for m in outbox.glob("*.eml")] \
        if outbox.exists() else []
    assert run.status == "cancelled", run.status
    assert record_of(rt, person.token).data.get("confirmed") is not True
    assert not [m for m in mails if "is booked" in m]
    assert not watch.server_errors and not watch.console_errors, problems(watch, web)


def test_an_operator_edits_a_record_while_its_work_runs(browser, web, worker, rt):
    make_user(rt, "olga", operator=True)
    watch = Watch()
    person = submit_as(browser, watch, web.url, "room_booking", "Dee Park", javascript=True)
    operator = operator_in(browser, watch, web.url)
    record_id = record_of(rt, person.token).id
    # While the reservation runs, the operator moves the booking to another room.
    wait_until(lambda: (run := reserving(rt, person.token)) and run.status == "running",
               timeout=60, interval=0.05)
    page = operator[1]
    for _ in range(3):  # a worker write between loading and saving asks for a second try
        page.goto(f"{web.url}/admin/records/{record_id}/edit")
        page.locator('[name="room"]').select_option("Borealis")
        page.get_by_role("button", name="Save changes").click()
        page.wait_for_load_state()
        if "changed while you were editing" not in page.content():
            break
    assert record_of(rt, person.token).data["room"] == "Borealis"

    live_until_ended(rt, watch, web.url, [person], operator)
    person.page.wait_for_selector(DONE, timeout=30000)
    runs = runs_of(rt, person.token)
    assert any(r.title.startswith("Telling Dee Park") for r in runs), \
        [r.title for r in runs]
    assert all(r.status == "done" for r in runs), [(r.title, r.status, r.last_error)
                                                   for r in runs]
    mails = [m.read_text(errors="replace") for m in rt.settings.outbox_dir.glob("*.eml")]
    assert any("It was Atlas on" in m for m in mails), mails
    assert not watch.server_errors and not watch.console_errors, problems(watch, web)
