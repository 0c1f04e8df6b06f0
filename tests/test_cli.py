"""The `formrules` command: check, and the one-command run that leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from formrules.process.redis_server import free_port
from tests.helpers import ROOT, alive, cmdline, descendants, wait_until

pytestmark = pytest.mark.integration  # runs the CLI in subprocesses

FORMRULES = [sys.executable, "-m", "formrules.cli"]


def run_cli(*args: str, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*FORMRULES, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def test_check_accepts_the_example_rules():
    result = run_cli("check", str(ROOT / "rules"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "form(s) OK" in result.stdout
    assert "room_booking" in result.stdout


def test_check_reports_every_mistake_with_position_and_exits_1(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "form: a\n"
        "fields:\n"
        "  - {name: done, type: string}\n"
        "events:\n"
        "  submit:\n"
        "    - background:\n"
        "        flag: done\n"
        "        timeout: soon\n"
        "        do: [{send_emial: {to: x}}]\n")
    (tmp_path / "b.yaml").write_text("form: b\nform: c\n")
    (tmp_path / "c.yaml").write_text("form: [unclosed\n")
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines == [
        f"{tmp_path}/a.yaml:7:15: events/submit/0/background: flag field 'done' must have "
        "type boolean, not string",
        f"{tmp_path}/a.yaml:8:18: events/submit/0/background: expected a duration like 30s, "
        "10m, 2h, 3d or PT10M, got 'soon'",
        f"{tmp_path}/a.yaml:9:15: events/submit/0/background/do/0: unknown action "
        "'send_emial' (did you mean 'send_email'?)",
        f"{tmp_path}/b.yaml:2:1: duplicate key 'form' (first defined at line 1)",
        f"{tmp_path}/c.yaml:2:1: not valid YAML: the '[' at line 1, column 7 is not closed "
        "with ']' (or a ',' is missing between its items)",
    ]
    assert "5 problems found." in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_starts_everything_and_stops_without_leftovers(tmp_path, stop_signal):
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "SECRET_KEY")}
    env.update({"FORMRULES_INSTANCE": str(tmp_path / "instance"),
                "FORMRULES_RULES": str(ROOT / "rules")})
    process = subprocess.Popen([*FORMRULES, "run", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def serving():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    return r.status == 200 and b"Book a meeting room" in r.read()
            except OSError:
                return False

        wait_until(serving, timeout=60, interval=0.2)

        def started() -> tuple[set[int], set[bytes]] | None:
            tree = set(descendants(process.pid))
            names = {cmdline(p).replace(b"\0", b" ") for p in tree if alive(p)}
            # The worker: its guard, which starts the worker itself a moment later.
            return (tree, names) if any(b"formrules.process.worker --in-process" in n
                                        for n in names) else None
        tree, names = wait_until(started, timeout=60, interval=0.2)
        assert any(b"redis-server" in n or b"valkey-server" in n for n in names), names
        assert any(b"formrules.process.guard" in n for n in names), names
        assert (tmp_path / "instance" / "secret_key").exists()
    finally:
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "formrules is running at" in output and "Stopped." in output
    wait_until(lambda: not any(alive(p) for p in tree), timeout=20)


@pytest.mark.slow
def test_closing_the_terminal_stops_everything_in_order_without_tracebacks(tmp_path):
    """SIGHUP reaches every process of the terminal's group, as when its window closes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "SECRET_KEY")}
    env.update({"FORMRULES_INSTANCE": str(tmp_path / "instance"),
                "FORMRULES_RULES": str(ROOT / "rules")})
    process = subprocess.Popen([*FORMRULES, "run", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        def serving():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(serving, timeout=60, interval=0.2)
        tree = set(descendants(process.pid))
        def worker_up():  # the worker process is running before the hangup
            return any(b"formrules.process.worker" in cmdline(pid)
                       for pid in descendants(process.pid))

        wait_until(worker_up, timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGHUP)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "Stopped." in output
    assert "Traceback" not in output and "ConnectionError" not in output, output
    wait_until(lambda: not any(alive(p) for p in tree), timeout=20)


@pytest.mark.slow
def test_run_stops_promptly_while_a_job_is_running(tmp_path):
    """Stopping mid-job ends the work-horse too; the Run resumes when workers return."""
    import http.cookiejar
    import json
    import re
    import urllib.parse

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "SECRET_KEY")}
    env.update({"FORMRULES_INSTANCE": str(tmp_path / "instance"),
                "FORMRULES_RULES": str(ROOT / "tests" / "rules"),
                "FORMRULES_ACTIONS": "tests.fixture_actions", "PYTHONPATH": str(ROOT)})
    process = subprocess.Popen([*FORMRULES, "run", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        def form_page():
            try:
                with opener.open(f"{base}/forms/slow", timeout=2) as response:
                    return response.read()
            except OSError:
                return None

        page = wait_until(form_page, timeout=60, interval=0.2)
        data = {name: re.search(rb'name="' + name.encode() + rb'" type="hidden" value="([^"]*)"',
                                page).group(1).decode() for name in ("csrf_token", "submit_key")}
        data["name"] = "Stopper"
        with opener.open(f"{base}/forms/slow", urllib.parse.urlencode(data).encode(),
                         timeout=10) as response:
            status_url = response.url + "/status"

        def running():
            with opener.open(status_url, timeout=5) as response:
                runs = json.loads(response.read())["runs"]
            return runs and runs[0]["status"] == "running"

        wait_until(running, timeout=60, interval=0.2)
        tree = set(descendants(process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    wait_until(lambda: not any(alive(p) for p in tree | set(descendants(process.pid))),
               timeout=20)


def test_bad_numeric_setting_is_a_clean_error(tmp_path):
    env = {**os.environ, "FORMRULES_HEARTBEAT": "often", "FORMRULES_INSTANCE": str(tmp_path)}
    result = run_cli("reconcile", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: FORMRULES_HEARTBEAT must be a number, got 'often'"


LOGGING_FORM = """
form: logging
fields:
  - {name: name, type: string}
events:
  submit:
    - background:
        title: Logging
        do:
          - log: "Logged for {{ record.name }}"
"""


@pytest.fixture
def logging_rules(rules_dir):
    """A form whose background Run writes an info-level `log:` line."""
    (rules_dir / "logging.yaml").write_text(LOGGING_FORM)


@pytest.mark.slow
@pytest.mark.parametrize("command", [[*FORMRULES, "worker", "--burst"],
                                     [sys.executable, str(ROOT / "worker.py"), "--burst"]])
def test_every_way_of_starting_a_worker_keeps_info_log_lines(
        logging_rules, client, rt, subprocess_env, command):
    from tests.helpers import runs_of, submit, token_of

    token = token_of(submit(client, "logging", {"name": "Ann"}))
    out = subprocess.run(command, env=subprocess_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert runs_of(rt, token)[0].status == "done"
    assert "events/submit/0/background/do/0: Logged for Ann" in out.stderr, out.stderr


def test_check_shows_a_warning_and_still_exits_0(tmp_path):
    (tmp_path / "old.yaml").write_text("form: old\ntasks:\n  export: {do: [{log: x}]}\n")
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"{tmp_path}/old.yaml:2:1: warning: tasks: `tasks:` is now `batches:`; rename it",
        f"1 form(s) OK in {tmp_path}: old (1 warning)"]
    both = tmp_path / "both.yaml"
    both.write_text("form: both\nbatches: {}\ntasks: {}\n")
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 1
    assert (f"{both}:3:1: tasks: a file has either `batches:` or the old `tasks:`, not both; "
            "move these into `batches:`") in result.stdout
