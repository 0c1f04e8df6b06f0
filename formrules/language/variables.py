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
