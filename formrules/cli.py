"""The `formrules` command: check, schema, show, preview, lsp, run, web, worker, runs,
users, tokens, batches.

Expected failures (`FormrulesError`) print a clean message and exit 1; anything else is a
bug and keeps its traceback. The web layer is imported only by the commands that serve it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from formrules.config import from_env
from formrules.errors import FormrulesError, errors_in
from formrules.language.loader import check_rules
from formrules.process import logs as log_setup


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """formrules: forms and event trees in YAML, with background work on RQ."""


def main() -> None:
    """Console entry point."""
    log_setup.configure(replace=False)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FormrulesError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("directory", required=False)
def check(directory: str | None) -> None:
    """Validate the rules in DIRECTORY (default: FORMRULES_RULES or rules/)."""
    from formrules.actions import registry as actions

    settings = from_env()
    actions.load_modules(settings.actions_modules)
    directory = directory or settings.rules_dir
    ruleset, problems = check_rules(directory)
    for problem in problems:
        click.echo(str(problem))
    errors = errors_in(problems)
    if errors:
        click.echo(f"{len(errors)} problem{'s' if len(errors) != 1 else ''} found.",
                   err=True)
        sys.exit(1)
    warned = len(problems) - len(errors)
    click.echo(f"{len(ruleset.forms)} form(s) OK in {directory}: "
               + ", ".join(sorted(ruleset.forms))
               + (f" ({warned} warning{'s' if warned != 1 else ''})" if warned else ""))


@cli.command()
@click.option("--builtin", is_flag=True,
              help="only formrules' own actions (what docs/formrules.schema.json holds)")
def schema(builtin: bool) -> None:
    """Print the JSON Schema of rule files (with FORMRULES_ACTIONS' custom actions)."""
    from formrules.actions import registry as actions
    from formrules.language.schema import builtin_actions, schema_text

    if not builtin:
        actions.load_modules(from_env().actions_modules)
    click.echo(schema_text(builtin_actions() if builtin else None), nl=False)


@cli.command()
def lsp() -> None:
    """Serve the Language Server Protocol on stdin/stdout (point your editor at it)."""
    try:
        from formrules.language.lsp import serve
    except ImportError as exc:
        raise FormrulesError("formrules lsp needs pygls: pip install 'formrules[lsp]'") from exc
    serve(from_env().actions_modules)


@cli.command()
@click.argument("form_id")
@click.option("--rules", "rules_dir", help="rules directory (default: rules/)")
def show(form_id: str, rules_dir: str | None) -> None:
    """Print FORM_ID's trees, batches and schedules with every node's path."""
    from formrules.actions import registry as actions
    from formrules.language.loader import load_rules
    from formrules.language.outline import outline

    settings = from_env()
    actions.load_modules(settings.actions_modules)
    form = load_rules(rules_dir or settings.rules_dir).form(form_id)
    if form is None:
        raise FormrulesError(f"no form {form_id!r} in {rules_dir or settings.rules_dir}")
    click.echo("\n".join(outline(form)))


@cli.command()
@click.argument("directory", required=False)
def impact(directory: str | None) -> None:
    """What the rules in DIRECTORY (default: the configured rules) change for pending Runs.

    Compares them with the rules the deployment uses (the configured rules directory,
    each broken file at its last good version) and with the tree each pending Run carries.
    """
    from formrules.actions import registry as actions
    from formrules.language.impact import lines
    from formrules.language.registry import current_rules
    from formrules.runs.impact import impact as work_out

    settings = from_env()
    actions.load_modules(settings.actions_modules)
    on_disk, problems = check_rules(directory or settings.rules_dir)
    in_use = current_rules(settings.rules_dir).forms
    # A file with problems is not applied (as live reload does): its form stays at the
    # version in use.
    broken = {Path(p.file).name for p in problems}
    on_disk_forms = {k: f for k, f in in_use.items() if Path(f.file).name in broken}
    on_disk_forms.update((k, f) for k, f in on_disk.forms.items()
                         if Path(f.file).name not in broken)
    rt = _runtime()
    with rt.store.session() as s:
        report = lines(work_out(s, in_use, on_disk_forms))
    for problem in problems:
        report.append(f"not applied: {problem}")
    click.echo("\n".join(report))


@cli.command()
@click.argument("form_id")
@click.option("--set", "assignments", multiple=True, metavar="FIELD=VALUE",
              help="a field value (repeatable); other fields take their defaults")
@click.option("--event", default="submit", show_default=True,
              type=click.Choice(["submit", "update"]))
@click.option("--rules", "rules_dir", help="rules directory (default: rules/)")
@click.option("--until", "until", metavar="DURATION",
              help="also lay out on a simulated clock what happens over this long (30d)")
@click.option("--at", "at", metavar="TIME",
              help="as if submitted then (ISO 8601; without an offset: FORMRULES_TIMEZONE)")
def preview(form_id: str, assignments: tuple[str, ...], event: str,
            rules_dir: str | None, until: str | None, at: str | None) -> None:
    """Show what FORM_ID's tree would do with some values, without doing any of it.

    With `--event update`, the record before the edit has the fields' defaults and the
    `--set` values are the edit. `--until 30d` adds a timeline: when each Background and
    Delay runs, each retry if a step keeps failing, and which schedule slots fire.
    """
    from formrules.actions import registry as actions
    from formrules.language.fieldtypes import field_type
    from formrules.language.loader import load_rules
    from formrules.language.values import to_storage
    from formrules.runs.preview import preview as preview_tree

    settings = from_env()
    actions.load_modules(settings.actions_modules)
    form = load_rules(rules_dir or settings.rules_dir).form(form_id)
    if form is None:
        raise FormrulesError(f"no form {form_id!r} in {rules_dir or settings.rules_dir}")
    defaults = {f.name: to_storage(f.default, f.type) for f in form.fields}
    values = dict(defaults)
    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        field = form.field(name.strip())
        if not sep or field is None:
            raise FormrulesError(f"--set {assignment!r}: expected FIELD=VALUE with one of "
                                 + ", ".join(f.name for f in form.fields))
        try:
            values[field.name] = field_type(field.type).from_text(raw)
        except ValueError as exc:
            raise FormrulesError(f"--set {assignment!r}: {exc}") from exc
    start = _simulated_start(at, settings.timezone) or _utcnow()
    for line in preview_tree(form, values, settings, event=event, old=defaults, now=start):
        click.echo(str(line))
    if until is not None:
        from formrules.language.duration import parse_duration
        from formrules.runs.timeline import timeline
        try:
            window = parse_duration(until)
        except ValueError as exc:
            raise FormrulesError(f"--until: {exc}") from exc
        click.echo("")
        for line in timeline(form, values, settings, start=start, until=window,
                             event=event, old=defaults):
            click.echo(line)


def _utcnow():
    from datetime import UTC, datetime
    return datetime.now(UTC)


def _simulated_start(at: str | None, timezone: str):
    """`--at` as an aware datetime (None without it)."""
    if at is None:
        return None
    from datetime import datetime
    from zoneinfo import ZoneInfo
    try:
        when = datetime.fromisoformat(at)
    except ValueError as exc:
        raise FormrulesError(f"--at {at!r}: expected a time like 2030-01-31T09:00 "
                             "or 2030-01-31T09:00+01:00") from exc
    return when if when.tzinfo else when.replace(tzinfo=ZoneInfo(timezone))


@cli.command()
@click.option("--rules", "rules_dir", help="rules directory (default: rules/)")
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def run(rules_dir: str | None, port: int, host: str) -> None:
    """Run everything: web + worker (+ a private Redis when REDIS_URL is unset)."""
    from formrules.process.redis_server import RedisServer

    if rules_dir:
        os.environ["FORMRULES_RULES"] = rules_dir
    settings = from_env()
    _warn_about_rules(settings.rules_dir, settings.actions_modules)
    _prepare_schema(settings)
    _observed()  # one metrics directory for the web and the worker it starts
    redis_server = None
    supervisor = None

    def shutdown(*_args) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGHUP, shutdown)  # a closed terminal: stop in order, as for Ctrl-C
    try:
        if not os.environ.get("REDIS_URL"):
            redis_server = RedisServer(Path(settings.instance_dir) / "redis").start()
            os.environ["REDIS_URL"] = redis_server.url
            click.echo(f"Started a private Redis at {redis_server.url} "
                       f"(data in {redis_server.data_dir})")
        from formrules.process.children import Supervisor, die_with_parent

        def start_worker() -> subprocess.Popen:
            # One worker for everything: every queue the rules name (read at its start).
            return subprocess.Popen([sys.executable, "-m", "formrules.process.worker",
                                     "--queues", "*"],
                                    env=os.environ.copy(), preexec_fn=die_with_parent)

        # Restarts the worker (and the private Redis) whenever one exits on its own.
        supervisor = Supervisor(start_worker, redis_server)
        supervisor.start()
        from werkzeug.serving import run_simple

        from formrules.web import create_app
        app = create_app(settings=from_env())
        click.echo(f"formrules is running at http://{host}:{port}/  (Ctrl-C stops it all)")
        run_simple(host, port, app, threaded=True, use_reloader=False)
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor is not None:
            _stop_worker(supervisor.stop())
        if redis_server is not None:
            redis_server.stop()  # last: the worker needed it until it stopped
        with contextlib.suppress(OSError):  # after a hangup the terminal may be gone
            click.echo("Stopped.")


