"""The operator's text search: the trigram index (SQLite FTS5, PostgreSQL pg_trgm) finds
what the LIKE query finds, stays current as Runs and records are written, updated and
deleted, and the pages answer the same whichever path served them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, or_, select, update

from formrules.store import search
from formrules.store.models import Record, Run, utcnow

pytestmark = pytest.mark.integration

TITLES = ["Invoice for Åsa", "Reminder for Bo", "Quick work for n17", 'Say "hi" 100% now',
          "under_score here", "Invoice for Cy"]


def _runs(rt) -> dict[str, str]:
    """One record and a Run per title; returns title -> Run id."""
    ids = {}
    with rt.store.session() as s:
        record = Record(form_id="quick", owner="anon:searcher-42", data={})
        s.add(record)
        s.flush()
        for i, title in enumerate(TITLES):
            run = Run(record_id=record.id, form_id="quick", owner=f"user:{i}", kind="background",
                      node_path=f"events/submit/{i}/background", title=title, snapshot={},
                      status="done", created_at=utcnow() + timedelta(seconds=i))
            s.add(run)
            s.flush()
            ids[title] = run.id
    return ids


def _like(rt, text: str) -> list[str]:
    """The ids the unindexed query finds (what the page did before the index)."""
    with rt.store.session() as s:
        return sorted(s.scalars(select(Run.id).where(or_(Run.id.startswith(text), *(
            getattr(Run, c).icontains(text, autoescape=True) for c in search.RUN_COLUMNS)))))


def _indexed(rt, text: str, limit: int = 1000) -> list[str] | None:
    with rt.store.session() as s:
        return search.run_ids(s, text, limit)


def test_the_migrations_give_every_test_database_the_index(rt):
    with rt.store.session() as s:
        assert search.indexed(s)


def test_the_index_finds_what_like_finds_and_follows_every_write(rt):
    ids = _runs(rt)
    for text in ("invoice", "INVOICE FOR", '"hi"', "100%", "r_s", "n_e", "under_s",
                 "events/submit/3", "user:4", "n17", "no-such-text", ids["Reminder for Bo"][:6]):
        assert _indexed(rt, text) == _like(rt, text), text
    assert _indexed(rt, "Invoice") == sorted([ids["Invoice for Åsa"], ids["Invoice for Cy"]])
    assert _indexed(rt, "100%") == [ids['Say "hi" 100% now']]  # % is text, not a wildcard
    assert _indexed(rt, "r_s") == [ids["under_score here"]]
    assert _indexed(rt, "n_e") == []  # _ too: "under" does not match

    with rt.store.session() as s:  # searched columns written later: errors, a new title
        s.execute(update(Run).where(Run.id == ids["Reminder for Bo"])
                  .values(last_error="RuntimeError: upstream said 503",
                          safe_error="The service is busy."))
        s.execute(update(Run).where(Run.id == ids["Invoice for Cy"]).values(title="Receipt"))
        s.execute(delete(Run).where(Run.id == ids["Quick work for n17"]))
    assert _indexed(rt, "upstream said") == [ids["Reminder for Bo"]]
    assert _indexed(rt, "service is busy") == [ids["Reminder for Bo"]]
    assert _indexed(rt, "Invoice") == [ids["Invoice for Åsa"]]
    assert _indexed(rt, "receipt") == [ids["Invoice for Cy"]]
    assert _indexed(rt, "n17") == []
    for text in ("upstream", "receipt", "invoice", "n17", "busy"):
        assert _indexed(rt, text) == _like(rt, text), text


def test_short_text_and_many_matches_leave_it_to_like(rt):
    _runs(rt)
    assert _indexed(rt, "Bo") is None  # too short for trigrams
    assert _indexed(rt, "for", limit=2) is None  # more than the limit: the newest-first scan
    assert len(_indexed(rt, "for", limit=10)) == 4


def test_pages_answer_alike_through_the_index_and_like(operator, rt, monkeypatch):
    ids = _runs(rt)

    def page(query: str) -> str:
        response = operator.get(query)
        assert response.status_code == 200, query
        return response.get_data(as_text=True)

    indexed = page("/admin?q=invoice")
    assert "Invoice for Åsa" in indexed and "Invoice for Cy" in indexed
    assert "Reminder for Bo" not in indexed and "2 results" in indexed
    assert "Reminder for Bo" in page(f"/admin?q={ids['Reminder for Bo'][:8]}")
    assert "No runs match." in page("/admin?q=no-such-text")
    assert "Reminder for Bo" in page("/admin?q=Bo")  # two letters: LIKE
    assert "1 result" in page("/admin/records?q=searcher-4")  # its owner, indexed
    assert "No records match." in page("/admin/records?q=nobody-here")

    monkeypatch.setattr(search, "indexed", lambda session: False)  # no index: LIKE only
    unindexed = page("/admin?q=invoice")
    assert "Invoice for Åsa" in unindexed and "Invoice for Cy" in unindexed
    assert "Reminder for Bo" not in unindexed and "2 results" in unindexed
    assert "1 result" in page("/admin/records?q=searcher-4")
    assert "No records match." in page("/admin/records?q=nobody-here")


def _triggers(engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'").scalars())


def test_a_downgrade_past_a_table_rebuild_keeps_sqlite_search_current(tmp_path):
    """Dropping a column rebuilds a SQLite table, and its triggers went with it: the
    revision after the search tables puts them back, so search still follows writes."""
    from alembic import command
    from sqlalchemy import create_engine

    from formrules.store import migrate
    url = f"sqlite:///{tmp_path / 'down.db'}"
    migrate.upgrade(url)
    engine = migrate.migration_engine(url)
    before = _triggers(engine)
    assert len(before) == 6
    with engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0006_perf")
    assert _triggers(engine) == before
    engine.dispose()
    plain = create_engine(url)
    with plain.begin() as conn:  # the schema of 0006: written as that code wrote it
        conn.exec_driver_sql(
            "INSERT INTO records (token, form_id, owner, data, version, created_at, "
            "updated_at) VALUES ('tok', 'f', 'anon:after-downgrade', '{}', 1, "
            "'2030-01-01 00:00:00', '2030-01-01 00:00:00')")
    from sqlalchemy.orm import Session
    with Session(plain) as s:
        assert len(search.record_ids(s, "after-downgrade", 10)) == 1
    plain.dispose()


def test_reindex_rebuilds_the_sqlite_search_tables(rt, tmp_path):
    """`formrules db reindex` (after a VACUUM): the tables are rebuilt from the rows."""
    ids = _runs(rt)
    if rt.store.engine.dialect.name != "sqlite":
        with rt.store.session() as s:
            assert search.rebuild(s) is False
        return
    with rt.store.engine.begin() as conn:  # as a VACUUM that renumbered rowids leaves it
        conn.exec_driver_sql("INSERT INTO runs_search(runs_search) VALUES ('delete-all')")
    assert _indexed(rt, "Invoice") == []
    from click.testing import CliRunner

    from formrules.cli import cli
    done = CliRunner().invoke(cli, ["db", "reindex"],
                              env={"DATABASE_URL": rt.settings.sqlalchemy_url})
    assert done.exit_code == 0 and done.output == "Search tables rebuilt.\n", done.output
    assert _indexed(rt, "Invoice") == sorted([ids["Invoice for Åsa"], ids["Invoice for Cy"]])
