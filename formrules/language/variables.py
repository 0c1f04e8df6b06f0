"""What rule templates and expressions can name, built in one place for every place that
renders one: sync actions, worker steps, Delay times and titles, the status page's
`after_submit`, previews, batches and schedules.

Built separately, they disagreed (`{{ form.title }}` was empty inside actions and set on
the status page). The checker's list of names (`checker.VARIABLES`) describes this dict.
"""

from __future__ import annotations

from typing import Any

from formrules.language.values import typed_record

FORM_NAMES = ("id", "title")  # what `form.` has
RUN_NAMES = ("id", "title", "attempt")  # what `run.` has


def template_variables(*, form_id: str, form_title: str | None, field_types: dict[str, str],
                       data: dict[str, Any], run: dict[str, Any] | None = None,
                       **extra: Any) -> dict[str, Any]:
    """`record` (typed), `form` (id and title), `run` inside a Run, and event names
    (`old`, `changed`, `error`, `response`) where the caller has them."""
    variables: dict[str, Any] = {
        "record": typed_record(data, field_types),
        "form": {"id": form_id, "title": form_title or form_id},
    }
    if run is not None:
        variables["run"] = run
    variables.update(extra)
    return variables


def form_variables(form: Any, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """`template_variables` for a loaded `Form` and a record's stored data."""
    return template_variables(form_id=form.id, form_title=form.title,
                              field_types=form.field_types, data=data, **extra)


def run_info(run: Any) -> dict[str, Any]:
    """What `run.` names inside a Run: its id, title and attempt number."""
    return {"id": run.id, "title": run.title, "attempt": run.attempt}


def form_title_of(run: Any) -> str:
    """The form title a Run was started under (kept in its snapshot), else its form id."""
    return (run.snapshot or {}).get("form_title") or run.form_id


def call_inputs(node: Any, variables: dict[str, Any]) -> dict[str, Any]:
    """What `inputs.` names inside a called tree: the `with:` values of a `call:` node
    evaluated in the caller's `variables`, each converted to its declared type (the
    tree's defaults fill in the rest). Plain JSON values, so a Run started inside the
    tree can carry them in its snapshot.

    A string is a template rendered to text, then converted (`"{{ record.amount }}"` to a
    number for `type: number`); other literals are used as written.
    """
    from formrules.errors import PermanentError
    from formrules.language import sandbox

    out: dict[str, Any] = {}
    for name, spec in node.params.items():
        if name not in node.inputs:
            out[name] = spec.default
            continue
        value = sandbox.render_value(node.inputs[name], variables)
        try:
            out[name] = convert_input(value, spec.type)
        except (TypeError, ValueError) as exc:
            raise PermanentError(
                f"{node.path}: input '{name}' of tree '{node.tree}' must be a {spec.type}, "
                f"got {value!r}", "This form's rules could not be evaluated.") from exc
    return out


def convert_input(value: Any, itype: str) -> Any:
    """`value` as an input of type `itype` (string, number, integer, boolean, any)."""
    if value is None or itype == "any":
        return value
    if itype == "string":
        return value if isinstance(value, str) else str(value)
    if itype == "boolean":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0", ""):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None  # an empty field renders as nothing
        number = float(text) if itype == "number" and not text.lstrip("+-").isdigit() \
            else int(text)
    else:
        number = value
    if isinstance(number, float) and (number != number or number in (float("inf"),
                                                                   float("-inf"))):
        raise ValueError("not a finite number")
    if itype == "integer" and not float(number).is_integer():
        raise ValueError(f"not a whole number: {value!r}")
    return int(number) if itype == "integer" else number
