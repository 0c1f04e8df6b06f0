"""Helpers for the user- and operator-facing page tests: extra forms, users, POSTs."""

from __future__ import annotations

import http.cookiejar
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from redis import Redis
from rq import Worker
from werkzeug.security import generate_password_hash

from formrules.store.models import User
from tests.helpers import tokens

WEB_RULES = Path(__file__).parent / "rules_web"
PASSWORD = "correct horse battery"


def add_web_rules(rules_dir: Path) -> Path:
    """Copy the forms of tests/rules_web beside the core test forms."""
    for path in WEB_RULES.glob("*.yaml"):
        shutil.copy(path, rules_dir)
    return rules_dir


def make_user(rt, name: str, *, operator: bool = False) -> int:
    """Create an account with a hashed password; returns its id."""
    with rt.store.session() as s:
        user = User(name=name, password_hash=generate_password_hash(PASSWORD),
                    is_operator=operator)
        s.add(user)
        s.flush()
        return user.id


def csrf(client, path: str = "/login") -> str:
    """A CSRF token for this client's session (read from a page with a form)."""
    page = client.get(path)
    found = tokens(page.data).get("csrf_token")
    assert found, f"no CSRF token on {path}"
    return found


def login(client, name: str, password: str = PASSWORD, next_path: str = ""):
    """Log in the way the login form does."""
    url = "/login" + (f"?next={next_path}" if next_path else "")
    return client.post(url, data={"csrf_token": csrf(client), "name": name,
                                  "password": password})


def post(client, path: str, data: dict | None = None, **kwargs):
    """POST with this client's CSRF token, as the page's own form would."""
    return client.post(path, data={"csrf_token": csrf(client), **(data or {})},
                       **kwargs)


def workers_alive(redis_url: str) -> int:
    """How many RQ workers have registered (a started worker is ready to take jobs)."""
    return len(Worker.all_keys(connection=Redis.from_url(redis_url)))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Show redirects (303 after a submit or a login) instead of following them."""

    def redirect_request(self, *args, **kwargs):
        return None


class Browser:
    """A cookie-keeping HTTP client that records every status it sees."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), NoRedirect())
        self.seen: dict[str, int] = {}

    def request(self, path: str, data: dict | None = None) -> tuple[int, str, str]:
        """(status, body, Location) for a GET, or a POST of `data`."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        try:
            with self.opener.open(self.base + path, data=body, timeout=30) as response:
                status, text, location = response.status, response.read().decode(), ""
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
            location = exc.headers.get("Location", "")
        self.seen[f"{'POST' if data is not None else 'GET'} {path}"] = status
        return status, text, location

    def get(self, path: str) -> str:
        """GET a page that must answer 200."""
        status, text, _ = self.request(path)
        assert status == 200, f"GET {path}: {status}\n{text[:2000]}"
        return text

    def post_form(self, path: str, data: dict) -> str:
        """Fill the form at `path` (CSRF and submit key from the page), expect 303."""
        status, text, location = self.request(path, {**tokens(self.get(path).encode()),
                                                     **data})
        assert status == 303, f"POST {path}: {status}\n{text[:2000]}"
        return urllib.parse.urlparse(location).path
