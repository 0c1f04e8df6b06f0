"""`formrules preview`: what a tree would do, with nothing done."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from formrules.config import from_env
from formrules.language.loader import load_rules
from formrules.runs.preview import preview
from tests.helpers import ROOT

RULES = ROOT / "tests" / "rules"


def test_preview_runs_set_and_if_and_only_describes_the_rest(tmp_path):
    import tests.fixture_actions  # noqa: F401  (registers the custom actions the form uses)

    settings = from_env({}, instance_dir=str(tmp_path / "instance"), secret_key="x")
    form = load_rules(RULES).form("slow")
    lines = [str(line) for line in preview(
        form, {"name": "Ann", "done": False}, settings,
        now=datetime(2030, 1, 1, 12, 0, tzinfo=UTC))]
    assert lines == [
        "events/submit/0/background: background 'Five seconds of work' runs at once on a "
        "worker; awaited; sets done when done; 8 attempts, waiting 10s, 1m, 10m, 1h, 6h, 1d, "
        "1d",
        "  events/submit/0/background/do/0: would run slow {'seconds': 5, 'steps': 10}",
        "events/submit/1/delay: delay 'Three seconds later' runs at 2030-01-01 12:00:03 UTC "
        "(in 3s) "
        "on a worker; not awaited; 8 attempts, waiting 10s, 1m, 10m, 1h, 6h, 1d, 1d",
        "  events/submit/1/delay/do/0: would run record_call {'name': 'delayed'}",
    ]
    assert not (tmp_path / "instance").exists()  # nothing written anywhere


@pytest.mark.integration  # runs the CLI in a subprocess
def test_preview_command_shows_branches_and_refuses_bad_values(tmp_path):
    env = {**os.environ, "FORMRULES_ACTIONS": "tests.fixture_actions", "PYTHONPATH": str(ROOT),
           "FORMRULES_INSTANCE": str(tmp_path / "instance")}
    command = [sys.executable, "-m", "formrules.cli", "preview", "demo", "--rules", str(RULES),
               "--set", "name=Ann", "--set", "count=12"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:4] == [
        "events/submit/0: set status = 'received'",
        "events/submit/1: if record.count > 10 -> true: then (1 node(s))",
        "  events/submit/1/then/0: set size = 'big'",
        "events/submit/2/background: background 'Preparing Ann' runs at once on a worker; "
        "awaited; sets ready when done; 8 attempts, waiting 10s, 1m, 10m, 1h, 6h, 1d, 1d",
    ]
    bad = subprocess.run([*command[:-2], "--set", "count=many"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode == 1
    assert "error: --set 'count=many'" in bad.stderr


def test_preview_renders_progress_messages(tmp_path):
    (tmp_path / "count.yaml").write_text(
        "form: count\n"
        "fields:\n"
        "  - {name: name, type: string}\n"
        "  - {name: boxes, type: integer, default: 4}\n"
        "events:\n"
        "  submit:\n"
        "    - progress: {done: 1, total: 'record.boxes', message: 'Packing for "
        "{{ record.name }}', title: 'Boxes of {{ record.name }}'}\n"
        "    - progress: {message: Plain}\n")
    settings = from_env({}, instance_dir=str(tmp_path / "instance"), secret_key="x")
    form = load_rules(tmp_path).form("count")
    lines = [str(line) for line in preview(form, {"name": "Ann", "boxes": 4}, settings)]
    assert lines == [
        "events/submit/0: progress 1/4 Packing for Ann (title 'Boxes of Ann')",
        "events/submit/1: progress -/- Plain",
    ]
