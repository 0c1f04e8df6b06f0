"""Helpers for the user- and operator-facing page tests: extra forms, users, POSTs."""

from __future__ import annotations

import shutil
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
