"""Built-in actions against real things: an HTTP server on loopback, the e-mail outbox."""

from __future__ import annotations

import email
import json
import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from formrules.actions.context import Context
from formrules.actions.registry import action
from formrules.config import from_env
from formrules.errors import PermanentError, RetryableError
from formrules.language.duration import format_duration, parse_duration
from formrules.language.source import Pos
from formrules.language.tree import ActionNode
from formrules.runs.engine import call_action

FIELDS = {"ref": "string", "email": "email", "amount": "decimal", "note": "text"}


class Recorder(BaseHTTPRequestHandler):
    """Answers by path: /ok (JSON), /fail500, /missing404, /away (redirect off-list)."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Recorder.seen.append({"path": self.path, "headers": dict(self.headers),
                              "body": body.decode()})
        if self.path == "/ok":
            payload = json.dumps({"reference": "BK-42"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif self.path == "/away":
            self.send_response(307)
            self.send_header("Location", "http://elsewhere.invalid/steal")
            self.end_headers()
        else:
            code = {"/fail500": 500, "/busy429": 429}.get(self.path, 404)
            self.send_response(code)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def ctx(tmp_path):
    settings = from_env({}, instance_dir=str(tmp_path), secret_key="x",
                        http_allow=("127.0.0.1:*",))
    return Context(settings=settings, form_id="order", field_types=FIELDS,
                   data={"email": "ann@example.com", "amount": "12.50"},
                   path="events/submit/0/background/do/0", run_id="run1")


def run(action_name: str, args, ctx: Context) -> None:
    call_action(ActionNode(ctx.path, Pos("t.yaml", 1, 1), action_name, args), ctx)


def test_http_request_sends_idempotency_key_and_saves_the_response(ctx, http_server):
    run("http_request", {"url": f"{http_server}/ok", "json": {"amount": "{{ record.amount }}"},
                         "save": {"ref": "{{ response.json.reference }}"}}, ctx)
    (request,) = Recorder.seen
    assert request["headers"]["Idempotency-Key"] == "run1:events/submit/0/background/do/0"
    assert json.loads(request["body"]) == {"amount": "12.50"}
    assert ctx.updates == {"ref": "BK-42"}


@pytest.mark.parametrize(("path", "error", "says"), [
    ("/fail500", RetryableError, "had a problem on its side"),
    ("/busy429", RetryableError, "is busy at the moment"),
    ("/missing404", PermanentError, "did not accept the request")])
def test_http_errors_are_classified_and_said_in_the_users_terms(ctx, http_server, path, error,
                                                                 says):
    with pytest.raises(error) as caught:
        run("http_request", {"url": f"{http_server}{path}"}, ctx)
    assert caught.value.safe_message == f"A service needed for this {says}."
    assert "could not be reached" not in caught.value.safe_message  # it answered
    assert "127.0.0.1" in str(caught.value)  # the host and code are for operators
    assert "HTTP" in str(caught.value)


def test_an_unreachable_service_names_no_host(ctx):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetryableError) as caught:
        run("http_request", {"url": f"http://127.0.0.1:{port}/x"}, ctx)
    assert caught.value.safe_message == "A service needed for this could not be reached."


def test_http_request_refuses_hosts_and_redirects_off_the_allowlist(ctx, http_server):
    with pytest.raises(PermanentError, match="not in FORMRULES_HTTP_ALLOW"):
        run("http_request", {"url": "http://localhost:9/x"}, ctx)
    with pytest.raises(PermanentError, match="redirect to 'http://elsewhere.invalid/steal'"):
        run("http_request", {"url": f"{http_server}/away"}, ctx)


def test_send_email_writes_outbox_once_per_step(ctx):
    args = {"to": "{{ record.email }}", "subject": "Booked", "body": "Amount {{ record.amount }}"}
    run("send_email", args, ctx)
    run("send_email", args, ctx)  # a repeated step: same Message-ID, same file
    (path,) = list((ctx.settings.outbox_dir).glob("*.eml"))
    message = email.message_from_bytes(path.read_bytes())
    assert message["To"] == "ann@example.com" and message["Subject"] == "Booked"
    assert "Amount 12.50" in message.get_payload()


def test_report_attaches_csv_and_defuses_formulas(ctx):
    ctx.data["note"] = "=HYPERLINK(\"http://evil\")"
    run("report", {"filename": "r-{{ record.amount }}.csv", "columns": ["email", "note",
                                                                        "amount"]}, ctx)
    (file,) = ctx.attachments
    assert file.filename == "r-12.50.csv" and file.content_type.startswith("text/csv")
    lines = file.data.decode().splitlines()
    assert lines[0] == "email,note,amount"
    assert lines[1] == "ann@example.com,\"'=HYPERLINK(\"\"http://evil\"\")\",12.50"


def test_set_keeps_expression_types_and_coerces(ctx):
    run("set", {"amount": "{{ record.amount * 2 }}", "note": "{{ record.missing }}"}, ctx)
    assert ctx.updates == {"amount": "25.00", "note": None}


def test_registering_another_function_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        @action("send_email")
        def impostor(ctx):
            pass


@pytest.mark.parametrize(("text", "seconds"), [
    ("now", 0), ("500ms", 0.5), ("30s", 30), ("10m", 600), ("1.5h", 5400), ("3d", 259200),
    ("1h30m", 5400), ("PT10M", 600), ("P1DT2H", 93600), (90, 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_formatted_durations_parse_back():
    for seconds in (0, 59, 90, 3600, 93784):
        delta = timedelta(seconds=seconds)
        assert parse_duration(format_duration(delta)) == delta


def test_report_of_all_records_needs_a_worker_and_lists_them(ctx):
    with pytest.raises(PermanentError, match="needs a worker"):
        run("report", {"filename": "all.csv", "records": "all", "columns": ["email"]}, ctx)
    ctx.all_records = lambda: [{"email": "a@example.com"}, {"email": "b@example.com"}]
    run("report", {"filename": "all.csv", "records": "all", "columns": ["email"]}, ctx)
    assert ctx.attachments[0].data.decode().splitlines() == [
        "email", "a@example.com", "b@example.com"]


@pytest.mark.parametrize("field", ["subject", "to", "cc", "reply_to"])
def test_a_line_break_in_an_email_header_is_a_permanent_error(ctx, field):
    ctx.data = {**ctx.data, "ref": "A\r\nBcc: victim@example.com"}
    args = {"to": "ann@example.com", "subject": "Booked", "body": "Hi", field: "x {{ record.ref }}"}
    with pytest.raises(PermanentError) as caught:
        run("send_email", args, ctx)
    assert not caught.value.retryable  # was a ValueError: retried 8 times over two days
    assert "line break" in caught.value.safe_message
    assert not list(ctx.settings.outbox_dir.glob("*.eml"))  # nothing half-sent


def test_a_trailing_newline_from_a_yaml_block_is_not_a_line_break(ctx):
    run("send_email", {"to": "ann@example.com", "subject": "Booked\n", "body": "Hi"}, ctx)
    (path,) = list(ctx.settings.outbox_dir.glob("*.eml"))
    assert email.message_from_bytes(path.read_bytes())["Subject"] == "Booked"


def test_html_email_bodies_escape_inserted_values_by_default(ctx):
    ctx.data = {**ctx.data, "note": "<script>alert(1)</script>"}
    run("send_email", {"to": "ann@example.com", "subject": "Hi", "body": "{{ record.note }}",
                       "html": "<p>{{ record.note }}</p>{{ '<b>kept</b>' | safe }}"}, ctx)
    (path,) = list(ctx.settings.outbox_dir.glob("*.eml"))
    message = email.message_from_bytes(path.read_bytes())
    text, html = [part.get_payload(decode=True).decode() for part in message.walk()
                  if part.get_content_maintype() == "text"]
    assert "<script>alert(1)</script>" in text  # the plain text part is plain text
    assert "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p><b>kept</b>" in html
