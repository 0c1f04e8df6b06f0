"""Operations endpoints: /healthz, /readyz and /metrics, plus the web's metrics and log context.

/healthz answers while the process serves requests (for a liveness probe); /readyz says
whether it can do its work: database reachable and at this code's schema, Redis
answering, rules loaded (503 with the failing checks otherwise, for a load balancer).
/metrics is for Prometheus: with FORMRULES_METRICS_TOKEN set it wants that bearer token,
without one it answers only clients on this machine (see docs/operations.md).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time

from flask import Blueprint, Response, abort, g, jsonify, request
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from formrules.errors import FormrulesError
from formrules.process import logs, metrics
from formrules.store import migrate
from formrules.web.state import rt, rules, rules_health

bp = Blueprint("ops", __name__)
log = logging.getLogger("formrules.web.ops")
# Endpoints that take a submission, and the channel they are counted under.
SUBMITS = {"forms.show": "web", "api.create": "api"}


@bp.get("/healthz")
def healthz():
    """The process is up and serving."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    """Ready to serve: database (and its schema), Redis and rules all fine; else 503."""
    checks = {"database": _database(), "redis": _redis(), "rules": _rules()}
    ready = all(value.startswith("ok") for value in checks.values())
    return jsonify(status="ready" if ready else "not ready", checks=checks), \
        200 if ready else 503


def _database() -> str:
    try:
        with rt().store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        migrate.check(rt().store.engine)
    except migrate.SchemaError:
        return "schema is not at this version's revision: run `formrules db upgrade`"
    except (SQLAlchemyError, OSError) as exc:
        log.warning("readyz: database: %s", exc)
        return f"unreachable ({type(exc).__name__})"
    return "ok"


def _redis() -> str:
    try:
        rt().redis.ping()
    except (RedisError, OSError) as exc:
        log.warning("readyz: redis: %s", exc)
        return f"unreachable ({type(exc).__name__})"
    return "ok"


def _rules() -> str:
    """Forms loaded, and how many rule files are broken (a count: /readyz is public, so
    file names and problems stay on the operator pages)."""
    try:
        forms, status = rules().forms, rules_health()
    except (KeyError, FormrulesError):
        return "not loaded"
    broken = f"; {len(status.broken)} rule file(s) with problems" if status.broken else ""
    if not status.ready:
        return f"not loaded ({len(status.broken)} rule file(s) with problems)"
    return f"ok ({len(forms)} forms{broken})"


@bp.get("/metrics")
def prometheus():
    """Prometheus exposition (token or local clients only)."""
    token = rt().settings.metrics_token
    if token:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(sent.encode(), token.encode()):
            abort(401)
    elif not _local(request.remote_addr):
        abort(403)
    return Response(metrics.exposition(rt()), mimetype=metrics.CONTENT_TYPE)


def _local(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@bp.before_app_request
def start():
    """Note when a submission started; bind a record token in the URL to the log lines."""
    if request.method == "POST" and request.endpoint in SUBMITS:
        g.submit_started = time.monotonic()
    token = (request.view_args or {}).get("token")
    if token:
        g.log_context = logs.record_token.set(token)


@bp.after_app_request
def finish(response):
    """Count a submission once answered (a form that does not exist is not counted)."""
    started = g.pop("submit_started", None)
    if started is not None and response.status_code != 404:
        metrics.submitted(request.view_args["form_id"], SUBMITS[request.endpoint],
                          response.status_code, time.monotonic() - started)
    return response


@bp.teardown_app_request
def forget(exc):
    """Unbind the request's record token."""
    context = g.pop("log_context", None)
    if context is not None:
        logs.record_token.reset(context)
