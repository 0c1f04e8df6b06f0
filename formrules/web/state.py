"""Request-scoped access to the runtime, the rules and the current user's identity.

Anonymous users are identified by a random id in Flask's signed, long-lived session
cookie; users who log in are `user:<id>` and see their tasks on any browser.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from flask import current_app, g, session
from sqlalchemy.engine import Connection

from formrules.language.registry import RuleRegistry, RulesStatus
from formrules.language.tree import RuleSet
from formrules.process.runtime import Runtime
from formrules.store.db import Store

log = logging.getLogger("formrules.web")


def rt() -> Runtime:
    """This app's runtime (store, dispatcher, settings)."""
    return current_app.extensions["formrules"]


def _registry() -> RuleRegistry:
    # The app's registry, found once at start: `registry(dir)` resolves the path on every
    # call, which costs a status poll more than the freshness check itself.
    return current_app.extensions["formrules.rules"]


def rules() -> RuleSet:
    """The rules now: files edited on disk show within a second, broken ones keep their
    last good version (`formrules.language.registry`)."""
    return _registry().rules()


def rules_health() -> RulesStatus:
    """Which rule files are broken (for the operator banner and a readiness check)."""
    return _registry().status()


def owner() -> str:
    """The current user's owner key, creating the anonymous cookie on first use."""
    if "user_id" in session:
        return f"user:{session['user_id']}"
    if "anon" not in session:
        session["anon"] = secrets.token_urlsafe(24)
        session.permanent = True
    return f"anon:{session['anon']}"


def current_owner_or_none() -> str | None:
    """The owner key if this browser has one already (no cookie is created)."""
    if "user_id" in session:
        return f"user:{session['user_id']}"
    return f"anon:{session['anon']}" if "anon" in session else None


def db():
    """A session for this request (closed at teardown)."""
    if "db" not in g:
        g.db = rt().store.sessions()
    return g.db


def discard_db() -> None:
    """Close the request's session, whatever state a failure left it in: rolling back
    on a connection the database has cut fails, and there is nothing left to undo."""
    session = g.pop("db", None)
    if session is not None:
        try:
            session.close()
        except Exception as exc:
            log.warning("closing the request's database session failed: %s", exc)


@contextmanager
def reading(store: Store | None = None) -> Iterator[Connection]:
    """A connection for a request that only reads (a status poll), apart from `db()`:
    no ORM session to set up for a statement that needs none (`Session(bind=conn)` when
    one does).

    On PostgreSQL it runs in autocommit: no BEGIN before its first statement and no
    ROLLBACK after the last, two round trips fewer; each statement still reads one
    consistent snapshot. SQLite keeps the default (switching it costs more than it saves).
    """
    store = store or rt().store
    with store.engine.connect() as conn:
        if not store.is_sqlite:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn
