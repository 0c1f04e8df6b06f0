"""Health, readiness, Prometheus metrics and JSON logs, from the outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from formrules.process.redis_server import free_port
from formrules.web import create_app
from tests.helpers import WorkerProcess, runs_of, submit, token_of, wait_until, work
from tests.web_helpers import Browser

OBSERVED = """\
form: observed
title: Observed
fields:
  - {name: name, type: string, required: true}
events:
  submit:
    - background:
        title: Work for {{ record.name }}
        do:
          - log: "working for {{ record.name }}"
    - background:
        title: Flaky
        retry: {attempts: 2, backoff: [1s], jitter: 0}
        do: [{flaky: {fail_times: 1}}]
"""


@pytest.fixture
def observed_rules(rules_dir):
    """The test rules plus a form with a logging Run and a Run that retries once."""
    (rules_dir / "observed.yaml").write_text(OBSERVED)
    return rules_dir


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_healthz_and_readyz_when_all_is_well(client):
    """Liveness answers; readiness lists each dependency as fine."""
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["status"] == "ready"
    assert ready.json["checks"]["database"] == "ok"
    assert ready.json["checks"]["redis"] == "ok"
    assert ready.json["checks"]["rules"].startswith("ok (")


def test_readyz_counts_broken_rule_files_without_naming_them(client, rules_dir):
    """A broken file keeps the process ready (its last good version, the other forms);
    the public answer says how many files are broken, not which or why."""
    (rules_dir / "zz_broken.yaml").write_text("form: zz\ntitle: [unclosed\n")

    def noticed() -> str | None:
        found = client.get("/readyz").json["checks"]["rules"]
        return found if "problems" in found else None

    checks = wait_until(noticed, timeout=10)
    assert checks.startswith("ok (") and checks.endswith("; 1 rule file(s) with problems)")
    assert "zz_broken" not in client.get("/readyz").get_data(as_text=True)


def test_readyz_is_503_with_the_reason_when_redis_is_away(rt):
    """A load balancer takes the process out; the reason names the dependency only."""
    away = rt.settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = create_app({"TESTING": True}, settings=away).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json["status"] == "not ready"
    assert ready.json["checks"]["redis"].startswith("unreachable (")
    assert ready.json["checks"]["database"] == "ok"
    assert client.get("/healthz").status_code == 200


def test_metrics_are_for_local_clients_or_token_holders(rt):
    """No token: only this machine may scrape; with a token, only its holder."""
    local = create_app({"TESTING": True}, settings=rt.settings).test_client()
    assert local.get("/metrics").status_code == 200
    assert local.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code \
        == 403
    guarded = create_app({"TESTING": True}, settings=rt.settings.with_overrides(
        metrics_token="s3cret")).test_client()
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    ok = guarded.get("/metrics", headers={"Authorization": "Bearer s3cret"},
                     environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert ok.status_code == 200
    assert "formrules_runs" in ok.text


def test_metrics_move_with_a_submit_and_a_worker_run(observed_rules, rt, client):
    """Submit counter and latency, Runs by status, queue depth, run duration, retries."""
    before = client.get("/metrics").text
    token = token_of(submit(client, "observed", {"name": "Ann"}))
    queued = client.get("/metrics").text
    assert sample(queued, "formrules_submits_total", form="observed", channel="web",
                  outcome="accepted") == sample(before, "formrules_submits_total",
                                                form="observed", channel="web",
                                                outcome="accepted") + 1
    assert sample(queued, "formrules_submit_seconds_count", form="observed") >= 1
    assert sample(queued, "formrules_runs", status="queued") == 2
    assert sample(queued, "formrules_queue_depth") == 2
    assert sample(queued, "formrules_due_runs") == 2

    work(rt)
    after = client.get("/metrics").text
    assert {r.status for r in runs_of(rt, token)} == {"done", "retrying"}

    def moved(name: str, **labels: str) -> float:  # counters live as long as the process
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("formrules_run_duration_seconds_count", form="observed",
                 node="events/submit/0/background", status="done") == 1
    assert moved("formrules_run_retries_total", form="observed",
                 node="events/submit/1/background") == 1
    assert sample(after, "formrules_runs", status="done") == 1
    assert sample(after, "formrules_queue_depth") == 0


def test_a_worker_reports_health_metrics_and_json_logs_with_the_run_id(
        observed_rules, rt, client, subprocess_env):
    """A real forking worker: /healthz while it lives, its work-horses' metrics summed,
    and every log line of a Run carries the Run id and the record token."""
    port = free_port()
    env = dict(subprocess_env, FORMRULES_LOG_FORMAT="json")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = WorkerProcess(env, "--health-port", str(port)).start()
    try:
        health = wait_until(lambda: _get(f"http://127.0.0.1:{port}/healthz"))
        assert health[0] == 200
        assert json.loads(health[1])["checks"]["rq"].startswith("ok")
        token = token_of(submit(client, "observed", {"name": "Bo"}))
        wait_until(lambda: {r.status for r in runs_of(rt, token)} == {"done", "retrying"}
                   or {r.status for r in runs_of(rt, token)} == {"done"})
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert sample(body.decode(), "formrules_run_duration_seconds_count",
                      form="observed", node="events/submit/0/background", status="done") == 1
    finally:
        output = worker.stop()
    assert _get(f"http://127.0.0.1:{port}/healthz") is None  # gone with its worker
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and all("run_id" in line and "level" in line for line in lines)
    work_run = next(r for r in runs_of(rt, token) if r.node_path == "events/submit/0/background")
    mine = [line for line in lines if line["run_id"] == work_run.id]
    assert any("working for Bo" in line["message"] for line in mine), output[-3000:]
    assert {line["record_token"] for line in mine} == {token}


def _get(url: str) -> tuple[int, bytes] | None:
    """(status, body), or None when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None


@pytest.mark.slow
def test_gunicorn_serves_and_sums_metrics_over_its_processes(rt, subprocess_env, tmp_path):
    """`formrules web --workers 2`: pages, readiness, and one submit seen by every scrape
    whichever gunicorn process answers it (multiprocess metrics)."""
    port = free_port()
    env = dict(subprocess_env, FORMRULES_LOG_FORMAT="json")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with (tmp_path / "web.log").open("w") as log:
        web = subprocess.Popen([sys.executable, "-m", "formrules.cli", "web", "--workers", "2",
                                "--port", str(port)], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    browser = Browser(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: _get(f"{browser.base}/healthz"), timeout=60)
        assert browser.request("/readyz")[0] == 200
        browser.post_form("/forms/demo", {"name": "Gun", "email": "g@example.com"})
        scrapes = [browser.get("/metrics") for _ in range(6)]
        assert {sample(text, "formrules_submits_total", form="demo", channel="web",
                       outcome="accepted") for text in scrapes} == {1}
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(30)
    lines = [json.loads(line) for line in (tmp_path / "web.log").read_text().splitlines()
             if line.startswith("{")]
    assert any(line["logger"] == "gunicorn.error" for line in lines)
    assert not any(line["level"] == "ERROR" for line in lines), lines
