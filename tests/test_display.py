"""Times as people read them (Babel via Flask-Babel), with the clock moved, not slept:
every unit boundary, past and future, on the functions and on the pages that show them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

from formrules.web import display
from tests.helpers import examples, runs_of, submit, token_of
from tests.web_helpers import add_web_rules

NOW = datetime(2026, 3, 14, 11, 0, 0, tzinfo=UTC)  # a Saturday; Berlin is on CET (+1)
# Seconds at and around every place a wording changes: "just now", seconds, minutes,
# hours, days, months, years (Babel rounds up from 85% of the next unit).
BOUNDARIES = (0, 1, 9, 10, 11, 44, 45, 46, 50, 51, 52, 56, 57, 58, 59, 60, 61, 89, 90, 91,
              119, 120, 3059, 3060, 3061, 3599, 3600, 3601, 5399, 5400, 73439, 73440,
              86399, 86400, 86401, 172800, 2246400, 2592000, 31535999, 31536000)


@pytest.fixture(scope="module")
def berlin():
    """A bare app with the display set up for Europe/Berlin (no store needed)."""
    app = Flask(__name__)
    display.init_app(app, "Europe/Berlin")
    return app


@pytest.mark.parametrize("sign", [1, -1], ids=["future", "past"])
@pytest.mark.parametrize("seconds", BOUNDARIES)
def test_every_offset_across_unit_boundaries_has_a_wording(berlin, seconds, sign):
    delta = timedelta(seconds=sign * seconds)
    with time_machine.travel(NOW, tick=False), berlin.test_request_context():
        words = display.relative(delta)
        shown = str(display.when(NOW + delta))
    assert words and words in shown
    if seconds >= 10:  # the direction is always said
        assert words.startswith("in ") if sign > 0 else words.endswith(" ago")


@pytest.mark.parametrize(("seconds", "expected"), [
    (0, "just now"), (-9, "just now"), (9, "in a moment"),
    (45, "in 45 seconds"), (-50, "50 seconds ago"), (50, "in 50 seconds"), (51, "in 1 minute"),
    (-57, "1 minute ago"), (90, "in 2 minutes"), (-3600, "1 hour ago"),
    (5400, "in 2 hours"), (-86400, "1 day ago"), (2 * 86400, "in 2 days"),
])
def test_wordings(berlin, seconds, expected):
    with time_machine.travel(NOW, tick=False), berlin.test_request_context():
        assert display.relative(timedelta(seconds=seconds)) == expected


def test_dates_are_in_the_configured_zone(berlin):
    with time_machine.travel(NOW, tick=False), berlin.test_request_context():
        shown = display.when(NOW + timedelta(hours=1), False).replace("\u202f", " ")
        assert ">today at 1:00 PM CET<" in shown
        assert "tomorrow at" in display.when(NOW + timedelta(hours=13))  # 01:00 Sunday
        assert "today at" in display.when(NOW - timedelta(hours=11))  # 01:00 Saturday
        assert "yesterday at" in display.when(NOW - timedelta(hours=13))  # 23:00 Friday
        assert "Mar 1, 2026" in display.when(NOW - timedelta(days=13))
        assert ">2026-03-14 12:00:00<" in display.clock(NOW)
        assert display.duration(350) == "350 ms"
        assert display.duration(4200) == "4.2 s"


@settings(max_examples=examples(300), deadline=None)
@given(offset=st.timedeltas(min_value=timedelta(days=-3650), max_value=timedelta(days=3650)))
def test_any_offset_formats_without_raising(berlin, offset):
    with time_machine.travel(NOW, tick=False), berlin.test_request_context():
        assert display.relative(offset)
        assert "<time datetime=" in display.when(NOW + offset)
        assert display.duration(abs(offset).total_seconds() * 1000)


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


def test_pages_answer_at_every_boundary(client, rt):
    """A reminder an hour out: its pages, loaded as time passes, never answer 500."""
    token = token_of(submit(client, "later", {"name": "Ann"}))
    (run,) = runs_of(rt, token)
    assert run.status == "scheduled"
    created, due = run.created_at.replace(tzinfo=UTC), run.due_at.replace(tzinfo=UTC)
    # In order, as time passes (the session cookie is re-signed at each moment).
    moments = sorted([due - timedelta(seconds=s) for s in BOUNDARIES if s < 3500] +
                     [created + timedelta(seconds=s) for s in BOUNDARIES if s < 3500])
    # Never before the cookie was signed (whole seconds): a signature from the future is
    # refused as expired, which would log this browser out of its own page.
    signed = created.replace(microsecond=0) + timedelta(seconds=1)
    moments = [max(moment, signed) for moment in moments]
    for moment in moments:
        with time_machine.travel(moment, tick=False):
            for page in (f"/r/{token}", f"/r/{token}/part", "/tasks", "/tasks/part"):
                response = client.get(page)
                assert response.status_code == 200, (page, moment - created)
