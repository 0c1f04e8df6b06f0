"""The field-type registry: every type is complete in one place (and one web line)."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from formrules.language.fieldtypes import REGISTRY, option_keys, types_with
from formrules.language.loader import FIELD_KEYS
from formrules.language.schema import FIELD_VALUES
from formrules.language.tree import FIELD_TYPES, FieldDef
from formrules.web.formbuilder import WIDGETS

SAMPLES = {"string": "Ann", "text": "Notes", "email": "ann@example.com", "integer": 3,
           "decimal": 2.5, "boolean": True, "date": "2030-01-10",
           "datetime": "2030-01-10T09:30:00+00:00", "choice": "A", "file": None}


@pytest.mark.parametrize("name", FIELD_TYPES)
def test_every_type_is_drawn_described_and_stored(name):
    kind = REGISTRY[name]
    assert kind.widget in WIDGETS, f"{name}: no WTForms field for widget {kind.widget!r}"
    assert set(kind.options) <= set(FIELD_KEYS) and set(kind.options) <= set(FIELD_VALUES)
    for required in (True, False):
        fd = FieldDef(name="f", type=name, label="F", required=required, choices=("A", "B"))
        schema = kind.json_schema(fd)
        Draft202012Validator.check_schema(schema)
        if SAMPLES[name] is not None and not kind.upload:
            # A value a client sends is valid by the schema the API documents, and it
            # stores, and comes back typed.
            Draft202012Validator(schema).validate(SAMPLES[name])
            stored = kind.to_storage(SAMPLES[name])
            assert kind.problem(fd, stored) is None
            assert kind.typed(stored) is not None
    assert name in SAMPLES


def test_options_belong_to_the_types_that_take_them():
    assert types_with("max_length") == ("string", "text", "email")
    assert types_with("min") == ("integer", "decimal")
    assert types_with("choices") == ("choice",)
    assert types_with("accept") == ("file",)
    assert option_keys() == FIELD_KEYS
