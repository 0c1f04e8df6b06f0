"""Benchmark: formrules beside the hand-written Flask + RQ it replaces, in one interleaved run.

Not a test (pytest does not collect it). Run it from the repository root:

    .venv/bin/python tests/bench_compare.py [--db sqlite,postgres] [--rounds 5]
        [--submits 20] [--drain 40] [--flags 8] [--delays 20] [--poll 1.5]
        [--base /path/to/other/checkout]

Systems: formrules (this checkout; `--base` adds another checkout as `formrules@base`,
e.g. the commit before a change), the hand-written peer (tests/peer: a Flask-WTF form
that stores a row and enqueues an RQ job that sets a flag, and a status endpoint), raw
RQ no-op jobs and a Flask hello route. Each web app runs in its own process
(tests/bench_agent.py); every measure is taken in rounds that visit the systems in turn
(rotating the order), so machine noise falls on all of them alike. A private
redis-server on a free port; SQLite files in a temp folder and, for `postgres`, one
schema per system in $FORMRULES_TEST_POSTGRES (default
postgresql+psycopg://postgres@127.0.0.1:5432/test), dropped at the end.
Prints medians and ratios; figures vary with the machine, compare within one run.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.utils import str_to_date

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.bench_submit import BENCH_RULES  # noqa: E402

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TOKEN = re.compile(rb'name="(csrf_token|submit_key)" type="hidden" value="([^"]*)"')
RULES = {
    "quick.yaml": BENCH_RULES["quick.yaml"],  # the flag form bench_submit.py times
    "later.yaml": """
