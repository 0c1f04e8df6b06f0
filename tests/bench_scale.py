"""Benchmark: does each page cost the same with 1k records as with 1M?

Not a test (pytest does not collect it). Run it from the repository root:

    .venv/bin/python tests/bench_scale.py [--sizes 1000,10000,100000] [--db sqlite,postgres]
        [--repeat 5] [--base /path/to/other/checkout]

For each size N it builds a fresh database (SQLite file, or a schema of its own in
$FORMRULES_TEST_POSTGRES), bulk-loads N records and N Runs (10% future Delays, 10% dead,
the rest mostly done; one user with min(10k, N/2) tasks; one trace line per Run), then
times each page through Flask's test client: every (checkout, size) is loaded into a
process of its own first, then each page is requested from each in turn, --repeat
rounds with the order rotating (medians, after one warm-up request), so machine noise
falls on all sizes alike. Last, reconciler passes over the pending Delays: the first
enqueues them all into an empty Redis, the later ones find nothing to do. `--base`
measures another checkout too, on its own copy of the data (its own schema).
Loading 1M records and Runs takes about N min on SQLite (see README); the default sizes
finish in a few minutes.
"""

from __future__ import annotations

import argparse
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
import uuid
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RULE = """
form: quick
title: Quick flag
fields:
  - {name: name, type: string, required: true}
  - {name: status, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - set: {status: received}
    - background:
        title: Quick work for {{ record.name }}
        flag: done
        do:
          - set: {status: worked}
"""
PAGES = [
    ("admin runs", "/admin"),
    ("admin runs, status=done", "/admin?status=done"),
    ("admin runs, form=other1", "/admin?form=other1"),
    ("admin runs, page 20", "/admin?page=20"),
    ("admin runs, search common", "/admin?q=Quick"),
    ("admin runs, search rare", "/admin?q=needle-7"),
    ("admin runs, search none", "/admin?q=no-such-text"),
    ("dead list", "/admin/dead"),
    ("records list", "/admin/records"),
    ("records list, page 20", "/admin/records?page=20"),
    ("record timeline", "/admin/records/{record}"),
    ("/tasks, 10k-task user", "/tasks"),
    ("/tasks, light user", "/tasks"),
    ("submit (POST)", None),
    ("status poll", "/r/{token}/status"),
    ("status poll, 304", "/r/{token}/status"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the measuring process (one tree, one size) ----------------------------------------
def load(store, n: int) -> dict:
    """Bulk-load n records and n Runs (plus users); returns ids the pages need."""
    from sqlalchemy import insert
    from werkzeug.security import generate_password_hash

    from formrules.store.models import Record, Run, RunEvent, User
    pw = generate_password_hash("bench-password")
    now = datetime.now(UTC)
    heavy = min(10_000, n // 2)
    with store.engine.begin() as conn:
        conn.execute(insert(User), [
            {"id": 1, "name": "olga", "password_hash": pw, "is_operator": True,
             "created_at": now},
            {"id": 2, "name": "heavy", "password_hash": pw, "is_operator": False,
             "created_at": now},
            {"id": 3, "name": "light", "password_hash": pw, "is_operator": False,
             "created_at": now}])
    chunk = 20_000
    for start in range(0, n, chunk):
        records, runs, events = [], [], []
        for i in range(start, min(n, start + chunk)):
            owner = "user:2" if i < heavy else "user:3" if i == heavy else f"anon:{i % 5000}"
            form = "quick" if i % 5 else f"other{i % 3}"
            created = now - timedelta(seconds=(n - i) * 31_536_000 / n)
            kind, status = ("delay", "scheduled") if i % 10 == 1 else \
                ("background", "dead") if i % 10 == 2 else \
                ("background", "cancelled") if i % 20 == 3 else ("background", "done")
            final = status in ("done", "dead", "cancelled")
            records.append({"id": i + 1, "token": f"tok{i:012d}", "form_id": form,
                            "owner": owner, "data": {"name": f"n{i}", "status": status,
                                                     "done": status == "done"},
                            "version": 2, "created_at": created, "updated_at": created})
            run_id = f"{i:032x}"
            due = now + timedelta(days=1 + i % 300) if status == "scheduled" else created
            runs.append({
                "id": run_id, "record_id": i + 1, "form_id": form, "owner": owner,
                "kind": kind, "node_path": "events/submit/1/" + kind,
                "title": f"Quick work for n{i}" + (" needle-7" if i % 100_000 == 7 else ""),
                "snapshot": {"raw": {"background": {"title": "x", "do": []}},
                             "fields": {}, "intervals": [], "timeout": None},
                "status": status, "awaited": "true", "flag": "done", "due_at": due,
                "attempt": 0 if status == "scheduled" else 1, "max_attempts": 1,
                "started_at": created if final else None,
                "finished_at": created + timedelta(seconds=1) if final else None,
                "progress_done": 1.0 if final else 0.0, "progress_total": 1.0,
                "progress_message": "", "recoveries": 0, "cancel_requested": False,
                "hidden": False,
                "last_error": "Traceback (most recent call last):\n  ...\nRuntimeError: "
                              "upstream said 503" if status == "dead" else None,
                "safe_error": "The service is busy." if status == "dead" else None,
                "created_at": created, "updated_at": created})
            events.append({"run_id": run_id, "at": created, "attempt": 1, "path": "",
                           "event": "finish" if final else "scheduled", "detail": status})
        with store.engine.begin() as conn:
            conn.execute(insert(Record), records)
            conn.execute(insert(Run), runs)
            conn.execute(insert(RunEvent), events)
    if store.is_sqlite:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    else:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in ("records", "users"):  # ids were given: move the sequences past them
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT max(id) FROM {table}))")
            conn.exec_driver_sql("ANALYZE")
    return {"record": n // 2 + 1, "token": None}


def serve(n: int) -> None:
    """Load, then answer timing requests on stdin (one page label per line)."""
    from formrules.config import from_env
    from formrules.process.runtime import Runtime, install
    from formrules.runs import reconciler
    from formrules.web import create_app
    settings = from_env()
    rt = install(Runtime(settings))
    rt.store.create_all()
    began = time.perf_counter()
    ids = load(rt.store, n)
    load_s = time.perf_counter() - began
    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": True}, settings=settings)
    clients = {}
    token_re = re.compile(rb'name="(csrf_token|submit_key)" type="hidden" value="([^"]*)"')
    for name in ("olga", "heavy", "light"):
        client = app.test_client()
        page = client.get("/login").data
        data = {k.decode(): v.decode() for k, v in token_re.findall(page)}
        response = client.post("/login", data={**data, "name": name,
                                                "password": "bench-password"})
        assert response.status_code == 303, (name, response.status_code)
        clients[name] = client
    anon = app.test_client()
    page = anon.get("/forms/quick").data
    data = {k.decode(): v.decode() for k, v in token_re.findall(page)}
    location = anon.post("/forms/quick", data={**data, "name": "mine"}).headers["Location"]
    ids["token"] = location.rsplit("/", 1)[-1]
    etag = anon.get(f"/r/{ids['token']}/status").headers["ETag"]

    def submit_post() -> float:
        page = anon.get("/forms/quick").data
        data = {k.decode(): v.decode() for k, v in token_re.findall(page)}
        began = time.perf_counter()
        assert anon.post("/forms/quick", data={**data, "name": "s"}).status_code == 303
        return time.perf_counter() - began

    def page_time(label: str) -> float:
        path = dict(PAGES)[label]
        if path is None:
            return submit_post()
        path = path.format(**ids)
        client = clients["heavy"] if "10k" in label else clients["light"] \
            if "light" in label else anon if path.startswith("/r/") else clients["olga"]
        headers, expect = ({"If-None-Match": etag}, 304) if label.endswith("304") \
            else ({}, 200)
        began = time.perf_counter()
        response = client.get(path, headers=headers)
        took = time.perf_counter() - began
        assert response.status_code == expect, (path, response.status_code)
        return took

    print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
    for line in sys.stdin:
        label = line.strip()
        if label == "reconcile first":
            began = time.perf_counter()
            result = reconciler.reconcile_once(rt)
            out = {"ms": (time.perf_counter() - began) * 1000, "dispatched": result.dispatched}
        elif label == "reconcile idle":
            began = time.perf_counter()
            reconciler.reconcile_once(rt)
            out = {"ms": (time.perf_counter() - began) * 1000}
        else:
            try:
                out = {"ms": page_time(label) * 1000}
            except Exception as exc:  # a page that fails is a finding: report, go on
                print(f"{label}: {exc!r}", file=sys.stderr, flush=True)
                out = {"ms": float("nan")}
        print(json.dumps(out), flush=True)


# -- the orchestrator ---------------------------------------------------------------------
class Server:
    """One (checkout, size) pair: its own database, loaded, answering timing requests."""

    def __init__(self, tmp: Path, db: str, pg: str, port: int, tree: Path, n: int):
        self.key = uuid.uuid4().hex[:8]
        self.tmp, self.schema, self.admin = tmp, None, None
        if db == "sqlite":
            url = f"sqlite:///{tmp}/scale-{self.key}.db"
        else:
            from sqlalchemy import create_engine
            self.admin = create_engine(pg, isolation_level="AUTOCOMMIT")
            self.schema = f"bench_scale_{self.key}"
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{self.schema}"')
            url = f"{pg}{'&' if '?' in pg else '?'}options=-csearch_path%3D{self.schema}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FORMRULES", "DATABASE"))}
        env.update({"DATABASE_URL": url, "SECRET_KEY": "bench",
                    "REDIS_URL": f"redis://127.0.0.1:{port}/{len(list(tmp.glob('instance-*')))}",
                    "FORMRULES_RULES": str(tmp / "rules"),
                    "FORMRULES_INSTANCE": str(tmp / f"instance-{self.key}"),
                    "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(tree), str(ROOT)]))})
        (tmp / f"instance-{self.key}").mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "bench_scale.py"), "--serve", str(tree),
             str(n)], env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"loading {n} into {tree} failed (see stderr above)")
        self.load_s = json.loads(line)["load_s"]

    def ask(self, label: str) -> dict:
        self.proc.stdin.write(label + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        with suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(30)
        if self.admin is not None:
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{self.schema}" CASCADE')
            self.admin.dispose()
        for path in self.tmp.glob(f"scale-{self.key}.db*"):
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--base", help="another formrules checkout to measure too")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)  # TREE SIZE
    args = parser.parse_args()
    if args.serve:
        sys.path.insert(0, args.serve[0])
        serve(int(args.serve[1]))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = [("formrules", ROOT)] + ([("base", Path(args.base).resolve())] if args.base else [])
    tmp = Path(tempfile.mkdtemp(prefix="formrules-scale-"))
    (tmp / "rules").mkdir()
    (tmp / "rules" / "quick.yaml").write_text(RULE)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp),
                              "--databases", "64"], stdout=subprocess.DEVNULL)
    pg = os.environ.get("FORMRULES_TEST_POSTGRES") or PG_DEFAULT
    print(f"bench_scale: python {sys.version.split()[0]}, sizes {sizes}, "
          f"repeat {args.repeat}", flush=True)
    try:
        wait_redis(port)
        for db in args.db.split(","):
            servers: dict[tuple[str, int], Server] = {}
            try:
                for n in sizes:
                    for name, tree in trees:
                        servers[(name, n)] = Server(tmp, db, pg, port, tree, n)
                        print(f"  {db} {name} {n:,}: loaded in "
                              f"{servers[(name, n)].load_s:.1f} s", flush=True)
                results = measure_all(servers, args.repeat)
                print_table(db, results, sizes, [t for t, _ in trees])
            finally:
                for server in servers.values():
                    server.close()
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def measure_all(servers: dict, repeat: int) -> dict:
    """Each page on every server in turn (order rotating), `repeat` times; medians."""
    keys = list(servers)
    samples: dict[tuple, list[float]] = {}
    for label, _ in PAGES:
        for key in keys:
            servers[key].ask(label)  # warm: templates compiled, caches filled
    for r in range(repeat):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for label, _ in PAGES:
            for key in order:
                samples.setdefault((key, label), []).append(servers[key].ask(label)["ms"])
    results: dict[tuple, dict] = {key: {"load_s": servers[key].load_s} for key in keys}
    for key in keys:
        first = servers[key].ask("reconcile first")
        results[key]["reconciler pass, Redis empty"] = first["ms"]
        results[key]["dispatched"] = first["dispatched"]
    for _ in range(max(3, repeat // 2)):
        for key in keys:
            samples.setdefault((key, "reconciler pass, idle"), []).append(
                servers[key].ask("reconcile idle")["ms"])
    for (key, label), values in samples.items():
        ok = [v for v in values if v == v]  # NaN: the page failed (its error is on stderr)
        results[key][label] = statistics.median(ok) if len(ok) == len(values) else float("nan")
    return results


def wait_redis(port: int) -> None:
    from redis import Redis
    deadline = time.monotonic() + 10
    while True:
        try:
            Redis(port=port).ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def print_table(db: str, results: dict, sizes: list[int], trees: list[str]) -> None:
    print(f"\n### {db}: milliseconds per request (median)\n")
    cols = [(t, n) for n in sizes for t in trees]
    head = "| page | " + " | ".join(
        f"{n:,}" + ("" if t == "formrules" else f" {t}") for t, n in cols) + \
        " | " + " | ".join(f"{sizes[-1]:,}/{sizes[0]:,} {t}" for t in trees) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    labels = [label for label, _ in PAGES] + ["reconciler pass, Redis empty",
                                               "reconciler pass, idle"]
    for label in labels:
        cells = [f"{results[c][label]:.1f}" for c in cols]
        ratios = [results[(t, sizes[-1])][label] / max(1e-9, results[(t, sizes[0])][label])
                  for t in trees]
        ratios = [f"{r:.2f}×" for r in ratios]
        print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    loads = " / ".join(f"{results[c]['load_s']:.0f}" for c in cols)
    print(f"\nload time (s), same columns: {loads}; pending future Delays at the largest size: "
          f"{results[(trees[0], sizes[-1])]['dispatched']:,} dispatched by the first pass\n",
          flush=True)


if __name__ == "__main__":
    main()