def _stop_worker(child: subprocess.Popen) -> None:
    """Stop a worker: warm (finish the current job), then cold, then kill.

    A job cut short is not lost: its Run stops heartbeating and is resumed from its last
    checkpoint by the next worker that starts.
    """
    for stop, patience in ((child.terminate, 5), (child.terminate, 10), (child.kill, 10)):
        if child.poll() is not None:
            return
        stop()  # RQ: a first SIGTERM is a warm shutdown, a second one kills the work-horse
        try:
            child.wait(patience)
        except subprocess.TimeoutExpired:
            continue


def _prepare_schema(settings) -> None:
    """Upgrade the embedded SQLite database by itself; any other must be current already.

    The embedded database (no DATABASE_URL) belongs to this machine's formrules alone, so
    upgrading it is safe; a shared database is upgraded once, on purpose, by an operator.
    """
    from formrules.store import migrate
    from formrules.store.db import Store

    store = Store(settings.sqlalchemy_url)
    try:
        if settings.database_url:
            store.check_schema()
            return
        before, after = migrate.upgrade(store.url)
        if before.current != after:
            click.echo(f"Database upgraded: {before.label} -> {after}", err=True)
    finally:
        store.dispose()


def _warn_about_rules(directory: str, modules: str) -> None:
    """Say which rule files are broken; they stay out until fixed, the rest is served."""
    from formrules.actions import registry as actions

    actions.load_modules(modules)
    _, problems = check_rules(directory)
    for problem in problems:
        click.echo(f"warning: {problem}" if problem.is_error else str(problem), err=True)
    if errors_in(problems):
        click.echo("warning: forms with problems are not served until their files are "
                   "fixed (edits are picked up while running)", err=True)


