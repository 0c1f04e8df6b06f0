"""Several machines (issue 10.5): two web processes and three workers on one database and
one Redis, each its own process group, as they would run on separate machines.

Every Run executes once, each schedule slot fires once, and the reconciler's duties are
done by one elected worker at a time: kill the leader and another takes over.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections import Counter

import pytest
from sqlalchemy import select

from formrules.process.leader import leader_of
from formrules.process.redis_server import free_port
from formrules.store.models import Run, RunEvent, RunStatus, ScheduleSlot
from tests.fixture_actions import read_calls
from tests.helpers import ROOT, WorkerProcess, wait_until

RULES = {
    "steps": """
form: steps
title: Steps
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Three steps
        flag: done
        do:
          - record_call: {name: "a-{{ record.name }}"}
          - record_call: {name: "b-{{ record.name }}", sleep: 1}
          - record_call: {name: "c-{{ record.name }}"}
""",
    "minutely": """
form: minutely
fields: [{name: n, type: string}]
schedules:
  - {name: tick, cron: '* * * * *', do: [{record_call: {name: tick}}]}
""",
}


class Web:
    """`formrules web` in a process group of its own."""

    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "formrules.cli", "web", "--port", str(self.port)],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def up(self) -> bool:
        """True once it answers."""
        try:
            with urllib.request.urlopen(f"{self.base}/forms/steps", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def submit(self, form: str, data: dict[str, str]) -> str:
        """Submit like a browser (form page, then POST with its tokens); the record URL."""
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with opener.open(f"{self.base}/forms/{form}", timeout=10) as response:
            page = response.read()
        fields = {name: re.search(rb'name="' + name.encode()
                                  + rb'" type="hidden" value="([^"]*)"', page).group(1).decode()
                  for name in ("csrf_token", "submit_key")}
        with opener.open(f"{self.base}/forms/{form}",
                         urllib.parse.urlencode({**fields, **data}).encode(),
                         timeout=30) as response:
            return response.url

    def stop(self) -> None:
        """SIGTERM its group and wait."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def identity(worker: WorkerProcess) -> str:
    """The lease holder name a worker uses (its in-process child's pid, by default)."""
    return f"{os.uname().nodename}:{worker.pid}"


@pytest.mark.slow
def test_two_webs_three_workers_one_leader_each_run_once_leader_killed(
        rt, rules_dir, subprocess_env):
    for name, text in RULES.items():
        (rules_dir / f"{name}.yaml").write_text(text.lstrip())
    env = {**subprocess_env, "FORMRULES_LEADER_LEASE": "2"}
    webs = [Web(env) for _ in range(2)]
    workers = [WorkerProcess(env).start() for _ in range(3)]
    try:
        for web in webs:
            wait_until(web.up, timeout=60, interval=0.2)
        by_id = {identity(w): w for w in workers}
        leader_id = wait_until(lambda: leader_of(rt) in by_id and leader_of(rt), timeout=60)
        leader = by_id[leader_id]
        urls = [webs[i % 2].submit("steps", {"name": f"r{i}"}) for i in range(12)]
        wait_until(lambda: sum(1 for line in read_calls(rt.settings.instance_dir)
                               if line.startswith("c-")) >= 3, timeout=90)
        leader.kill()  # its machine is gone: the lease runs out, another worker takes over
        successor = wait_until(lambda: leader_of(rt) in by_id and leader_of(rt) != leader_id
                               and leader_of(rt), timeout=30)
        assert by_id[successor] is not leader and by_id[successor].process.poll() is None
        urls += [webs[i % 2].submit("steps", {"name": f"s{i}"}) for i in range(6)]

        def finished() -> bool:
            with rt.store.session() as s:
                return all(status == RunStatus.DONE.value
                           for status in s.scalars(select(Run.status)))

        wait_until(finished, timeout=180, interval=0.5)
    finally:
        for web in webs:
            web.stop()
        for worker in workers:
            worker.stop()
    assert len(urls) == 18
    with rt.store.session() as s:
        runs = list(s.scalars(select(Run)))
        events = list(s.execute(select(RunEvent.run_id, RunEvent.path, RunEvent.event)))
        slots = list(s.scalars(select(ScheduleSlot).where(
            ScheduleSlot.schedule_key == "minutely/tick")))
    steps = [r for r in runs if r.form_id == "steps"]
    assert len(steps) == 18 and all(r.status == RunStatus.DONE for r in steps)
    # Each Run finished once and each of its steps was checkpointed once.
    finishes = Counter(run_id for run_id, _, event in events if event == "finish")
    # A schedule slot may fire in the moment between the last check and the stop: that
    # newest tick is the only Run allowed not to have run yet.
    late = [r for r in runs if r.status != RunStatus.DONE]
    assert len(late) <= 1 and all(r.form_id == "minutely" for r in late), late
    assert set(finishes.values()) == {1} and len(finishes) == len(runs) - len(late)
    checkpoints = Counter((run_id, path) for run_id, path, event in events if event == "checkpoint")
    assert set(checkpoints.values()) == {1}
    calls = Counter(line.split()[0] for line in read_calls(rt.settings.instance_dir))
    # Only the step the killed leader was in the middle of may have run a second time.
    assert sum(n - 1 for name, n in calls.items() if name != "tick") <= 1, calls
    assert all(calls[f"{step}-{r}"] >= 1 for step in "abc"
               for r in [*(f"r{i}" for i in range(12)), *(f"s{i}" for i in range(6))])
    # Each schedule slot fired once, whichever worker led at the time.
    ticks = [r for r in runs if r.form_id == "minutely"]
    assert slots and len({slot.slot_at for slot in slots}) == len(slots) == len(ticks)
    assert calls["tick"] == len(ticks) - len(late)
