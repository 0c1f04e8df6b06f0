"""Web hardening (issue 14): log-in throttling, revocable sessions, security headers,
scoped idempotency keys, and client input that used to answer 500."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta

import pytest
import time_machine
from sqlalchemy import select, update

from formrules.store import tokens
from formrules.store.models import Record, RevokedSession, User, utcnow
from formrules.web import create_app
from tests.helpers import ROOT, submit, token_of
from tests.web_helpers import PASSWORD, login, make_user, post

PRICED = """
form: priced
title: Priced
fields:
  - {name: label, type: string, required: true, max_length: 40}
  - {name: price, type: decimal, min: 0, max: 1000}
  - {name: qty, type: integer}
  - {name: at, type: datetime}
events:
  submit: []
"""
DEMO = {"name": "Ann", "email": "ann@example.com", "count": 12}


@pytest.fixture
def rules_dir(rules_dir):
    (rules_dir / "priced.yaml").write_text(PRICED)
    return rules_dir


def app_with(rt, **changes):
    """An app on the test settings with some changed (smaller limits, another Redis)."""
    return create_app({"TESTING": True}, settings=rt.settings.with_overrides(**changes))


@pytest.fixture
def api_token(rt):
    with rt.store.session() as s:
        return tokens.create(s, "robot")


@pytest.fixture
def auth(api_token):
    return {"Authorization": f"Bearer {api_token}"}


# --- 14.5 log-in throttling --------------------------------------------------------------

def test_a_burst_of_wrong_passwords_locks_the_account_even_for_the_right_one(app, rt):
    make_user(rt, "olga", operator=True)
    attacker = app.test_client()
    for _ in range(5):
        assert login(attacker, "olga", "wrong password").status_code == 401
    refused = login(attacker, "olga", "wrong password")
    assert refused.status_code == 429
    assert "Too many failed log-ins" in refused.get_data(as_text=True)
    assert int(refused.headers["Retry-After"]) > 0
    owner = app.test_client()  # the right password, even from another browser, must wait
    assert login(owner, "olga", PASSWORD).status_code == 429
    assert owner.get("/admin").status_code == 302  # to the log-in page
    make_user(rt, "ulla")  # other accounts are not locked
    assert login(app.test_client(), "ulla").status_code == 303


def test_failures_are_counted_per_client_across_account_names(rt):
    app = app_with(rt, login_client_limit="3 per 15 minutes")
    make_user(rt, "olga")
    browser = app.test_client()
    for name in ("a", "b", "c"):
        assert login(browser, name, "guess").status_code == 401
    assert login(browser, "olga").status_code == 429


def test_successful_log_ins_are_not_counted(rt):
    app = app_with(rt, login_account_limit="2 per 15 minutes")
    make_user(rt, "olga")
    for _ in range(4):
        assert login(app.test_client(), "olga").status_code == 303


def test_wrong_api_tokens_are_throttled_per_client(rt, api_token):
    app = app_with(rt, api_auth_limit="3 per 15 minutes")
    client = app.test_client()
    for _ in range(3):
        assert client.get("/api/records/x", headers={"Authorization": "Bearer nope"}
                          ).status_code == 401
    response = client.post("/api/forms/demo", json=DEMO,
                           headers={"Authorization": f"Bearer {api_token}"})
    assert response.status_code == 429
    assert response.json["error"] == "too_many_requests" and response.headers["Retry-After"]


def test_log_in_still_works_when_redis_is_unreachable(rt):
    app = app_with(rt, redis_url="redis://127.0.0.1:1/0")
    make_user(rt, "olga")
    assert login(app.test_client(), "olga", "wrong").status_code == 401
    assert login(app.test_client(), "olga").status_code == 303


def test_bad_limit_settings_stop_the_app(rt):
    from formrules.errors import ConfigError
    with pytest.raises(ConfigError, match="FORMRULES_LOGIN_ACCOUNT_LIMIT"):
        app_with(rt, login_account_limit="lots")


# --- 14.6 sessions ---------------------------------------------------------------------

def copied_session(app, browser):
    """A second browser holding a copy of `browser`'s session cookie."""
    thief = app.test_client()
    thief.set_cookie("session", browser.get_cookie("session").value)
    return thief


def test_log_out_ends_a_copied_session_but_not_other_log_ins(app, rt, operator):
    other_device = app.test_client()
    assert login(other_device, "olga").status_code == 303
    thief = copied_session(app, operator)
    assert thief.get("/admin").status_code == 200
    assert post(operator, "/logout").status_code == 303
    assert operator.get("/admin").status_code == 302
    assert thief.get("/admin").status_code == 302  # the copy died with the session
    assert other_device.get("/admin").status_code == 200
    assert post(other_device, "/logout").status_code == 303
    with rt.store.session() as s:  # kept only as long as the sessions could have lasted
        rows = s.scalars(select(RevokedSession)).all()
    assert len(rows) == 2
    assert all(row.expires_at <= utcnow() + timedelta(days=14) for row in rows)


