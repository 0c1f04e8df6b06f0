"""Schema migrations: they equal the models, they adopt and upgrade a database of the last
release without losing a row, and web/worker refuse a schema that is behind.

The last release's schema comes from tests/fixtures/schema_b9253d4.*.sql: DDL compiled
from models.py at commit b9253d4 (before migrations), never from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from formrules.config import from_env
from formrules.process.runtime import Runtime, install
from formrules.runs import snapshot
from formrules.runs.job import Execution
from formrules.store import migrate, search
from formrules.store.models import Base, Record, Run
from tests.conftest import PG_URL, ROOT

FIXTURES = Path(__file__).parent / "fixtures"
QUEUED_RUN, DEAD_RUN = "a" * 32, "b" * 32
LEGACY_TABLES = ("records", "runs", "run_events", "result_files", "users", "notifications",
                 "api_tokens", "batches", "schedule_slots")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    """A database with nothing in it: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    if not PG_URL:
        pytest.skip("FORMRULES_TEST_POSTGRES is not set")
    schema = f"formrules_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_migrations_build_exactly_the_models(database_url):
    """Autogenerate finds nothing to add: the migrations and models.py agree."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "compare_type": True, "include_name": search.include_name})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() == migrate.head()
    finally:
        engine.dispose()


def _legacy_database(url: str, extra_sql: str = "") -> None:
    """Create the schema of the last release from its DDL fixture."""
    engine = create_engine(url)
    ddl = (FIXTURES / f"schema_b9253d4.{engine.dialect.name}.sql").read_text()
    with engine.begin() as conn:
        for statement in ddl.split(";\n"):
            body = "\n".join(line for line in statement.splitlines()
                             if not line.startswith("--")).strip()
            if body:
                conn.exec_driver_sql(body)
        if extra_sql:
            conn.exec_driver_sql(extra_sql)
    engine.dispose()


LEGACY_SNAPSHOT = {  # a Run snapshot as formrules 0.1.0 wrote it: no version
    "raw": {"background": {"title": "Confirm", "retry": False, "await": True,
                           "do": [{"set": {"note": "confirmed by {{ record.name }}"}}]}},
    "fields": {"name": "string", "note": "string"},
    "intervals": [], "timeout": None,
}


def _fill(url: str) -> None:
    """Rows in every table, written as the last release would have (plain SQL).

    Serial ids come from the database (as they did), so its sequences are where the old
    code left them; the first record of a new database is id 1.
    """
    engine = create_engine(url)
    pg = engine.dialect.name == "postgresql"
    json_ = "CAST({} AS JSON)" if pg else "{}"

    def at(minute: int):
        when = datetime(2026, 11, 1, 10, minute, 7, 123456, tzinfo=UTC)
        return when if pg else when.strftime("%Y-%m-%d %H:%M:%S.%f")

    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO records (token, form_id, owner, data, version, submit_key, "
            f"created_at, updated_at) VALUES ('tok-1', 'legacy', 'anon:x', "
            f"{json_.format(':data')}, 3, 'key-1', :t0, :t1)"),
            {"data": json.dumps({"name": "Åsa", "count": 2}), "t0": at(0), "t1": at(1)})
        conn.execute(text(
            "INSERT INTO runs (id, record_id, form_id, owner, kind, node_path, title, snapshot,"
            " status, awaited, flag, due_at, attempt, max_attempts, lease, heartbeat_at, "
            "started_at, finished_at, progress_done, progress_total, progress_message, "
            "last_error, safe_error, recoveries, cancel_requested, hidden, batch_id, "
            "parent_id, created_at, updated_at) VALUES "
            f"(:id, 1, 'legacy', 'anon:x', 'background', "
            f"'events/submit/0', 'Confirm', {json_.format(':snap')}, 'queued', 'true', NULL, "
            ":t0, 0, 1, NULL, NULL, NULL, NULL, 0, 0, '', NULL, NULL, 0, :no, :no, NULL, "
            "NULL, :t0, :t0)"),
            {"id": QUEUED_RUN, "snap": json.dumps(LEGACY_SNAPSHOT), "t0": at(0), "no": False})
        conn.execute(text(
            "INSERT INTO runs (id, record_id, form_id, owner, kind, node_path, title, snapshot,"
            " status, awaited, due_at, attempt, max_attempts, progress_done, progress_total, "
            "progress_message, last_error, safe_error, recoveries, cancel_requested, hidden, "
            "created_at, updated_at, finished_at) VALUES (:id, 1, 'legacy', 'anon:x', 'delay',"
            f" 'events/submit/1', 'Old failure', {json_.format(':snap')}, 'dead', 'false', :t0,"
            " 3, 3, 1.5, 4, 'half', 'Traceback…', 'It failed.', 1, :no, :yes, :t0, :t2, :t2)"),
            {"id": DEAD_RUN, "snap": json.dumps(LEGACY_SNAPSHOT), "t0": at(0), "t2": at(2),
             "no": False, "yes": True})
        conn.execute(text(
            "INSERT INTO run_events (run_id, at, attempt, path, event, detail, duration_ms)"
            " VALUES (:run, :t, 3, 'events/submit/1/do/0', 'error', 'boom', 12)"),
            {"run": DEAD_RUN, "t": at(2)})
        conn.execute(text(
            "INSERT INTO result_files (id, run_id, owner, filename, content_type, data, "
            "created_at) VALUES (:id, :run, 'anon:x', 'r.csv', 'text/csv', :data, :t)"),
            {"id": "f" * 32, "run": DEAD_RUN, "data": b"a,b\n\x00\xff", "t": at(3)})
        conn.execute(text(
            "INSERT INTO users (name, password_hash, is_operator, created_at) VALUES "
            "('olga', 'scrypt:xyz', :yes, :t)"), {"yes": True, "t": at(4)})
        conn.execute(text(
            "INSERT INTO notifications (owner, run_id, record_token, level, message, "
            "created_at, read_at) VALUES ('anon:x', :run, 'tok-1', 'error', "
            "'Old failure: It failed.', :t, NULL)"), {"run": DEAD_RUN, "t": at(5)})
        conn.execute(text(
            "INSERT INTO api_tokens (name, token_hash, created_at, last_used_at) VALUES "
            "('ci', 'hash', :t, :t)"), {"t": at(6)})
        conn.execute(text(
            "INSERT INTO batches (id, form_id, task, title, owner, total, concurrency, "
            "stop_on_error, status, created_at, finished_at) VALUES (:id, "
            "'legacy', 'export', 'Export', 'user:1', 10, 2, :no, 'done', :t, :t)"),
            {"id": "c" * 32, "no": False, "t": at(7)})
        conn.execute(text(
            "INSERT INTO schedule_slots (schedule_key, slot_at, outcome, created_at) "
            "VALUES ('legacy/nightly', :t, 'started 1 run(s)', :t)"), {"t": at(8)})
    engine.dispose()


def _dump_columns(url: str, columns: dict[str, list[str]]) -> dict[str, list[tuple]]:
    """Every row of the given tables and columns, in key order."""
    engine = create_engine(url)
    with engine.connect() as conn:
        dump = {table: [tuple(row) for row in conn.exec_driver_sql(
                    f"SELECT {', '.join(names)} FROM {table} ORDER BY id")]
                for table, names in columns.items()}
    engine.dispose()
    return dump


def _cli(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATABASE_URL=url, FORMRULES_INSTANCE=str(tmp_path / "instance"),
               FORMRULES_RULES=str(ROOT / "rules"), SECRET_KEY="test",
               REDIS_URL="redis://127.0.0.1:1/0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "formrules.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_a_database_of_the_last_release_upgrades_without_loss(empty_url, tmp_path,
                                                              redis_url):
    """Adopted as 0001, upgraded to head, every row intact, and its old Run still runs."""
    _legacy_database(empty_url)
    _fill(empty_url)
    engine = create_engine(empty_url)
    legacy_columns = {table: [c["name"] for c in inspect(engine).get_columns(table)]
                      for table in LEGACY_TABLES}
    engine.dispose()
    before = _dump_columns(empty_url, legacy_columns)
    assert all(before.values())

    refused = _cli(empty_url, tmp_path, "worker", "--burst")
    assert refused.returncode == 1
    assert "made by formrules before migrations" in refused.stderr
    assert "formrules db upgrade" in refused.stderr
    assert _cli(empty_url, tmp_path, "db", "current").returncode == 1

    done = _cli(empty_url, tmp_path, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    assert f"unversioned (made before migrations) -> {migrate.head()}" in done.stdout
    current = _cli(empty_url, tmp_path, "db", "current")
    assert current.returncode == 0, current.stderr
    assert f"database: {migrate.head()}" in current.stdout
    assert _dump_columns(empty_url, legacy_columns) == before
    assert "Database already at" in _cli(empty_url, tmp_path, "db", "upgrade").stdout

    settings = from_env({}, database_url=empty_url, redis_url=redis_url, secret_key="t",
                        instance_dir=str(tmp_path / "instance"), rules_dir=str(ROOT / "rules"))
    rt = install(Runtime(settings))
    try:
        rt.store.check_schema()
        assert Execution(rt, QUEUED_RUN).execute() == "done"  # an unversioned snapshot
        with rt.store.session() as s:
            assert s.get(Record, 1).data == {"name": "Åsa", "count": 2,
                                             "note": "confirmed by Åsa"}
            old = s.get(Run, DEAD_RUN)
            assert (old.status, old.hidden, old.progress_message) == ("dead", True, "half")
            assert old.finished_at == datetime(2026, 11, 1, 10, 2, 7, 123456, tzinfo=UTC)
    finally:
        rt.store.dispose()


def test_a_foreign_unversioned_schema_is_refused_untouched(empty_url):
    """Tables that are not exactly those of 0001 are never stamped or altered."""
    _legacy_database(empty_url, "ALTER TABLE runs ADD COLUMN shoe_size INTEGER")
    with pytest.raises(migrate.SchemaError, match=r"runs\.shoe_size is unknown"):
        migrate.upgrade(empty_url)
    engine = create_engine(empty_url)
    assert "alembic_version" not in inspect(engine).get_table_names()
    engine.dispose()


def test_web_and_worker_refuse_an_empty_database_and_say_what_to_run(empty_url, tmp_path):
    """Neither serves nor works on a database that is behind; `db upgrade` fixes it."""
    from formrules.web import create_app

    settings = from_env({}, database_url=empty_url, secret_key="t",
                        instance_dir=str(tmp_path / "instance"), rules_dir=str(ROOT / "rules"))
    with pytest.raises(migrate.SchemaError, match="run `formrules db upgrade`"):
        create_app(settings=settings)
    worker = _cli(empty_url, tmp_path, "worker", "--burst")
    assert worker.returncode == 1
    assert "has no formrules tables yet: run `formrules db upgrade`" in worker.stderr
    assert "Traceback" not in worker.stderr
    web = _cli(empty_url, tmp_path, "web", "--workers", "2", "--port", "1")
    assert web.returncode == 1
    assert "run `formrules db upgrade`" in web.stderr
    assert _cli(empty_url, tmp_path, "db", "upgrade").returncode == 0
    create_app(settings=settings)


@pytest.mark.integration  # a database, through the CLI in a process of its own
def test_cli_commands_upgrade_the_embedded_database_by_themselves(tmp_path):
    """No DATABASE_URL: the instance folder's SQLite is formrules' own and is upgraded."""
    env = dict(os.environ, FORMRULES_INSTANCE=str(tmp_path / "instance"),
               FORMRULES_PASSWORD="long enough", SECRET_KEY="t")
    env.pop("DATABASE_URL", None)
    added = subprocess.run([sys.executable, "-m", "formrules.cli", "users", "add", "ann"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    assert f"Database upgraded: empty -> {migrate.head()}" in added.stderr
    history = subprocess.run([sys.executable, "-m", "formrules.cli", "db", "history"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert history.stdout.startswith(migrate.head())
    assert "0001 <- (base)" in history.stdout


def test_new_runs_carry_the_snapshot_version(rt, client):
    """Every Run written now says which snapshot shape it has."""
    from tests.helpers import runs_of, submit, token_of

    token = token_of(submit(client, "demo", {"name": "Ann", "email": "a@example.com"}))
    assert {r.snapshot[snapshot.VERSION_KEY] for r in runs_of(rt, token)} == {snapshot.VERSION}


def test_a_snapshot_newer_than_the_code_goes_dead_with_a_reason(rt):
    """A worker running older code than the Run's writer does not guess: dead, explained."""
    with rt.store.session() as s:
        record = Record(form_id="legacy", owner="anon:x", data={"name": "A"})
        s.add(record)
        s.flush()
        run = Run(record_id=record.id, form_id="legacy", owner="anon:x", kind="background",
                  node_path="events/submit/0", title="Future",
                  snapshot={**LEGACY_SNAPSHOT, snapshot.VERSION_KEY: snapshot.VERSION + 1})
        s.add(run)
    with pytest.raises(Exception, match="dead"):
        Execution(rt, run.id).execute()
    with rt.store.session() as s:
        dead = s.get(Run, run.id)
        assert dead.status == "dead"
        assert f"snapshot version {snapshot.VERSION + 1} is newer" in dead.last_error
