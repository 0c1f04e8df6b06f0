"""What a person does over the minutes of a real job, for the life-of-a-job and
accessibility tests: the real web server and worker as processes, Chromium, axe-core.

The shipped example rules are used as they are, except durations measured in days, which
a test copy shortens (`short_rules`) so that every Run ends within about a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import ROOT, wait_until

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"


def chromium_args() -> list[str]:
    """Flags for headless Chromium in a container; screenshots land in ARTIFACTS."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARGS


DONE = '.status-body[data-state="done"]'
AXE_VERSION = "4.10.3"
AXE_DIR = Path(os.environ.get("FORMRULES_AXE_DIR", ROOT / ".cache" / "axe-core"))
AXE_JS = AXE_DIR / "node_modules" / "axe-core" / "axe.min.js"

# Shipped text -> test text: only what would make a test wait for days, plus the one-minute
# Delay the issue asks every life-of-a-job run to include.
SHORTER = {
    "room_booking.yaml": [('at: "record.date - days(1)"', 'at: "now() + seconds(60)"')],
    "newsletter.yaml": [("for: 30s", "for: 60s")],
    "expense_report.yaml": [],
    "contacts_import.yaml": [],
}
FIXTURES = ROOT / "tests" / "fixtures"  # what people upload into file fields
EXAMPLES = sorted(name.removesuffix(".yaml") for name in SHORTER)


def short_rules(target: Path) -> Path:
    """Copy rules/*.yaml into `target` with day-long waits cut to a minute."""
    target.mkdir(parents=True, exist_ok=True)
    shipped = sorted(p.name for p in (ROOT / "rules").glob("*.yaml"))
    assert shipped == sorted(SHORTER), "a new example rule needs its entry in SHORTER"
    for name, swaps in SHORTER.items():
        text = (ROOT / "rules" / name).read_text(encoding="utf-8")
        for old, new in swaps:
            assert old in text, f"rules/{name} no longer says {old!r}: update SHORTER"
            text = text.replace(old, new)
        (target / name).write_text(text, encoding="utf-8")
    return target


def answers(form_id: str, who: str) -> dict[str, str]:
    """What a person types into each example form (field name -> text)."""
    email = f"{who.lower().replace(' ', '.')}@example.com"
    soon = (date.today() + timedelta(days=3)).isoformat()
    return {
        "room_booking": {"requester": who, "email": email, "room": "Atlas", "date": soon,
                         "attendees": "4"},
        "expense_report": {"employee": who, "email": email, "amount": "42.50",
                           "category": "Travel", "spent_on": date.today().isoformat(),
                           "notes": "Taxi to the airport",
                           "receipt": str(FIXTURES / "receipt.pdf")},
        "contacts_import": {"email": email, "contacts": str(FIXTURES / "contacts.csv")},
        "newsletter": {"name": who, "email": email, "topics": "Engineering"},
    }[form_id]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebProcess:
    """`formrules web` in a process of its own, as deployed (not inside the test process)."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> WebProcess:
        """Start on a free port and wait until it answers."""
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        for _ in range(5):  # another process may take the port between the probe and bind
            port = free_port()
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from formrules.cli import main; main()", "web",
                 "--port", str(port)], env=self.env, cwd=ROOT, stdout=self.log,
                stderr=subprocess.STDOUT, start_new_session=True)
            self.url = f"http://127.0.0.1:{port}"
            with contextlib.suppress(AssertionError):
                wait_until(self._ready, timeout=30, interval=0.1)
                return self
            self.stop()
        raise AssertionError("the web server did not start:\n" + self.output())

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("the web server exited:\n" + self.output())
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        """What the server printed so far (its request log and tracebacks)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Watch:
    """Everything a browser context saw go wrong: 5xx answers and console errors."""

    server_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def attach(self, context) -> None:
        """Listen to every page of the context, and its API requests."""
        context.on("response", self._response)
        context.on("page", self.page)

    def page(self, page) -> None:
        page.on("console", lambda msg: self._console(page, msg))
        page.on("pageerror", lambda exc: self.console_errors.append(f"{page.url}: {exc}"))

    def _console(self, page, msg) -> None:
        if msg.type == "error":
            self.console_errors.append(f"{page.url}: {msg.text} ({msg.location.get('url')})")

    def _response(self, response) -> None:
        if response.status >= 500:
            self.server_errors.append(f"{response.status} {response.url}")

    def get(self, context, path: str, base_url: str):
        """GET a page with the context's cookies (no rendering); note a 5xx."""
        response = context.request.get(base_url + path, max_redirects=0)
        if response.status >= 500:
            self.server_errors.append(f"{response.status} {path}")
        return response


def fill(page, values: dict[str, str]) -> None:
    """Type the answers into the form's inputs, whatever kind each is."""
    for name, value in values.items():
        box = page.locator(f'[name="{name}"]')
        if box.evaluate("e => e.tagName") == "SELECT":
            box.select_option(value)
        elif box.evaluate("e => e.type") == "file":  # the value is the file to upload
            box.set_input_files(value)
        else:
            box.fill(value)


def shot(page, name: str) -> None:
    """Save a full-page screenshot as a CI artifact."""
    with contextlib.suppress(Exception):  # a screenshot must never hide the real failure
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def axe_source() -> str:
    """axe-core from the npm registry, installed once into .cache/ (one process at a time)."""
    if not AXE_JS.exists():
        AXE_DIR.mkdir(parents=True, exist_ok=True)
        with FileLock(str(AXE_DIR) + ".lock"):
            if not AXE_JS.exists():
                npm = shutil.which("npm")
                if npm is None:
                    pytest.fail("npm is missing: install it (apt-get install npm) so the "
                                "accessibility test can fetch axe-core")
                subprocess.run([npm, "install", "--prefix", str(AXE_DIR), "--no-audit",
                                "--no-fund", "--silent", f"axe-core@{AXE_VERSION}"],
                               check=True, timeout=300)
    return AXE_JS.read_text(encoding="utf-8")


def axe_problems(page, source: str) -> list[str]:
    """Serious and critical axe-core violations on the page as it is now."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=source)
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(' ') + ': ' +
                                         (n.any.concat(n.all)[0] || {}).message)}));
    }""")
    return [f"{page.url}: {v['impact']} {v['id']} ({v['help']}): {json.dumps(v['nodes'])}"
            for v in result if v["impact"] in ("serious", "critical")]


def poll(predicate, timeout: float, interval: float = 1.0):
    """Like wait_until, at a person's pace (once a second by default)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
