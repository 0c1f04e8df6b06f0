"""The submit service both the HTML form and the JSON API call: one record per submit
key (also when two requests race), nothing kept when a synchronous action fails."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from formrules.errors import ActionError
from formrules.language.loader import load_rules
from formrules.runs import submit
from formrules.store.models import Record, Run

GOOD = {"name": "Ann", "email": "ann@example.com", "count": 3}


def count(rt, model) -> int:
    with rt.store.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_the_same_submit_key_makes_one_record_even_when_requests_race(rt):
    form = load_rules(rt.settings.rules_dir).forms["demo"]
    results: list[submit.Submitted] = []
    start = threading.Barrier(4)

    def one() -> None:
        with rt.store.sessions() as s:
            start.wait()
            results.append(submit.accept(s, form, GOOD, owner="anon:x",
                                         settings=rt.settings, submit_key="k-1"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert sum(not r.duplicate for r in results) == 1
    assert len({r.record.token for r in results}) == 1
    assert all(not r.runs for r in results if r.duplicate)
    assert count(rt, Record) == 1 and count(rt, Run) == len(
        next(r for r in results if not r.duplicate).runs)


def test_a_failing_synchronous_action_keeps_nothing(rt):
    form = load_rules(rt.settings.rules_dir).forms["failing_sync"]
    with rt.store.sessions() as s, pytest.raises(ActionError):
        submit.accept(s, form, {"name": "Bo"}, owner="anon:y", settings=rt.settings,
                      submit_key="k-2")
    assert count(rt, Record) == 0 and count(rt, Run) == 0
