"""Throttle password guessing: failed log-ins per account and per client, and requests
with a wrong API token per client (Flask-Limiter, counted in Redis so every web process
shares the counts).

Only failures count, and the check comes before the password is: after a burst of wrong
passwords for an account, even the right one is refused until the window has moved on.
If Redis cannot be reached, logging in still works (unthrottled) rather than failing.
"""

from __future__ import annotations

import math
import time

from flask import Flask, jsonify, render_template, request
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import parse

from formrules.config import Settings
from formrules.errors import ConfigError


def _account() -> str:
    """The per-account key: the user name typed (case folded, so `Olga` counts too)."""
    return "account:" + request.form.get("name", "").strip().lower()[:100]


def _failed_login(response) -> bool:
    return response.status_code == 401


def check(settings: Settings) -> None:
    """Refuse limit settings Flask-Limiter would not understand, at start-up."""
    for var, value in (("FORMRULES_LOGIN_ACCOUNT_LIMIT", settings.login_account_limit),
                       ("FORMRULES_LOGIN_CLIENT_LIMIT", settings.login_client_limit),
                       ("FORMRULES_API_AUTH_LIMIT", settings.api_auth_limit)):
        try:
            parse(value)
        except ValueError:
            raise ConfigError(f"{var} must read like '5 per 15 minutes', got {value!r}") \
                from None


def _check_only(app: Flask, limiter: Limiter, blueprints: frozenset[str]) -> None:
    """Run the limiter's before-request check only for `blueprints`.

    That check is how blueprint limits apply; decorated views (the login) check in their
    own wrapper. Every other request (a status poll every second or two per open page)
    has no limit, yet the check resolves limits and exemptions for it each time.
    """
    hooks = app.before_request_funcs[None]
    check = limiter._check_request_limit
    index = hooks.index(check)  # ValueError: Flask-Limiter changed how it hooks in

    def check_limited() -> None:
        if request.blueprint in blueprints:
            check()

    hooks[index] = check_limited


def install(app: Flask, settings: Settings) -> Limiter:
    """Rate-limit the login view and the API's token check on `app`."""
    check(settings)
    limiter = Limiter(
        get_remote_address, app=app, storage_uri=settings.redis_url,
        # A short bound: a frozen Redis must not hold up every log-in for 10 s.
        storage_options={"socket_timeout": 1, "socket_connect_timeout": 1},
        strategy="moving-window", key_prefix=f"{settings.queue}:limits",
        swallow_errors=True,
    )
    login = app.view_functions["auth.login"]
    login = limiter.limit(settings.login_account_limit, key_func=_account, methods=["POST"],
                          deduct_when=_failed_login, scope="login-account")(login)
    login = limiter.limit(settings.login_client_limit, methods=["POST"],
                          deduct_when=_failed_login, scope="login-client")(login)
    app.view_functions["auth.login"] = login
    # Shared: one count for every API endpoint, not one per endpoint.
    limiter.shared_limit(settings.api_auth_limit, scope="api-auth",
                         deduct_when=_failed_login)(app.blueprints["api"])
    _check_only(app, limiter, blueprints=frozenset({"api"}))

    @app.errorhandler(RateLimitExceeded)
    def too_many(exc: RateLimitExceeded):
        current = limiter.current_limit
        wait = max(1, math.ceil(current.reset_at - time.time())) if current else 60
        minutes = max(1, math.ceil(wait / 60))
        when = f"{minutes} minute{'s' if minutes != 1 else ''}"
        headers = {"Retry-After": str(wait)}
        if request.blueprint == "api":
            response = jsonify({"error": "too_many_requests",
                                "message": f"Too many requests with a wrong token. Try again "
                                           f"in {when}.", "retry_after": wait})
            return response, 429, headers
        return render_template(
            "error.html", title="Too many attempts",
            message=f"Too many failed log-ins. For the account's safety, logging in is "
                    f"paused: try again in {when}."), 429, headers

    return limiter
