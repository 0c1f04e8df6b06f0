"""Completion callbacks: an API client's URL called when a record's awaited work ends.

Registered with the submit (`callback_url`, same transaction as the record). When the last
awaited Run of the record ends (done, dead or cancelled), `lifecycle.move` calls
`record_ended` in the transaction of that ending: the row becomes `due` with its JSON
body written, so nothing is lost if Redis blips (the outbox). The leader's tick enqueues
due callbacks as RQ jobs (`deliver`), leasing each for `LEASE` so one in flight is not
sent twice; a failure or a non-2xx answer is retried with backoff, and after
`callback_attempts` tries the callback is `failed` (`formrules callbacks list`).

The body is signed with HMAC-SHA256 under FORMRULES_CALLBACK_SECRET:
`X-Formrules-Signature: t=<unix time>,v1=<hex of HMAC(secret, "<t>." + body)>`; the
receiver checks the signature and that `t` is recent (docs/api.md shows how).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from formrules.language.tree import RetryPolicy
from formrules.store.models import AWAITED, OPEN, Callback, CallbackState, Record, Run, utcnow

log = logging.getLogger("formrules.runs.callbacks")
JOB_FUNCTION = "formrules.runs.callbacks.deliver"
LEASE = timedelta(seconds=60)  # a delivery job lost with its worker is sent again after this
TIMEOUT = 10.0


def check_url(url: Any, allow: tuple[str, ...]) -> str | None:
    """Why `url` cannot be a callback (None when it can): https to a public host, or any
    http(s) host on FORMRULES_HTTP_ALLOW (the `http_request` allowlist)."""
    from formrules.actions.builtin import allowed
    if not isinstance(url, str) or len(url) > 2000:
        return "Give the callback URL as text (at most 2000 characters)."
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "The callback URL must be an https:// URL."
    if allowed(url, allow):
        return None
    if parts.scheme != "https":
        return "The callback URL must use https (or its host must be on the allowlist)."
    try:  # an address literal of this network is not a public endpoint
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None
    if not address.is_global:
        return "The callback URL's host is not allowed."
    return None


def register(s: Session, record: Record, url: str) -> Callback:
    """Store the callback with the record (in its transaction); due now if nothing is
    awaited (a form whose work ended inline)."""
    callback = Callback(record_id=record.id, url=url)
    s.add(callback)
    s.flush()
    record_ended(s, record.id)
    return callback


def record_ended(s: Session, record_id: int, now: datetime | None = None) -> None:
    """If the record's awaited work has ended, make its waiting callbacks due (the
    ending's transaction). Called for each awaited Run that finishes."""
    waiting = list(s.scalars(select(Callback).where(
        Callback.record_id == record_id, Callback.state == CallbackState.WAITING.value)))
    if not waiting:
        return
    # What its page waits for (`formrules.runs.status`): the submitter's own awaited
    # Runs, not an operator's batch or a schedule that touched the record.
    record = s.get(Record, record_id)
    runs = list(s.scalars(select(Run).where(Run.record_id == record_id,
                                            Run.owner == record.owner, Run.hidden.is_(False),
                                            Run.awaited.in_(AWAITED))
                          .order_by(Run.created_at, Run.node_path)))
    if any(r.status in OPEN for r in runs):
        return
    state = "failed" if any(r.status == "dead" for r in runs) else \
        "cancelled" if any(r.status == "cancelled" for r in runs) else "done"
    now = now or utcnow()
    for callback in waiting:
        callback.body = {
            "id": callback.id, "event": "record.ended", "token": record.token,
            "form": record.form_id, "state": state,
            "ended_at": now.isoformat(timespec="seconds"),
            "runs": [{"id": r.id, "title": r.title, "status": r.status,
                      **({"error": r.safe_error} if r.status == "dead" and r.safe_error
                         else {})} for r in runs],
        }
        callback.state = CallbackState.DUE.value
        callback.next_at = now


