"""One builder of template variables: `{{ form.title }}`, `{{ record.x }}` and `{{ run.x }}`
mean the same in a sync action, a worker step, a Delay's title, `after_submit`, a preview
and a batch; and a task is named the same way on every batch page."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from formrules.language.loader import load_rules
from formrules.runs.preview import preview
from formrules.store.models import Batch, Run
from tests.helpers import record_of, runs_of, submit, token_of, tokens, work

TITLED = """
form: titled
title: Book the boat
fields:
  - {name: name, type: string, required: true}
  - {name: inline, type: string, hidden: true}
  - {name: deferred, type: string, hidden: true}
  - {name: in_task, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - set: {inline: "{{ form.title }}/{{ form.id }}"}
    - background:
        title: "{{ form.title }} for {{ record.name }}"
        flag: done
        do:
          - set: {deferred: "{{ form.title }}/{{ form.id }}/{{ run.title }}"}
tasks:
  export_row:
    title: Export row {{ record.name }}
    do:
      - set: {in_task: "{{ form.title }}/{{ record.name }}"}
after_submit:
  message: "{{ form.title }}: {{ record.deferred }}"
"""


@pytest.fixture
def rules_dir(rules_dir):
    """The test forms plus one that names its form everywhere."""
    (rules_dir / "titled.yaml").write_text(TITLED)
    return rules_dir


def test_form_title_is_the_same_in_actions_workers_and_on_the_page(client, rt):
    token = token_of(submit(client, "titled", {"name": "Ann"}))
    work(rt)
    data = record_of(rt, token).data
    assert data["inline"] == "Book the boat/titled"
    assert data["deferred"] == "Book the boat/titled/Book the boat for Ann"
    (run,) = runs_of(rt, token)
    assert run.title == "Book the boat for Ann" and run.status == "done"
    status = client.get(f"/r/{token}/status").json
    assert status["message"] == "Book the boat: Book the boat/titled/Book the boat for Ann"


def test_preview_names_the_form(rt):
    form = load_rules(rt.settings.rules_dir).form("titled")
    text = "\n".join(str(line) for line in preview(form, {"name": "Ann"}, rt.settings))
    assert "set inline = 'Book the boat/titled'" in text
    assert "set deferred = 'Book the boat/titled/Book the boat for Ann'" in text
    assert "FAILS" not in text


def test_a_task_is_named_the_same_on_every_batch_page(operator, client, rt):
    token = token_of(submit(client, "titled", {"name": "Bo"}))
    work(rt)
    listing = operator.get("/admin/batches").data.decode()
    assert "{{" not in listing and "Export row" in listing
    page = operator.get("/admin/batches/new/titled/export_row")
    assert "{{" not in page.data.decode() and "<h1>Export row <span" in page.data.decode()
    response = operator.post("/admin/batches/new/titled/export_row", data={
        "csrf_token": tokens(page.data)["csrf_token"], "where": "", "scope": "filter"})
    assert response.status_code == 303, response.data[:1000]
    batch_id = response.headers["Location"].rsplit("/", 1)[-1]
    work(rt)
    with rt.store.session() as s:
        assert s.get(Batch, batch_id).title == "Export row"
        (child,) = s.scalars(select(Run).where(Run.batch_id == batch_id))
        assert child.title == "Export row Bo"  # the child names its record
    assert record_of(rt, token).data["in_task"] == "Book the boat/Bo"
    shown = operator.get(f"/admin/batches/{batch_id}").data.decode()
    assert "<h1>Export row <span" in shown and "{{" not in shown
    assert "Export row" in operator.get("/admin/batches").data.decode()
