"""Form pages: validation messages, CSRF, double submits, failing actions, tokens."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from formrules.store.models import Record, Run
from formrules.web import create_app
from tests.helpers import submit, token_of, tokens

GOOD = {"name": "Ann", "email": "ann@example.com", "count": "3"}


def count(rt, model) -> int:
    with rt.store.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_index_lists_forms(client):
    page = client.get("/")
    assert page.status_code == 200
    assert b"Demo request" in page.data and b'href="/forms/demo"' in page.data


def test_unknown_form_is_404(client):
    assert client.get("/forms/nope").status_code == 404


def test_form_renders_fields_and_hides_hidden_ones(client):
    page = client.get("/forms/demo")
    assert b'name="email"' in page.data and b'name="count"' in page.data
    assert b'name="ready"' not in page.data  # hidden flag fields are set by rules only
    assert set(tokens(page.data)) == {"csrf_token", "submit_key"}


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "", "email": "ann@example.com"}, b"This field is required."),
    ({"name": "Ann", "email": "not-an-email"}, b"Invalid email address."),
    ({"name": "Ann", "email": "a@example.com", "count": "500"},
     b"Number must be between 1 and 100."),
    ({"name": "Ann", "email": "a@example.com", "count": "two"}, b"Not a valid integer value."),
    ({"name": "x" * 41, "email": "a@example.com"}, b"Field cannot be longer than 40"),
    ({"name": "Ann", "email": "a@example.com", "kind": "huge"}, b"Not a valid choice."),
    ({"name": "Ann", "email": "a@example.com", "when": "31/02/2020"},
     b"Not a valid date value."),
])
def test_bad_input_shows_field_messages_and_stores_nothing(client, rt, data, message):
    response = submit(client, "demo", data)
    assert response.status_code == 422
    assert message in response.data
    assert b'aria-invalid="true"' in response.data
    assert count(rt, Record) == 0 and count(rt, Run) == 0


def test_bad_input_keeps_what_the_user_typed(client):
    response = submit(client, "demo", {"name": "Ann Example", "email": "nope"})
    assert b'value="Ann Example"' in response.data


def test_missing_csrf_token_is_400_and_stores_nothing(client, rt):
    response = client.post("/forms/demo", data=GOOD)
    assert response.status_code == 400
    assert b"Form expired" in response.data
    assert count(rt, Record) == 0


def test_valid_submit_redirects_303_to_unguessable_status_page(client, rt):
    response = submit(client, "demo", GOOD)
    token = token_of(response)
    assert response.headers["Location"] == f"/r/{token}"
    assert len(token) >= 32  # 24 random bytes, url-safe: 192 bits
    assert count(rt, Record) == 1 and count(rt, Run) == 1


def test_double_submit_creates_one_record(client, rt):
    page = client.get("/forms/demo")
    data = {**tokens(page.data), **GOOD}
    first = client.post("/forms/demo", data=data)
    second = client.post("/forms/demo", data=data)
    assert token_of(first) == token_of(second)
    assert count(rt, Record) == 1 and count(rt, Run) == 1


def test_failing_sync_action_shows_safe_message_and_keeps_nothing(client, rt):
    response = submit(client, "failing_sync", {"name": "Bo"})
    assert response.status_code == 500
    assert b"The approval service rejected this request." in response.data
    assert b"hunter2" not in response.data and b"Traceback" not in response.data
    assert b'value="Bo"' in response.data  # the user's input is still on screen
    assert count(rt, Record) == 0 and count(rt, Run) == 0


def test_status_json_shape_and_etag(client):
    token = token_of(submit(client, "demo", GOOD))
    response = client.get(f"/r/{token}/status")
    body = response.json
    assert set(body) >= {"done", "record", "runs"}
    assert body["done"] is False
    assert body["record"]["status"] == "received"
    (run,) = body["runs"]
    assert set(run) >= {"id", "title", "status", "progress", "message"}
    assert run["title"] == "Preparing Ann" and run["progress"] == 0
    again = client.get(f"/r/{token}/status", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


def test_unknown_token_is_404(client):
    assert client.get("/r/doesnotexist").status_code == 404
    assert client.get("/r/doesnotexist/status").status_code == 404


def test_submit_with_redis_down_still_confirms(rt, app, monkeypatch):
    # Point the dispatcher at a port where nothing listens: the record and its Run are
    # committed (the outbox) and the user gets the confirmation; the reconciler enqueues
    # later (proven end to end in test_durability).
    from formrules.process.redis_server import free_port
    from formrules.runs.queue import Dispatcher, connect

    rt.__dict__["dispatcher"] = Dispatcher(connect(f"redis://127.0.0.1:{free_port()}/0"),
                                           rt.settings.queue)
    client = app.test_client()
    token = token_of(submit(client, "demo", GOOD))
    assert client.get(f"/r/{token}").status_code == 200
    assert count(rt, Run) == 1


def test_app_starts_with_invalid_rules_and_leaves_that_form_out(rt, rules_dir, caplog):
    (rules_dir / "broken.yaml").write_text(
        "form: broken\nevents:\n  submit:\n    - send_emial: {to: x}\n")
    app = create_app({"TESTING": True}, settings=rt.settings)
    assert app.test_client().get("/forms/broken").status_code == 404
    assert f"{rules_dir}/broken.yaml:4:7: events/submit/0: unknown action 'send_emial' " \
           "(did you mean 'send_email'?)" in caplog.text


def test_required_fields_typed_wrongly_say_what_is_wrong(client):
    response = submit(client, "dated", {"day": "31/02/2020", "size": "XL"})
    assert response.status_code == 422
    assert b"Not a valid date value." in response.data
    assert response.data.count(b"Not a valid choice.") == 1  # one message, not two
    missing = submit(client, "dated", {})
    assert missing.data.count(b"This field is required.") == 2
