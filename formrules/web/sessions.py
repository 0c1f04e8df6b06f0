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
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import delete, update

from formrules.config import Settings
from formrules.store.models import RevokedSession, User, utcnow
from formrules.web.state import db, rt

SEEN_EVERY = 60  # seconds: refresh the idle clock (and so the cookie) at most this often
# An unchanged long-lived cookie is re-signed and re-sent at most this often (seconds),
# not on every request: its expiry then trails the last visit by a day at most.
REFRESH_EVERY = 86400
VERIFIED_MAX = 4096  # cookies whose signature was checked, remembered per app
_SCALARS = (str, int, float, bool, type(None))


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


class CookieSession(SecureCookieSession):
    """A session that knows when its cookie was signed (0: it had none)."""

    signed_at: float = 0.0


class SessionInterface(SecureCookieSessionInterface):
    """Signed cookies whose expiry follows the session: a year for the anonymous owner
    cookie, the idle and absolute limits once logged in.

    A waiting page polls with the same cookie every second or two, so checking its
    signature again each time is waste: a cookie that verified once is remembered (its
    exact text, under the keys that verified it) with its contents and signing time, and
    its age is still checked on every request. Only sessions of plain values are
    remembered, so no request can change a remembered one in place.
    """

    session_class = CookieSession

    def __init__(self) -> None:
        self._serializers: dict[tuple, URLSafeTimedSerializer] = {}
        self._verified: dict[tuple[str, URLSafeTimedSerializer],
                             tuple[int, dict]] = {}

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        """Flask's serializer, built once per set of keys rather than per request."""
        if not app.secret_key:
            return None
        keys = (app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        found = self._serializers.get(keys)
        if found is None:
            found = self._serializers[keys] = super().get_signing_serializer(app)
        return found

    def open_session(self, app: Flask, request) -> CookieSession | None:
        serializer = self.get_signing_serializer(app)
        if serializer is None:
            return None
        value = request.cookies.get(self.get_cookie_name(app))
        if not value:
            return self.session_class()
        known = self.verified(app, value, serializer)
        if known is None:
            return self.session_class()
        signed_at, data = known
        opened = self.session_class(data)  # a copy: the remembered dict stays as signed
        opened.signed_at = signed_at
        return opened

    def verified(self, app: Flask, value: str,
                 serializer: URLSafeTimedSerializer | None = None) -> tuple[int, dict] | None:
        """A cookie's signing time and contents if it is genuine and unexpired, else None.
        The contents are the remembered ones: read them, never change them."""
        serializer = serializer or self.get_signing_serializer(app)
        if serializer is None:
            return None
        max_age = int(app.permanent_session_lifetime.total_seconds())
        known = self._verified.get((value, serializer))
        if known is None:
            try:
                data, signed = serializer.loads(value, max_age=max_age, return_timestamp=True)
            except BadSignature:  # expired ones too, as in Flask
                return None
            known = (int(signed.timestamp()), data)
            if isinstance(data, dict) and all(type(v) in _SCALARS for v in data.values()):
                if len(self._verified) >= VERIFIED_MAX:
                    self._verified.clear()
                self._verified[(value, serializer)] = known
        if not 0 <= int(time.time()) - known[0] <= max_age:  # itsdangerous' age check
            return None
        return known

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
        if session.modified:
            return True
        if request.endpoint in self.quiet:
            return False
        return super().should_set_cookie(app, session) and \
            time.time() - getattr(session, "signed_at", 0.0) >= REFRESH_EVERY


def install(app: Flask) -> None:
    """Check the session on every request and give templates `current_user`."""
    app.session_interface = SessionInterface()
    app.before_request_funcs.setdefault(None, []).insert(0, load_user)
    app.context_processor(current_user)
