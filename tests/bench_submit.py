"""Benchmark: how fast a submit answers and how long until the flag is set.

Not a test (pytest does not collect it). Run it from the repository root:

    .venv/bin/python tests/bench_submit.py [--submits 200] [--flags 30]

It starts a private Redis, a SQLite database in a temp folder (PostgreSQL when
DATABASE_URL is set), the web app on a real HTTP socket and one real worker process,
then prints latency figures. Figures vary with the machine; compare runs on one machine.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_RULES = {
    "quick.yaml": """
form: quick
title: Quick flag
fields:
  - {name: name, type: string, required: true}
  - {name: status, type: string, hidden: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - set: {status: received}
    - if: "record.name == 'x'"
      then: [{set: {status: special}}]
    - background:
        title: Quick work
        flag: done
        do:
          - set: {status: worked}
""",
    "five.yaml": """
form: five
title: Five seconds
fields:
  - {name: name, type: string, required: true}
  - {name: done, type: boolean, hidden: true, default: false}
events:
  submit:
    - background:
        title: Five seconds of work
        flag: done
        do:
          - simulate_work: {seconds: 5, steps: 10}
""",
}


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), in milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000


class Browser:
    """A cookie-keeping HTTP client that submits forms the way a browser does."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
            NoRedirect())

    def get(self, path: str) -> bytes:
        with self.opener.open(self.base + path, timeout=30) as response:
            return response.read()

    def submit(self, form: str, data: dict) -> tuple[str, float]:
        """GET then POST the form; return (status path, seconds the POST took)."""
        page = self.get(f"/forms/{form}")
        for name in ("csrf_token", "submit_key"):
            data[name] = re.search(
                rb'name="' + name.encode() + rb'" type="hidden" value="([^"]*)"',
                page).group(1).decode()
        body = urllib.parse.urlencode(data).encode()
        began = time.perf_counter()
        try:
            self.opener.open(self.base + f"/forms/{form}", body, timeout=30)
            raise RuntimeError("expected a 303")
        except urllib.error.HTTPError as exc:
            took = time.perf_counter() - began
            if exc.code != 303:
                raise RuntimeError(f"submit answered {exc.code}") from exc
            return exc.headers["Location"], took

    def status(self, path: str) -> dict:
        return json.loads(self.get(path + "/status"))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submits", type=int, default=200)
    parser.add_argument("--flags", type=int, default=30)
    args = parser.parse_args()

    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log in the figures

    from formrules.config import from_env
    from formrules.process.redis_server import RedisServer, free_port
    from formrules.store.db import Store
    from formrules.web import create_app

    tmp = Path(tempfile.mkdtemp(prefix="formrules-bench-"))
    rules = tmp / "rules"
    rules.mkdir()
    for name, text in BENCH_RULES.items():
        (rules / name).write_text(text)
    redis = RedisServer(tmp / "redis", persist=False).start()
    env = {**os.environ, "REDIS_URL": redis.url, "FORMRULES_RULES": str(rules),
           "FORMRULES_INSTANCE": str(tmp / "instance"), "SECRET_KEY": "bench"}
    settings = from_env(env)
    Store(settings.sqlalchemy_url).upgrade()  # a fresh database: the app refuses an empty one
    app = create_app(settings=settings)
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    db = "PostgreSQL" if settings.database_url.startswith("postgres") else "SQLite"
    print(f"formrules bench: {db}, Redis {redis.url}, 1 worker process, "
          f"python {sys.version.split()[0]}")
    try:
        browser = Browser(base)
        browser.get("/")
        took = [browser.submit("quick", {"name": f"n{i}"})[1] for i in range(args.submits)]
        print(f"submit (POST, sync set+if, 1 Run enqueued), n={len(took)}: "
              f"p50 {pct(took, 50):.1f} ms  p95 {pct(took, 95):.1f} ms  "
              f"max {max(took) * 1000:.1f} ms")

        # Let the worker drain the submits above before timing flags one by one.
        deadline = time.time() + 300
        while time.time() < deadline:
            from redis import Redis
            from rq import Queue
            if Queue("formrules", connection=Redis.from_url(redis.url)).count == 0:
                break
            time.sleep(0.2)
        flag = []
        for i in range(args.flags):
            path, _ = browser.submit("quick", {"name": f"f{i}"})
            began = time.perf_counter()
            while not browser.status(path)["record"]["done"]:
                time.sleep(0.005)
            flag.append(time.perf_counter() - began)
        print(f"submit -> flag set (idle worker, trivial step), n={len(flag)}: "
              f"p50 {pct(flag, 50):.0f} ms  p95 {pct(flag, 95):.0f} ms  "
              f"max {max(flag) * 1000:.0f} ms")

        path, post = browser.submit("five", {"name": "five"})
        began = time.perf_counter()
        while not browser.status(path)["done"]:
            time.sleep(0.02)
        print(f"5 s background job: POST answered in {post * 1000:.1f} ms; "
              f"flag set {time.perf_counter() - began:.2f} s after the answer")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"web process (this one) max RSS: {rss:.0f} MiB")
    finally:
        worker.terminate()
        worker.wait(15)
        server.shutdown()
        redis.stop()


if __name__ == "__main__":
    main()
