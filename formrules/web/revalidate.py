"""Unchanged status polls, answered below Flask.

Every open waiting page revalidates `/r/<token>/status` every second or two (`wait.js`
sends the ETag it has), and nearly every answer is a bare 304. For that answer Flask's
request machinery (context, session, a dozen hooks, a response object) costs several
times the one statement it rests on, so this WSGI middleware gives it itself, deciding
exactly as the view does: the browser's anonymous owner cookie, verified by the app's
session interface; the record's change tag (`poll_tag`, one statement); its ETag
(`etag_for`); the app's security headers.

Anything else goes to the view, which decides as before: a logged-in browser (its
session is checked against the database), an API record or an operator, someone
else's or an unknown token, a changed status, a database error (the view retries a
cut connection), or anything unexpected.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from flask import Flask
from sqlalchemy.exc import DBAPIError
from werkzeug.http import parse_cookie, parse_etags

from formrules.runs.status import etag_for, poll_tag
from formrules.web.headers import HEADERS
from formrules.web.state import reading

log = logging.getLogger("formrules.web")
# `secrets.token_urlsafe` tokens; the view refuses longer ones.
STATUS_PATH = re.compile(r"/r/([A-Za-z0-9_-]{1,64})/status")
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class RevalidatedPolls:
    """WSGI middleware: a 304 for an anonymous owner's unchanged status poll."""

    def __init__(self, app: Flask, wsgi_app: WSGIApp) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        # As Flask's 304 from the view: the change headers, the app's, and Vary (the
        # answer depends on the session cookie).
        self.fixed = [("Cache-Control", "no-cache"), *HEADERS.items(), ("Vary", "Cookie")]

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        tags = environ.get("HTTP_IF_NONE_MATCH")
        if tags and environ.get("REQUEST_METHOD") == "GET":
            match = STATUS_PATH.fullmatch(environ.get("PATH_INFO", ""))
            if match is not None:
                try:
                    etag = self.unchanged(environ, match[1], tags)
                except DBAPIError as exc:  # the view answers (and retries a cut connection)
                    log.debug("revalidating a status poll failed; the view answers: %s", exc)
                    etag = None
                except Exception:  # a bug: loud, and the view answers
                    log.exception("revalidating a status poll failed; the view answers")
                    etag = None
                if etag is not None:
                    start_response("304 NOT MODIFIED", [("ETag", f'"{etag}"'), *self.fixed])
                    return []
        return self.wsgi_app(environ, start_response)

    def unchanged(self, environ: dict, token: str, tags: str) -> str | None:
        """The ETag to answer 304 with, or None to let the view answer."""
        owner = self._anonymous_owner(environ)
        if owner is None:
            return None
        with reading(self.app.extensions["formrules"].store) as conn:
            found = poll_tag(conn, token)
        if found is None or found.owner != owner:
            return None
        form = self.app.extensions["formrules.rules"].rules().form(found.form_id)
        etag = etag_for(found.tag, form)
        # If-None-Match compares weakly (RFC 9110 13.1.2): W/"x" matches "x".
        return etag if parse_etags(tags).contains_weak(etag) else None

    def _anonymous_owner(self, environ: dict) -> str | None:
        """`anon:<id>` from a genuine, unexpired session cookie without a login."""
        interface = self.app.session_interface
        verified = getattr(interface, "verified", None)
        if verified is None:
            return None
        value = parse_cookie(environ.get("HTTP_COOKIE", "")).get(
            interface.get_cookie_name(self.app))
        if not value:
            return None
        known = verified(self.app, value)
        if known is None or not isinstance(known[1], dict) or "user_id" in known[1] \
                or not isinstance(known[1].get("anon"), str):
            return None
        return f"anon:{known[1]['anon']}"


def install(app: Flask) -> None:
    """Put the middleware in front of `app`'s WSGI callable."""
    app.wsgi_app = RevalidatedPolls(app, app.wsgi_app)
