"""Retention: finished Runs past their form's period go, with their traces and files, in
bounded passes by the elected leader; what users still need stays.

The clock is moved with time-machine; the database is real (SQLite, and PostgreSQL when
configured) and so is Redis (the jobs run on a real RQ worker in this process)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from sqlalchemy import func, select

from formrules.config import from_env
from formrules.errors import ConfigError
from formrules.language.loader import parse_form
from formrules.process import metrics
from formrules.process.leader import Leader
from formrules.runs import purge
from formrules.runs.reconciler import reconcile_once
from formrules.store.models import Record, ResultFile, Run, RunEvent
from tests.helpers import submit, token_of, work

KEEP = """
form: keep
title: Kept a while
fields:
  - {name: name, type: string, required: true}
  - {name: fail, type: boolean, default: false}
  - {name: ready, type: boolean, hidden: true, default: false}
retention: {done: 1d, dead: 7d}
events:
  submit:
    - background:
        title: Report for {{ record.name }}
        flag: ready
        retry: false
        do:
          - if: "record.fail"
            then: [{explode: {permanent: true, safe: It broke.}}]
          - report: {filename: out.txt, content: "hello {{ record.name }}"}
"""
# A form without `retention:`: the deployment default applies (or nothing goes).
PLAIN = """
form: plain
fields: [{name: name, type: string, required: true}]
events:
  submit:
    - background: {title: Plain, do: [{log: plain}]}