form: later
title: Later
fields:
  - {name: name, type: string, required: true}
  - {name: when, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - delay:
        title: Later work
        at: "record.when"
        flag: done
        do:
          - set: {name: fired}
""",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def wait_for(check, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what}")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Browser:
    """A cookie-keeping HTTP client that submits a form the way a browser does."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), NoRedirect())

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    def submit(self, path: str, name: str) -> tuple[str, float]:
        """GET then POST the form; (the status page path, seconds the POST took)."""
        data = {k.decode(): v.decode() for k, v in TOKEN.findall(self.get(path)[1])}
        data["name"] = name
        body = urllib.parse.urlencode(data).encode()
        began = time.perf_counter()
        try:
            self.opener.open(self.base + path, body, timeout=30)
            raise RuntimeError("expected a 303")
        except urllib.error.HTTPError as exc:
            took = time.perf_counter() - began
            if exc.code != 303:
                raise RuntimeError(f"{path}: submit answered {exc.code}") from exc
            return urllib.parse.urlsplit(exc.headers["Location"]).path, took


class Agent:
    """A web app in its own process (tests/bench_agent.py), served on a free port."""

    def __init__(self, kind: str, env: dict, tree: Path = ROOT):
        self.kind, self.port = kind, free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "bench_agent.py"), kind, str(self.port),
             str(tree)], env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        hello = json.loads(self.proc.stdout.readline())
        assert hello["ready"], hello
        self.module = hello["module"]
        self.browser = Browser(f"http://127.0.0.1:{self.port}")

    def call(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["out"]

    def stop(self) -> None:
        with suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tree_rss(pid: int) -> float:
    """RSS of a process and all its descendants, MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class System:
    """One contender: how to start its worker and where its jobs live in Redis."""

    def __init__(self, name: str, redis_url: str, queue: str, env: dict,
                 agent: Agent | None = None, tree: Path = ROOT):
        self.name, self.redis_url, self.queue, self.env = name, redis_url, queue, env
        self.agent, self.tree = agent, tree
        self.redis = Redis.from_url(redis_url)
        self.worker: subprocess.Popen | None = None

    def worker_cmd(self, simple: bool | None, burst: bool) -> list[str]:
        """simple: True RQ's SimpleWorker, False its forking Worker, None the system's
        default (formrules: in-process under a guard; the others: the forking Worker)."""
        flags = (["--simple"] if simple else []) + (["--burst"] if burst else [])
        if self.name.startswith("formrules"):
            if simple is False and self.guarded():
                flags.append("--fork")
            return [sys.executable, str(self.tree / "worker.py"), *flags]
        if self.name == "peer":
            return [sys.executable, "-m", "tests.peer.worker", *flags]
        cls = "rq.worker.SimpleWorker" if simple else "rq.worker.Worker"
        return [sys.executable, "-m", "rq.cli", "worker", "-u", self.redis_url, "-w", cls,
                "-q", *(["--burst"] if burst else []), "--with-scheduler", self.queue]

    def guarded(self) -> bool:
        """Does this formrules checkout's default worker run jobs in-process (guarded)?"""
        return (self.tree / "formrules" / "process" / "guard.py").exists()

    def start_worker(self, simple: bool | None = None, burst: bool = False) -> subprocess.Popen:
        return subprocess.Popen(self.worker_cmd(simple, burst), env=self.env, cwd=self.tree,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def enqueue_noops(self, n: int) -> None:
        q = Queue(self.queue, connection=self.redis)
        with self.redis.pipeline() as pipe:
            for _ in range(n):
                q.enqueue("tests.peer.noop.noop", pipeline=pipe)
            pipe.execute()

    def fill(self, n: int) -> None:
        """Queue n jobs of this system's kind (with no worker running)."""
        if self.name == "raw RQ":
            self.enqueue_noops(n)
        else:
            self.agent.call(cmd="inproc", n=n)

    def drain(self, simple: bool | None) -> float:
        """Run a burst worker over the queued jobs; jobs/s from the jobs' own timestamps."""
        self.start_worker(simple=simple, burst=True).wait(600)
        registry = FinishedJobRegistry(self.queue, connection=self.redis)
        ids = registry.get_job_ids()
        spans = []
        for job_id in ids:
            started, ended = self.redis.hmget(Job.key_for(job_id), "started_at", "ended_at")
            if started and ended:
                spans.append((str_to_date(started), str_to_date(ended)))
            self.redis.delete(Job.key_for(job_id))
            registry.remove(job_id)
        if len(spans) < 2:
            return float("nan")
        first = min(s for s, _ in spans)
        last = max(e for _, e in spans)
        return len(spans) / max(1e-6, (last - first).total_seconds())


def make_env(tmp: Path, name: str, db: str, redis_url: str, pg_schema_url) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORMRULES", "DATABASE"))}
    env.update({"PYTHONPATH": str(ROOT), "SECRET_KEY": "bench", "PEER_SECRET_KEY": "bench",
                "REDIS_URL": redis_url, "PEER_REDIS_URL": redis_url})
    if db == "sqlite":
        url = f"sqlite:///{tmp}/{name}.db"
    else:
        url = pg_schema_url(name)
    env["DATABASE_URL"] = env["PEER_DATABASE_URL"] = url
    env["FORMRULES_RULES"] = str(tmp / "rules")
    env["FORMRULES_INSTANCE"] = str(tmp / f"instance-{name}")
    return env


MEASURES = ("submits", "drains", "flags", "delays", "polls", "rss")


def rotate(items: list, r: int) -> list:
    return items[r % len(items):] + items[:r % len(items)]


def run_db(db: str, args, tmp: Path, redis_port: int) -> None:
    schemas: list[str] = []
    admin = None
    pg = os.environ.get("FORMRULES_TEST_POSTGRES") or PG_DEFAULT

    def pg_schema_url(name: str) -> str:
        schema = f"bench_{re.sub(r'[^a-z0-9]', '_', name)}_{uuid.uuid4().hex[:6]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        schemas.append(schema)
        sep = "&" if "?" in pg else "?"
        return f"{pg}{sep}options=-csearch_path%3D{schema}"

    if db == "postgres":
        from sqlalchemy import create_engine
        admin = create_engine(pg, isolation_level="AUTOCOMMIT")

    trees = [("formrules", ROOT)] + ([("formrules@base", Path(args.base))] if args.base else [])
    systems: list[System] = []
    agents: list[Agent] = []
    dbn = 0
    try:
        for name, tree in trees:
            dbn += 1
            url = f"redis://127.0.0.1:{redis_port}/{dbn}"
            env = make_env(tmp, name.replace("@", "_"), db, url, pg_schema_url)
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(tree), str(ROOT)]))
            agent = Agent("formrules", env, tree)
            agents.append(agent)
            systems.append(System(name, url, "formrules", env, agent, tree))
        for name, kind, queue in (("peer", "peer", "peer"), ("raw RQ", None, "raw")):
            dbn += 1
            url = f"redis://127.0.0.1:{redis_port}/{dbn}"
            env = make_env(tmp, name.replace(" ", "_"), db, url, pg_schema_url)
            agent = Agent(kind, env) if kind else None
            if agent:
                agents.append(agent)
            systems.append(System(name, url, queue, env, agent))
        hello = Agent("hello", make_env(tmp, "hello", "sqlite", "", pg_schema_url))
        agents.append(hello)
        web = [s for s in systems if s.agent]
        print(f"\n== {db}: " + ", ".join(
            f"{s.name}" + (f" ({Path(s.agent.module).parents[1]})" if s.agent.module else "")
            for s in web), flush=True)
        res: dict[tuple[str, str], list[float]] = {}

        def add(measure: str, system: str, values) -> None:
            res.setdefault((measure, system), []).extend(
                values if isinstance(values, list) else [values])

        # Warm every app once (first requests import templates, fill statement caches).
        for s in web:
            s.agent.call(cmd="inproc", n=3)
            s.agent.browser.submit(
                "/forms/quick" if s.name.startswith("formrules") else "/quick", "warm")
        only = set(args.only.split(","))
        for r in range(args.rounds if "submits" in only else 0):
            for s in rotate(web, r):
                add("submit_inproc", s.name, s.agent.call(cmd="inproc", n=args.submits))
            for s in rotate(web, r):
                path = "/forms/quick" if s.name.startswith("formrules") else "/quick"
                add("submit_http", s.name,
                    [s.agent.browser.submit(path, f"h{i}")[1] for i in range(args.submits)])
        print("submits measured", flush=True)

        # Drain: clear the submit backlog untimed, then timed rounds per worker class.
        for s in systems:
            if s.name != "raw RQ":
                s.drain(simple=True)
        for simple in (False, True, None) if "drains" in only else ():
            key = {False: "drain_fork", True: "drain_simple", None: "drain_default"}[simple]
            for r in range(args.rounds):
                for s in rotate(systems, r):
                    if simple is None and not s.name.startswith("formrules"):
                        continue  # the others' default is the forking Worker (above)
                    s.fill(args.drain)
                    add(key, s.name, s.drain(simple))
        print("drains measured", flush=True)

        # Default workers up for the rest.
        for s in systems:
            s.worker = s.start_worker()
        from rq import Worker
        for s in systems:
            # A loaded machine took more than a minute to start a warm worker.
            wait_for(lambda s=s: Worker.all(connection=s.redis), 180, f"{s.name} worker")
        time.sleep(1)
        tokens: dict[str, str] = {}
        for r in range(args.flags if only & {"flags", "polls"} else 0):
            for s in rotate(systems, r):
                if s.name == "raw RQ":
                    q = Queue(s.queue, connection=s.redis)
                    began = time.perf_counter()
                    job = q.enqueue("tests.peer.noop.noop")
                    wait_for(lambda j=job: j.get_status(refresh=True) == "finished", 30,
                             "raw job", step=0.005)
                    add("flag", s.name, time.perf_counter() - began)
                    continue
                form = "/forms/quick" if s.name.startswith("formrules") else "/quick"
                path, _ = s.agent.browser.submit(form, f"f{r}")
                began = time.perf_counter()

                def flagged(s=s, path=path):
                    code, raw = s.agent.browser.get(path + "/status")
                    if code != 200:
                        raise RuntimeError(f"{s.name}: {path}/status answered {code}")
                    body = json.loads(raw)
                    return body["record"]["done"] if "record" in body else body["done"]
                wait_for(flagged, 60, f"{s.name} flag", step=0.005)
                add("flag", s.name, time.perf_counter() - began)
                tokens[s.name] = path
        print("flags measured", flush=True)

        # Delays vs RQ enqueue_at, all due in one window, interleaved due times.
        first, spread = 2.0, 0.13
        n = args.delays if "delays" in only else 0
        pending: dict[str, list[str]] = {}
        raw = next(s for s in systems if s.name == "raw RQ")
        raw_jobs = []
        start = datetime.now(UTC)
        for s in systems:
            if s.name.startswith("formrules"):
                pending[s.name] = s.agent.call(cmd="delays", n=n, first=first, spread=spread)
        q = Queue(raw.queue, connection=raw.redis)
        for i in range(n):
            due = start + timedelta(seconds=first + i * spread + spread / 2)
            raw_jobs.append((q.enqueue_at(due, "tests.peer.noop.noop"), due))
        time.sleep(first + n * spread if n else 0)
        for name, ids in pending.items() if n else ():
            s = next(x for x in systems if x.name == name)
            late = wait_for(lambda s=s, ids=ids: (v := s.agent.call(cmd="lateness", ids=ids))
                            and all(x is not None for x in v) and v, 120, "delays", 0.5)
            add("late", name, late)

        def raw_done():
            out = []
            for job, due in raw_jobs:
                job.refresh()
                if job.ended_at is None:
                    return None
                out.append((job.ended_at.replace(tzinfo=UTC) - due).total_seconds())
            return out
        if n:
            add("late", "raw RQ", wait_for(raw_done, 120, "raw delays", 0.5))
        print("delays measured", flush=True)

        # Status polls: a finished record's status, fresh (200) and unchanged (304); hello.
        polls = [(s, tokens[s.name]) for s in web]
        for r in range(args.rounds if "polls" in only else 0):
            for s, path in rotate(polls, r):
                add("poll", s.name, rate(s.agent.browser, path + "/status", args.poll))
                if s.name.startswith("formrules"):
                    add("poll304", s.name, rate(s.agent.browser, path + "/status",
                                                args.poll, conditional=True))
            add("poll", "hello", rate(hello.browser, "/hello", args.poll))
        time.sleep(3 if "rss" in only else 0)
        for s in systems if "rss" in only else ():
            add("rss", s.name, tree_rss(s.worker.pid))
        print_table(db, res, [s.name for s in systems])
    finally:
        for s in systems:
            if s.worker:
                s.worker.terminate()
                with suppress(Exception):
                    s.worker.wait(15)
        for agent in agents:
            agent.stop()
        if admin is not None:
            with admin.connect() as conn:
                for schema in schemas:
                    conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            admin.dispose()


