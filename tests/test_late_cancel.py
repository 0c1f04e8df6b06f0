"""A cancel in the last seconds of a Run (issue 8.3): asked for while the step before the
last runs, or while the last one runs, on a real worker whose heartbeat is far away (the
default 5 s): no later step starts, the flag stays unset, no e-mail, no "done" notice."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from formrules.store.models import Notification, Run, RunStatus
from tests.fixture_actions import read_calls
from tests.helpers import (
    WorkerProcess,
    events_of,
    record_of,
    runs_of,
    submit,
    token_of,
    wait_until,
)
from tests.web_helpers import post


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before_last", "last"])
def test_a_cancel_near_the_end_stops_before_the_next_step_and_the_flag(
        client, rt, subprocess_env, where):
    env = {**subprocess_env, "FORMRULES_HEARTBEAT": "5", "FORMRULES_STALE_AFTER": "60"}
    instance = Path(rt.settings.instance_dir)
    with WorkerProcess(env, "--no-reconciler", "--simple"):
        token = token_of(submit(client, "late_cancel",
                                {"name": "Ann", "email": "ann@example.com", "where": where}))
        (run,) = runs_of(rt, token)
        held = "first" if where == "before_last" else "last"
        wait_until(lambda: any(line.startswith(held)
                               for line in read_calls(rt.settings.instance_dir)), timeout=60)

        response = post(client, f"/tasks/{run.id}/cancel", follow_redirects=True)
        assert "Stopping" in response.get_data(as_text=True)
        (instance / f"release-{held}").touch()  # the held step ends well before a heartbeat

        def ended():
            with rt.store.session() as s:
                return s.get(Run, run.id).status in (RunStatus.CANCELLED, RunStatus.DONE)

        wait_until(ended, timeout=30)

    (run,) = runs_of(rt, token)
    assert run.status == RunStatus.CANCELLED
    calls = [line.split()[0] for line in read_calls(rt.settings.instance_dir)]
    assert calls == ["first"] if where == "before_last" else ["first", "last"]
    assert record_of(rt, token).data["done"] is False
    assert not list(rt.settings.outbox_dir.glob("*.eml"))
    events = [e.event for e in events_of(rt, run.id)]
    assert "finish" not in events and events[-1] == "cancel"
    with rt.store.session() as s:
        levels = list(s.scalars(select(Notification.level).where(Notification.run_id == run.id)))
    assert "success" not in levels
    page = client.get("/tasks").get_data(as_text=True)
    assert "Cancelled" in page
