"""The Flask app factory. Rules come from `formrules.language.registry` (reloaded live)."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, render_template, send_from_directory
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy.exc import DBAPIError

from formrules.config import Settings, from_env
from formrules.language.registry import registry
from formrules.process import runtime as runtime_mod
from formrules.web import display
from formrules.web.state import discard_db


def template_folder() -> Path:
    """The templates: inside the installed package (a wheel), else the checkout's templates/.

    The top-level templates/ folder is the source; building a wheel copies it into the
    package as formrules/templates (see setup.py).
    """
    packaged = Path(__file__).resolve().parents[1] / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "templates"


csrf = CSRFProtect()
log = logging.getLogger("formrules.web")
FALLBACK_500 = ("<!doctype html><meta charset='utf-8'><title>Something went wrong</title>"
                "<h1>Something went wrong</h1><p>Something went wrong on our side. Please try "
                "again in a moment.</p>")


class FormrulesFlask(Flask):
    """Flask, running a request once more when its database connection was cut."""

    def full_dispatch_request(self):
        """Retry once on a disconnect: the first attempt's transaction never committed
        (or, cut during COMMIT, submit keys and state checks make a repeat harmless)."""
        try:
            return super().full_dispatch_request()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("database connection lost; running the request once more: %s",
                        exc.orig)
            discard_db()
            return super().full_dispatch_request()


def create_app(test_config: dict[str, Any] | None = None,
               settings: Settings | None = None) -> Flask:
    """Build the app: settings from the environment unless given, rules loaded and checked.

    A broken rule file does not stop the app: its form is left out (or keeps its last good
    version) and the problem shows on operator pages until the file is fixed.
    """
    settings = settings or from_env()
    app = FormrulesFlask(__name__, template_folder=str(template_folder()), instance_path=str(
        Path(settings.instance_dir).resolve()))
    app.config.from_mapping(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        # The anonymous owner cookie; logged-in sessions end sooner (web/sessions.py).
        PERMANENT_SESSION_LIFETIME=timedelta(days=365),
        WTF_CSRF_TIME_LIMIT=None,  # a form left open over lunch must still submit
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,
    )
    if test_config:
        app.config.update(test_config)
    rt = runtime_mod.install(runtime_mod.Runtime(settings))
    rt.store.check_schema()  # behind: refuse, saying which command upgrades it
    app.extensions["formrules"] = rt
    app.extensions["formrules.rules"] = registry(settings.rules_dir)  # loads, logs problems
    app.extensions["formrules.rules"].refresh()  # a new app reads the directory now
    from formrules.web import uploads as web_uploads
    web_uploads.install(app)  # before CSRF: its check reads the body, within the limit
    csrf.init_app(app)
    display.init_app(app, settings.timezone, settings.locale)

    from formrules.web import (
        admin,
        admin_forms,  # noqa: F401  (adds its views to admin.bp)
        admin_records,  # noqa: F401  (adds its views to admin.bp)
        api,
        auth,
        batches,
        events,
        forms,
        headers,
        limits,
        my_batches,
        ops,
        records,
        revalidate,
        sessions,
        tasks,
        updates,
    )
    for module in (forms, records, tasks, events, my_batches, auth, admin, updates, batches,
                   api, ops, web_uploads):
        app.register_blueprint(module.bp)
    app.context_processor(tasks.inject_notifications)
    from formrules.web.state import rules_health
    app.jinja_env.globals["rules_health"] = rules_health
    sessions.install(app)
    headers.install(app)
    limits.install(app, settings)
    revalidate.install(app)
    # Every request's session is closed here, whichever blueprint served it.
    app.teardown_request(lambda _exc: discard_db())

    @app.get("/favicon.ico")
    def favicon():
        """The tab icon: browsers ask for it on every page, so it must not 404."""
        return send_from_directory(app.static_folder, "favicon.ico", max_age=86400,
                                   mimetype="image/vnd.microsoft.icon")

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return render_template("error.html", title="Form expired",
                               message="This form expired or was sent from elsewhere. "
                                       "Go back, reload the page and try again."), 400

    @app.errorhandler(404)
    def not_found(exc):
        return render_template("error.html", title="Not found",
                               message="There is nothing here."), 404

    @app.errorhandler(500)
    def server_error(exc):
        # The failure may have left the request's database session unusable (a lost
        # connection): start the page on a fresh one, and if even that fails, plain HTML.
        discard_db()
        try:
            return render_template("error.html", title="Something went wrong",
                                   message="Something went wrong on our side. Please try "
                                           "again in a moment."), 500
        except Exception:
            log.exception("the error page itself failed")
            discard_db()
            return FALLBACK_500, 500

    return app