def _observed() -> None:
    """Logs as FORMRULES_LOG_FORMAT says; metrics shared by this process and its children.

    Called before anything imports prometheus_client (see `process.metrics`).
    """
    from formrules.process import logs, metrics
    logs.configure()
    metrics.use_multiprocess_dir()


@cli.command()
@click.option("--port", default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--workers", default=0, show_default=True,
              help="gunicorn worker processes (production); 0: the development server")
@click.option("--threads", default=8, show_default=True, help="threads per gunicorn worker")
def web(port: int, host: str, workers: int, threads: int) -> None:
    """Run the web app alone: gunicorn with --workers N, else the development server."""
    from formrules.store.db import Store
    _observed()
    settings = from_env()
    _warn_about_rules(settings.rules_dir, settings.actions_modules)
    store = Store(settings.sqlalchemy_url)
    try:
        store.check_schema()  # refuse here, before gunicorn forks workers that would all fail
    finally:
        store.dispose()
    if workers > 0:
        from formrules.web.server import serve
        serve(host, port, workers, threads)
        return
    from werkzeug.serving import run_simple

    from formrules.web import create_app
    run_simple(host, port, create_app(settings=settings), threaded=True, use_reloader=False)


@cli.command()
@click.option("--simple", is_flag=True, help="run jobs in this process, with no guard process")
@click.option("--fork", is_flag=True, help="fork a work-horse per job (RQ's Worker): slower, "
                                          "isolated per job")
@click.option("--burst", is_flag=True, help="stop when the queue is empty")
@click.option("--no-reconciler", is_flag=True, help="leave reconciling to other workers")
@click.option("--health-port", type=int, help="serve /healthz and /metrics on this port")
@click.option("--health-host", default="127.0.0.1", show_default=True,
              help="address for --health-port")
@click.option("--queues", help="queues to serve, first first: 'slow,default' (default: "
                               "FORMRULES_QUEUES, else 'default'; '*': every queue named)")
def worker(simple: bool, fork: bool, burst: bool, no_reconciler: bool,
           health_port: int | None, health_host: str, queues: str | None) -> None:
    """Run a worker: jobs in-process under a guard process (default), RQ scheduling and,
    when elected, the reconciler."""
    _observed()
    from formrules.process.worker import main
    if simple and fork:
        raise click.UsageError("--simple and --fork exclude each other")
    argv = [flag for flag, on in (("--simple", simple), ("--fork", fork), ("--burst", burst),
                                  ("--no-reconciler", no_reconciler)) if on]
    if health_port:
        argv += ["--health-port", str(health_port), "--health-host", health_host]
    if queues:
        argv += ["--queues", queues]
    main(argv)


@cli.command()
def reconcile() -> None:
    """Run one reconciler pass now and print what it did."""
    from formrules.process.runtime import Runtime, install
    from formrules.runs.reconciler import dispatch_due, reconcile_once
    settings = from_env()
    _prepare_schema(settings)
    rt = install(Runtime(settings, bounded=False))  # as the leader runs it
    moved = dispatch_due(rt)  # the due Delays and retries, as the leader's tick does
    result = reconcile_once(rt)
    result.dispatched += moved
    click.echo(str(result))


@cli.group()
def db() -> None:
    """The database schema: upgrade it, see where it stands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True,
              help="upgrade only up to this revision")
def db_upgrade(revision: str) -> None:
    """Migrate the database (DATABASE_URL, or the embedded SQLite) to this version's schema.

    Safe to run again; a database made before migrations existed is recognised.
    """
    from formrules.store import migrate
    settings = from_env()
    before, after = migrate.upgrade(settings.sqlalchemy_url, revision)
    if before.current == after:
        click.echo(f"Database already at {after}.")
    else:
        click.echo(f"Database upgraded: {before.label} -> {after}")


@db.command("current")
def db_current() -> None:
    """Print the database's revision and this code's; exit 1 when they differ."""
    from formrules.store import migrate
    found = migrate.current(from_env().sqlalchemy_url)
    click.echo(f"database: {found.label}")
    click.echo(f"code:     {found.head}")
    if not found.up_to_date:
        click.echo(f"behind: {migrate.UPGRADE_HINT}", err=True)
        sys.exit(1)


@db.command("reindex")
def db_reindex() -> None:
    """Rebuild the admin's text search tables (SQLite; run after a VACUUM)."""
    from formrules.store import search
    from formrules.store.db import Store
    store = Store(from_env().sqlalchemy_url)
    with store.session() as s:
        done = search.rebuild(s)
    store.engine.dispose()
    click.echo("Search tables rebuilt." if done else
               "Nothing to rebuild: PostgreSQL indexes follow their rows, and a SQLite "
               "without the search tables searches every row.")


@db.command("history")
def db_history() -> None:
    """List the schema revisions this version ships, newest first."""
    from formrules.store import migrate
    for line in migrate.history():
        click.echo(line)


@cli.group()
def forms() -> None:
    """Pause and resume a form's work."""


@forms.command("pause")
@click.argument("form_id")
def forms_pause(form_id: str) -> None:
    """Pause FORM's queued and scheduled work: nothing of it starts until resumed."""
    from formrules.runs import pause
    with _runtime().store.session() as s:
        changed = pause.pause(s, form_id, "the CLI")
    click.echo(f"{form_id}: {'paused' if changed else 'already paused'}.")


