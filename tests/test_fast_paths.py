"""The hot paths stay cheap: statements per submit and per status poll, a warm worker
parent, capped counts on list pages. Counts of SQL statements, never timings."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import time_machine
from sqlalchemy import event, func, insert, select

from formrules.language.registry import current_rules
from formrules.process.warmup import warm
from formrules.store.models import Record, Run, RunEvent, utcnow
from formrules.web import admin, create_app
from formrules.web.formbuilder import form_class
from tests.fixture_actions import read_calls
from tests.helpers import submit, token_of, tokens, work

GOOD = {"name": "Ann", "email": "ann@example.com", "count": "3"}
PLAIN = """
form: plain
title: Plain
after_submit:
  message: "All done."
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Work
        flag: done
        do:
          - set: {name: worked}
"""
NOISY = """
form: noisy
title: Noisy
fields:
  - {name: name, type: string, required: true}
  - {name: status, type: string, hidden: true}
events:
  submit:
    - set: {status: received}
    - record_call: {name: inline}
"""


@contextmanager
def statements(app):
    """The SQL statements the app sends (transaction control and PRAGMAs left out)."""
    engine = app.extensions["formrules"].store.engine
    seen: list[str] = []

    def note(conn, cursor, statement, *args):
        word = statement.lstrip().split(None, 1)[0].upper()
        if word not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PRAGMA"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", note)


def count(rt, model) -> int:
    with rt.store.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_submit_is_two_inserts_with_inline_sets_in_the_record(app, client, rt):
    data = {**tokens(client.get("/forms/demo").data), **GOOD}
    with statements(app) as seen:
        response = client.post("/forms/demo", data=data)
    assert response.status_code == 303
    assert [s.split()[:3] for s in seen] == [["INSERT", "INTO", "records"],
                                            ["INSERT", "INTO", "runs"]]
    with rt.store.session() as s:
        record = s.scalar(select(Record))
        assert record.data["status"] == "received" and record.data["size"] == "normal"
        assert s.scalar(select(Run.record_id)) == record.id


def test_double_submit_of_a_tree_with_outside_effects_runs_it_once(rt, rules_dir):
    (rules_dir / "noisy.yaml").write_text(NOISY)
    client = create_app({"TESTING": True}, settings=rt.settings).test_client()
    data = {**tokens(client.get("/forms/noisy").data), "name": "Bo"}
    first = client.post("/forms/noisy", data=data)
    second = client.post("/forms/noisy", data=data)
    assert token_of(first) == token_of(second)
    assert count(rt, Record) == 1
    assert len(read_calls(rt.settings.instance_dir)) == 1  # the record was claimed first


def test_unchanged_status_poll_is_one_statement(app, client):
    token = token_of(submit(client, "demo", GOOD))
    with statements(app) as seen:
        first = client.get(f"/r/{token}/status")
    assert first.status_code == 200 and first.json["record"]["status"] == "received"
    assert len(seen) <= 3  # change tag, the Runs (with a has-files flag), the record
    with statements(app) as seen:
        again = client.get(f"/r/{token}/status",
                           headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and len(seen) == 1


def test_status_etag_changes_with_the_record_and_its_runs(client, rt):
    from formrules.store.db import lock_record
    token = token_of(submit(client, "demo", GOOD))
    tag = client.get(f"/r/{token}/status").headers["ETag"]
    with rt.store.session() as s:
        record = s.scalar(select(Record).where(Record.token == token))
        lock_record(s, record.id).data = {**record.data, "status": "edited"}
    changed = client.get(f"/r/{token}/status", headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.json["record"]["status"] == "edited"
    tag = changed.headers["ETag"]
    with rt.store.session() as s:
        s.scalar(select(Run)).progress_message = "halfway"
    moved = client.get(f"/r/{token}/status", headers={"If-None-Match": tag})
    assert moved.status_code == 200 and moved.json["runs"][0]["message"] == "halfway"


def test_status_of_someone_elses_record_is_404(app, client):
    token = token_of(submit(client, "demo", GOOD))
    assert app.test_client().get(f"/r/{token}/status").status_code == 404


def test_form_class_is_built_once_per_form(app):
    form = current_rules(app.extensions["formrules"].settings.rules_dir).form("demo")
    assert form_class(form) is form_class(form)
    assert form_class(form, include_hidden=True) is not form_class(form)


def test_warm_up_runs_a_job_and_leaves_nothing_behind(rt):
    assert warm(rt) is True
    assert count(rt, Record) == 0 and count(rt, Run) == 0 and count(rt, RunEvent) == 0


def test_admin_list_counts_up_to_a_limit(operator, rt, monkeypatch):
    monkeypatch.setattr(admin, "COUNT_LIMIT", 60)
    now = utcnow()
    with rt.store.session() as s:
        s.execute(insert(Run), [
            {"id": f"{i:032d}", "form_id": "demo" if i % 2 else "other", "owner": "o",
             "kind": "background", "node_path": "p", "title": f"t{i}", "snapshot": {},
             "status": "done", "created_at": now, "updated_at": now} for i in range(130)])
    page = operator.get("/admin")
    assert b"60+ results" in page.data and b'rel="next"' in page.data
    page = operator.get("/admin?page=3")
    assert page.status_code == 200 and b"t29" in page.data  # newest first: 129 … 0
    filtered = operator.get("/admin?form=other")
    assert b"60+ results" in filtered.data
    assert b'value="other"' in filtered.data  # the form filter offers forms with Runs


def test_status_polls_do_not_reissue_the_session_cookie(client):
    token = token_of(submit(client, "demo", GOOD))
    with time_machine.travel(datetime.now(UTC) + timedelta(days=2), tick=False):
        assert "Set-Cookie" in client.get(f"/r/{token}").headers  # the page refreshes it
        poll = client.get(f"/r/{token}/status")
        assert poll.status_code == 200 and "Set-Cookie" not in poll.headers


def test_an_unchanged_cookie_is_resent_at_most_daily(client):
    token = token_of(submit(client, "demo", GOOD))
    assert "Set-Cookie" not in client.get(f"/r/{token}").headers  # signed moments ago
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=25), tick=False):
        page = client.get(f"/r/{token}")
        assert page.status_code == 200 and "Set-Cookie" in page.headers  # a year from now
        assert "Set-Cookie" not in client.get(f"/r/{token}").headers
        assert client.get(f"/r/{token}/status").status_code == 200  # the new one is ours


def test_a_fresh_poll_is_one_statement_and_tags_as_a_revalidation_does(app, client, rt):
    token = token_of(submit(client, "demo", GOOD))
    with statements(app) as seen:
        fresh = client.get(f"/r/{token}/status")
    assert fresh.status_code == 200 and len(seen) == 1
    again = client.get(f"/r/{token}/status", headers={"If-None-Match": fresh.headers["ETag"]})
    assert again.status_code == 304 and again.headers["ETag"] == fresh.headers["ETag"]
    with rt.store.session() as s:
        s.scalar(select(Run)).progress_message = "halfway"
    moved = client.get(f"/r/{token}/status")
    assert moved.headers["ETag"] != fresh.headers["ETag"]
    assert moved.json["runs"][0]["message"] == "halfway"
    assert client.get(f"/r/{token}/status", headers={"If-None-Match": moved.headers["ETag"]}
                      ).status_code == 304


def test_rule_forms_translate_messages_as_flask_wtf_without_reloading_them(app):
    """The catalogue is cached per locale; every message still reads as flask_wtf's."""
    from flask_wtf.i18n import translations as flask_wtf_translations

    from formrules.web import formbuilder
    formbuilder._catalogue.cache_clear()
    for language in ("en", "de", "fr-CH", "en", "de"):
        with app.test_request_context(headers={"Accept-Language": language}):
            ours = formbuilder.RuleForm.Meta().get_translations(None)
            for message in ("This field is required.", "Not a valid integer value.",
                            "Invalid email address."):
                assert ours.gettext(message) == flask_wtf_translations.gettext(message)
            assert ours.ngettext("Field must be at least %(min)d character long.",
                                 "Field must be at least %(min)d characters long.", 2) == \
                flask_wtf_translations.ngettext(
                    "Field must be at least %(min)d character long.",
                    "Field must be at least %(min)d characters long.", 2)
    assert formbuilder._catalogue.cache_info().misses <= 3  # once per locale, not per call


