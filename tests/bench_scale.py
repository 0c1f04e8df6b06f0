"""Benchmark: does each page cost the same with 1k records as with 1M?

Not a test (pytest does not collect it). Run it from the repository root:

    .venv/bin/python tests/bench_scale.py [--sizes 1000,10000,100000] [--db sqlite,postgres]
        [--repeat 5] [--base /path/to/other/checkout]

For each size N it builds a fresh database (SQLite file, or a schema of its own in
$FORMRULES_TEST_POSTGRES), bulk-loads N records and N Runs (10% future Delays, 10% dead,
the rest mostly done; one user with min(10k, N/2) tasks; one trace line per Run), then
times each page through Flask's test client in a process of its own (median of
--repeat, after one warm-up request) and one reconciler pass over the pending Delays
(the first pass enqueues them all into an empty Redis, the second finds nothing to do).
`--base` measures another checkout too, on its own copy of the data (its own schema).
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


def measure(n: int, repeat: int) -> dict:
    """Load, then time every page; runs inside the tree under test."""
    from formrules.config import from_env
    from formrules.process.runtime import Runtime, install
    from formrules.runs import reconciler
    from formrules.web import create_app
    settings = from_env()
    rt = install(Runtime(settings))
    rt.store.create_all()
    began = time.perf_counter()
    ids = load(rt.store, n)
    out = {"load_s": time.perf_counter() - began}
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

    def timed(fn) -> float:
        fn()  # warm: templates compiled, caches filled
        samples = []
        for _ in range(repeat):
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
        return statistics.median(samples) * 1000

    def get(client, path, expect=200, headers=None):
        def call():
            response = client.get(path, headers=headers or {})
            assert response.status_code == expect, (path, response.status_code)
            return response
        return call

    def post_submit():
        page = anon.get("/forms/quick").data
        data = {k.decode(): v.decode() for k, v in token_re.findall(page)}
        began = time.perf_counter()
        assert anon.post("/forms/quick", data={**data, "name": "s"}).status_code == 303
        return time.perf_counter() - began

    for label, path in PAGES:
        if label == "submit (POST)":
            post_submit()
            out[label] = statistics.median(post_submit() for _ in range(repeat)) * 1000
            continue
        path = path.format(**ids)
        client = clients["heavy"] if "10k" in label else clients["light"] \
            if "light" in label else anon if path.startswith("/r/") else clients["olga"]
        if label.endswith("304"):
            tag = anon.get(path).headers["ETag"]
            out[label] = timed(get(client, path, 304, {"If-None-Match": tag}))
        else:
            out[label] = timed(get(client, path))
    began = time.perf_counter()
    first = reconciler.reconcile_once(rt)
    out["reconciler pass, Redis empty"] = (time.perf_counter() - began) * 1000
    out["dispatched"] = first.dispatched
    out["reconciler pass, idle"] = timed(lambda: reconciler.reconcile_once(rt))
    return out


# -- the orchestrator ---------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--base", help="another formrules checkout to measure too")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # TREE SIZE REPEAT
    args = parser.parse_args()
    if args.measure:
        tree, size, repeat = args.measure
        sys.path.insert(0, tree)
        print("RESULT " + json.dumps(measure(int(size), int(repeat))), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = [("formrules", ROOT)] + ([("base", Path(args.base).resolve())] if args.base else [])
    tmp = Path(tempfile.mkdtemp(prefix="formrules-scale-"))
    (tmp / "rules").mkdir()
    (tmp / "rules" / "quick.yaml").write_text(RULE)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL)
    pg = os.environ.get("FORMRULES_TEST_POSTGRES") or PG_DEFAULT
    print(f"bench_scale: python {sys.version.split()[0]}, sizes {sizes}, "
          f"repeat {args.repeat}", flush=True)
    try:
        for db in args.db.split(","):
            results: dict[tuple[str, int], dict] = {}
            for n in sizes:
                for name, tree in trees:
                    results[(name, n)] = run_one(tmp, db, pg, port, tree, n, args.repeat)
                    print(f"  {db} {name} {n}: loaded in "
                          f"{results[(name, n)]['load_s']:.1f} s", flush=True)
            print_table(db, results, sizes, [t for t, _ in trees])
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def run_one(tmp: Path, db: str, pg: str, port: int, tree: Path, n: int, repeat: int) -> dict:
    schema = None
    admin = None
    key = uuid.uuid4().hex[:8]
    if db == "sqlite":
        url = f"sqlite:///{tmp}/scale-{key}.db"
    else:
        from sqlalchemy import create_engine
        admin = create_engine(pg, isolation_level="AUTOCOMMIT")
        schema = f"bench_scale_{key}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = f"{pg}{'&' if '?' in pg else '?'}options=-csearch_path%3D{schema}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORMRULES", "DATABASE"))}
    env.update({"DATABASE_URL": url, "REDIS_URL": f"redis://127.0.0.1:{port}/0",
                "FORMRULES_RULES": str(tmp / "rules"), "SECRET_KEY": "bench",
                "FORMRULES_INSTANCE": str(tmp / f"instance-{key}"),
                "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(tree), str(ROOT)]))})
    try:
        flush_redis(port)
        out = subprocess.run([sys.executable, str(ROOT / "tests" / "bench_scale.py"),
                              "--measure", str(tree), str(n), str(repeat)],
                             env=env, cwd=tree, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"measuring {tree} at {n} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[7:])
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            admin.dispose()
        with suppress(OSError):
            for path in tmp.glob(f"scale-{key}.db*"):
                path.unlink()


def flush_redis(port: int) -> None:
    from redis import Redis
    deadline = time.monotonic() + 10
    while True:
        try:
            Redis(port=port).flushall()
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
