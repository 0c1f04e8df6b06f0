"""One builder of template variables: `{{ form.title }}`, `{{ record.x }}` and `{{ run.x }}`
mean the same in a sync action, a worker step, a Delay's title, `after_submit`, a preview
and a batch; and a batch is named the same way on every page."""

from __future__ import annotations

import logging
import textwrap

import pytest
from sqlalchemy import select

from formrules.language.loader import load_rules, parse_form
from formrules.runs.preview import preview
from formrules.runs.status import FAILED_MESSAGE
from formrules.store.models import Batch, Run
from tests.helpers import record_of, runs_of, submit, token_of, tokens, work

TITLED = """
form: titled
title: Book the boat
fields:
  - {name: name, type: string, required: true}
  - {name: inline, type: string, hidden: true}
  - {name: deferred, type: string, hidden: true}
  - {name: in_batch, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - set: {inline: "{{ form.title }}/{{ form.id }}"}
    - background:
        title: "{{ form.title }} for {{ record.name }}"
        flag: done
        do:
          - set: {deferred: "{{ form.title }}/{{ form.id }}/{{ run.title }}"}
batches:
  export_row:
    title: Export row {{ record.name }}
    do:
      - set: {in_batch: "{{ form.title }}/{{ record.name }}"}
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


def test_a_batch_is_named_the_same_on_every_batch_page(operator, client, rt):
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
    assert record_of(rt, token).data["in_batch"] == "Book the boat/Bo"
    shown = operator.get(f"/admin/batches/{batch_id}").data.decode()
    assert "<h1>Export row <span" in shown and "{{" not in shown
    assert "Export row" in operator.get("/admin/batches").data.decode()


def test_check_catches_what_after_submit_cannot_name():
    text = textwrap.dedent("""\
        form: booking
        fields:
          - {name: room, type: string}
        events:
          submit: []
        after_submit:
          message: "{{ run.title }} {{ form.titel }} {{ reccord.room }} {{ record.rom }}"
        """)
    _form, found = parse_form(text, "rules/booking.yaml")
    shown = [str(p) for p in sorted(found)]
    assert any("'form' has no 'titel'" in p and "did you mean 'title'" in p for p in shown)
    assert any("'run' is only set inside a Run" in p for p in shown), shown
    assert any("unknown name 'reccord'" in p for p in shown)
    assert any("unknown field 'rom'" in p for p in shown)
    assert all(p.startswith("rules/booking.yaml:7:") for p in shown), shown


def test_run_names_are_checked_inside_a_run():
    text = textwrap.dedent("""\
        form: booking
        fields:
          - {name: note, type: string}
        events:
          submit:
            - set: {note: "{{ run.id }}"}
            - background:
                do: [{set: {note: "{{ run.id }} {{ run.attempts }}"}}]
        """)
    _form, found = parse_form(text, "rules/booking.yaml")
    shown = [str(p) for p in sorted(found)]
    assert len(shown) == 2, shown
    assert "events/submit/0: 'run' is only set inside a Run" in shown[0]
    assert "'run' has no 'attempts'" in shown[1] and "did you mean 'attempt'" in shown[1]


BROKEN_MESSAGE = """
form: sums
title: Sums
fields:
  - {name: count, type: integer}
events:
  submit: []
after_submit:
  message: "You sent {{ record.count + 'apples' }}."
"""


def test_a_failing_after_submit_is_logged_and_the_user_reads_a_plain_sentence(
        client, rt, rules_dir, caplog):
    (rules_dir / "sums.yaml").write_text(BROKEN_MESSAGE)
    from formrules.web import create_app

    browser = create_app({"TESTING": True}, settings=rt.settings).test_client()
    token = token_of(submit(browser, "sums", {"count": "3"}))
    with caplog.at_level(logging.ERROR, logger="formrules"):
        page = browser.get(f"/r/{token}")
    assert page.status_code == 200
    assert FAILED_MESSAGE in page.data.decode()
    assert "apples" not in page.data.decode() and "TypeError" not in page.data.decode()
    (entry,) = [r for r in caplog.records if "after_submit" in r.getMessage()]
    assert "form sums" in entry.getMessage() and token in entry.getMessage()
    assert "TypeError" in entry.getMessage() and "sums.yaml" in entry.getMessage()