def test_a_finished_answer_is_kept_until_its_tag_moves(rt, rules_dir):
    from formrules.store.db import lock_record
    (rules_dir / "plain.yaml").write_text(PLAIN)
    app = create_app({"TESTING": True}, settings=rt.settings)
    client = app.test_client()
    token = token_of(submit(client, "plain", {"name": "Ann"}))
    assert client.get(f"/r/{token}/status").json["state"] == "working"
    views = app.extensions["formrules.finished_views"]
    assert not views.known(token)  # working: its ETA moves with the clock, never kept
    work(rt)
    first = client.get(f"/r/{token}/status")
    assert first.json["state"] == "done" and first.json["message"] == "All done."
    assert views.known(token)
    with statements(app) as seen:
        again = client.get(f"/r/{token}/status")
    assert len(seen) == 1 and seen[0].lstrip().startswith("SELECT records.id, records.owner")
    assert again.data == first.data and again.headers["ETag"] == first.headers["ETag"]
    assert app.test_client().get(f"/r/{token}/status").status_code == 404  # owner only
    with rt.store.session() as s:
        record = s.scalar(select(Record).where(Record.token == token))
        lock_record(s, record.id).data = {**record.data, "name": "edited"}
    edited = client.get(f"/r/{token}/status")
    assert edited.json["record"]["name"] == "edited"
    assert edited.headers["ETag"] != first.headers["ETag"]


def test_an_answer_with_a_templated_message_is_built_each_time(app, client, rt):
    token = token_of(submit(client, "demo", GOOD))
    work(rt)
    assert client.get(f"/r/{token}/status").json["state"] == "done"
    assert not app.extensions["formrules.finished_views"].known(token)  # may call now()


def test_a_poll_leaves_pooled_connections_as_it_found_them(app, client, rt):
    """The poll's own connection runs in autocommit on PostgreSQL; the pool must hand
    the next request a connection in the engine's default (transactional) mode."""
    engine = rt.store.engine
    with engine.connect() as conn:
        default = conn.get_isolation_level()
    token = token_of(submit(client, "demo", GOOD))
    tag = client.get(f"/r/{token}/status").headers["ETag"]
    assert client.get(f"/r/{token}/status", headers={"If-None-Match": tag}).status_code == 304
    with engine.connect() as first, engine.connect() as second:
        assert first.get_isolation_level() == second.get_isolation_level() == default
