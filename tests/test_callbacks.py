"""Completion callbacks: a real worker delivers a signed body to a real local HTTP server
when the record's awaited work ends; the first delivery fails and is retried; the
receiver verifies the signature with the snippet from docs/api.md."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from formrules.store import tokens
from formrules.store.models import Callback
from tests.helpers import WorkerProcess, wait_until
from tests.web_helpers import workers_alive

SECRET = "callback-test-secret"
API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def docs_snippet() -> dict:
    """The verification snippet of docs/api.md, run as written."""
    text = API_MD.read_text(encoding="utf-8")
    code = re.search(r"<!-- callback-verify -->\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


@pytest.fixture
def settings(settings):
    return settings.with_overrides(callback_secret=SECRET)


@pytest.fixture
def receiver():
    """A local HTTP server that answers 503 to the first callback, then 200."""
    got: list[tuple[bytes, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((body, self.headers.get("X-Formrules-Signature", "")))
            self.send_response(503 if len(got) == 1 else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", got
    server.shutdown()


@pytest.fixture
def auth(rt):
    with rt.store.session() as s:
        return {"Authorization": f"Bearer {tokens.create(s, 'robot')}"}


def test_the_callback_is_signed_retried_and_verified(client, rt, auth, receiver,
                                                     subprocess_env):
    url, got = receiver
    env = {**subprocess_env, "FORMRULES_CALLBACK_SECRET": SECRET,
           "FORMRULES_CALLBACK_BACKOFF": "0.5", "FORMRULES_TICK": "0.2"}
    with WorkerProcess(env) as worker:
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, timeout=60)
        response = client.post("/api/forms/demo", headers=auth, json={
            "name": "Cal", "email": "cal@example.com", "callback_url": url})
        assert response.status_code == 201, response.data
        token = response.get_json()["token"]
        wait_until(lambda: len(got) >= 2, timeout=40)
        with rt.store.session() as s:
            callback = wait_until(lambda: s.scalar(select(Callback).where(
                Callback.state == "delivered").execution_options(populate_existing=True)))
            assert callback.attempts == 2
        output = worker.stop()
    assert "503" in output  # the failed first attempt is logged with its reason
    verify = docs_snippet()["verify"]
    for body, header in got:
        event = verify(body, header, SECRET)
        assert event["token"] == token and event["state"] == "done"
        assert [r["status"] for r in event["runs"]] == ["done"]
    with pytest.raises(ValueError):
        verify(got[0][0] + b" ", got[0][1], SECRET)  # a changed body is refused
    with pytest.raises(ValueError):
        verify(got[0][0], got[0][1], SECRET, now=int(got[0][1][2:12]) + 3600)  # too old


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/x", "must be an https:// URL"),
    ("http://example.com/hook", "must use https"),
    ("https://10.0.0.5/hook", "not allowed"),
    (42, "as text"),
])
def test_a_bad_callback_url_is_a_field_error(client, auth, url, message):
    response = client.post("/api/forms/demo", headers=auth, json={
        "name": "X", "email": "x@example.com", "callback_url": url})
    assert response.status_code == 422
    assert message in response.get_json()["fields"]["callback_url"][0]


def test_an_https_callback_is_accepted_and_waits(client, rt, auth):
    response = client.post("/api/forms/demo", headers=auth, json={
        "name": "Y", "email": "y@example.com", "callback_url": "https://example.com/h"})
    assert response.status_code == 201
    with rt.store.session() as s:
        assert s.scalar(select(Callback.state)) == "waiting"  # the work is still queued


def test_the_openapi_document_offers_callback_url(client):
    spec = client.get("/api/openapi.json").get_json()
    body = spec["components"]["schemas"]["demo.input"]["properties"]
    assert body["callback_url"]["format"] == "uri"
    assert "callback_url" not in spec["components"]["schemas"]["demo.patch"]["properties"]


@pytest.mark.unit
def test_a_name_that_resolves_to_this_network_is_refused_at_delivery():
    """An https host name passes registration, but DNS may point it inside: the check
    is made again, on the resolved addresses, each time a delivery is sent."""
    from formrules.runs.callbacks import _private_host
    assert "private address" in _private_host("https://localhost/hook", ())
    assert _private_host("https://localhost/hook", ("localhost",)) is None
    assert _private_host("https://127.0.0.1:8443/hook", ("127.0.0.1:8443",)) is None


@pytest.mark.unit
def test_delivery_retries_double_up_to_an_hour():
    from formrules.config import Settings
    from formrules.runs.callbacks import _policy
    waits = _policy(Settings(callback_backoff_seconds=10, callback_attempts=12)).nominal_waits()
    assert waits[:4] == [10, 20, 40, 80] and max(waits) == 3600 and len(waits) == 11
