"""The built wheel, installed into a fresh virtualenv away from the source tree, serves
every page: templates, static files and migrations all come from the package."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

from formrules.process.redis_server import free_port
from tests.helpers import ROOT, wait_until
from tests.web_helpers import Browser

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the built wheel (and its dependencies) installed."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy: pip builds in the source folder, whose build/ could hold leftovers.
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "instance", "*.egg-info", "__pycache__", "test-artifacts"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(base / "dist"), str(source)], check=True, timeout=600, cwd=base)
    wheel, = (base / "dist").glob("formrules-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True,
                   timeout=300)
    subprocess.run([str(base / "venv/bin/pip"), "install", "-q", str(wheel)], check=True,
                   timeout=900, cwd=base)
    return base


def test_the_installed_wheel_serves_every_page(installed, tmp_path):
    """`formrules run` from the wheel: every page once, 200 or 303, never a 5xx."""
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV",
                          "PROMETHEUS_MULTIPROC_DIR")}
    env.update(FORMRULES_RULES=str(tmp_path / "rules"),
               FORMRULES_INSTANCE=str(tmp_path / "instance"),
               FORMRULES_PASSWORD="correct horse battery")
    formrules = str(installed / "venv/bin/formrules")
    where = subprocess.run([str(installed / "venv/bin/python"), "-c",
                            "import formrules; print(formrules.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(installed / "venv")), where.stdout
    subprocess.run([formrules, "users", "add", "olga", "--operator"], env=env, cwd=tmp_path,
                   check=True, timeout=120)
    port = free_port()
    log = (tmp_path / "run.log").open("w")
    app = subprocess.Popen([formrules, "run", "--port", str(port)], env=env, cwd=tmp_path,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        browser = Browser(f"http://127.0.0.1:{port}")
        wait_until(lambda: _answers(browser), timeout=60)
        _visit_everything(browser)
    finally:
        app.terminate()  # `formrules run` stops its worker, then its Redis
        try:
            app.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert not [page for page, status in browser.seen.items() if status >= 500], output
    assert "Traceback" not in output, output[-5000:]


def _answers(browser: Browser) -> bool:
    try:
        return browser.request("/healthz")[0] == 200
    except OSError:
        return False


def _visit_everything(browser: Browser) -> None:
    """Each page of the app once, as a visitor and then as an operator."""
    index = browser.get("/")
    forms = sorted(set(re.findall(r'href="/forms/([\w-]+)"', index)))
    assert forms, index[:2000]
    for form_id in forms:
        browser.get(f"/forms/{form_id}")
    assert "body" in browser.get("/static/style.css")
    browser.post_form("/forms/room_booking", {
        "requester": "Wheel", "email": "w@example.com", "room": "Atlas",
        "date": (date.today() + timedelta(days=30)).isoformat(), "attendees": "3"})
    waiting = browser.post_form("/forms/newsletter", {"name": "Wheel", "email": "w@example.com"})
    token = waiting.rsplit("/", 1)[-1]
    for path in (waiting, f"/r/{token}/part", f"/r/{token}/status", "/tasks", "/tasks/part",
                 "/notifications", "/healthz", "/readyz", "/metrics", "/api/openapi.json",
                 "/login"):
        browser.get(path)
    assert browser.post_form("/login", {"name": "olga", "password": "correct horse battery"})
    admin = browser.get("/admin")
    run_id = re.findall(r'href="/admin/runs/([0-9a-f]{32})"', admin)[0]
    browser.get(f"/admin/runs/{run_id}")
    records = browser.get("/admin/records")
    record_id = re.findall(r'href="/admin/records/(\d+)"', records)[0]
    for path in (f"/admin/records/{record_id}", f"/admin/records/{record_id}/edit",
                 "/admin/dead", "/admin/queues", "/admin/batches",
                 "/admin/batches/new/room_booking/export_csv", "/admin/forms"):
        browser.get(path)
    # The form diagram's scripts, Mermaid's bundle and its licence come from the wheel.
    diagram = browser.get("/admin/forms/room_booking")
    scripts = re.findall(r'<script src="(/static/[^"]+)"', diagram)
    assert "/static/vendor/mermaid.min.js" in scripts, diagram[:2000]
    for script in scripts:
        assert len(browser.get(script)) > 1000, script
    assert "MIT License" in browser.get("/static/vendor/mermaid.LICENSE")
    batch = browser.post_form("/admin/batches/new/room_booking/export_csv",
                              {"scope": "all", "where": ""})
    browser.get(batch)
    browser.get(f"{batch}/progress")
