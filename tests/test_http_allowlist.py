"""`FORMRULES_HTTP_ALLOW` and ports (issue 14.13): a bare host allows only the scheme's
default port; `host:port` names one port; `host:*` any port of that host."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from formrules.actions.builtin import allowed
from formrules.actions.context import Context
from formrules.config import from_env
from formrules.errors import PermanentError
from formrules.language.source import Pos
from formrules.language.tree import ActionNode
from formrules.runs.engine import call_action


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hi")

    def log_message(self, *args):
        pass


@pytest.fixture
def port():
    """A local HTTP server on a random (non-default) port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def call(url: str, allow: tuple[str, ...], tmp_path) -> None:
    settings = from_env({}, instance_dir=str(tmp_path), secret_key="x", http_allow=allow)
    ctx = Context(settings=settings, form_id="f", field_types={}, data={},
                  path="events/submit/0", run_id="run1")
    call_action(ActionNode(ctx.path, Pos("t.yaml", 1, 1), "http_request",
                           {"url": url, "method": "GET"}), ctx)


def test_a_bare_host_does_not_open_its_other_ports(port, tmp_path):
    with pytest.raises(PermanentError, match=f"127.0.0.1:{port}"):
        call(f"http://127.0.0.1:{port}/", ("127.0.0.1",), tmp_path)
    call(f"http://127.0.0.1:{port}/", (f"127.0.0.1:{port}",), tmp_path)
    call(f"http://127.0.0.1:{port}/", ("127.0.0.1:*",), tmp_path)
    with pytest.raises(PermanentError):
        call(f"http://127.0.0.1:{port}/", (f"127.0.0.1:{port + 1}",), tmp_path)


@pytest.mark.parametrize(("url", "allow", "ok"), [
    ("https://api.example/x", ("api.example",), True),
    ("https://api.example:443/x", ("api.example",), True),
    ("http://api.example/x", ("api.example",), True),
    ("https://api.example:8443/x", ("api.example",), False),
    ("http://api.example:443/x", ("api.example",), False),  # not http's default port
    ("https://api.example:8443/x", ("api.example:8443",), True),
    ("https://api.example/x", ("api.example:443",), True),
    ("https://API.example:8443/x", ("api.example:*",), True),
    ("https://other.example/x", ("api.example:*",), False),
    ("http://[::1]:8080/x", ("[::1]:8080",), True),
    ("http://[::1]:8080/x", ("::1",), False),
    ("http://api.example:99999/x", ("api.example:*",), False),  # no such port
    ("ftp://api.example/x", ("api.example",), False),
])
def test_allowlist_entries_and_ports(url, allow, ok):
    assert allowed(url, allow) is ok
