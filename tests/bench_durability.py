"""Benchmark: Runs survive workers SIGKILLed at random moments, each step done once.

Not a test (pytest does not collect it). Run it from the repository root:

    .venv/bin/python tests/bench_durability.py [--runs 200] [--workers 4] [--kills 6]
    .venv/bin/python tests/bench_durability.py --idle [--pending 100000]

`--idle` measures what an idle deployment costs instead: the duration of a reconciler
pass (and of a leader tick) with N pending future Delays in the database, before and
after Redis loses its data, and the resident memory of an idle worker (every process).

It starts a private Redis and a SQLite database in a temporary folder, submits N Runs of
three checkpointed steps (the outbox path the web uses), runs W real worker processes,
and every few seconds SIGKILLs a random worker (preferring a busy one: its guard, the
worker running the job and its leader thread die together) and starts a replacement.
When every Run is finished (or a limit passes) it prints: runs, kills, lost Runs,
duplicated steps and recovery times (kill → the interrupted Run claimed again by another
worker). Figures vary with the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rq import Worker  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from formrules.config import from_env  # noqa: E402
from formrules.language.loader import load_rules  # noqa: E402
from formrules.process.redis_server import RedisServer  # noqa: E402
from formrules.process.runtime import Runtime, install  # noqa: E402
from formrules.runs.engine import submit  # noqa: E402
from formrules.store.models import Run, RunEvent, RunStatus, utcnow  # noqa: E402
from tests.fixture_actions import read_calls  # noqa: E402
from tests.helpers import WorkerProcess  # noqa: E402

RULE = """
form: bench
title: Durability bench
fields:
  - {name: n, type: integer}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Three steps
        flag: done
        do:
          - record_call: {name: s1, sleep: 0.1}
          - record_call: {name: s2, sleep: 0.4}
          - record_call: {name: s3, sleep: 0.1}
"""
HEARTBEAT, STALE, RECONCILE = 0.5, 3.0, 1.0


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit", type=float, default=100, help="seconds to wait at most")
    parser.add_argument("--verbose", action="store_true", help="print each kill's Run trace")
    parser.add_argument("--idle", action="store_true",
                        help="measure an idle reconciler pass and an idle worker's memory")
    parser.add_argument("--pending", type=int, default=100_000,
                        help="with --idle: pending future Delays in the database")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print("command:", " ".join([os.path.relpath(sys.executable, ROOT),
                                os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    print(f"settings: heartbeat {HEARTBEAT}s, stale after {STALE}s, reconcile every "
          f"{RECONCILE}s -> recovery bound {STALE + RECONCILE}s after the last heartbeat")

    with tempfile.TemporaryDirectory(prefix="formrules-bench-") as tmp:
        base = Path(tmp)
        (base / "rules").mkdir()
        (base / "rules" / "bench.yaml").write_text(RULE)
        with RedisServer(base / "redis", persist=False) as redis_server:
            env = {**os.environ,
                   "FORMRULES_RULES": str(base / "rules"),
                   "FORMRULES_INSTANCE": str(base / "instance"),
                   "DATABASE_URL": f"sqlite:///{base}/bench.db",
                   "REDIS_URL": redis_server.url, "SECRET_KEY": "bench",
                   "FORMRULES_ACTIONS": "tests.fixture_actions",
                   "FORMRULES_HEARTBEAT": str(HEARTBEAT),
                   "FORMRULES_STALE_AFTER": str(STALE),
                   "FORMRULES_RECONCILE": str(RECONCILE),
                   "FORMRULES_PROGRESS_INTERVAL": "1",
                   "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            rt = install(Runtime(from_env(env)))
            rt.store.create_all()
            figures = idle(rt, env, args) if args.idle else bench(rt, env, args, rng)
    print(figures)


def bench(rt: Runtime, env: dict[str, str], args: argparse.Namespace,
          rng: random.Random) -> str:
    """Submit, work, kill, wait; return the figures as text."""
    form = load_rules(rt.settings.rules_dir).form("bench")
    began = time.monotonic()
    workers = [WorkerProcess(env).start() for _ in range(args.workers)]
    with rt.store.session() as s:  # the outbox: records and Runs in one transaction …
        runs = [run for i in range(args.runs)
                for run in submit(s, form, {"n": i}, owner="bench", settings=rt.settings)[1]]
    rt.dispatcher.dispatch_all(runs)  # … enqueued after commit
    kills: list[tuple[float, str | None]] = []  # (epoch seconds, run id it was running)
    try:
        while len(kills) < args.kills and unfinished(rt):
            time.sleep(rng.uniform(2.0, 5.0))
            busy = current_jobs(rt)  # by the pid of the process running jobs: the guard's child
            candidates = [w for w in workers if w.child() in busy] or workers
            victim = rng.choice(candidates)
            running = busy.get(victim.child())
            victim.kill()
            kills.append((utcnow().timestamp(), running))
            victim.stop()
            workers[workers.index(victim)] = WorkerProcess(env).start()
        deadline = time.monotonic() + args.limit
        while unfinished(rt) and time.monotonic() < deadline:
            time.sleep(0.25)
        elapsed = time.monotonic() - began
    finally:
        for worker in workers:
            worker.stop()
    if args.verbose:
        for killed_at, run_id in kills:
            print(f"kill at {killed_at:.2f} during run {run_id}")
            with rt.store.session() as s:
                for ev in s.scalars(select(RunEvent).where(RunEvent.run_id == (run_id or ""))
                                    .order_by(RunEvent.id)):
                    print(f"  {ev.at.timestamp() - killed_at:+6.2f}s {ev.event:<8} "
                          f"{ev.path or '-'} {ev.detail.splitlines()[0] if ev.detail else ''}")
    return figures(rt, args.runs, kills, elapsed)


def idle(rt: Runtime, env: dict[str, str], args: argparse.Namespace) -> str:
    """Idle costs: a reconciler pass and a tick over N future Delays; a worker's RSS."""
    from datetime import timedelta

    from sqlalchemy import insert

    from formrules.process.leader import Leader
    from formrules.runs.reconciler import dispatch_due, reconcile_once
    from tests.helpers import descendants, wait_until

    later = utcnow() + timedelta(days=1)
    rows = [dict(id=f"{i:032x}", form_id="bench", owner="bench", kind="delay",
                 node_path="events/submit/0/delay", title="Later", snapshot={"raw": {}},
                 status=RunStatus.SCHEDULED.value, due_at=later + timedelta(seconds=i))
            for i in range(args.pending)]
    with rt.store.session() as s:
        for start in range(0, len(rows), 10_000):
            s.execute(insert(Run), rows[start:start + 10_000])
    leader_rt = Leader(rt.settings).rt  # unbounded, as the leader runs it

    def timed(fn, n=5) -> str:
        times = []
        for _ in range(n):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return f"median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"

    lines = [f"pending future Delays: {args.pending}",
             f"idle reconciler pass: {timed(lambda: reconcile_once(leader_rt))}",
             f"idle leader tick:     {timed(lambda: dispatch_due(leader_rt), 20)}"]
    rt.redis.flushall()  # Redis lost its data: nothing is due, so nothing to re-dispatch yet
    lines.append(f"pass after FLUSHALL:  {timed(lambda: reconcile_once(leader_rt))}")
    worker = WorkerProcess(env).start()
    try:
        wait_until(lambda: len(rt.redis.smembers("rq:workers")) >= 1, timeout=60)
        time.sleep(3)  # a few idle ticks and one pass
        pids = [worker.process.pid, *descendants(worker.process.pid)]
        rss = {pid: _rss_kib(pid) for pid in pids}
    finally:
        worker.stop()
    lines.append(f"idle worker: {len(pids)} process(es), RSS "
                 f"{sum(rss.values()) / 1024:.0f} MiB in total")
    return "\n".join(lines)


