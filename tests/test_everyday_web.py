"""Small things seen in everyday use (issue 8): the tab icon, whose notices show where,
batch children kept off "My tasks", owners by name, attempts numbered across an operator's
retry, and JSON booleans in the status."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from formrules.store import tokens as api_tokens
from formrules.store.models import Notification, Run, RunStatus
from tests.helpers import runs_of, submit, token_of, work
from tests.web_helpers import add_web_rules, login, make_user, post

LEDGER = """
form: ledger
title: Ledger entry
fields:
  - {name: name, type: string, required: true}
events:
  submit: []
batches:
  export:
    title: Export {{ record.name }}
    do: [{report: {filename: "{{ record.name }}.txt", content: "{{ record.name }}"}}]
"""


@pytest.fixture
def rules_dir(rules_dir):
    """The page-test forms and a form with a batch."""
    (rules_dir / "ledger.yaml").write_text(LEDGER)
    return add_web_rules(rules_dir)


def test_the_tab_icon_is_served_and_linked(client):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.mimetype == "image/vnd.microsoft.icon"
    assert icon.data[:4] == b"\x00\x00\x01\x00"  # an ICO file
    assert '<link rel="icon" href="/favicon.ico"' in client.get("/").get_data(as_text=True)


def run_batch(operator, rt) -> str:
    """Two ledger records, then the export batch over both, worked to the end."""
    for name in ("Ann", "Bob"):
        token_of(submit(operator, "ledger", {"name": name}))
    page = operator.get("/admin/batches/new/ledger/export")
    response = post(operator, "/admin/batches/new/ledger/export",
                    {"where": "", "scope": "filter"})
    assert page.status_code == 200 and response.status_code == 303, response.data[:500]
    work(rt)
    return response.headers["Location"].rsplit("/", 1)[-1]


def test_batch_notices_stay_on_operator_pages_and_its_runs_off_my_tasks(operator, rt):
    batch_id = run_batch(operator, rt)
    with rt.store.session() as s:
        (note,) = s.scalars(select(Notification).where(Notification.run_id.is_(None)))
        assert note.message.startswith("Export: done")
        children = s.scalars(select(Run).where(Run.batch_id == batch_id)).all()
        assert len(children) == 2 and {c.status for c in children} == {"done"}
    form_page = operator.get("/forms/ledger").get_data(as_text=True)
    assert "Export: done" not in form_page and 'class="notice ' not in form_page
    assert "Export: done" in operator.get("/admin/batches").get_data(as_text=True)
    assert "Export: done" in operator.get("/notifications").get_data(as_text=True)
    tasks = operator.get("/tasks").get_data(as_text=True)
    assert "Export Ann" not in tasks and "Nothing here yet." in tasks
    assert "by olga" in operator.get(f"/admin/batches/{batch_id}").get_data(as_text=True)


def test_owners_show_by_name(app, operator, rt, client):
    make_user(rt, "ursula")
    user = app.test_client()
    assert login(user, "ursula").status_code == 303
    mine = runs_of(rt, token_of(submit(user, "later", {"name": "U"})))[0]
    theirs = runs_of(rt, token_of(submit(client, "later", {"name": "V"})))[0]
    page = operator.get(f"/admin/runs/{mine.id}").get_data(as_text=True)
    assert "<dd>ursula</dd>" in page and "user:" not in page
    listing = operator.get("/admin").get_data(as_text=True)
    assert "ursula" in listing and "an anonymous visitor" in listing
    assert "user:" not in listing and "anon:" not in listing
    assert theirs.owner.startswith("anon:")


def trace_attempts(html: str) -> list[str]:
    """The attempt column of a Run page's trace, top to bottom."""
    return re.findall(r'<td class="small nowrap">.*?</td>\s*<td class="num">([^<]*)</td>',
                      html, re.S)


def test_an_operators_retry_continues_the_attempt_numbers(client, operator, rt):
    (run,) = runs_of(rt, token_of(submit(client, "broken", {"name": "Flo"})))
    work(rt)
    assert post(operator, f"/admin/runs/{run.id}/retry").status_code == 303
    work(rt)
    with rt.store.session() as s:
        assert s.get(Run, run.id).status == RunStatus.DEAD
    numbers = [n for n in trace_attempts(operator.get(f"/admin/runs/{run.id}")
                                         .get_data(as_text=True)) if n]
    assert numbers[0] == "1" and numbers[-1] == "2" and sorted(numbers) == numbers, numbers


def test_awaited_is_a_json_boolean(client, rt):
    token = token_of(submit(client, "optional", {"name": "Oz"}))
    (run,) = client.get(f"/r/{token}/status").json["runs"]
    assert run["awaited"] is True and run["can_continue"] is True
    later = token_of(submit(client, "later", {"name": "Lu"}))
    (other,) = client.get(f"/r/{later}/status").json["other_runs"]
    assert other["awaited"] is False and other["can_continue"] is False
    with rt.store.session() as s:
        key = api_tokens.create(s, "robot")
    body = client.get(f"/api/records/{token}", headers={"Authorization": f"Bearer {key}"}).json
    assert body["runs"][0]["awaited"] is True
