"""The store: one SQLAlchemy engine and session factory per process.

SQLite (the default) runs in WAL mode with a busy timeout so web and worker processes can
share the file; PostgreSQL is used when DATABASE_URL names it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, create_engine, event, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from formrules.store import migrate
from formrules.store.models import Record, utcnow


class Store:
    """The database: `session()` for a unit of work; the schema is Alembic's (`migrate`)."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> tuple[str | None, str]:
        """Migrate the schema to this code's revision; returns (before, after)."""
        return migrate.upgrade(self.url)

    def check_schema(self) -> None:
        """Refuse (SchemaError, saying which command to run) unless the schema is current."""
        migrate.check(self.engine)

    def create_all(self) -> None:
        """The schema via migrations (the name callers from before migrations know)."""
        self.upgrade()

    @contextmanager
    def session(self):
        """A session that commits on success and rolls back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        """Drop pooled connections (after fork, or on shutdown)."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


KNOWN_RECORDS = "formrules.known_records"  # Session.info: facts of records read already


@dataclass(frozen=True)
class RecordFacts:
    """What a transaction already knows of a record, so it need not ask again: its token
    (it never changes) and whether callbacks wait for its work (registered only with
    the record, so a Run started later sees them all)."""

    token: str
    callbacks_waiting: bool


def remember_record(session: Session, record_id: int, facts: RecordFacts) -> None:
    """Note `facts` for the rest of this session's transactions."""
    session.info.setdefault(KNOWN_RECORDS, {})[record_id] = facts


def known_record(session: Session, record_id: int) -> RecordFacts | None:
    """The facts noted for a record in this session, if any."""
    return session.info.get(KNOWN_RECORDS, {}).get(record_id)


@cache
def _guarded_write() -> Any:
    """`merge_record`'s UPDATE, built once (every step of every Run writes through it)."""
    return (update(Record)
            .where(Record.id == bindparam("p_id"), Record.version == bindparam("p_seen"))
            .values(data=bindparam("p_data", type_=Record.data.type),
                    version=bindparam("p_version"), updated_at=bindparam("p_now"))
            .execution_options(synchronize_session=False))


def lock_record(session: Session, record_id: int) -> Record:
    """Lock a record for a read-modify-write and return it fresh.

    The write comes first on purpose: on PostgreSQL the UPDATE takes the row lock, on
    SQLite it takes the database write lock (waiting with the busy timeout), so a
    concurrent writer cannot slip between our read and our write. Call it at the start
    of a transaction. One statement: the locking UPDATE hands the row back (RETURNING).
    """
    record = session.scalar(
        update(Record).where(Record.id == record_id)
        .values(version=Record.version + 1, updated_at=utcnow()).returning(Record)
        .execution_options(synchronize_session=False, populate_existing=True))
    if record is None:
        raise LookupError(f"record {record_id} is gone")
    return record


def merge_record(session: Session, record_id: int, updates: dict[str, Any],
                 known_version: int | None = None,
                 known_data: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """Write `updates` into a record's data; returns its data and version as written.

    A caller that read the record earlier (`known_version`, `known_data`) writes in one
    UPDATE guarded by that version: when nobody wrote meanwhile (the common case) that
    is all; when someone did, it matches nothing and the record is locked, re-read and
    merged as `lock_record` does. Either way the version goes up by one.
    """
    if known_version is not None and known_data is not None:
        merged = {**known_data, **updates}
        if session.execute(_guarded_write(), {
                "p_id": record_id, "p_seen": known_version, "p_data": merged,
                "p_version": known_version + 1, "p_now": utcnow()}).rowcount:
            return merged, known_version + 1
    record = lock_record(session, record_id)
    record.data = {**record.data, **updates}
    return dict(record.data), record.version
