"""One web app under test for tests/bench_compare.py, in its own process.

    python tests/bench_agent.py KIND PORT [TREE]

KIND is formrules (imported from TREE, so two checkouts can be compared in one run), peer
or hello. The app is served over HTTP on PORT (threaded werkzeug, no access log) and the
agent answers JSON commands on stdin, one per line, so in-process timings are taken in
the app's own process. Configuration comes from the environment the bench sets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

KIND, PORT = sys.argv[1], int(sys.argv[2])
HERE = Path(__file__).resolve().parents[1]
TREE = Path(sys.argv[3]).resolve() if len(sys.argv) > 3 else HERE
sys.path[:0] = [str(TREE), str(HERE)] if TREE != HERE else [str(HERE)]
FORM = {"formrules": "/forms/quick", "peer": "/quick", "hello": None}[KIND]
TOKEN = re.compile(rb'name="(csrf_token|submit_key)" type="hidden" value="([^"]*)"')


def build_app():
    """The app for KIND, plus the formrules runtime (None for the others)."""
    if KIND == "formrules":
        from formrules.config import from_env
        from formrules.web import create_app
        settings = from_env()
        try:  # a checkout with migrations refuses a database that is behind: upgrade first
            from formrules.store import migrate
        except ImportError:  # an older `--base` checkout builds its tables itself
            pass
        else:
            migrate.upgrade(settings.database_url)
        app = create_app(settings=settings)
        return app, app.extensions["formrules"]
    if KIND == "peer":
        from tests.peer.app import create_app
        return create_app(), None
    from tests.peer.hello import create_app
    return create_app(), None


def inproc_submits(client, n: int) -> list[float]:
    """n GET+POST submits through Flask's test client; the POSTs' durations."""
    took = []
    for i in range(n):
        page = client.get(FORM).data
        data = {k.decode(): v.decode() for k, v in TOKEN.findall(page)}
        data["name"] = f"n{i}"
        began = time.perf_counter()
        response = client.post(FORM, data=data)
        took.append(time.perf_counter() - began)
        assert response.status_code == 303, response.status_code
    return took


def delays(rt, n: int, first: float, spread: float) -> list[str]:
    """n formrules Delay Runs due `first` s from now, `spread` s apart; their ids."""
    from formrules.language.loader import load_rules
    from formrules.runs.engine import submit
    form = load_rules(rt.settings.rules_dir).form("later")
    now = datetime.now(UTC)
    ids, runs = [], []
    with rt.store.session() as s:
        for i in range(n):
            when = (now + timedelta(seconds=first + i * spread)).isoformat()
            _, new = submit(s, form, {"name": f"d{i}", "when": when, "done": False},
                            owner="bench", settings=rt.settings)
            runs += new
        s.flush()
        ids = [r.id for r in runs]
    rt.dispatcher.dispatch_all(runs)
    return ids


def lateness(rt, ids: list[str]) -> list[float | None]:
    """Seconds from each Run's due time to its end (None while unfinished)."""
    from sqlalchemy import select

    from formrules.store.models import Run
    with rt.store.session() as s:
        rows = s.execute(select(Run.due_at, Run.finished_at).where(Run.id.in_(ids))).all()
    return [(f - d).total_seconds() if f else None for d, f in rows]


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from werkzeug.serving import make_server
    app, rt = build_app()
    server = make_server("127.0.0.1", PORT, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = app.test_client()
    where = sys.modules["formrules"].__file__ if "formrules" in sys.modules else ""
    print(json.dumps({"ready": True, "pid": os.getpid(), "module": where}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "inproc":
            out = inproc_submits(client, cmd["n"])
        elif cmd["cmd"] == "delays":
            out = delays(rt, cmd["n"], cmd["first"], cmd["spread"])
        elif cmd["cmd"] == "lateness":
            out = lateness(rt, cmd["ids"])
        else:
            out = None
        print(json.dumps({"out": out}), flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
