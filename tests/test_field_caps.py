"""Text fields have a default length cap: no field accepts megabytes unless a rule says so."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from formrules.language.loader import DEFAULT_MAX_LENGTH, parse_form
from formrules.store import tokens
from formrules.store.models import Record
from tests.helpers import submit

NOTE = """
form: note
fields:
  - {name: title, type: string, required: true}
  - {name: email, type: email}
  - {name: body, type: text}
  - {name: long, type: text, max_length: 50000}
"""


def test_text_fields_without_max_length_get_the_documented_default():
    form, problems = parse_form(NOTE, "note.yaml")
    assert problems == []
    assert {f.name: f.max_length for f in form.fields} == {
        "title": 1000, "email": 254, "body": 20_000, "long": 50_000}
    assert DEFAULT_MAX_LENGTH == {"string": 1000, "email": 254, "text": 20_000}


@pytest.fixture
def note_rules(rules_dir):
    """The note form in the rules folder before the app loads it."""
    (rules_dir / "note.yaml").write_text(NOTE)


def test_a_two_megabyte_string_is_refused_by_the_api_and_the_form(note_rules, client, rt):
    with rt.store.session() as s:
        auth = {"Authorization": f"Bearer {tokens.create(s, 'robot')}"}
    huge = "x" * 2_000_000
    response = client.post("/api/forms/note", headers=auth, json={"title": huge})
    assert response.status_code == 422
    assert response.json["fields"]["title"] == ["Field cannot be longer than 1000 characters."]
    page = submit(client, "note", {"title": "ok", "body": "y" * 20_001})
    assert page.status_code == 422 and b"cannot be longer than 20000 characters" in page.data
    with rt.store.session() as s:
        assert s.scalar(select(Record)) is None
    ok = client.post("/api/forms/note", headers=auth, json={"title": "t", "long": "z" * 40_000})
    assert ok.status_code == 201, ok.json
