"""The peer's one table and its session factory (shared by the app and its jobs)."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, Integer, String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

engine = create_engine(os.environ.get("PEER_DATABASE_URL", "sqlite:///peer.db"))
Session = sessionmaker(engine)

if engine.dialect.name == "sqlite":
    # The settings formrules uses too (and any SQLite app shared by web and worker
    # processes wants): compare code, not fsync policies.
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


class Base(DeclarativeBase):
    pass


class Submission(Base):
    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 default=lambda: datetime.now(UTC))


def init_db() -> None:
    """Create the table (idempotent)."""
    Base.metadata.create_all(engine)
