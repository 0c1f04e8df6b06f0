"""Text search indexes for the operator's runs and records search.

SQLite: FTS5 tables with the trigram tokenizer (SQLite 3.34 or newer) over the searched
columns, kept in step with `runs` and `records` by triggers (so bulk loads and every
writer are covered). PostgreSQL: pg_trgm GIN indexes, which serve `ILIKE '%text%'`
directly. Where neither is available (an old SQLite, or pg_trgm not installable) nothing
is created and the search keeps its unindexed query (`formrules.store.search` checks).

The searched text is written out here, not imported, so this revision stays as it is
when the code moves on; `formrules.store.search` must match it.

Revision ID: 0006_perf
Revises: 0005_lanes
"""

import logging

from alembic import op
from sqlalchemy.exc import DBAPIError

revision = "0006_perf"
down_revision = "0005_lanes"
branch_labels = None
depends_on = None

log = logging.getLogger("formrules.migrations")

RUN_COLUMNS = ("title", "node_path", "owner", "safe_error", "last_error")
# PostgreSQL: one expression over the Run's searched columns (one index to keep up, one
# scan to read); the separator keeps a match from spanning two columns.
RUNS_TEXT = " || chr(10) || ".join(f"coalesce({c}, '')" for c in RUN_COLUMNS)


def upgrade() -> None:
    """Create the search tables (SQLite) or indexes (PostgreSQL) where supported."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _sqlite_upgrade(bind)
    elif bind.dialect.name == "postgresql":
        _postgres_upgrade(bind)


def downgrade() -> None:
    """Drop them again (whatever was created)."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for table in ("runs", "records"):
            for suffix in ("ai", "ad", "au"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_search_{suffix}")
            op.execute(f"DROP TABLE IF EXISTS {table}_search")
    elif bind.dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_runs_search_trgm")
        op.execute("DROP INDEX IF EXISTS ix_records_owner_trgm")


def _sqlite_upgrade(bind) -> None:
    version = tuple(int(p) for p in bind.exec_driver_sql("SELECT sqlite_version()")
                    .scalar().split("."))
    if version < (3, 34):
        log.warning("SQLite %s has no trigram tokenizer (3.34+): admin search stays "
                    "unindexed", ".".join(map(str, version)))
        return
    _fts(bind, "runs", RUN_COLUMNS, "rowid")
    _fts(bind, "records", ("owner",), "id")


def _fts(bind, table: str, columns: tuple[str, ...], key: str) -> None:
    """An external-content FTS5 table over `table` and the triggers that keep it current.

    The update trigger fires only when a searched column is written, so the worker's
    status, lease and progress updates cost nothing extra.
    """
    cols = ", ".join(columns)
    new = ", ".join(f"new.{c}" for c in columns)
    old = ", ".join(f"old.{c}" for c in columns)
    search = f"{table}_search"
    bind.exec_driver_sql(
        f"CREATE VIRTUAL TABLE {search} USING fts5({cols}, content='{table}', "
        f"content_rowid='{key}', tokenize='trigram', columnsize=0)")
    bind.exec_driver_sql(
        f"CREATE TRIGGER {table}_search_ai AFTER INSERT ON {table} BEGIN "
        f"INSERT INTO {search}(rowid, {cols}) VALUES (new.{key}, {new}); END")
    bind.exec_driver_sql(
        f"CREATE TRIGGER {table}_search_ad AFTER DELETE ON {table} BEGIN "
        f"INSERT INTO {search}({search}, rowid, {cols}) VALUES ('delete', old.{key}, {old}); "
        "END")
    bind.exec_driver_sql(
        f"CREATE TRIGGER {table}_search_au AFTER UPDATE OF {cols} ON {table} BEGIN "
        f"INSERT INTO {search}({search}, rowid, {cols}) VALUES ('delete', old.{key}, {old}); "
        f"INSERT INTO {search}(rowid, {cols}) VALUES (new.{key}, {new}); END")
    bind.exec_driver_sql(f"INSERT INTO {search}({search}) VALUES ('rebuild')")


def _postgres_upgrade(bind) -> None:
    schema = _trgm_schema(bind)
    if schema is None:
        return
    op.execute(f"CREATE INDEX ix_runs_search_trgm ON runs USING gin (({RUNS_TEXT}) "
               f'"{schema}".gin_trgm_ops)')
    op.execute("CREATE INDEX ix_records_owner_trgm ON records USING gin "
               f'(owner "{schema}".gin_trgm_ops)')


def _trgm_schema(bind) -> str | None:
    """The schema pg_trgm lives in, installing it (into `public`) when it is not there.

    Not into the current schema: a deployment (or a test) that drops its schema would
    take the extension, and every other schema's indexes on it, along.
    """
    found = bind.exec_driver_sql("SELECT extnamespace::regnamespace::text FROM pg_extension "
                                 "WHERE extname = 'pg_trgm'").scalar()
    if found:
        return found.strip('"')
    target = "public" if bind.exec_driver_sql(
        "SELECT 1 FROM pg_namespace WHERE nspname = 'public'").scalar() else None
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm"
                                 + (" SCHEMA public" if target else ""))
    except DBAPIError as exc:  # no privilege, or not installed on the server
        log.warning("pg_trgm is not available (%s): admin search stays unindexed "
                    "(docs/operations.md says how to add the index later)",
                    str(exc.orig).splitlines()[0])
        return None
    return bind.exec_driver_sql("SELECT extnamespace::regnamespace::text FROM pg_extension "
                                "WHERE extname = 'pg_trgm'").scalar().strip('"')
