"""Schema versions: the Alembic migrations in `formrules/store/migrations`, run from code.

`upgrade` brings a database to the newest revision (an empty one gets every table); a
database made by `create_all` before migrations existed has tables but no version, and is
adopted as revision 0001 when its tables and columns are exactly those of 0001. `check`
is what `web` and `worker` call: they never change a schema, they say which command will.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from formrules.errors import FormrulesError

BASELINE = "0001"  # the schema of the first release, made by create_all back then
UPGRADE_HINT = "run `formrules db upgrade` (with the same DATABASE_URL) first"


class SchemaError(FormrulesError):
    """The database schema is not the one this code needs (behind, ahead or foreign)."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands against the migrations this code ships."""

    current: str | None  # None: no version table (empty, or made before migrations)
    head: str
    has_tables: bool  # any formrules table exists

    @property
    def up_to_date(self) -> bool:
        """True when the code and the database agree."""
        return self.current == self.head

    @property
    def label(self) -> str:
        """The revision for people: a revision id, or what an unversioned database is."""
        if self.current:
            return self.current
        return "unversioned (made before migrations)" if self.has_tables else "empty"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the shipped migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", "formrules.store:migrations")
    config.attributes["connection"] = connection
    return config


@cache
def scripts() -> ScriptDirectory:
    """The revisions shipped with this code."""
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision id."""
    heads = scripts().get_heads()
    if len(heads) != 1:
        raise SchemaError(f"the migrations have {len(heads)} heads ({', '.join(heads)}); "
                          "a revision must be merged or re-chained")
    return heads[0]


def migration_engine(url: str) -> Engine:
    """An engine for schema work: SQLite without foreign-key enforcement.

    Batch mode rebuilds a SQLite table by copy, drop and rename; with foreign keys on,
    the drop would cascade into every child row (a Run's trace, its files).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
        from sqlalchemy import event

        event.listen(engine, "connect", _foreign_keys_off)
        return engine
    return create_engine(url, poolclass=NullPool)


def _foreign_keys_off(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=OFF")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def state(engine: Engine) -> SchemaState:
    """Read the database's revision (one short connection)."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
    return SchemaState(current=current, head=head(), has_tables=bool(tables & _baseline()))


def check(engine: Engine) -> SchemaState:
    """Raise SchemaError unless the database is at this code's revision."""
    found = state(engine)
    if found.up_to_date:
        return found
    known = {rev.revision for rev in scripts().walk_revisions()}
    if found.current is None and not found.has_tables:
        raise SchemaError(f"the database {_safe(engine)} has no formrules tables yet: "
                          f"{UPGRADE_HINT}")
    if found.current is None:
        raise SchemaError(f"the database {_safe(engine)} was made by formrules before "
                          f"migrations existed: {UPGRADE_HINT}")
    if found.current not in known:
        raise SchemaError(f"the database {_safe(engine)} is at revision {found.current}, "
                          "which this formrules does not know (made by a newer version?); "
                          "upgrade formrules instead")
    raise SchemaError(f"the database {_safe(engine)} is at revision {found.current}, this "
                      f"formrules needs {found.head}: {UPGRADE_HINT}")


def upgrade(url: str, revision: str = "head") -> tuple[SchemaState, str]:
    """Migrate the database at `url` to `revision`; return where it stood, and its revision.

    A database from before migrations is checked against revision 0001 and stamped with
    it first (nothing is rewritten); one that does not match is refused, untouched.
    """
    engine = migration_engine(url)
    try:
        before = state(engine)
        if before.current is None and before.has_tables:
            _adopt(engine)
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
        after = state(engine).current
    finally:
        engine.dispose()
    return before, after or ""


def current(url: str) -> SchemaState:
    """The database's revision next to this code's."""
    engine = migration_engine(url)
    try:
        return state(engine)
    finally:
        engine.dispose()


def history() -> list[str]:
    """One line per shipped revision, newest first."""
    return [f"{rev.revision} <- {rev.down_revision or '(base)'}: {rev.doc.splitlines()[0]}"
            for rev in scripts().walk_revisions()]


def _adopt(engine: Engine) -> None:
    """Stamp a create_all database as 0001 when its tables are exactly those of 0001."""
    expected = _baseline_columns()
    with engine.connect() as conn:
        inspector = inspect(conn)
        found = {t: {c["name"] for c in inspector.get_columns(t)}
                 for t in inspector.get_table_names() if t in expected}
    problems = [f"table {t} is missing" for t in sorted(expected) if t not in found]
    for table, columns in sorted(found.items()):
        problems += [f"{table}.{c} is missing" for c in sorted(expected[table] - columns)]
        problems += [f"{table}.{c} is unknown" for c in sorted(columns - expected[table])]
    if problems:
        raise SchemaError(f"the database {_safe(engine)} has formrules tables but no "
                          f"version, and they are not those of revision {BASELINE}: "
                          + "; ".join(problems) + ". Nothing was changed.")
    with engine.begin() as conn:
        command.stamp(alembic_config(conn), BASELINE)


@cache
def _baseline_columns() -> dict[str, frozenset[str]]:
    """Tables and columns of revision 0001, read from 0001 applied to a scratch database."""
    engine = migration_engine("sqlite://")  # in memory: one connection, one database
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), BASELINE)
            inspector = inspect(conn)
            return {t: frozenset(c["name"] for c in inspector.get_columns(t))
                    for t in inspector.get_table_names() if t != "alembic_version"}
    finally:
        engine.dispose()


def _baseline() -> set[str]:
    return set(_baseline_columns())


def _safe(engine: Engine) -> str:
    """The URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)