def rate(browser: Browser, path: str, seconds: float, conditional: bool = False) -> float:
    """Sequential requests per second for `seconds` (with If-None-Match: a 304 each)."""
    headers = {}
    if conditional:
        request = urllib.request.Request(browser.base + path)
        with browser.opener.open(request, timeout=30) as response:
            headers = {"If-None-Match": response.headers["ETag"]}
    n, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        code, _ = browser.get(path, headers)
        assert code == (304 if conditional else 200), code
        n += 1
    return n / elapsed


def print_table(db: str, res: dict, names: list[str]) -> None:
    med = {k: statistics.median(v) for k, v in res.items() if v}
    fr = [n for n in names if n.startswith("formrules")]

    def get(measure, system, scale=1.0, fmt="{:.1f}"):
        v = med.get((measure, system))
        return "–" if v is None else fmt.format(v * scale)

    def theirs(measure, other):
        """(system, measure) of a comparison: `other` is a system name (hello's figure is
        its poll) or a (system, measure) pair."""
        if isinstance(other, tuple):
            return other
        return other, "poll" if other == "hello" else measure

    def ratio(measure, a, b):
        system, their_measure = theirs(measure, b)
        va = med.get((measure, a))
        vb = med.get((their_measure, system))
        if not va or not vb:
            return "–"
        return f"{va / vb:.2f}×"

    print(f"\n### {db}\n")
    head = "| measure | " + " | ".join(fr) + " | peer | raw RQ / hello | ratios |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rows = [
        ("submit POST p50, in-process (ms)", "submit_inproc", 1000, "peer", None),
        ("submit POST p50, HTTP (ms)", "submit_http", 1000, "peer", None),
        ("worker drain, forking Worker (jobs/s)", "drain_fork", 1, "peer", "raw RQ"),
        ("worker drain, SimpleWorker (jobs/s)", "drain_simple", 1, "peer", "raw RQ"),
        # formrules' default (in-process, guarded) against the peer on the same class
        # (SimpleWorker) and raw RQ's default (forking Worker, no-op jobs).
        ("worker drain, formrules' default worker (jobs/s)", "drain_default", 1,
         ("peer", "drain_simple"), ("raw RQ", "drain_fork")),
        ("submit → flag p50 (ms)", "flag", 1000, "peer", "raw RQ"),
        ("status poll, HTTP (req/s)", "poll", 1, "peer", "hello"),
        ("unchanged poll 304 (req/s)", "poll304", 1, None, "hello"),
        ("worker-side idle RSS (MiB)", "rss", 1, "peer", "raw RQ"),
    ]
    for label, m, scale, peer, other in rows:
        cells = [get(m, n, scale) for n in fr]
        ratios = []
        for n in fr:
            short = "fr" if n == "formrules" else "base"
            for against in (peer, other):
                if against:
                    ratios.append(f"{short}/{theirs(m, against)[0]} {ratio(m, n, against)}")
        cols = [get(*reversed(theirs(m, against)), scale) if against else "–"
                for against in (peer, other)]
        print(f"| {label} | " + " | ".join(cells) + f" | {cols[0]} | {cols[1]} | "
              f"{', '.join(ratios)} |")
    for n in [*fr, "raw RQ"]:
        late = res.get(("late", n))
        if late:
            label = "RQ enqueue_at" if n == "raw RQ" else n
            print(f"| Delay lateness {label}: p50 / p95 / max / min (s) | "
                  f"{pct(late, 50):.2f} / {pct(late, 95):.2f} / {max(late):.2f} / "
                  f"{min(late):.2f} | | | | |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--submits", type=int, default=20, help="per system per round")
    parser.add_argument("--drain", type=int, default=40, help="jobs per drain round")
    parser.add_argument("--flags", type=int, default=8, help="submit→flag samples")
    parser.add_argument("--delays", type=int, default=20)
    parser.add_argument("--poll", type=float, default=1.5, help="seconds per poll sample")
    parser.add_argument("--base", help="another formrules checkout to compare (its code, "
                                       "this checkout's Python environment)")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help="measures to take, of " + ",".join(MEASURES))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="formrules-compare-"))
    (tmp / "rules").mkdir()
    for name, text in RULES.items():
        (tmp / "rules" / name).write_text(text)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: _ping(port), 10, "redis")
        print(f"bench_compare: python {sys.version.split()[0]}, {os.cpu_count()} cores, "
              f"redis on port {port}, rounds {args.rounds}")
        for db in args.db.split(","):
            run_db(db, args, tmp, port)
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _ping(port: int) -> bool:
    with suppress(Exception):
        return Redis(port=port).ping()
    return False


if __name__ == "__main__":
    main()
