"""Batch runs: a batch def over many records, one child Run each, `concurrency` at a time, with
progress "n of m", a combined zip, stop_on_error, cancel of the whole batch, and the CLI."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import zipfile

import pytest
from sqlalchemy import select

from formrules.language.loader import load_rules
from formrules.runs import batch
from formrules.runs.engine import submit as submit_record
from formrules.store.models import Batch, Notification, Run, RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import ROOT, events_of, tokens, wait_until, work

LEDGER = """
form: ledger
title: Ledger entry
fields:
  - {name: name, type: string, required: true}
  - {name: amount, type: integer, default: 1}
  - {name: exported, type: boolean, hidden: true, default: false}
events:
  submit: []
batches:
  export:
    title: Export {{ record.name }}
    do:
      - report:
          filename: "{{ record.name }}.txt"
          content: "{{ record.name }} = {{ record.amount }}"
      - set: {exported: true}
  export_fast:
    title: Export quickly
    concurrency: 3
    do: [{record_call: {name: "fast {{ record.name }}"}}]
  fragile:
    title: Fragile
    stop_on_error: true
    do:
      - if: "record.amount > 5"
        then: [{explode: {permanent: true}}]
      - record_call: {name: "fragile {{ record.name }}"}
  tolerant:
    title: Tolerant
    do:
      - if: "record.amount > 5"
        then: [{explode: {permanent: true}}]
      - record_call: {name: "tolerant {{ record.name }}"}
  slow:
    title: Slow
    do: [{record_call: {name: "slow {{ record.name }}", sleep: 30}}]
"""


@pytest.fixture
def rules_dir(rules_dir):
    """The test rules plus the ledger form with its batches."""
    (rules_dir / "ledger.yaml").write_text(LEDGER)
    return rules_dir


@pytest.fixture
def form(rt):
    """The ledger form as loaded."""
    return load_rules(rt.settings.rules_dir).form("ledger")


def add_records(rt, form, amounts: list[int]) -> list[int]:
    """Records submitted through the engine (as the form would); returns their ids."""
    ids = []
    with rt.store.session() as s:
        for i, amount in enumerate(amounts):
            record, _ = submit_record(s, form, {"name": f"r{i:02d}", "amount": amount,
                                                "exported": False},
                                      owner="anon:x", settings=rt.settings)
            ids.append(record.id)
    return ids


def start(operator, name: str, *, where: str = "", records: list[int] | None = None):
    """Start a batch from the operator's page; returns the batch id."""
    page = operator.get(f"/admin/batches/new/ledger/{name}")
    assert page.status_code == 200, page.data[:500]
    data = {"csrf_token": tokens(page.data)["csrf_token"], "where": where,
            "scope": "selected" if records else "filter",
            "record": [str(r) for r in records or []]}
    response = operator.post(f"/admin/batches/new/ledger/{name}", data=data)
    assert response.status_code == 303, response.data[:2000]
    return response.headers["Location"].rsplit("/", 1)[-1]


def children(rt, batch_id: str) -> list[Run]:
    with rt.store.session() as s:
        return list(s.scalars(select(Run).where(Run.batch_id == batch_id)
                              .order_by(Run.record_id)))


def get_batch(rt, batch_id: str) -> Batch:
    with rt.store.session() as s:
        return s.get(Batch, batch_id)


def calls(rt, prefix: str) -> list[str]:
    return [c.split()[1] for c in read_calls(rt.settings.instance_dir)
            if c.split()[0] == prefix]