"""
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def rules_dir(rules_dir):
    (rules_dir / "keep.yaml").write_text(KEEP)
    (rules_dir / "plain.yaml").write_text(PLAIN)
    return rules_dir


def counts(rt) -> tuple[int, int, int]:
    with rt.store.session() as s:
        return (s.scalar(select(func.count()).select_from(Run)),
                s.scalar(select(func.count()).select_from(RunEvent)),
                s.scalar(select(func.count()).select_from(ResultFile)))


def finished(client, rt, form: str, name: str, **extra) -> str:
    """Submit and run the work to its end; returns the record token."""
    token = token_of(submit(client, form, {"name": name, **extra}))
    work(rt)
    return token


def run_status(rt, token: str) -> list[str]:
    with rt.store.session() as s:
        return list(s.scalars(select(Run.status).join(Record, Record.id == Run.record_id)
                              .where(Record.token == token)))


def test_old_runs_files_and_traces_go_young_ones_stay(client, rt):
    with time_machine.travel(T0, tick=True):
        old_done = finished(client, rt, "keep", "old")
        old_dead = finished(client, rt, "keep", "broken", fail="y")
    assert run_status(rt, old_done) == ["done"] and run_status(rt, old_dead) == ["dead"]
    with time_machine.travel(T0 + timedelta(hours=30), tick=True):
        young = finished(client, rt, "keep", "young")
        before = counts(rt)
        assert before[2] == 2  # two reports
        done = purge.purge_due(rt)
        # The day-old done Run went, with its trace and its file; the dead one (7d) and
        # the young one stayed.
        assert (done.runs, done.files) == (1, 1) and done.events >= 3
        assert run_status(rt, old_done) == [] and run_status(rt, old_dead) == ["dead"]
        assert run_status(rt, young) == ["done"]
        assert counts(rt) == (before[0] - 1, before[1] - done.events, 1)
        # Its page says the work's details are gone, not "done"; the values stay.
        page = client.get(f"/r/{old_done}/status").get_json()
        assert page["state"] == "expired" and page["record"]["name"] == "old"
        assert client.get(f"/r/{young}/status").get_json()["state"] == "done"
    with time_machine.travel(T0 + timedelta(days=8), tick=True):
        assert purge.purge_due(rt).runs == 2  # the dead one and the (now old) young one
        assert run_status(rt, old_dead) == [] and counts(rt) == (0, 0, 0)


def test_a_pass_is_bounded_and_the_next_goes_on(client, rt, settings):
    with time_machine.travel(T0, tick=True):
        for i in range(5):
            finished(client, rt, "keep", f"n{i}")
    rt.settings = settings.with_overrides(purge_batch=2)
    with time_machine.travel(T0 + timedelta(days=2), tick=True):
        assert [purge.purge_due(rt).runs for _ in range(4)] == [2, 2, 1, 0]


def test_runs_of_a_record_still_awaited_stay(client, rt):
    """A finished Run of a record whose awaited work is still open is kept: the waiting
    page adds up every awaited Run of the record."""
    with time_machine.travel(T0, tick=True):
        token = finished(client, rt, "keep", "pair")
        with rt.store.session() as s:
            first = s.scalar(select(Run).join(Record, Record.id == Run.record_id)
                             .where(Record.token == token))
            # A second awaited Run of the same record, still queued (not worked).
            s.add(Run(record_id=first.record_id, form_id="keep", owner=first.owner,
                      kind="background", node_path="events/submit/1", title="Second",
                      snapshot=first.snapshot, status="queued", awaited="true"))
    with time_machine.travel(T0 + timedelta(days=3), tick=True):
        assert purge.purge_due(rt).runs == 0
        assert sorted(run_status(rt, token)) == ["done", "queued"]


def test_the_deployment_default_applies_to_forms_without_the_key(client, rt, settings):
    with time_machine.travel(T0, tick=True):
        plain = finished(client, rt, "plain", "p")
    with time_machine.travel(T0 + timedelta(days=40), tick=True):
        assert purge.purge_due(rt).runs == 0
        assert run_status(rt, plain) == ["done"]  # no default: kept forever
        rt.settings = settings.with_overrides(retention="done=30d")
        assert purge.purge_due(rt).runs == 1
        assert run_status(rt, plain) == []


def test_only_the_leader_purges(client, rt, settings):
    with time_machine.travel(T0, tick=True):
        tokens = [finished(client, rt, "keep", f"l{i}") for i in range(2)]
    with time_machine.travel(T0 + timedelta(days=2), tick=True):
        first, second = Leader(settings), Leader(settings)
        first.step()  # elected: its pass purges
        assert first.leading and all(run_status(rt, t) == [] for t in tokens)
        later = finished(client, rt, "keep", "later")
    with time_machine.travel(T0 + timedelta(days=4), tick=True):
        try:
            second.step()  # not elected while the first holds the lease: no pass
            assert not second.leading and run_status(rt, later) == ["done"]
            first.next_pass = 0
            first.step()
            assert run_status(rt, later) == []
            text = metrics.exposition().decode()
            assert 'formrules_purged_total{kind="runs"}' in text
        finally:
            first.resign(), second.resign()
            first.rt.store.dispose(), second.rt.store.dispose()


def test_the_reconciler_pass_counts_purged_runs(client, rt):
    with time_machine.travel(T0, tick=True):
        finished(client, rt, "keep", "r")
    with time_machine.travel(T0 + timedelta(days=2), tick=True):
        assert reconcile_once(rt, schedules=False).purged == 1


def test_retention_is_checked_with_positions():
    bad = KEEP.replace("retention: {done: 1d, dead: 7d}",
                       "retention: {done: 1d, daed: 7d, cancelled: forevr, skipped: 5s}")
    _, problems = parse_form(bad, "keep.yaml")
    text = [str(p) for p in problems]
    assert any("keep.yaml:8:" in t and "unknown status 'daed'" in t and
               "did you mean 'dead'" in t for t in text), text
    assert any("retention/cancelled" in t and "did you mean 'forever'" in t for t in text)
    assert any("retention/skipped" in t and "at least 1m" in t for t in text)
    form, problems = parse_form(KEEP.replace("retention: {done: 1d, dead: 7d}",
                                             "retention: forever"), "keep.yaml")
    assert not problems and set(form.retention.values()) == {None}


def test_the_deployment_setting_is_checked():
    assert from_env({"FORMRULES_RETENTION": "done=30d,dead=90d"}, secret_key="x").retention
    with pytest.raises(ConfigError, match="FORMRULES_RETENTION"):
        from_env({"FORMRULES_RETENTION": "done=30d,finished=2d"}, secret_key="x")
