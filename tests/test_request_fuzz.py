"""Request parsing never answers 5xx (issue 14.9): Hypothesis sends the JSON API and the
HTML form bodies built from the form's OpenAPI schema and field types, near-valid and
hostile alike, and every record the API accepts must show on the operator pages."""

from __future__ import annotations

import json
from datetime import UTC, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from formrules.store import tokens
from formrules.store.models import Record
from formrules.web import create_app

FUZZ = """
form: fuzz
title: Every field type
fields:
  - {name: s, type: string, required: true, max_length: 20}
  - {name: t, type: text}
  - {name: e, type: email}
  - {name: i, type: integer, min: -5, max: 50}
  - {name: d, type: decimal, min: 0, max: 100}
  - {name: b, type: boolean}
  - {name: day, type: date}
  - {name: at, type: datetime}
  - {name: c, type: choice, choices: [small, large]}
  - {name: h, type: string, hidden: true}
events:
  submit: []
"""
FUZZ_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])
NASTY = ["", " ", "sNaN", "NaN", "-Infinity", "inf", "1e999999999", "-0", "0x10", "1_000",
         "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "2025-02-30",
         "0001-01-01", "9999-12-31", "2025-05-01T09:30", "\x00", "a\x00b", "\ud800",
         "x\udfff", "\u202e", "<script>", "small ", "ann@example", "a@b.c", "💥" * 30]


@pytest.fixture
def rules_dir(rules_dir):
    (rules_dir / "fuzz.yaml").write_text(FUZZ)
    return rules_dir


@pytest.fixture
def fuzz_app(rt):
    """The app without CSRF (so each example is one request), errors as 500 pages."""
    return create_app({"WTF_CSRF_ENABLED": False, "PROPAGATE_EXCEPTIONS": False},
                      settings=rt.settings)


def hostile() -> st.SearchStrategy:
    """Any JSON value, weighted towards what breaks parsers."""
    scalar = st.one_of(st.none(), st.booleans(), st.integers(),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                       st.sampled_from(NASTY))
    return st.one_of(scalar, st.lists(scalar, max_size=3),
                     st.dictionaries(st.text(max_size=3), scalar, max_size=2))


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values near what a property's JSON schema allows (inside and just outside)."""
    options = schema.get("anyOf", [schema])
    strategies = []
    for option in options:
        kind = option.get("type")
        if kind == "null":
            strategies.append(st.none())
        elif "enum" in option:
            strategies.append(st.sampled_from(option["enum"]))
        elif kind == "integer":
            low, high = option.get("minimum", -10**6), option.get("maximum", 10**6)
            strategies.append(st.integers(low - 2, high + 2))
            strategies.append(st.integers(low, high).map(float))
        elif kind == "number":
            low, high = option.get("minimum", -1e9), option.get("maximum", 1e9)
            strategies.append(st.floats(low - 1, high + 1))
            strategies.append(st.decimals(low, high, places=3).map(float))
        elif kind == "boolean":
            strategies.append(st.booleans())
        elif option.get("format") == "date":
            strategies.append(st.dates().map(lambda d: d.isoformat()))
        elif option.get("format") == "date-time":
            offsets = st.integers(-23 * 60, 23 * 60).map(
                lambda m: timezone(timedelta(minutes=m)))
            strategies.append(st.datetimes(timezones=st.one_of(st.none(), st.just(UTC),
                                                               offsets))
                              .map(lambda d: d.isoformat()))
        elif option.get("format") == "email":
            strategies.append(st.emails())
        elif kind == "string":
            strategies.append(st.text(min_size=option.get("minLength", 0),
                                      max_size=option.get("maxLength", 50) + 2))
    return st.one_of(*strategies)


def bodies(doc: dict) -> st.SearchStrategy:
    """Request bodies for the fuzz form: schema-shaped values, hostile ones, stray keys."""
    props = doc["components"]["schemas"]["fuzz.input"]["properties"]
    value = {name: st.one_of(from_schema(schema), hostile()) for name, schema in props.items()}
    known = st.fixed_dictionaries({}, optional=value)
    stray = st.dictionaries(st.one_of(st.text(max_size=4), st.sampled_from(["h", "\ud800"])),
                            hostile(), max_size=2)
    return st.one_of(known, st.tuples(known, stray).map(lambda pair: {**pair[1], **pair[0]}))


def test_the_api_never_answers_5xx(fuzz_app, rt, operator):
    with rt.store.session() as s:
        auth = {"Authorization": f"Bearer {tokens.create(s, 'fuzzer')}",
                "Content-Type": "application/json"}
    client = fuzz_app.test_client()
    doc = client.get("/api/openapi.json").json

    @FUZZ_SETTINGS
    @given(body=bodies(doc))
    def check(body):
        raw = json.dumps(body, allow_nan=True)  # NaN and Infinity literals too
        response = client.post("/api/forms/fuzz", data=raw, headers=auth)
        assert response.status_code < 500, (body, response.get_data(as_text=True)[:300])
        if response.status_code == 201:
            token = response.json["token"]
            assert client.get(f"/api/records/{token}", headers=auth).status_code == 200
            with rt.store.session() as s:
                record_id = s.scalar(select(Record.id).where(Record.token == token))
            for page in (f"/admin/records/{record_id}", f"/admin/records/{record_id}/edit",
                         f"/r/{token}"):
                assert operator.get(page).status_code == 200, (body, page)
            patched = client.patch(f"/api/records/{token}", data=raw, headers=auth)
            assert patched.status_code < 500, body

    check()


def test_the_html_form_never_answers_5xx(fuzz_app):
    client = fuzz_app.test_client()
    names = ["s", "t", "e", "i", "d", "b", "day", "at", "c", "h", "submit_key"]
    text = st.one_of(st.text(max_size=40), st.sampled_from(NASTY).map(
        lambda s: s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")))

    @FUZZ_SETTINGS
    @given(data=st.dictionaries(st.sampled_from(names), text))
    def check(data):
        response = client.post("/forms/fuzz", data=data)
        assert response.status_code < 500, (data, response.get_data(as_text=True)[:300])

    check()
