"""Every docs/rules.md example with a deferred node (background or delay) runs: submitted
through the web form, its Runs executed by a real RQ worker on real Redis and databases,
Delays brought forward, until every Run has ended without an error. `formrules check`
accepting an example (tests/test_docs.py) does not prove its templates work at run time.
"""

from __future__ import annotations

import io
import urllib.request
from datetime import date, timedelta

import pytest
from sqlalchemy import update

from formrules.language.tree import DeferNode
from formrules.runs.reconciler import reconcile_once
from formrules.store.models import PENDING, Run, utcnow
from tests.helpers import record_of, runs_of, submit, token_of, tokens, work
from tests.test_docs import (  # noqa: F401 (doc_actions is a fixture)
    YAML_BLOCKS,
    as_form,
    doc_actions,
    docs_actions_registered,
    parse_form,
)
from tests.web_helpers import make_user

pytestmark = pytest.mark.slow

FORM_ID = "docs_example"
# What a person types for each field type (anything valid will do).
TYPED = {"string": "Atlas", "text": "Some notes", "email": "ann@example.com",
         "integer": "4", "decimal": "900.00", "date": (date.today() + timedelta(days=3))
         .isoformat(), "datetime": (date.today() + timedelta(days=3)).isoformat() + "T10:00",
         "boolean": "y"}
# What a person uploads into a file field: a CSV, or a PDF where CSV is not accepted.
CSV_UPLOAD = b"name,email\r\nAnn,ann@example.com\r\nBob,bob@example.com\r\n"
PDF_UPLOAD = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def deferred(form) -> bool:
    """True when a form's events hold a background or delay node, at any depth."""
    def walk(nodes) -> bool:
        for node in nodes or []:
            if isinstance(node, DeferNode):
                return True
            if any(walk(getattr(node, name, None)) for name in (
                    "then", "otherwise", "do", "on_error", "body", "handler")):
                return True
        return False
    return any(walk(nodes) for nodes in form.events.values())


def examples() -> list:
    """The valid yaml examples whose form has a deferred node (custom actions known)."""
    with docs_actions_registered():
        return _examples()


def _examples() -> list:
    found = []
    for block in YAML_BLOCKS:
        if block.all("invalid"):
            continue
        form, problems = parse_form(as_form(block), "docs.yaml")
        if form is not None and not problems and deferred(form) and form.events:
            found.append(pytest.param(block, id=block.id))
    return found


EXAMPLES = examples()


def answers(form) -> dict[str, str]:
    """A valid value for each visible field of the form."""
    out = {}
    for fd in form.fields:
        if fd.hidden:
            continue
        if fd.type == "choice":
            out[fd.name] = fd.choices[0]
        elif fd.type == "boolean":
            out[fd.name] = "y"
        elif fd.type == "file":
            csv = not fd.accept or ".csv" in fd.accept or "text/csv" in fd.accept
            out[fd.name] = (io.BytesIO(CSV_UPLOAD), "people.csv") if csv \
                else (io.BytesIO(PDF_UPLOAD), "receipt.pdf")
        else:
            out[fd.name] = TYPED.get(fd.type, "x")
    return out


def changed_value(value: str) -> str:
    """Another valid value of the same type: a day later, or a longer text or address."""
    if len(value) == 10 and value[4] == "-":
        return str(date.fromisoformat(value) + timedelta(days=1))
    return "x" + value if "@" in value else value + "2"


def hurry(rt) -> None:
    """Make every pending Run due now and queue its job (the Delays' minutes pass)."""
    with rt.store.session() as s:
        s.execute(update(Run).where(Run.status.in_([p.value for p in PENDING]),
                                    Run.due_at > utcnow()).values(due_at=utcnow()))
        s.commit()
    for queue in map(rt.dispatcher.lane, rt.dispatcher.lanes()):
        registry = queue.scheduled_job_registry
        for job_id in registry.get_job_ids():
            job = queue.fetch_job(job_id)
            if job is not None:
                queue._enqueue_job(job)
            registry.remove(job_id)
    reconcile_once(rt)  # and what has no job (a retry the worker left to it) is dispatched


def run_to_the_end(rt, token: str) -> list[Run]:
    """Work and hurry until every Run of the record has ended (or give up after 20 rounds)."""
    for _ in range(20):
        work(rt)
        runs = runs_of(rt, token)
        if runs and all(r.is_final for r in runs):
            return runs
        hurry(rt)
    return runs_of(rt, token)


@pytest.fixture
def rules_dir(tmp_path, request):
    """A rules folder holding this test's example alone, as the form `docs_example`."""
    target = tmp_path / "rules"
    target.mkdir()
    block = request.node.callspec.params["block"]
    (target / f"{FORM_ID}.yaml").write_text(as_form(block), encoding="utf-8")
    return target


def test_the_docs_have_runnable_examples():
    assert len(EXAMPLES) >= 15
    assert any(p.values[0].marker("event") == "update" for p in EXAMPLES)


@pytest.mark.parametrize("block", EXAMPLES)
def test_docs_example_runs_through_a_worker(block, rules_dir, rt, client, operator,
                                            doc_actions, monkeypatch):  # noqa: F811
    if "create_invoice" in block.text:  # the docs' billing service, which is not here
        monkeypatch.setattr(urllib.request, "urlopen",
                            lambda request, timeout: io.BytesIO(b'{"number": "INV-7"}'))
    form, _ = parse_form(as_form(block), "docs.yaml")
    make_user(rt, "ann")
    token = token_of(submit(client, form.id, answers(form)))
    if "update" in form.events:  # an operator changes every field that can change
        record = record_of(rt, token)
        page = operator.get(f"/admin/records/{record.id}/edit")
        assert page.status_code == 200
        changed = {name: changed_value(value) for name, value in answers(form).items()}
        if "status" in changed:  # the docs' update example acts when a booking is cancelled
            changed["status"] = "cancelled"
        saved = operator.post(f"/admin/records/{record.id}/edit", data={
            **tokens(page.data), "version": str(record.version), **changed})
        assert saved.status_code == 303, saved.data[:2000]
    runs = run_to_the_end(rt, token)
    assert runs, "the example started no Run"
    report = [(r.title, r.status, r.last_error) for r in runs]
    assert all(r.is_final for r in runs), report
    if "http_request" in block.text:  # no network here: the call itself may fail, cleanly
        assert all(r.status in ("done", "skipped") or "http_request" in (r.last_error or "")
                   for r in runs), report
    else:
        assert all(r.status in ("done", "skipped") for r in runs), report
