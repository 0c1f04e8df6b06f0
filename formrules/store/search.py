"""Text search for the operator's runs and records lists, through an index where there is one.

Revision 0006_perf gives SQLite FTS5 trigram tables (`runs_search`, `records_search`, kept
current by triggers) and PostgreSQL pg_trgm GIN indexes; both find a substring in a few
index probes however large the tables are. The pages ask here for the ids that match,
up to a limit: a few matches (the slow case for a scan: "nothing matches" reads every
row) come from the index; when there are more than the limit, or the text is too short
for trigrams, or the database has no index (an old SQLite, pg_trgm not installable), the
answer is None and the page uses its `LIKE` query, which finds common text quickly in
the newest rows.
"""

from __future__ import annotations

import logging
import re
import weakref

from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

MIN_CHARS = 3  # trigram indexes cannot find less; shorter text keeps the LIKE query
RUN_COLUMNS = ("title", "node_path", "owner", "safe_error", "last_error")
# The indexed expression on PostgreSQL: must equal the one in revision 0006_perf.
RUNS_TEXT = " || chr(10) || ".join(f"coalesce({c}, '')" for c in RUN_COLUMNS)
_HEX = re.compile(r"[0-9a-f]+")

_indexed: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def run_ids(session: Session, text: str, limit: int) -> list[str] | None:
    """Ids of the Runs whose id starts with `text` or whose title, path, owner or errors
    contain it (case-insensitive), when they are at most `limit`; else None."""
    if len(text) < MIN_CHARS or not indexed(session):
        return None
    if session.get_bind().dialect.name == "sqlite":
        found = session.execute(sql(
            "SELECT runs.id FROM runs_search JOIN runs ON runs.rowid = runs_search.rowid "
            "WHERE runs_search MATCH :q LIMIT :n"), {"q": _phrase(text), "n": limit + 1})
    else:
        found = session.execute(sql(f"SELECT id FROM runs WHERE ({RUNS_TEXT}) ILIKE :p "
                                    "LIMIT :n"), {"p": _contains(text), "n": limit + 1})
    ids = set(found.scalars())
    prefix = text.lower()
    if _HEX.fullmatch(prefix):  # Run ids are lowercase hex: a prefix is a key range
        ids.update(session.scalars(sql("SELECT id FROM runs WHERE id >= :a AND id < :b "
                                       "LIMIT :n"), {"a": prefix, "b": prefix + "~",
                                                      "n": limit + 1}))
    return sorted(ids) if len(ids) <= limit else None


def record_ids(session: Session, text: str, limit: int) -> list[int] | None:
    """Ids of the records whose owner contains `text`, when at most `limit`; else None."""
    if len(text) < MIN_CHARS or not indexed(session):
        return None
    if session.get_bind().dialect.name == "sqlite":
        found = session.scalars(sql("SELECT rowid FROM records_search WHERE records_search "
                                    "MATCH :q LIMIT :n"), {"q": _phrase(text), "n": limit + 1})
    else:
        found = session.scalars(sql("SELECT id FROM records WHERE owner ILIKE :p LIMIT :n"),
                                {"p": _contains(text), "n": limit + 1})
    ids = sorted(found)
    return ids if len(ids) <= limit else None


def indexed(session: Session) -> bool:
    """True when the database has the search index (checked once per engine)."""
    engine = session.get_bind().engine
    known = _indexed.get(engine)
    if known is None:
        if engine.dialect.name == "sqlite":
            query = "SELECT 1 FROM sqlite_master WHERE name = 'runs_search'"
        elif engine.dialect.name == "postgresql":
            query = ("SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() "
                     "AND indexname = 'ix_runs_search_trgm'")
        else:
            query = None
        known = bool(query and session.execute(sql(query)).scalar())
        if not known:
            log.warning("no text search index in this database (SQLite older than 3.34, "
                        "or pg_trgm unavailable): admin search reads every row")
        _indexed[engine] = known
    return known


def rebuild(session: Session) -> bool:
    """Rebuild the SQLite search tables from `runs` and `records` (after a `VACUUM`, which
    may renumber the rowids of `runs`, whose key is text); False where there is nothing
    to rebuild (PostgreSQL's indexes follow their rows by themselves)."""
    if session.get_bind().dialect.name != "sqlite" or not indexed(session):
        return False
    for table in ("runs_search", "records_search"):
        session.execute(sql(f"INSERT INTO {table}({table}) VALUES ('rebuild')"))
    return True


def _phrase(text: str) -> str:
    """`text` as one FTS5 phrase: with the trigram tokenizer, a substring match."""
    return '"' + text.replace('"', '""') + '"'


def _contains(text: str) -> str:
    """An ILIKE pattern matching `text` literally anywhere (backslash is the escape)."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def include_name(name: str | None, type_: str, _parent: dict) -> bool:
    """Alembic's `include_name` hook: autogenerate leaves out the search tables and
    indexes (revision 0006_perf makes them per database; models.py cannot say them)."""
    if type_ == "table" and name and (name.endswith("_search")
                                      or re.search(r"_search_(data|idx|config|docsize|"
                                                   r"content)$", name)):
        return False
    return not (type_ == "index" and name in ("ix_runs_search_trgm", "ix_records_owner_trgm"))
