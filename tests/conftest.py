"""Shared fixtures: a private real Redis, real databases (SQLite, and PostgreSQL when
FORMRULES_TEST_POSTGRES names one), the app, and helpers to run real workers."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import create_engine, text

from formrules.config import from_env
from formrules.process.redis_server import RedisServer
from formrules.process.runtime import Runtime, install
from formrules.store import migrate
from formrules.store.models import Base
from tests.helpers import WorkerProcess, wait_until
from tests.journey import CHROMIUM, WebProcess, chromium_args
from tests.web_helpers import login, make_user, workers_alive

HERE = Path(__file__).parent
ROOT = HERE.parent
PG_URL = os.environ.get("FORMRULES_TEST_POSTGRES", "")
DATABASES = ["sqlite"] + (["postgresql"] if PG_URL else [])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server of our own for the whole session (tests may flush it freely)."""
    with RedisServer(tmp_path_factory.mktemp("redis"), persist=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The private Redis, emptied before each test."""
    Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def pg_url():
    """A private schema in the PostgreSQL test database, dropped at the end."""
    if not PG_URL:
        pytest.skip("FORMRULES_TEST_POSTGRES is not set")
    schema = f"formrules_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A SQLite file migrated once to the newest revision; each test gets a copy (fast)."""
    path = tmp_path_factory.mktemp("schema") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_migrated(pg_url) -> str:
    """The session's PostgreSQL schema, built once by the migrations."""
    migrate.upgrade(pg_url)
    return pg_url


@pytest.fixture(params=DATABASES)
def database_url(request, tmp_path):
    """Each test that uses the store runs on SQLite and (when configured) PostgreSQL.

    Both schemas are built by the Alembic migrations (test_migrations proves they equal
    the models), then copied (SQLite) or emptied (PostgreSQL) for each test.
    """
    if request.param == "sqlite":
        shutil.copyfile(request.getfixturevalue("sqlite_template"), tmp_path / "formrules.db")
        return f"sqlite:///{tmp_path}/formrules.db"
    url = request.getfixturevalue("pg_migrated")
    engine = create_engine(url)
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def rules_dir(tmp_path):
    """A rules folder holding the test forms in tests/rules; tests may add files."""
    target = tmp_path / "rules"
    shutil.copytree(HERE / "rules", target)
    return target


@pytest.fixture
def settings(tmp_path, database_url, redis_url, rules_dir):
    """Settings with short heartbeat/stale/reconcile times so recovery tests are quick."""
    return from_env(
        {},
        rules_dir=str(rules_dir), instance_dir=str(tmp_path / "instance"),
        database_url=database_url, redis_url=redis_url, secret_key="test-secret",
        heartbeat_seconds=0.2, stale_seconds=2.0, reconcile_seconds=0.5,
        progress_write_seconds=0.0, actions_modules="tests.fixture_actions",
        http_allow=("127.0.0.1:*",),  # test servers listen on random ports
    )


@pytest.fixture
def rt(settings):
    """The runtime the app and in-process workers share."""
    runtime = install(Runtime(settings))
    runtime.store.check_schema()
    yield runtime
    runtime.store.dispose()


@pytest.fixture
def app(rt):
    """The Flask app on the test settings, CSRF on (as in production)."""
    from formrules.web import create_app

    return create_app({"TESTING": True}, settings=rt.settings)


@pytest.fixture
def client(app):
    """A test client (one browser)."""
    return app.test_client()


@pytest.fixture
def operator(app, rt):
    """A browser logged in as an operator."""
    make_user(rt, "olga", operator=True)
    browser = app.test_client()
    assert login(browser, "olga").status_code == 303
    return browser


@pytest.fixture
def subprocess_env(settings):
    """Environment for worker/CLI subprocesses: same settings, tests importable."""
    env = dict(os.environ)
    env.update({
        "FORMRULES_RULES": settings.rules_dir, "FORMRULES_INSTANCE": settings.instance_dir,
        "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
        "SECRET_KEY": settings.secret_key, "FORMRULES_ACTIONS": settings.actions_modules,
        "FORMRULES_HEARTBEAT": str(settings.heartbeat_seconds),
        "FORMRULES_STALE_AFTER": str(settings.stale_seconds),
        "FORMRULES_RECONCILE": str(settings.reconcile_seconds),
        "FORMRULES_PROGRESS_INTERVAL": str(settings.progress_write_seconds),
        "FORMRULES_HTTP_ALLOW": ",".join(settings.http_allow),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })
    return env


@pytest.fixture
def web(rt, subprocess_env):
    """The web app served by a real `formrules web` process on a free port."""
    server = WebProcess(subprocess_env).start()
    yield server
    server.stop()
    server.log.close()


@pytest.fixture
def browser():
    """Headless Chromium from the system: never downloaded, never skipped."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package "
                    "(apt-get install chromium); the browser tests must not be skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args())
        yield chromium
        chromium.close()


@pytest.fixture
def worker(rt, subprocess_env):
    """A real default worker (a guard around an in-process worker, scheduler,
    reconciler), ready, serving every queue the rules name (as `formrules run` does)."""
    with WorkerProcess(subprocess_env, "--queues", "*") as process:
        wait_until(lambda: workers_alive(rt.settings.redis_url) >= 1, timeout=60)
        yield process


# Test layers: a test that needs none of these is pure (`unit`, the inner loop:
# `pytest -m unit`, well under 15 s); one that does is `integration` (real Redis, real
# databases, the app); those that start real worker processes are also marked `slow`.
INTEGRATION_FIXTURES = {"redis_server", "redis_url", "pg_url", "database_url", "settings",
                        "empty_url",  # test_migrations: an empty SQLite file or PG schema
                        "rt", "app", "client", "operator", "subprocess_env",
                        "http_server",  # a real HTTP server on loopback
                        "web", "browser"}


def pytest_configure(config):
    """The inner loop (`-m unit`) tries each Hypothesis property on a fifth of its examples
    (see `tests.helpers.examples`); the suite and CI try all of them. Failures Hypothesis
    found before are replayed from its example database either way."""
    if (config.option.markexpr or "").strip() == "unit":
        os.environ["FORMRULES_TEST_INNER_LOOP"] = "1"


def pytest_collection_modifyitems(config, items):
    """Mark each test `unit` or `integration` by the fixtures it uses."""
    for item in items:
        if item.get_closest_marker("integration"):
            continue  # marked by its module (a subprocess, a server)
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) \
                or item.get_closest_marker("browser") or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
