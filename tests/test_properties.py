"""Properties of the rule checker and durations, over generated input (Hypothesis).

Whatever text a rule file holds, checking it gives problems with positions in that file
and never a crash; every duration `format_duration` writes reads back as itself.
"""

from __future__ import annotations

from datetime import timedelta

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formrules.language.duration import format_duration, parse_duration
from formrules.language.loader import parse_form
from tests.helpers import examples

FILE = "rules/gen.yaml"
KEYS = ["form", "title", "fields", "events", "submit", "update", "background", "delay",
        "do", "on_error", "if", "then", "else", "set", "log", "send_email", "progress",
        "name", "type", "for", "at", "retry", "attempts", "backoff", "flag", "await",
        "timeout", "batches", "tasks", "schedules", "cron", "message", "after_submit", "default",
        "choices", "max_length", "to", "subject", "body", "<<"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(["string", "boolean", "10m", "now", "record.x > 1", "{{ record.x }}",
                     "{% for %}", "{{", "ann@example.com", "0 2 * * *", "optional",
                     "exponential", "2024-02-30", "x" * 300]),
    st.text(max_size=20))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=30)
YAMLISH = st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#?,%@`\t\n   abcfrom1{}")),
                  max_size=200)


def assert_positions(text: str) -> None:
    _form, problems = parse_form(text, FILE)
    lines = max(1, text.count("\n") + 1)
    for problem in problems:
        assert problem.file == FILE, problem
        assert 1 <= problem.line <= lines + 1, (problem, lines)
        assert problem.col >= 1 and problem.message, problem
        str(problem)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
@example("x: &a [*a]\n")  # a recursive alias: was a RecursionError traceback
@example("a:\n  - b\n  c: 1\n")  # was "expected <block end>, but found '?'"
@example("? [1, 2]\n: x\n")
def test_any_text_gives_positioned_problems_never_a_crash(text):
    assert_positions(text)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_any_rule_shaped_structure_gives_positioned_problems(document):
    assert_positions(yaml.safe_dump(document, default_flow_style=False, allow_unicode=True))


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(VALUES, max_size=5))
@example([{"background": {"flag": []}}])  # found by this test: a TypeError traceback
def test_any_submit_tree_gives_positioned_problems(nodes):
    text = yaml.safe_dump({"form": "gen", "fields": [{"name": "x", "type": "integer"}],
                           "events": {"submit": nodes}})
    assert_positions(text)


@given(st.integers(min_value=0, max_value=10**9))
def test_formatted_durations_read_back_as_themselves(seconds):
    delta = timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta


@given(st.text(max_size=30))
def test_parsing_any_text_is_a_duration_or_a_value_error(text):
    try:
        delta = parse_duration(text)
    except ValueError as exc:
        assert "duration" in str(exc)
    else:
        assert delta >= timedelta(0)