def test_log_out_everywhere_ends_a_copied_session(app, rt, operator):
    thief = copied_session(app, operator)
    assert thief.get("/admin").status_code == 200
    page = operator.get("/").get_data(as_text=True)
    assert "Log out everywhere" in page
    assert post(operator, "/logout", {"everywhere": "1"}).status_code == 303
    assert operator.get("/admin").status_code == 302
    assert thief.get("/admin").status_code == 302  # the copy no longer opens /admin
    assert login(operator, "olga").status_code == 303  # a new log-in works again
    assert operator.get("/admin").status_code == 200


def test_a_new_password_ends_sessions_started_with_the_old_one(app, rt, operator,
                                                                subprocess_env):
    thief = copied_session(app, operator)
    assert thief.get("/admin").status_code == 200
    result = subprocess.run([sys.executable, "-m", "formrules.cli", "users", "add", "olga",
                             "--operator", "--password", "a brand new secret"],
                            env=subprocess_env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert thief.get("/admin").status_code == 302
    assert operator.get("/admin").status_code == 302


def test_sessions_end_when_idle_and_after_the_absolute_lifetime(app, rt):
    make_user(rt, "olga", operator=True)
    with time_machine.travel("2030-01-01 08:00", tick=False) as clock:
        browser = app.test_client()
        response = login(browser, "olga")
        expires = re.search(r"Expires=([^;]+)", response.headers["Set-Cookie"]).group(1)
        assert "01 Jan 2030 20:00:00" in expires  # 12 idle hours, not a year
        clock.shift(timedelta(hours=11))
        assert browser.get("/admin").status_code == 200
        clock.shift(timedelta(hours=13))  # idle longer than 12 hours
        assert browser.get("/admin").status_code == 302

        assert login(browser, "olga").status_code == 303
        for _ in range(14):  # busy every 11 hours, yet not past 14 days
            clock.shift(timedelta(hours=11))
            assert browser.get("/admin").status_code == 200
        for _ in range(20):
            clock.shift(timedelta(hours=11))
            if browser.get("/admin").status_code == 302:
                break
        else:
            pytest.fail("a session outlived 14 days")


def test_a_remembered_cookie_still_expires_and_a_tampered_copy_is_refused(app, client):
    token = token_of(submit(client, "demo", DEMO))
    cookie = client.get_cookie("session").value
    assert client.get(f"/r/{token}/status").status_code == 200  # verified, remembered
    payload, stamp, signature = cookie.rsplit(".", 2)
    other = "B" if signature[0] == "A" else "A"  # the first character: no padding bits
    for forged in (f"{payload}.{stamp}.{other}{signature[1:]}", f"{payload}x.{stamp}.{signature}"):
        thief = app.test_client()
        thief.set_cookie("session", forged)
        assert thief.get(f"/r/{token}/status").status_code == 404
    later = app.test_client()
    later.set_cookie("session", cookie)
    assert later.get(f"/r/{token}/status").status_code == 200
    with time_machine.travel(utcnow() + timedelta(days=366), tick=False):
        assert later.get(f"/r/{token}/status").status_code == 404  # past its year
    app.secret_key = "rotated"  # a key no longer trusted: the remembered cookie is not
    assert client.get(f"/r/{token}/status").status_code == 404


def test_the_operator_role_is_read_from_the_database(app, rt, operator):
    assert "Operations" in operator.get("/").get_data(as_text=True)
    with rt.store.session() as s:
        s.execute(update(User).values(is_operator=False))
    page = operator.get("/").get_data(as_text=True)
    assert "Operations" not in page and "Log out" in page
    assert operator.get("/admin").status_code == 403


# --- 14.7 security headers ---------------------------------------------------------------

def test_every_response_carries_the_security_headers(app, rt, operator, client):
    token = token_of(submit(client, "demo", DEMO))
    responses = [client.get(p) for p in ("/", "/forms/demo", "/login", "/tasks",
                                         f"/r/{token}", "/nothing-here", "/api/openapi.json",
                                         "/static/style.css")]
    responses += [operator.get(p) for p in ("/admin", "/admin/queues", "/admin/dead")]
    for response in responses:
        csp = response.headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, response
        assert "unsafe-inline" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        if response.mimetype == "text/html":  # the pages need nothing the CSP forbids
            html = response.get_data(as_text=True)
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), response.request.path
            assert not re.search(r"\sstyle=|\son[a-z]+=", html), response.request.path


# --- 14.8 Idempotency-Key scope ------------------------------------------------------------

def test_an_idempotency_key_is_scoped_to_the_form(client, rt, auth):
    key = {**auth, "Idempotency-Key": "order-1"}
    first = client.post("/api/forms/demo", json=DEMO, headers=key)
    second = client.post("/api/forms/priced", json={"label": "x"}, headers=key)
    assert first.status_code == 201 and second.status_code == 201
    assert second.json["form"] == "priced" and second.json["token"] != first.json["token"]
    again = client.post("/api/forms/priced", json={"label": "x"}, headers=key)
    assert again.status_code == 200 and again.json["token"] == second.json["token"]
    with rt.store.session() as s:
        assert len(s.scalars(select(Record)).all()) == 2


def test_the_same_key_with_another_body_is_refused(client, rt, auth):
    key = {**auth, "Idempotency-Key": "order-2"}
    assert client.post("/api/forms/demo", json=DEMO, headers=key).status_code == 201
    other = client.post("/api/forms/demo", json={**DEMO, "count": 13}, headers=key)
    assert other.status_code == 422 and other.json["error"] == "idempotency_key_reused"
    with rt.store.session() as s:
        assert len(s.scalars(select(Record)).all()) == 1


def test_idempotency_keys_longer_than_documented_are_refused(client, auth):
    doc = client.get("/api/openapi.json").json
    (param,) = doc["paths"]["/api/forms/demo"]["post"]["parameters"]
    longest = param["schema"]["maxLength"]
    ok = client.post("/api/forms/demo", json=DEMO,
                     headers={**auth, "Idempotency-Key": "k" * longest})
    assert ok.status_code == 201
    too_long = client.post("/api/forms/demo", json=DEMO,
                           headers={**auth, "Idempotency-Key": "k" * (longest + 1)})
    assert too_long.status_code == 400 and "at most 200" in too_long.json["message"]


# --- 14.9 client input that used to answer 500 -----------------------------------------

@pytest.mark.parametrize("value", ["sNaN", "NaN", "-Infinity", "inf"])
def test_non_finite_decimals_are_refused_not_500(client, auth, value):
    page = submit(client, "priced", {"label": "x", "price": value})
    assert page.status_code == 422
    assert "Not a valid decimal value" in page.get_data(as_text=True)
    # As a JSON string, and as the bare NaN / Infinity literals Python's parser accepts.
    for raw in (json.dumps(value), "NaN", "-Infinity"):
        api = client.post("/api/forms/priced", data='{"label": "x", "price": ' + raw + "}",
                          headers={**auth, "Content-Type": "application/json"})
        assert api.status_code == 422, raw
        assert "Not a valid decimal value." in api.json["fields"]["price"]


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:00-05:00"])
def test_datetimes_shifted_out_of_range_are_refused(client, auth, moment):
    response = client.post("/api/forms/priced", headers=auth, json={"label": "x", "at": moment})
    assert response.status_code == 422 and "at" in response.json["fields"]


def test_datetimes_at_the_ends_of_the_range_are_kept(client, auth):
    response = client.post("/api/forms/priced", headers=auth,
                           json={"label": "x", "at": "0001-01-01T00:00:00+00:00"})
    assert response.status_code == 201, response.json
    assert response.json["record"]["at"].startswith("0001-01-01T00:00")


def test_a_deeply_nested_body_is_a_400(client, auth):
    response = client.post("/api/forms/priced", headers={**auth, "Content-Type":
                                                         "application/json"},
                           data="[" * 100_000 + "]" * 100_000)
    assert response.status_code == 400
    nested = client.post("/api/forms/priced", headers={**auth, "Content-Type":
                                                       "application/json"},
                         data='{"label": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert nested.status_code == 400


@pytest.mark.parametrize("raw", ['"\\ud800"', '"a\\udfffb"', '"nul\\u0000"'])
def test_text_that_cannot_be_stored_is_refused(client, rt, operator, auth, raw):
    body = '{"label": ' + raw + "}"
    response = client.post("/api/forms/priced", data=body,
                           headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json["fields"]["label"] == ["Contains characters that are not valid text."]
    with rt.store.session() as s:
        assert s.scalar(select(Record)) is None
    assert operator.get("/admin/records").status_code == 200


def test_the_api_accepts_what_its_openapi_document_describes(client, auth):
    doc = client.get("/api/openapi.json").json
    schema = doc["components"]["schemas"]["priced.input"]["properties"]
    assert schema["label"]["minLength"] == 1 and schema["label"]["type"] == "string"
    whole = client.post("/api/forms/priced", headers=auth, json={"label": "x", "qty": 3.0})
    assert whole.status_code == 201 and whole.json["record"]["qty"] == 3
    half = client.post("/api/forms/priced", headers=auth, json={"label": "x", "qty": 3.5})
    assert half.status_code == 422
    number = client.post("/api/forms/priced", headers=auth, json={"label": 5})
    assert number.status_code == 422 and number.json["fields"]["label"] == ["Expected a string."]
    blank = client.post("/api/forms/priced", headers=auth, json={"label": "   "})
    assert blank.status_code == 422


def test_a_form_post_with_nul_is_refused(client):
    page = submit(client, "priced", {"label": "a\x00b"})
    assert page.status_code == 422