def signature(secret: str, body: bytes, at: int) -> str:
    """The X-Formrules-Signature value of `body` sent at unix time `at`."""
    mac = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def dispatch_due(rt, limit: int = 100) -> int:
    """Enqueue due callbacks (the leader's tick), each leased for `LEASE`; count them."""
    now = utcnow()
    with rt.store.session() as s:
        ids = list(s.scalars(select(Callback.id).where(
            Callback.state == CallbackState.DUE.value, Callback.next_at <= now)
            .order_by(Callback.next_at).limit(limit)))
        if not ids:
            return 0
        s.execute(update(Callback).where(Callback.id.in_(ids), Callback.next_at <= now)
                  .values(next_at=now + LEASE).execution_options(synchronize_session=False))
    sent = 0
    for callback_id in ids:
        try:
            rt.dispatcher.queue.enqueue(JOB_FUNCTION, callback_id, job_timeout=60,
                                        result_ttl=0, failure_ttl=3600)
            sent += 1
        except RedisError as exc:  # the lease runs out and a later tick tries again
            log.warning("callbacks: Redis unavailable (%s)", exc)
            break
    return sent


def deliver(callback_id: str) -> str:
    """RQ job: one delivery attempt; returns the outcome."""
    from formrules.process import metrics
    from formrules.process import runtime as runtime_mod
    rt = runtime_mod.current()
    with rt.store.session() as s:
        callback = s.get(Callback, callback_id)
        if callback is None or callback.state != CallbackState.DUE.value:
            return "nothing to do"
        url, body = callback.url, json.dumps(callback.body, sort_keys=True).encode()
    at = int(time.time())
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "formrules-callback",
        "X-Formrules-Signature": signature(rt.settings.callback_secret, body, at)})
    error = _private_host(url, rt.settings.http_allow) or _post(request)
    now = utcnow()
    with rt.store.session() as s:
        callback = s.get(Callback, callback_id)
        callback.attempts += 1
        if error is None:
            callback.state, callback.delivered_at = CallbackState.DELIVERED.value, now
            callback.last_error, outcome = None, "delivered"
        elif callback.attempts >= rt.settings.callback_attempts:
            callback.state, callback.last_error = CallbackState.FAILED.value, error
            outcome = "failed"
            log.error("callback %s to %s: given up after %d attempts: %s", callback_id,
                      url, callback.attempts, error)
        else:
            wait = _policy(rt.settings).nominal_waits()[callback.attempts - 1]
            callback.next_at, callback.last_error = now + timedelta(seconds=wait), error
            outcome = "retry"
            log.warning("callback %s to %s failed (%s); attempt %d in %.0fs", callback_id,
                        url, error, callback.attempts + 1, wait)
    metrics.callback(outcome)
    return outcome


def _post(request: urllib.request.Request) -> str | None:
    """Send one delivery; why it failed, or None for a 2xx answer."""
    try:
        # No redirects followed: a callback goes to the URL the client registered.
        # No proxy from the environment either: the address checked is the one called.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
        with opener.open(request, timeout=TIMEOUT) as r:
            r.read(10_000)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:400]
    return None


def _policy(settings) -> RetryPolicy:
    """The delivery retry timing, owned like every other retry by `RetryPolicy`:
    FORMRULES_CALLBACK_BACKOFF seconds, doubling, at most an hour."""
    return RetryPolicy(attempts=settings.callback_attempts,
                       exponential_base=settings.callback_backoff_seconds,
                       exponential_max=3600.0)


def _private_host(url: str, allow: tuple[str, ...]) -> str | None:
    """Why a delivery must not go to `url` now: its name resolves to an address of this
    network (checked at delivery, as DNS answers change) and the host is not allowlisted."""
    from formrules.actions.builtin import allowed
    if allowed(url, allow):
        return None
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return None  # unresolvable: the request fails and is retried like any other
    for info in infos:
        if not ipaddress.ip_address(info[4][0].split("%")[0]).is_global:
            return f"{host} resolves to a private address (allowlist it to call it)"
    return None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None