def test_a_batch_over_50_records_reports_progress_and_zips_50_results(operator, rt, form):
    add_records(rt, form, list(range(1, 51)))
    batch_id = start(operator, "export")
    first = operator.get(f"/admin/batches/{batch_id}/progress").json
    assert first["text"] == "0 of 50" and first["total"] == 50
    # One at a time by default: one job on the queue, the other 49 wait their turn.
    assert rt.dispatcher.queue.count == 1
    assert sorted(r.status for r in children(rt, batch_id)).count("waiting") == 49

    seen = []
    for _ in range(50):
        work(rt, max_jobs=1)
        seen.append(operator.get(f"/admin/batches/{batch_id}/progress").json["finished"])
    assert seen == list(range(1, 51))  # "n of m" moved up by one with every record

    done = get_batch(rt, batch_id)
    assert done.status == "done" and done.finished_at is not None
    page = operator.get(f"/admin/batches/{batch_id}")
    assert b"50 of 50" in page.data and b"Download all results" in page.data
    assert all(r.status == "done" for r in children(rt, batch_id))
    response = operator.get(f"/admin/batches/{batch_id}/results.zip")
    assert response.status_code == 200 and response.mimetype == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.data))
    names = archive.namelist()
    assert len(names) == 50 and len(set(names)) == 50
    assert archive.read(names[6]).decode() == "r06 = 7"
    with rt.store.session() as s:  # the owner hears once, not fifty times
        notes = list(s.scalars(select(Notification).where(Notification.owner.like("user:%"))))
    assert [n.message for n in notes] == ["Export: done; 50 of 50 done"]
    index = operator.get("/admin/batches")
    assert b"50 of 50" in index.data


def test_concurrency_starts_that_many_at_once(operator, rt, form):
    add_records(rt, form, [1] * 7)
    batch_id = start(operator, "export_fast")
    assert rt.dispatcher.queue.count == 3
    statuses = [r.status for r in children(rt, batch_id)]
    assert statuses.count("queued") == 3 and statuses.count("waiting") == 4
    work(rt)
    assert get_batch(rt, batch_id).status == "done"
    assert len(calls(rt, "fast")) == 7


def test_a_failed_child_does_not_stop_the_rest_by_default(operator, rt, form):
    add_records(rt, form, [1, 2, 9, 4, 5])
    batch_id = start(operator, "tolerant")
    work(rt)
    assert [r.status for r in children(rt, batch_id)] == ["done", "done", "dead", "done",
                                                         "done"]
    assert get_batch(rt, batch_id).status == "failed"
    assert calls(rt, "tolerant") == ["r00", "r01", "r03", "r04"]


def test_stop_on_error_cancels_the_remaining_children(operator, rt, form):
    add_records(rt, form, [1, 2, 9, 4, 5])
    batch_id = start(operator, "fragile")
    work(rt)
    runs = children(rt, batch_id)
    assert [r.status for r in runs] == ["done", "done", "dead", "cancelled", "cancelled"]
    assert calls(rt, "fragile") == ["r00", "r01"]
    assert get_batch(rt, batch_id).status == "stopped"
    reason = [e.detail for e in events_of(rt, runs[3].id) if e.event == "cancel"]
    assert reason == ["cancelled: an earlier item failed and the batch has stop_on_error: true"]
    assert b"stopped" in operator.get(f"/admin/batches/{batch_id}").data


def test_cancel_stops_the_running_child_and_the_waiting_ones(operator, rt, form):
    add_records(rt, form, [1, 2, 3, 4])
    batch_id = start(operator, "slow")

    def cancel_once_running() -> None:
        wait_until(lambda: any(r.status == "running" for r in children(rt, batch_id)),
                   timeout=60)
        page = operator.get(f"/admin/batches/{batch_id}")
        operator.post(f"/admin/batches/{batch_id}/cancel",
                      data={"csrf_token": tokens(page.data)["csrf_token"]})

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    work(rt)  # returns when the running child has stopped and nothing else was started
    canceller.join(60)

    runs = children(rt, batch_id)
    assert [r.status for r in runs] == ["cancelled"] * 4
    assert calls(rt, "slow") == ["r00"]  # started, then stopped at its next check
    first = [e.detail for e in events_of(rt, runs[0].id) if e.event == "cancel"]
    assert first[0].startswith("cancel requested by operator olga")
    done = get_batch(rt, batch_id)
    assert done.status == "cancelled" and done.finished_at is not None
    assert rt.dispatcher.queue.count == 0


