"""Logged-in sessions that the server can end: revocation, idle and absolute lifetimes.

The session cookie is signed, not stored, so deleting it in one browser does not stop a
copy. So it carries a random session id and the user's `session_generation` from login
time, and every request checks both: "Log out" records the id as revoked; "Log out
everywhere" and a new password bump the generation, ending all of the account's sessions.
The user (and so the operator role) is read from the database on each request, never
from the cookie.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta

from flask import Flask, g, request, session
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import delete, update

from formrules.config import Settings
from formrules.store.models import RevokedSession, User, utcnow
from formrules.web.state import db, rt

SEEN_EVERY = 60  # seconds: refresh the idle clock (and so the cookie) at most this often


def start(user: User) -> None:
    """A fresh session for `user` (no fixation: whatever the browser had is dropped)."""
    now = int(time.time())
    session.clear()
    session.permanent = True
    session.update(user_id=user.id, user_name=user.name, gen=user.session_generation,
                   sid=secrets.token_hex(16), login_at=now, seen_at=now)


def end_this() -> None:
    """Revoke this browser's session on the server, so a copy of its cookie dies with it
    (the caller commits). Revocations past their session's lifetime are dropped."""
    sid = session.get("sid")
    if not sid:
        return
    longest = timedelta(days=rt().settings.session_max_days)
    expires = datetime.fromtimestamp(session.get("login_at", 0), UTC) + longest
    db().execute(delete(RevokedSession).where(RevokedSession.expires_at < utcnow()))
    if db().get(RevokedSession, sid) is None:
        db().add(RevokedSession(sid=sid, expires_at=expires))


def end_everywhere(user_id: int) -> None:
    """End every session of this user, on every browser (the caller commits)."""
    db().execute(update(User).where(User.id == user_id)
                 .values(session_generation=User.session_generation + 1))


def _expired(settings: Settings, now: float) -> bool:
    idle = timedelta(hours=settings.session_idle_hours).total_seconds()
    longest = timedelta(days=settings.session_max_days).total_seconds()
    return (now - session.get("seen_at", 0) > idle
            or now - session.get("login_at", 0) > longest)


def load_user() -> None:
    """Before each request: `g.user` is the logged-in user, or None (session ended)."""
    g.user = None
    if "user_id" not in session or request.endpoint == "static" or request.blueprint == "api":
        return
    user = db().get(User, session["user_id"])
    now = time.time()
    if user is None or session.get("gen") != user.session_generation \
            or _expired(rt().settings, now) or not session.get("sid") \
            or db().get(RevokedSession, session["sid"]) is not None:
        session.clear()  # logged out: revoked, expired, or the account is gone
        return
    if now - session.get("seen_at", 0) > SEEN_EVERY:
        session["seen_at"] = int(now)
    g.user = user


def current_user() -> dict[str, User | None]:
    """Templates' `current_user`: the user this request is for, or None."""
    return {"current_user": g.get("user")}


class SessionInterface(SecureCookieSessionInterface):
    """Signed cookies whose expiry follows the session: a year for the anonymous owner
    cookie, the idle and absolute limits once logged in."""

    def get_expiration_time(self, app: Flask, session) -> datetime | None:
        expires = super().get_expiration_time(app, session)
        if expires is None or "user_id" not in session:
            return expires
        settings = app.extensions["formrules"].settings
        idle_end = session.get("seen_at", 0) + settings.session_idle_hours * 3600
        hard_end = session.get("login_at", 0) + settings.session_max_days * 86400
        return min(expires, datetime.fromtimestamp(min(idle_end, hard_end), UTC))

    # Status polls leave the cookie alone unless they changed it: the long-lived cookie
    # is re-signed and re-sent on every request to keep it fresh, a waiting page polls
    # every second or two, and the page load itself already refreshed it.
    quiet = frozenset({"records.status_json"})

    def should_set_cookie(self, app: Flask, session) -> bool:
        if request.endpoint in self.quiet and not session.modified:
            return False
        return super().should_set_cookie(app, session)


def install(app: Flask) -> None:
    """Check the session on every request and give templates `current_user`."""
    app.session_interface = SessionInterface()
    app.before_request_funcs.setdefault(None, []).insert(0, load_user)
    app.context_processor(current_user)