@forms.command("resume")
@click.argument("form_id")
def forms_resume(form_id: str) -> None:
    """Resume FORM: the reconciler's next pass dispatches what waited."""
    from formrules.runs import pause
    with _runtime().store.session() as s:
        changed = pause.resume(s, form_id)
    click.echo(f"{form_id}: {'resumed' if changed else 'was not paused'}.")


@forms.command("paused")
def forms_paused() -> None:
    """List the paused forms."""
    from formrules.runs import pause
    with _runtime().store.session() as s:
        for p in pause.paused_forms(s).values():
            click.echo(f"{p.form_id}\tpaused by {p.paused_by} at "
                       f"{p.paused_at.isoformat(timespec='seconds')}")


@cli.group()
def callbacks() -> None:
    """Completion callbacks of API clients."""


@callbacks.command("list")
@click.option("--state", type=click.Choice(["waiting", "due", "delivered", "failed"]),
              help="only callbacks in this state (failed: given up)")
@click.option("--limit", default=50, show_default=True)
def callbacks_list(state: str | None, limit: int) -> None:
    """List callbacks, newest first: state, attempts, URL and the last error."""
    from sqlalchemy import select

    from formrules.store.models import Callback
    with _runtime().store.session() as s:
        query = select(Callback).order_by(Callback.created_at.desc()).limit(limit)
        if state:
            query = query.where(Callback.state == state)
        for c in s.scalars(query):
            click.echo(f"{c.id}\t{c.state}\t{c.attempts}\t{c.url}\t{c.last_error or ''}")


@cli.group()
def runs() -> None:
    """Inspect and repair Runs."""


def _runtime():
    from formrules.process.runtime import Runtime, install
    settings = from_env()
    _prepare_schema(settings)
    return install(Runtime(settings))


@runs.command("list")
@click.option("--status", help="e.g. dead, running, retrying")
@click.option("--form", "form_id")
@click.option("--limit", default=50, show_default=True)
def runs_list(status: str | None, form_id: str | None, limit: int) -> None:
    """List Runs, newest first."""
    from sqlalchemy import select

    from formrules.store.models import Run
    rt = _runtime()
    with rt.store.session() as s:
        query = select(Run).order_by(Run.created_at.desc()).limit(limit)
        if status:
            query = query.where(Run.status == status)
        if form_id:
            query = query.where(Run.form_id == form_id)
        for run in s.scalars(query):
            click.echo(f"{run.id}  {run.status:<9}  {run.attempt}/{run.max_attempts}  "
                       f"{run.form_id}  {run.node_path}  {run.title}")


@runs.command("show")
@click.argument("run_id")
def runs_show(run_id: str) -> None:
    """Show a Run with its trace and full error."""
    from sqlalchemy import select

    from formrules.runs.trace import attempt_numbers
    from formrules.store.models import Run, RunEvent
    rt = _runtime()
    with rt.store.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise FormrulesError(f"no run {run_id}")
        for key in ("id", "status", "form_id", "node_path", "title", "attempt", "max_attempts",
                    "due_at", "started_at", "finished_at", "recoveries", "safe_error"):
            click.echo(f"{key:>12}: {getattr(run, key)}")
        click.echo("       trace:")
        for ev, attempt in attempt_numbers(s.scalars(
                select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id))):
            first = (ev.detail or "").strip().splitlines()[-1:] or [""]
            click.echo(f"  {ev.at:%Y-%m-%d %H:%M:%S} #{attempt or '-'} {ev.event:<8} "
                       f"{ev.path or '-'}  {first[0][:120]}")
        if run.last_error:
            click.echo("  last error:\n" + run.last_error)


@runs.command("retry")
@click.argument("run_ids", nargs=-1, required=True)
def runs_retry(run_ids: tuple[str, ...]) -> None:
    """Retry dead or cancelled Runs."""
    _control(run_ids, "retry")