def test_selected_records_and_a_filter(operator, rt, form):
    ids = add_records(rt, form, [1, 7, 8, 2, 9])
    picked = start(operator, "export_fast", records=[ids[0], ids[1], ids[2]],
                   where="record.amount > 5")
    assert [r.record_id for r in children(rt, picked)] == [ids[1], ids[2]]
    page = operator.get("/admin/batches/new/ledger/export_fast")
    bad = operator.post("/admin/batches/new/ledger/export_fast", data={
        "csrf_token": tokens(page.data)["csrf_token"], "where": "record.amunt > 5",
        "scope": "filter"})
    assert bad.status_code == 422
    assert b"Unknown field &#39;amunt&#39; in the filter (did you mean &#39;amount&#39;?)" \
        in bad.data


def test_a_lost_hook_does_not_stall_the_batch(operator, rt, form):
    """The reconciler's pass starts the next child if a worker died before its hook ran."""
    from formrules.runs.reconciler import reconcile_once

    add_records(rt, form, [1, 2])
    batch_id = start(operator, "export")
    first, second = children(rt, batch_id)
    rt.dispatcher.cancel(first.id)
    with rt.store.session() as s:  # the first child ended, but no hook told the batch
        s.get(Run, first.id).status = RunStatus.DONE.value
    assert second.status == "waiting" and rt.dispatcher.queue.count == 0

    reconcile_once(rt, schedules=False)

    assert children(rt, batch_id)[1].status == "queued"
    assert rt.dispatcher.queue.job_ids == [second.id]
    work(rt)
    assert get_batch(rt, batch_id).status == "done"


def test_batches_run_from_the_cli_and_wait_for_it(rt, form, subprocess_env):
    add_records(rt, form, [1, 6, 7, 2])
    cli = subprocess.Popen([sys.executable, "-m", "formrules.cli", "batches", "run", "ledger",
                            "export_fast", "--where", "record.amount > 5", "--wait"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=subprocess_env, cwd=ROOT)
    try:
        batch_id = cli.stdout.readline().strip()  # printed as soon as the batch exists
        assert get_batch(rt, batch_id).total == 2
        work(rt)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err
    assert "2 record(s), 3 at a time" in err and "2 of 2 finished (100%)" in err
    assert "batch done: 2 done" in err and "`formrules tasks` is now" not in err
    with rt.store.session() as s:
        assert batch.progress(s, s.get(Batch, batch_id))["text"] == "2 of 2"
    assert sorted(calls(rt, "fast")) == ["r01", "r02"]

    unknown = subprocess.run([sys.executable, "-m", "formrules.cli", "batches", "run", "ledger",
                              "export_fats"], capture_output=True, text=True,
                             env=subprocess_env, cwd=ROOT, timeout=120)
    assert unknown.returncode == 1
    assert ("error: form ledger has no batch 'export_fats' (did you mean 'export_fast'?)"
            in unknown.stderr)


def test_the_old_tasks_command_still_works_and_says_it_is_deprecated(rt, form,
                                                                    subprocess_env):
    listed = subprocess.run([sys.executable, "-m", "formrules.cli", "tasks", "list"],
                            capture_output=True, text=True, env=subprocess_env, cwd=ROOT,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "ledger export_fast  Export quickly  (concurrency 3)" in listed.stdout
    assert "`formrules tasks` is now `formrules batches`" in listed.stderr
    hidden = subprocess.run([sys.executable, "-m", "formrules.cli", "--help"],
                            capture_output=True, text=True, env=subprocess_env, cwd=ROOT,
                            timeout=120)
    assert "batches" in hidden.stdout and " tasks " not in hidden.stdout


def test_an_operator_batch_is_not_shown_on_the_submitters_waiting_page(app, operator, rt):
    submitter = app.test_client()
    page = submitter.get("/forms/ledger")
    response = submitter.post("/forms/ledger", data={**tokens(page.data), "name": "Ann"})
    token = response.headers["Location"].rsplit("/", 1)[-1]
    assert submitter.get(f"/r/{token}/status").json["done"] is True
    start(operator, "slow")
    status = submitter.get(f"/r/{token}/status").json
    assert status["done"] is True and status["runs"] == []
    assert status.get("other_runs", []) == []
