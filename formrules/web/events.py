"""Live events for a person's open pages: server-sent events (`GET /events`).

The worker's lifecycle transitions publish each change of a Run on its owner's Redis
pub/sub channel (`formrules.runs.notifications`); this relays the current owner's channel
and nothing else (owner-only: the channel is chosen from the session, never from the
request). Pages (wait.js, tasks.js) refresh what changed at once and keep polling as
the fallback when the stream fails or JavaScript is off.

A stream never holds a database connection (the request's session is closed before the
first byte) and holds one gunicorn thread for at most `sse_seconds`, sending a comment
line every `HEARTBEAT` seconds (proxies close idle connections, and a gone client is
noticed at the next write); then it ends and EventSource reconnects after `retry`. At
most `sse_streams` streams run per web process at once: the next one is answered 204
(SSE's "do not reconnect") and that page polls, so streams can never take every thread
from ordinary requests. Redis unreachable: 204 too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

from flask import Blueprint, Response, abort
from redis.exceptions import RedisError

from formrules.runs.notifications import channel
from formrules.web.state import current_owner_or_none, discard_db, rt

bp = Blueprint("events", __name__)
log = logging.getLogger("formrules.web.events")
HEARTBEAT = 5.0  # seconds between comment lines: a page gone frees its slot this soon
RETRY_MS = 3000  # EventSource waits this long before it reconnects
_slots_lock = threading.Lock()
_open = 0


def _take_slot(limit: int) -> bool:
    global _open
    with _slots_lock:
        if _open >= limit:
            return False
        _open += 1
        return True


def _free_slot() -> None:
    global _open
    with _slots_lock:
        _open -= 1


@bp.get("/events")
def stream():
    """The current owner's live events: `start`, `end` and `status`, each a JSON object
    `{"event", "run", "record", "status", "title"}`."""
    me = current_owner_or_none()
    if me is None:
        abort(404)
    settings = rt().settings
    discard_db()  # read what was needed: the stream holds no database connection
    if not _take_slot(settings.sse_streams):
        # 204 is how SSE says "do not reconnect": the page polls, with nothing logged as
        # an error in the browser (a 503 would be, on every page over the limit).
        return Response(status=204, headers={"Cache-Control": "no-store"})
    try:
        pubsub = rt().redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel(me))
    except RedisError as exc:
        _free_slot()
        log.warning("live events unavailable: %s", exc)
        return Response(status=204, headers={"Cache-Control": "no-store"})
    response = Response(_relay(pubsub, settings.sse_seconds), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # Freed when the response closes, whether or not its body was ever read (a client
    # gone before the first byte must not keep the slot and the subscription).
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            pubsub.close()
            _free_slot()

    response.call_on_close(release)
    return response


def _relay(pubsub, lifetime: float) -> Iterator[str]:
    """The stream's text: its messages, comment heartbeats, then the end."""
    try:
        yield f"retry: {RETRY_MS}\n: connected\n\n"
        end = time.monotonic() + lifetime
        beat = time.monotonic() + HEARTBEAT
        while (now := time.monotonic()) < end:
            message = pubsub.get_message(timeout=min(1.0, end - now))
            if message is not None and message.get("type") == "message":
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                kind = json.loads(text).get("event", "status")
                yield f"event: {kind}\ndata: {text}\n\n"
            elif time.monotonic() >= beat:
                yield ": ping\n\n"
                beat = time.monotonic() + HEARTBEAT
    except RedisError as exc:  # the page reconnects, and polls meanwhile
        log.warning("live events stream ended: %s", exc)
