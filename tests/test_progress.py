"""Progress: set by actions and by `progress:` nodes, written with a throttle."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from formrules.process.runtime import Runtime, install
from formrules.store.models import RunStatus
from tests.helpers import runs_of, submit, token_of, work
from tests.web_helpers import add_web_rules


@pytest.fixture
def rules_dir(rules_dir):
    """The core test forms plus the page-test forms."""
    return add_web_rules(rules_dir)


def test_progress_node_sets_title_total_and_message(client, rt):
    token = token_of(submit(client, "packing", {"name": "Ann", "pieces": "4"}))
    work(rt)  # stops at the flaky step: retried in an hour, progress as the tree left it
    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.RETRYING
    assert (run.title, run.progress_done, run.progress_total, run.progress_message) == \
        ("Packing Ann's order", 1, 4, "Waiting for the courier")
    view = client.get(f"/r/{token}/status").json["runs"][0]
    assert (view["title"], view["progress"], view["message"]) == \
        ("Packing Ann's order", 25, "Waiting for the courier")


def test_action_progress_writes_are_throttled(client, rt):
    throttled = install(Runtime(rt.settings.with_overrides(progress_write_seconds=60)))
    token = token_of(submit(client, "chatty", {"name": "Bo"}))
    writes: list[str] = []

    @event.listens_for(throttled.store.engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE runs") and "progress_done" in statement \
                and "status" not in statement:  # not the final "done" write
            writes.append(statement)

    work(throttled)
    (run,) = runs_of(throttled, token)
    assert run.status == RunStatus.DONE and run.percent == 100
    # Fifty reports; at most the first and the final one (done == total) are written.
    assert 1 <= len(writes) <= 2, writes
    throttled.store.dispose()
