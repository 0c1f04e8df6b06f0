"""`formrules lsp` (issue 12, item 6): a real server process, spoken to in LSP over stdio."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading

import pytest

from tests.helpers import ROOT

pytest.importorskip("pygls")

FORM = """\
form: trip
fields:
  - {name: traveller, type: string}
  - {name: nights, type: integer}
events:
  submit:
    - log: "{{ record.traveller }}"
"""


class Client:
    """A minimal LSP client: Content-Length framed JSON-RPC over the server's pipes."""

    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from formrules.cli import main; main()", "lsp"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd=ROOT)
        self.messages: queue.Queue = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream = self.process.stdout
        while True:
            length = None
            while (line := stream.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if line == b"" or length is None:
                return
            self.messages.put(json.loads(stream.read(length)))

    def send(self, method: str, params: dict, *, request: bool = True) -> int | None:
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        if request:
            self.next_id += 1
            message["id"] = self.next_id
        body = json.dumps(message).encode()
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.process.stdin.flush()
        return message.get("id")

    def wait_for(self, match, timeout: float = 30) -> dict:
        """The first message `match` accepts (others are skipped), within `timeout`."""
        while True:
            message = self.messages.get(timeout=timeout)
            if match(message):
                return message

    def request(self, method: str, params: dict) -> dict:
        number = self.send(method, params)
        return self.wait_for(lambda m: m.get("id") == number and "method" not in m)["result"]

    def diagnostics(self, version: int) -> list[dict]:
        return self.wait_for(lambda m: m.get("method") == "textDocument/publishDiagnostics"
                             and m["params"].get("version") == version)["params"]["diagnostics"]

    def close(self) -> None:
        self.request("shutdown", {})
        self.send("exit", {}, request=False)
        self.process.wait(10)


@pytest.fixture
def client(subprocess_env, tmp_path):
    lsp = Client(subprocess_env)
    result = lsp.request("initialize", {"processId": None, "rootUri": tmp_path.as_uri(),
                                        "capabilities": {}})
    assert result["capabilities"]["hoverProvider"]
    lsp.send("initialized", {}, request=False)
    yield lsp
    lsp.close()


def test_diagnostics_completion_and_hover_over_stdio(client, tmp_path):
    uri = (tmp_path / "trip.yaml").as_uri()
    client.send("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "yaml", "version": 1, "text": FORM}}, request=False)
    assert client.diagnostics(1) == []

    typo = FORM.replace("record.traveller", "record.travler")
    client.send("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                           "contentChanges": [{"text": typo}]}, request=False)
    (problem,) = client.diagnostics(2)
    assert problem["message"] == ("events/submit/0: unknown field 'travler' in template "
                                  "(did you mean 'traveller'?)")
    assert problem["range"]["start"] == {"line": 6, "character": 11}
    assert problem["severity"] == 1 and problem["source"] == "formrules"

    typing = FORM + '    - send_email: {to: "{{ record.'
    client.send("textDocument/didChange", {"textDocument": {"uri": uri, "version": 3},
                                           "contentChanges": [{"text": typing}]}, request=False)
    client.diagnostics(3)  # half a template is a problem until it is finished
    at = {"line": 7, "character": len('    - send_email: {to: "{{ record.')}
    fields = client.request("textDocument/completion",
                            {"textDocument": {"uri": uri}, "position": at})
    assert [item["label"] for item in fields["items"]] == ["traveller", "nights"]

    arguments = client.request("textDocument/completion", {"textDocument": {"uri": uri},
                               "position": {"line": 7, "character": len("    - send_email: {")}})
    assert [item["label"] for item in arguments["items"]] == \
        ["to", "subject", "body", "cc", "reply_to", "html", "attach"]

    node_start = FORM + "    - "
    client.send("textDocument/didChange", {"textDocument": {"uri": uri, "version": 4},
                                           "contentChanges": [{"text": node_start}]},
                request=False)
    client.diagnostics(4)
    kinds = client.request("textDocument/completion", {"textDocument": {"uri": uri},
                           "position": {"line": 7, "character": 6}})
    labels = [item["label"] for item in kinds["items"]]
    assert labels[:4] == ["if", "background", "delay", "progress"]
    assert {"send_email", "http_request", "record_call"} <= set(labels)  # custom ones too

    hover = client.request("textDocument/hover", {"textDocument": {"uri": uri},
                           "position": {"line": 6, "character": 8}})
    assert hover["contents"]["value"] == (  # the reference's paragraph, docs/rules.md
        "**log** `{message!, level}`\n\nWrites a line to the log of the process running it "
        "(the web app inline, the worker in a Run), prefixed with the node path.")


def test_the_old_batches_key_is_a_warning_and_batch_options_complete(client, tmp_path):
    uri = (tmp_path / "trip.yaml").as_uri()
    old = FORM + "tasks:\n  export:\n    do: [{log: x}]\n"
    client.send("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "yaml", "version": 1, "text": old}}, request=False)
    (warning,) = client.diagnostics(1)
    assert warning["message"] == "tasks: `tasks:` is now `batches:`; rename it"
    assert warning["severity"] == 2  # Warning, not Error
    assert warning["range"]["start"] == {"line": 7, "character": 0}

    typing = FORM + "batches:\n  export:\n    do: [{log: x}]\n    \n"
    client.send("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                           "contentChanges": [{"text": typing}]}, request=False)
    assert client.diagnostics(2) == []
    options = client.request("textDocument/completion", {"textDocument": {"uri": uri},
                             "position": {"line": 10, "character": 4}})
    assert [item["label"] for item in options["items"]] == \
        ["title", "do", "retry", "timeout", "on_error", "queue", "concurrency",
         "stop_on_error", "started_by"]
    top = client.request("textDocument/completion", {"textDocument": {"uri": uri},
                         "position": {"line": 11, "character": 0}})
    labels = [item["label"] for item in top["items"]]
    assert "batches" in labels and "schedules" in labels and "tasks" not in labels