def _rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def unfinished(rt: Runtime) -> int:
    """Runs not finished yet."""
    with rt.store.session() as s:
        return s.scalar(select(func.count()).select_from(Run).where(
            Run.status.not_in([RunStatus.DONE.value, RunStatus.DEAD.value])))


def current_jobs(rt: Runtime) -> dict[int, str]:
    """Worker pid -> the job (Run) it is executing right now."""
    busy = {}
    for worker in Worker.all(queue=rt.dispatcher.queue):
        job_id = worker.get_current_job_id()
        if job_id and worker.pid:
            busy[worker.pid] = job_id
    return busy


def figures(rt: Runtime, total: int, kills: list[tuple[float, str | None]],
            elapsed: float) -> str:
    """Count what happened, from the database (checkpoints) and the actions' own log."""
    with rt.store.session() as s:
        statuses = Counter(s.scalars(select(Run.status)))
        events = list(s.execute(select(RunEvent.run_id, RunEvent.path, RunEvent.event,
                                       RunEvent.at).order_by(RunEvent.id)))
    executions = Counter(line.split()[1] for line in read_calls(rt.settings.instance_dir))
    dones = Counter()
    claims: dict[str, list[float]] = {}
    recovered: dict[str, list[float]] = {}
    for run_id, path, event, at in events:
        if path and event == "checkpoint":
            dones[f"{run_id}:{path}"] += 1
        elif not path and event == "start":
            claims.setdefault(run_id, []).append(at.timestamp())
        elif event == "recover":
            recovered.setdefault(run_id, []).append(at.timestamp())
    recoveries = sum(len(times) for times in recovered.values())
    # A step may run again only if an execution of it was cut off by a kill (it ran, its
    # checkpoint never came): at most one step per kill. More re-runs than that, or a step
    # checkpointed twice, would be a completed step run again.
    rerun = sum(n - 1 for n in executions.values() if n > 1)
    duplicated = max(0, rerun - len(kills))
    duplicated += sum(n - 1 for n in dones.values() if n > 1)
    requeued, resumed = [], []
    for killed_at, run_id in kills:
        for found, into in ((recovered, requeued), (claims, resumed)):
            later = [t for t in found.get(run_id or "", []) if t > killed_at]
            if later:
                into.append(later[0] - killed_at)
    lost = total - statuses.get(RunStatus.DONE.value, 0)
    return "\n".join([
        f"runs: {total}  done: {statuses.get(RunStatus.DONE.value, 0)}  lost: {lost}  "
        f"(dead: {statuses.get(RunStatus.DEAD.value, 0)})",
        f"kills: {len(kills)} SIGKILLs of whole workers ({sum(1 for _, r in kills if r)} "
        f"mid-Run); Runs recovered by heartbeat: {recoveries}",
        f"steps: {sum(dones.values())} checkpoints for {3 * total} steps; "
        f"{sum(executions.values())} real executions: {rerun} interrupted step(s) re-run, "
        f"{duplicated} completed step(s) duplicated",
        f"recovery time, kill -> Run re-enqueued by the reconciler: {spread(requeued)}",
        f"recovery time, kill -> Run resumed on another worker:   {spread(resumed)}",
        f"total time: {elapsed:.1f}s",
    ])


def spread(times: list[float]) -> str:
    """Median and max of some durations, in seconds."""
    if not times:
        return "-"
    return f"median {statistics.median(times):.1f}s, max {max(times):.1f}s ({len(times)} Runs)"


if __name__ == "__main__":
    main()
