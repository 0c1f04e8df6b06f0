"""Database connections cut under the web app (issue 14.12), on real PostgreSQL: the
backends are killed with pg_terminate_backend, as a failover or an admin would.

A request whose connection is cut runs once more and answers normally; when even that
fails, the error page still renders (the error handler never trips over the dead session).
"""

from __future__ import annotations

import random
import select as select_module
import threading
import uuid

import pytest
from sqlalchemy import create_engine, event, func, select, text

from formrules.config import from_env
from formrules.store import migrate
from formrules.store.models import Base, Record
from formrules.web import create_app
from tests.helpers import submit, tokens
from tests.web_helpers import login, make_user

KILL = text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :name")


@pytest.fixture
def app_name() -> str:
    """The application_name of this test's connections: only they are ever killed."""
    return f"formrules_kill_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def admin_db(pg_url):
    """A separate connection that does the killing (never killed itself)."""
    migrate.upgrade(pg_url)  # the schema as the app expects it (check_schema)
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    with engine.connect() as conn:
        yield conn
    engine.dispose()


@pytest.fixture
def app(pg_url, app_name, admin_db, redis_url, rules_dir, tmp_path):
    """The app on PostgreSQL; errors answered by its own 500 page (not propagated)."""
    settings = from_env({}, rules_dir=str(rules_dir), instance_dir=str(tmp_path / "instance"),
                        database_url=f"{pg_url}&application_name={app_name}",
                        redis_url=redis_url, secret_key="test-secret",
                        actions_modules="tests.fixture_actions")
    app = create_app({"PROPAGATE_EXCEPTIONS": False}, settings=settings)
    yield app
    app.extensions["formrules"].store.dispose()


@pytest.fixture
def rt(app):
    """This app's runtime (PostgreSQL only, unlike the shared fixture)."""
    return app.extensions["formrules"]


def kill_backends(admin_db, app_name: str) -> int:
    """Terminate every backend of the app; how many there were."""
    return admin_db.execute(KILL, {"name": app_name}).scalar_one()


def cut_next_statements(app, admin_db, app_name: str, times: int) -> list[int]:
    """Kill the app's connection right before its next `times` statements run."""
    left, done = [times], []

    @event.listens_for(app.extensions["formrules"].store.engine, "before_cursor_execute")
    def cut(conn, cursor, statement, parameters, context, executemany):
        if left[0] > 0 and "pg_terminate_backend" not in statement:
            left[0] -= 1
            done.append(kill_backends(admin_db, app_name))
    return done


def test_a_request_whose_connection_is_cut_is_run_again(app, rt, admin_db, app_name):
    make_user(rt, "olga", operator=True)
    browser = app.test_client()
    assert login(browser, "olga").status_code == 303
    killed = cut_next_statements(app, admin_db, app_name, times=1)
    response = browser.get("/admin")
    assert killed == [1]
    assert response.status_code == 200
    assert "Operations" in response.get_data(as_text=True)


def test_a_submit_cut_mid_transaction_stores_one_record(app, admin_db, app_name):
    browser = app.test_client()
    page = browser.get("/forms/demo")
    killed = cut_next_statements(app, admin_db, app_name, times=1)
    response = browser.post("/forms/demo", data={**tokens(page.data), "name": "Ann",
                                                 "email": "ann@example.com"})
    assert killed == [1] and response.status_code == 303
    assert admin_db.execute(select(func.count()).select_from(Record)).scalar_one() == 1


def test_a_status_poll_whose_connection_is_cut_is_run_again(app, admin_db, app_name):
    browser = app.test_client()
    page = browser.get("/forms/demo")
    done = browser.post("/forms/demo", data={**tokens(page.data), "name": "Ann",
                                             "email": "ann@example.com"})
    status = done.headers["Location"] + "/status"
    killed = cut_next_statements(app, admin_db, app_name, times=1)
    fresh = browser.get(status)  # its own autocommit connection, not the request's session
    assert killed == [1] and fresh.status_code == 200
    killed = cut_next_statements(app, admin_db, app_name, times=1)
    again = browser.get(status, headers={"If-None-Match": fresh.headers["ETag"]})
    assert killed == [1] and again.status_code == 304


def test_the_error_page_renders_when_the_retry_fails_too(app, rt, admin_db, app_name):
    make_user(rt, "olga", operator=True)
    browser = app.test_client()
    assert login(browser, "olga").status_code == 303
    killed = cut_next_statements(app, admin_db, app_name, times=2)
    response = browser.get("/admin")  # no exception escapes the error handler
    assert killed == [1, 1]
    assert response.status_code == 500
    assert "Something went wrong" in response.get_data(as_text=True)
    assert browser.get("/admin").status_code == 200  # and the next request is fine


def test_no_500s_while_a_killer_loop_cuts_connections(app, rt, admin_db, app_name):
    """A real killer thread: once per request, at a random moment, it terminates every
    connection of the app (idle in the pool or busy in the request)."""
    make_user(rt, "olga", operator=True)
    operator = app.test_client()
    assert login(operator, "olga").status_code == 303
    visitor = app.test_client()
    go, went, stop, kills = threading.Event(), threading.Event(), threading.Event(), []

    def killer():
        while not stop.is_set():
            if not go.wait(0.1):
                continue
            go.clear()
            stop.wait(random.uniform(0, 0.03))  # somewhere inside the request, or just after
            kills.append(kill_backends(admin_db, app_name))
            went.set()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    statuses, submitted = [], 0
    try:
        for i in range(60):
            go.set()
            if i % 3 == 0:
                response = submit(visitor, "demo", {"name": f"N{i}", "email": "n@example.com"})
                submitted += 1
            elif i % 3 == 1:
                response = operator.get("/admin")
            else:
                response = visitor.get("/tasks")
            statuses.append(response.status_code)
            assert went.wait(10), "the killer thread stopped"
            went.clear()
    finally:
        stop.set()
        thread.join(10)
    assert sum(kills) > 0
    assert 500 not in statuses, statuses
    assert admin_db.execute(select(func.count()).select_from(Record)).scalar_one() == submitted


def test_a_connection_terminated_while_pooled_is_replaced_before_use(rt, admin_db, app_name):
    """The pool pings it on checkout: no statement of the next unit of work fails."""
    with rt.store.session() as s:
        s.scalar(select(func.count()).select_from(Record))
    (pooled,) = list(rt.store.engine.pool._pool.queue)
    assert kill_backends(admin_db, app_name) == 1
    poller = select_module.poll()
    poller.register(pooled.dbapi_connection.fileno(), select_module.POLLIN)
    assert poller.poll(5000), "the terminated backend's notice never arrived"
    failures = []
    event.listen(rt.store.engine, "handle_error",  # a failed ping is not a failure here
                 lambda context: None if context.is_pre_ping else failures.append(context))
    with rt.store.session() as s:  # no error: the pool pinged it, and took a fresh one
        assert s.scalar(select(func.count()).select_from(Record)) == 0
    assert failures == []
