"""The JSON API: token authentication, the form's own validation as field messages, 201 with
the record token and status URL, PATCH running update events, and a valid OpenAPI document."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from sqlalchemy import event, select

from formrules.store import tokens
from formrules.store.models import ApiToken, Record
from tests.helpers import ROOT, record_of, runs_of, work

TICKET = """
form: ticket
title: Support ticket
fields:
  - {name: subject, type: string, required: true, max_length: 60}
  - {name: due, type: date, required: true}
  - {name: priority, type: choice, choices: [low, high], default: low}
  - {name: urgent, type: boolean, default: false}
  - {name: history, type: string, hidden: true}
events:
  submit:
    - delay:
        title: Nudge
        at: "record.due - days(2)"
        do: [{record_call: {name: nudge}}]
  update:
    - set: {history: "{{ old.priority }} -> {{ record.priority }}"}
"""

RECEIPT = """
form: receipt
title: Receipt
fields:
  - {name: item, type: string, required: true}
events:
  submit:
    - background:
        title: Writing the receipt
        do: [{report: {filename: "receipt.csv", columns: [item]}}]
"""


@pytest.fixture
def rules_dir(rules_dir):
    """The test rules plus a ticket form with an update event."""
    (rules_dir / "ticket.yaml").write_text(TICKET)
    (rules_dir / "receipt.yaml").write_text(RECEIPT)
    return rules_dir


@pytest.fixture
def token(rt):
    """An API token, as `formrules tokens add robot` prints it."""
    with rt.store.session() as s:
        return tokens.create(s, "robot")


@pytest.fixture
def auth(token):
    return {"Authorization": f"Bearer {token}"}


VALID = {"name": "Ann", "email": "ann@example.com", "count": 12}


def fields_say(fields: dict[str, list[str]], expected: dict[str, list[str]]) -> bool:
    """Exactly the expected fields are refused, each with (at least) the expected message."""
    assert set(fields) == set(expected), fields
    for name, messages in expected.items():
        assert messages[0] in fields[name], (name, fields[name])
    return True


def test_unauthenticated_calls_get_401(client, rt, token):
    for method, path in (("post", "/api/forms/demo"), ("get", "/api/records/abc"),
                         ("patch", "/api/records/abc")):
        response = getattr(client, method)(path, json=VALID)
        assert response.status_code == 401, path
        assert response.json["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.post("/api/forms/demo", json=VALID,
                        headers={"Authorization": f"Bearer {token}x"})
    assert wrong.status_code == 401
    basic = client.post("/api/forms/demo", json=VALID,
                        headers={"Authorization": f"Basic {token}"})
    assert basic.status_code == 401
    with rt.store.session() as s:
        assert s.scalar(select(Record)) is None
        assert tokens.revoke(s, "robot")
    revoked = client.post("/api/forms/demo", json=VALID,
                          headers={"Authorization": f"Bearer {token}"})
    assert revoked.status_code == 401


def test_tokens_are_stored_hashed(rt, token):
    with rt.store.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "robot"))
    assert token not in row.token_hash and row.token_hash == tokens.hash_token(token)


def test_bad_input_is_refused_with_field_messages(client, rt, auth):
    response = client.post("/api/forms/demo", headers=auth, json={
        "name": "", "email": "not-an-email", "count": 500, "kind": "huge", "amount": "lots",
        "ready": True, "bogus": 1, "when": [2025]})
    assert response.status_code == 422
    assert response.json["error"] == "invalid"
    assert fields_say(response.json["fields"], {
        "name": ["This field is required."],
        "email": ["Invalid email address."],
        "count": ["Number must be between 1 and 100."],
        "kind": ["Not a valid choice."],
        "amount": ["Not a valid decimal value."],
        "ready": ["This field is set by the form's rules, not by clients."],
        "bogus": ["There is no such field."],
        "when": ["Expected a single value."],
    })
    assert client.post("/api/forms/demo", headers=auth, data="name=Ann").status_code == 400
    assert client.post("/api/forms/demo", headers=auth, json=[VALID]).status_code == 400
    assert client.post("/api/forms/nope", headers=auth, json=VALID).status_code == 404
    with rt.store.session() as s:
        assert s.scalar(select(Record)) is None


def test_post_answers_201_with_token_and_status_url_then_work_completes(client, rt, auth):
    response = client.post("/api/forms/demo", headers=auth, json=VALID)

    assert response.status_code == 201
    body = response.json
    assert body["status_url"] == f"http://localhost/api/records/{body['token']}"
    assert response.headers["Location"] == body["status_url"]
    assert body["page_url"] == f"http://localhost/r/{body['token']}"
    assert body["state"] == "working" and body["record"]["size"] == "big"
    record = record_of(rt, body["token"])
    assert record.owner == "api:robot" and record.data["status"] == "received"

    work(rt)

    status = client.get(body["status_url"], headers=auth)
    assert status.status_code == 200
    assert status.json["state"] == "done" and status.json["record"]["ready"] is True
    assert status.json["message"] == "All set, Ann (big)."
    assert client.get("/api/records/nope", headers=auth).status_code == 404


def test_a_repeated_idempotency_key_returns_the_first_record(client, rt, auth):
    headers = {**auth, "Idempotency-Key": "order-17"}
    first = client.post("/api/forms/demo", headers=headers, json=VALID)
    again = client.post("/api/forms/demo", headers=headers, json=VALID)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json["token"] == first.json["token"]
    assert len(runs_of(rt)) == 1


def test_an_idempotent_post_stores_key_and_fingerprint_in_the_record_insert(app, client,
                                                                           rt, auth):
    seen: list[str] = []
    engine = app.extensions["formrules"].store.engine

    def note(conn, cursor, statement, *args):
        if re.search(r"\brecords\b", statement):
            seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", note)
    try:
        answer = client.post("/api/forms/demo", headers={**auth, "Idempotency-Key": "k-1"},
                             json=VALID)
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert answer.status_code == 201
    assert seen[:1] == ["INSERT"] and "UPDATE" not in seen  # no key SELECT, one INSERT
    with rt.store.session() as s:
        record = s.scalar(select(Record))
        assert record.submit_key and record.submit_fingerprint


def test_patch_runs_update_events_and_moves_the_delay(client, rt, auth):
    due = date.today() + timedelta(days=20)
    created = client.post("/api/forms/ticket", headers=auth,
                          json={"subject": "Printer", "due": due.isoformat()})
    assert created.status_code == 201, created.json
    url = created.json["status_url"]
    nudge = runs_of(rt, created.json["token"])[0]
    assert nudge.due_at == datetime.combine(due - timedelta(days=2), datetime.min.time(), UTC)

    later = due + timedelta(days=5)
    response = client.patch(url, headers=auth,
                            json={"priority": "high", "due": later.isoformat()})

    assert response.status_code == 200, response.json
    assert response.json["changed"] == ["due", "history", "priority"]
    assert response.json["record"]["history"] == "low -> high"
    assert response.json["record"]["subject"] == "Printer"  # untouched fields stay
    moved = runs_of(rt, created.json["token"])[0]
    assert moved.due_at == datetime.combine(later - timedelta(days=2), datetime.min.time(), UTC)
    assert rt.dispatcher.queue.scheduled_job_registry.get_scheduled_time(moved.id) == \
        moved.due_at

    refused = client.patch(url, headers=auth, json={"priority": "urgent", "history": "x",
                                                   "urgent": "yes"})
    assert refused.status_code == 422
    assert fields_say(refused.json["fields"], {
        "priority": ["Not a valid choice."],
        "history": ["This field is set by the form's rules, not by clients."],
        "urgent": ["Expected true or false."]})
    assert record_of(rt, created.json["token"]).data["priority"] == "high"


def test_the_openapi_document_is_valid_and_matches_the_answers(client, auth):
    document = client.get("/api/openapi.json")  # public: it is documentation
    assert document.status_code == 200
    spec = document.json
    validate_openapi(spec)
    ticket = spec["components"]["schemas"]["ticket.input"]
    assert ticket["required"] == ["subject", "due"]
    assert ticket["properties"]["priority"]["anyOf"][0]["enum"] == ["low", "high"]
    assert "history" not in ticket["properties"]  # hidden fields are the rules' to set
    post = spec["paths"]["/api/forms/ticket"]["post"]
    assert set(post["responses"]) >= {"201", "401", "422"}

    def conforms(instance, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
        Draft202012Validator(schema).validate(instance)

    body = {"subject": "Printer", "due": (date.today() + timedelta(days=9)).isoformat()}
    conforms(body, "ticket.input")
    created = client.post("/api/forms/ticket", headers=auth, json=body)
    conforms(created.json, "Record")
    conforms(client.post("/api/forms/ticket", headers=auth, json={}).json, "Invalid")
    conforms(client.get("/api/records/x").json, "Error")


def test_formrules_tokens_add_prints_a_working_token_once(client, rt, subprocess_env):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "formrules.cli", "tokens", *args],
                              capture_output=True, text=True, env=subprocess_env, cwd=ROOT,
                              timeout=120)

    added = cli("add", "ci-bot")
    assert added.returncode == 0, added.stderr
    printed = added.stdout.strip()
    assert "cannot be shown again" in added.stderr
    response = client.post("/api/forms/demo", json=VALID,
                           headers={"Authorization": f"Bearer {printed}"})
    assert response.status_code == 201
    assert record_of(rt, response.json["token"]).owner == "api:ci-bot"
    again = cli("add", "ci-bot")
    assert again.returncode == 1 and "a token named 'ci-bot' exists" in again.stderr
    listed = cli("list")
    assert listed.stdout.startswith("ci-bot  created ") and printed not in listed.stdout


def test_result_files_download_with_a_token(client, rt, auth):
    body = client.post("/api/forms/receipt", headers=auth, json={"item": "desk"}).json
    work(rt)
    (run,) = client.get(body["status_url"], headers=auth).json["runs"]
    (listed,) = run["files"]
    assert listed["filename"] == "receipt.csv"

    response = client.get(f"/api/files/{listed['id']}", headers=auth)
    assert response.status_code == 200
    assert response.data.decode().splitlines() == ["item", "desk"]
    assert response.headers["Content-Disposition"] == 'attachment; filename="receipt.csv"'
    assert client.get(f"/api/files/{listed['id']}").status_code == 401
    assert client.get("/api/files/nope", headers=auth).status_code == 404


def test_only_the_submitting_token_changes_or_deletes_a_record(client, rt, auth):
    """A record token seen elsewhere (a person's page link, another client's logs) lets
    another API client read it, never change or delete it."""
    created = client.post("/api/forms/ticket", headers=auth,
                          json={"subject": "Printer",
                                "due": (date.today() + timedelta(days=20)).isoformat()})
    assert created.status_code == 201, created.json
    record_token = created.json["token"]
    with rt.store.session() as s:
        other = {"Authorization": f"Bearer {tokens.create(s, 'intruder')}"}
    url = f"/api/records/{record_token}"
    assert client.get(url, headers=other).status_code == 200
    assert client.patch(url, headers=other, json={"subject": "Hacked"}).status_code == 404
    assert client.delete(url, headers=other).status_code == 404
    assert client.get(url, headers=auth).json["record"]["subject"] == "Printer"
    assert client.delete(url, headers=auth).status_code in (202, 204)
    assert client.get(url, headers=auth).status_code == 404