@runs.command("cancel")
@click.argument("run_ids", nargs=-1, required=True)
def runs_cancel(run_ids: tuple[str, ...]) -> None:
    """Cancel Runs (running ones stop at their next step)."""
    _control(run_ids, "cancel")


def _control(run_ids: tuple[str, ...], what: str) -> None:
    from formrules.runs import control
    from formrules.store.models import Run
    rt = _runtime()
    failed = False
    for run_id in run_ids:
        with rt.store.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                click.echo(f"{run_id}: no such run", err=True)
                failed = True
                continue
            try:
                outcome = getattr(control, what)(s, run, "the CLI") or "queued"
            except control.NotAllowed as exc:
                click.echo(f"{run_id}: {exc}", err=True)
                failed = True
                continue
        control.after_commit(rt.dispatcher, run)
        click.echo(f"{run_id}: {outcome}")
    if failed:
        sys.exit(1)


@cli.group()
def users() -> None:
    """Manage user accounts."""


MIN_PASSWORD = 8


def _new_password(name: str, password: str | None, from_stdin: bool) -> str:
    """The password from the option, the first line of stdin, or asked for twice."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not password:
        # Asked twice and compared: a typo here would lock the person out.
        password = click.prompt(f"Password for {name}", hide_input=True,
                                confirmation_prompt="Repeat the password")
    if len(password) < MIN_PASSWORD:
        raise FormrulesError(f"a password needs at least {MIN_PASSWORD} characters")
    return password


_password_options = [
    click.option("--password", envvar="FORMRULES_PASSWORD",
                 help="the password (or FORMRULES_PASSWORD); default: asked for twice"),
    click.option("--password-stdin", is_flag=True,
                 help="read the password from the first line of stdin (for scripts)"),
]


def _with_password_options(fn):
    for option in reversed(_password_options):
        fn = option(fn)
    return fn


@users.command("add")
@click.argument("name")
@click.option("--operator", is_flag=True, help="may use the operator pages")
@_with_password_options
def users_add(name: str, operator: bool, password: str | None, password_stdin: bool) -> None:
    """Create a user (or reset its password and role)."""
    from sqlalchemy import select
    from werkzeug.security import generate_password_hash

    from formrules.store.models import User
    password = _new_password(name, password, password_stdin)
    rt = _runtime()
    with rt.store.session() as s:
        user = s.scalar(select(User).where(User.name == name)) or User(name=name)
        if user.id is not None:  # a new password ends the sessions started with the old one
            user.session_generation = (user.session_generation or 0) + 1
        user.password_hash = generate_password_hash(password)
        user.is_operator = operator
        s.add(user)
    click.echo(f"user {name} saved{' (operator)' if operator else ''}")


@users.command("passwd")
@click.argument("name")
@_with_password_options
def users_passwd(name: str, password: str | None, password_stdin: bool) -> None:
    """Set a new password for an existing user."""
    from sqlalchemy import select
    from werkzeug.security import generate_password_hash

    from formrules.store.models import User
    rt = _runtime()
    with rt.store.session() as s:
        if s.scalar(select(User).where(User.name == name)) is None:
            raise FormrulesError(f"no user named {name!r}")
    password = _new_password(name, password, password_stdin)
    with rt.store.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:  # removed while we asked
            raise FormrulesError(f"no user named {name!r}")
        user.password_hash = generate_password_hash(password)
        # A new password ends every session of the account (see web/sessions.py).
        user.session_generation = (user.session_generation or 0) + 1
    click.echo(f"password of {name} changed")


@users.command("list")
def users_list() -> None:
    """List user accounts (name, role, created)."""
    from sqlalchemy import select

    from formrules.store.models import User
    rt = _runtime()
    with rt.store.session() as s:
        for user in s.scalars(select(User).order_by(User.name)):
            role = "operator" if user.is_operator else "user"
            click.echo(f"{user.name}  {role}  created {user.created_at:%Y-%m-%d}")


@users.command("remove")
@click.argument("name")
def users_remove(name: str) -> None:
    """Delete the user called NAME; their records and Runs stay."""
    from sqlalchemy import select

    from formrules.store.models import User
    rt = _runtime()
    with rt.store.session() as s:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise FormrulesError(f"no user named {name!r}")
        s.delete(user)
    click.echo(f"user {name} removed")


@cli.group()
def tokens() -> None:
    """Manage API tokens for the JSON API."""


@tokens.command("add")
@click.argument("name")
def tokens_add(name: str) -> None:
    """Create an API token called NAME and print it (it is shown only this once)."""
    from formrules.store import tokens as tokens_mod
    rt = _runtime()
    with rt.store.session() as s:
        token = tokens_mod.create(s, name)
    click.echo(token)
    click.echo(f"API token {name!r} created; send it as 'Authorization: Bearer <token>'. "
               "It is stored hashed and cannot be shown again.", err=True)


@tokens.command("list")
def tokens_list() -> None:
    """List API tokens (names and last use; never the tokens)."""
    from sqlalchemy import select

    from formrules.store.models import ApiToken
    rt = _runtime()
    with rt.store.session() as s:
        for token in s.scalars(select(ApiToken).order_by(ApiToken.name)):
            used = f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never"
            click.echo(f"{token.name}  created {token.created_at:%Y-%m-%d}  last used {used}")


@tokens.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Delete the API token called NAME; clients using it get 401 from now on."""
    from formrules.store import tokens as tokens_mod
    rt = _runtime()
    with rt.store.session() as s:
        if not tokens_mod.revoke(s, name):
            raise FormrulesError(f"no API token named {name!r}")
    click.echo(f"API token {name!r} revoked")


