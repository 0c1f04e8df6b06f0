"""The JSON Schema for rule files (issue 12, item 2): generated, committed, and right."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from jsonschema import Draft7Validator

from formrules.cli import cli
from formrules.language.schema import builtin_actions, rules_schema, schema_text
from tests.test_docs import ROOT, YAML_BLOCKS, as_form, doc_actions  # noqa: F401 (fixture)

COMMITTED = ROOT / "docs" / "formrules.schema.json"
EXAMPLES = sorted((ROOT / "rules").glob("*.yaml"))


def errors(data, registered=None) -> list[str]:
    """The schema's complaints about `data`, as 'path: message' lines."""
    validator = Draft7Validator(rules_schema(registered))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(data)]


def test_the_committed_schema_is_the_generated_one():
    assert COMMITTED.read_text(encoding="utf-8") == schema_text(builtin_actions()), \
        "run: formrules schema --builtin > docs/formrules.schema.json"
    Draft7Validator.check_schema(json.loads(COMMITTED.read_text(encoding="utf-8")))


def test_formrules_schema_prints_it_with_the_custom_actions():
    builtin = CliRunner().invoke(cli, ["schema", "--builtin"])
    assert builtin.exit_code == 0 and builtin.output == COMMITTED.read_text(encoding="utf-8")
    everything = CliRunner().invoke(cli, ["schema"], env={
        "FORMRULES_ACTIONS": "tests.fixture_actions"})
    assert everything.exit_code == 0
    assert '"record_call"' in everything.output and '"record_call"' not in builtin.output


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_file_validates_and_points_at_the_schema(path):
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=../docs/formrules.schema.json"
    assert errors(yaml.safe_load(text), builtin_actions()) == []


VALID_DOCS = [b for b in YAML_BLOCKS if not b.all("invalid")]
INVALID_DOCS = [b for b in YAML_BLOCKS if b.all("invalid")]


@pytest.mark.parametrize("block", VALID_DOCS, ids=[b.id for b in VALID_DOCS])
def test_every_valid_docs_example_validates(block, doc_actions):  # noqa: F811
    assert errors(yaml.safe_load(as_form(block))) == []


# Invalid examples of the docs whose mistake is in a string's meaning (a template, an
# expression, a duration's words) or needs the whole form (field names): the checker
# catches them, a schema cannot. Each is listed by the message the docs promise.
BEYOND_A_SCHEMA = (
    "unknown field",
    "does not compile",
    "is only set",
    "has no '",
    "unknown name",
    "must have type boolean",
    "'on_change: recompute' needs",
    "goes with type",
    "is not one of the choices",
    "is reserved",
    "is not a valid",
    "duplicate key",  # YAML itself: the editor's YAML parser reports it
    "unknown tree", "has no input", "call cycle",  # need the file's `trees:`
)


def structural(block) -> bool:
    return not all(any(s in message for s in BEYOND_A_SCHEMA) for message in block.all("invalid"))


@pytest.mark.parametrize("block", INVALID_DOCS, ids=[b.id for b in INVALID_DOCS])
def test_the_checkers_invalid_docs_examples_are_rejected(block, doc_actions):  # noqa: F811
    found = errors(yaml.safe_load(as_form(block)))
    if structural(block):
        assert found, f"{block.id}: the schema accepts it; the checker says {block.all('invalid')}"


CHECKER_REJECTS = [
    ("form: Bad Id\n", "does not match"),
    ("form: a\ncolour: red\n", "Additional properties"),
    ("form: a\nfields: [{name: n, type: strnig}]\n", "is not one of"),
    ("form: a\nevents: {submit: [{send_emial: {to: x}}]}\n", "is not valid"),
    ("form: a\nevents: {submit: [{send_email: {to: x, subject: s}}]}\n", "is not valid"),
    ("form: a\nevents: {submit: [{background: {title: x}}]}\n", "is not valid"),
    ("form: a\nevents: {submit: [{delay: {for: 1h, at: now, do: []}}]}\n", "is not valid"),
    ("form: a\nevents: {submit: [{background: {do: [], await: maybe}}]}\n", "is not valid"),
    ("form: a\nevents: {submit: [{background: {do: [], retry: {backoff: soon}}}]}\n",
     "is not valid"),
    ("form: a\nevents: {submit: [{background: {do: [], timeout: ten minutes}}]}\n",
     "is not valid"),
    ("form: a\nevents: {delete: []}\n", "Additional properties"),
    ("form: a\nevents: {submit: [{background: {do: [], retry: {backoff: [1m], base: 5s}}}]}\n",
     "is not valid"),
    ("form: a\nschedules: [{do: []}]\n", "'cron' is a required property"),
    ("form: a\nbatches: {Bad: {do: []}}\n", "does not match"),
    ("form: a\ntasks: {Bad: {do: []}}\n", "does not match"),  # the old key, still read
    ("form: a\nbatches: {b: {do: [], started_by: [user]}}\n", "is not valid"),
    ("form: a\nevents: {submit: [{call: {with: {x: 1}}}]}\n", "is not valid"),
    ("form: a\nevents: {submit: [{try: [], catch: [], finally: []}]}\n", "is not valid"),
    ("form: a\ntrees: {t: {inputs: {x: {type: text}}, do: []}}\n", "is not valid"),
    ("form: a\ntrees: {t: {inputs: {}}}\n", "'do' is a required property"),
]


@pytest.mark.parametrize("text, message", CHECKER_REJECTS)
def test_structural_mistakes_the_checker_reports_are_rejected(text, message):
    from formrules.language.loader import parse_form
    assert parse_form(text, "x.yaml")[1], "the checker accepts it: not a mistake"
    found = errors(yaml.safe_load(text), builtin_actions())
    assert any(message in line for line in found), found
