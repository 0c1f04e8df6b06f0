"""Unchanged status polls answered below Flask (`formrules.web.revalidate`): the same
answer the view gives, and the view for everything the middleware cannot decide alone."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from flask import request_started
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from formrules.store.models import Run
from formrules.web import revalidate
from tests.helpers import submit, token_of

GOOD = {"name": "Ann", "email": "ann@example.com", "count": "3"}


@contextmanager
def views(app):
    """The requests that reached Flask's dispatch (not answered by the middleware)."""
    seen: list[str] = []

    def note(sender, **extra):
        from flask import request
        seen.append(request.path)

    request_started.connect(note, app)
    try:
        yield seen
    finally:
        request_started.disconnect(note, app)


def polled(client, token: str) -> str:
    first = client.get(f"/r/{token}/status")
    assert first.status_code == 200
    return first.headers["ETag"]


def test_an_unchanged_anonymous_poll_is_answered_below_flask_as_the_view_would(
        app, client, monkeypatch):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)
    with views(app) as seen:
        fast = client.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert fast.status_code == 304 and seen == [] and fast.data == b""
    monkeypatch.setattr(revalidate.RevalidatedPolls, "unchanged", lambda *a: None)
    with views(app) as seen:
        slow = client.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert slow.status_code == 304 and seen == [f"/r/{token}/status"]
    assert sorted(fast.headers.items()) == sorted(slow.headers.items())
    assert "Set-Cookie" not in fast.headers


def test_a_changed_status_goes_to_the_view(app, client, rt):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)
    with rt.store.session() as s:
        s.scalar(select(Run)).progress_message = "halfway"
    with views(app) as seen:
        moved = client.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert moved.status_code == 200 and moved.json["runs"][0]["message"] == "halfway"
    assert seen and moved.headers["ETag"] != etag


@pytest.mark.parametrize("who", ["stranger", "tampered", "none"])
def test_someone_elses_poll_with_the_right_etag_is_404(app, client, who):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)
    other = app.test_client()
    if who == "stranger":
        submit(other, "demo", GOOD)  # a cookie of its own
    elif who == "tampered":
        value = client.get_cookie("session").value
        other.set_cookie("session", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    with views(app) as seen:
        answer = other.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert answer.status_code == 404 and seen


def test_a_logged_in_browser_is_checked_by_the_view(app, operator, client):
    """Its session may have been revoked: only the view reads that from the database."""
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(operator, token)
    with views(app) as seen:
        assert operator.get(f"/r/{token}/status",
                            headers={"If-None-Match": etag}).status_code == 304
    assert seen == [f"/r/{token}/status"]


def test_odd_tokens_and_methods_go_to_the_view(app, client):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)
    with views(app) as seen:
        assert client.get("/r/" + "a" * 65 + "/status",
                          headers={"If-None-Match": etag}).status_code == 404
        assert client.get(f"/r/{token}%2E/status",
                          headers={"If-None-Match": etag}).status_code == 404
        assert client.head(f"/r/{token}/status",
                           headers={"If-None-Match": etag}).status_code == 304
    assert len(seen) == 3


def test_a_database_error_leaves_the_answer_to_the_view(app, client, monkeypatch, caplog):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)

    def broken(conn, token):
        raise OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(revalidate, "poll_tag", broken)
    caplog.set_level(logging.DEBUG, "formrules.web")
    with views(app) as seen:
        answer = client.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert answer.status_code == 304 and seen
    assert [r.levelname for r in caplog.records if "the view answers" in r.message] == ["DEBUG"]


def test_a_bug_is_logged_loudly_and_the_view_answers(app, client, monkeypatch, caplog):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)
    monkeypatch.setattr(revalidate, "etag_for", lambda *a: 1 / 0)
    with views(app) as seen:
        answer = client.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert answer.status_code == 304 and seen
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)


def test_an_expired_cookie_goes_to_the_view(app, client):
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)  # its cookie is remembered as verified
    with time_machine.travel(datetime.now(UTC) + timedelta(days=366), tick=False), \
            views(app) as seen:
        answer = client.get(f"/r/{token}/status", headers={"If-None-Match": etag})
    assert answer.status_code == 404 and seen


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(who=st.sampled_from(["owner", "stranger", "none", "garbage"]),
       tag=st.sampled_from(["same", "weak", "list", "star", "other", "junk"]),
       path=st.sampled_from(["token", "longer", "upper", "slash", "missing"]))
def test_the_middleware_answers_as_the_view_would(app, client, who, tag, path):
    """Generated polls: the app with the middleware and the view alone agree."""
    from werkzeug.test import Client
    token = _token(app, client)
    etag = polled(client, token)
    cookies = {"owner": client.get_cookie("session").value, "none": None,
               "garbage": "eyJhbm9uIjoieCJ9.AAAA.BBBB",
               "stranger": _stranger_cookie(app)}
    headers = {"If-None-Match": {"same": etag, "weak": f"W/{etag}",
                                 "list": f'"x", {etag}', "star": "*",
                                 "other": '"0123"', "junk": "nonsense"}[tag]}
    if cookies[who]:
        headers["Cookie"] = f"session={cookies[who]}"
    url = {"token": f"/r/{token}/status", "longer": f"/r/{token}x/status",
           "upper": f"/r/{token.upper()}/status", "slash": f"/r/{token}/status/",
           "missing": "/r/nothing-here/status"}[path]
    both = [Client(wsgi, use_cookies=False).get(url, headers=headers)  # our Cookie header
            for wsgi in (app, app.wsgi_app.wsgi_app)]  # with the middleware, the view alone
    assert both[0].status_code == both[1].status_code
    if who == "owner" and path == "token":
        assert both[0].status_code == (200 if tag in ("other", "junk") else 304)
    assert both[0].headers.get("ETag") == both[1].headers.get("ETag")
    assert both[0].get_data() == both[1].get_data()


def _token(app, client) -> str:
    """One submitted record per app (Hypothesis runs examples on one fixture set)."""
    found = app.extensions.get("test.token")
    if found is None:
        found = app.extensions["test.token"] = token_of(submit(client, "demo", GOOD))
    return found


def _stranger_cookie(app) -> str:
    found = app.extensions.get("test.stranger")
    if found is None:
        other = app.test_client()
        submit(other, "demo", GOOD)
        found = app.extensions["test.stranger"] = other.get_cookie("session").value
    return found


def test_a_record_whose_deletion_is_pending_is_gone_for_polls_too(app, client, rt):
    """As for its page: 404 at once, with or without an ETag (the delete changes no tag)."""
    from sqlalchemy import update

    from formrules.store.models import Record
    token = token_of(submit(client, "demo", GOOD))
    etag = polled(client, token)
    assert client.get(f"/r/{token}").status_code == 200
    with rt.store.session() as s:
        s.execute(update(Record).where(Record.token == token).values(delete_requested=True))
    assert client.get(f"/r/{token}").status_code == 404
    assert client.get(f"/r/{token}/status").status_code == 404
    assert client.get(f"/r/{token}/status", headers={"If-None-Match": etag}).status_code == 404