@cli.group()
def batches() -> None:
    """Run a form's batches over its records."""


@cli.group("tasks", hidden=True)
def tasks_alias() -> None:
    """Deprecated name of `batches`."""
    click.echo("warning: `formrules tasks` is now `formrules batches`; the old name will "
               "go away", err=True)


@batches.command("list")
def batches_list() -> None:
    """List the batches every form defines."""
    from formrules.language.registry import current_rules
    rt = _runtime()
    for form in sorted(current_rules(rt.settings.rules_dir).forms.values(), key=lambda f: f.id):
        for item in form.batches.values():
            click.echo(f"{form.id} {item.name}  {item.label}  (concurrency {item.concurrency}"
                       f"{', stop_on_error' if item.stop_on_error else ''})")


@batches.command("run")
@click.argument("form_id")
@click.argument("name")
@click.option("--where", "where", help="only records matching this expression, "
                                       "e.g. \"record.status == 'reserved'\"")
@click.option("--wait", is_flag=True, help="follow the progress until the batch ends")
def batches_run(form_id: str, name: str, where: str | None, wait: bool) -> None:
    """Start batch NAME of FORM over the form's records; print the batch id."""
    import time

    from formrules.language.registry import current_rules
    from formrules.runs import batch
    from formrules.store.models import Batch
    rt = _runtime()
    form = current_rules(rt.settings.rules_dir).form(form_id)
    if form is None:
        from formrules.language.registry import rules_status
        status = rules_status(rt.settings.rules_dir)
        raise FormrulesError(f"no form {form_id!r}" + ("" if status.ok else
                                                       f" ({status.summary()})"))
    with rt.store.session() as s:
        started = batch.start(s, form, name, owner="cli", settings=rt.settings, where=where)
    batch.advance(rt, started.id)
    click.echo(started.id)
    click.echo(f"{started.title}: {started.total} record(s), {started.concurrency} at a time",
               err=True)
    if not wait:
        return
    shown = None
    while True:
        with rt.store.session() as s:
            item = s.get(Batch, started.id)
            progress = batch.progress(s, item)
        line = f"{progress['text']} finished ({progress['percent']}%)"
        if line != shown:
            click.echo(line, err=True)
            shown = line
        if progress["ended"]:
            click.echo(f"batch {item.status}: " + ", ".join(
                f"{n} {st}" for st, n in sorted(progress["counts"].items())), err=True)
            if item.status != "done":
                sys.exit(1)
            return
        time.sleep(1)


tasks_alias.add_command(batches_list, "list")
tasks_alias.add_command(batches_run, "run")


if __name__ == "__main__":
    main()
