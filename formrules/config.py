"""Settings from the environment (and test overrides), in one typed place."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from formrules.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Everything web, worker and CLI need to agree on."""

    rules_dir: str = "rules"
    instance_dir: str = "instance"
    upload_dir: str = ""  # uploaded files; empty: `uploads` in the instance folder
    database_url: str = ""  # empty: SQLite file in the instance folder
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "formrules"
    # The lanes a worker serves, in priority order (`formrules worker --queues slow,default`);
    # ("*",): every queue the rules name (the all-in-one `formrules run`).
    queues: tuple[str, ...] = ("default",)
    secret_key: str = ""
    actions_modules: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_tls: bool = False
    mail_from: str = "formrules@localhost"
    http_allow: tuple[str, ...] = ()  # hosts `http_request` may call
    # Requests per host across all workers: (("api.example.com", "10/second"), …).
    http_limits: tuple[tuple[str, str], ...] = ()
    http_limit_wait_seconds: float = 60.0  # longest a request waits for its host's limit
    heartbeat_seconds: float = 5.0  # how often a running Run proves it is alive
    stale_seconds: float = 30.0  # a Run silent this long is resumed elsewhere
    reconcile_seconds: float = 10.0  # reconciler interval
    default_timeout_seconds: float = 3600.0
    progress_write_seconds: float = 0.5  # progress is written at most this often
    max_recoveries: int = 5  # a Run that kills its worker this often goes dead
    # A request (a submit) waits on Redis at most this long; the reconciler delivers the rest.
    submit_redis_seconds: float = 0.5
    leader_lease_seconds: float = 5.0  # a killed leader's duties move on within this
    tick_seconds: float = 0.5  # how often the leader moves due Delays and retries to the queue
    timezone: str = "UTC"
    locale: str = "en"  # pages' language and date formats when the browser asks for none
    secure_cookies: bool = False  # set behind HTTPS: cookies are then never sent in clear
    metrics_token: str = ""  # /metrics wants it as a bearer token; empty: local clients only
    session_idle_hours: float = 12.0  # a logged-in session unused this long ends
    session_max_days: float = 14.0  # and every logged-in session ends this long after login
    # Failed log-ins and API token failures allowed per window ("N per M minutes").
    login_account_limit: str = "5 per 15 minutes"  # per user name: a lockout window
    login_client_limit: str = "20 per 15 minutes"  # per client address, any names
    api_auth_limit: str = "20 per 15 minutes"  # per client address, bad API tokens
    # How long finished Runs are kept when a form says nothing: `30d`, `done=30d,dead=90d`;
    # empty keeps them (formrules.language.retention). A purge pass removes at most
    # `purge_batch` Runs; the next pass goes on.
    retention: str = ""
    purge_batch: int = 500
    # Completion callbacks: their HMAC key (empty: callbacks cannot be registered), the
    # deliveries tried before one is given up, and the first wait after a failure
    # (then x3 each time, at most an hour) (formrules.runs.callbacks).
    callback_secret: str = ""
    callback_attempts: int = 8
    callback_backoff_seconds: float = 10.0
    # Live event streams (SSE) per web process at once, each holding a thread for at most
    # `sse_seconds`; more are answered 204 (do not reconnect) and those pages keep polling.
    sse_streams: int = 4
    sse_seconds: float = 120.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def outbox_dir(self) -> Path:
        """Where e-mail goes as .eml files when no SMTP host is set."""
        return Path(self.instance_dir) / "outbox"

    @property
    def uploads_dir(self) -> Path:
        """Where uploaded files are kept (FORMRULES_UPLOAD_DIR, or instance/uploads)."""
        return Path(self.upload_dir) if self.upload_dir else Path(self.instance_dir) / "uploads"

    @property
    def sqlalchemy_url(self) -> str:
        """DATABASE_URL, or the default SQLite file in the instance folder."""
        url = self.database_url or f"sqlite:///{Path(self.instance_dir).resolve()}/formrules.db"
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # use psycopg 3
        return url

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some settings changed (tests, CLI flags)."""
        return replace(self, **changes)


_ENV = {
    "rules_dir": "FORMRULES_RULES", "instance_dir": "FORMRULES_INSTANCE",
    "upload_dir": "FORMRULES_UPLOAD_DIR",
    "database_url": "DATABASE_URL", "redis_url": "REDIS_URL", "queue": "FORMRULES_QUEUE",
    "queues": "FORMRULES_QUEUES", "http_limits": "FORMRULES_HTTP_LIMITS",
    "http_limit_wait_seconds": "FORMRULES_HTTP_LIMIT_WAIT",
    "secret_key": "SECRET_KEY", "actions_modules": "FORMRULES_ACTIONS",
    "smtp_host": "SMTP_HOST", "smtp_port": "SMTP_PORT", "smtp_user": "SMTP_USER",
    "smtp_password": "SMTP_PASSWORD", "smtp_tls": "SMTP_TLS", "mail_from": "MAIL_FROM",
    "http_allow": "FORMRULES_HTTP_ALLOW", "heartbeat_seconds": "FORMRULES_HEARTBEAT",
    "stale_seconds": "FORMRULES_STALE_AFTER", "reconcile_seconds": "FORMRULES_RECONCILE",
    "default_timeout_seconds": "FORMRULES_DEFAULT_TIMEOUT",
    "progress_write_seconds": "FORMRULES_PROGRESS_INTERVAL",
    "max_recoveries": "FORMRULES_MAX_RECOVERIES", "timezone": "FORMRULES_TIMEZONE",
    "locale": "FORMRULES_LOCALE",
    "secure_cookies": "FORMRULES_SECURE_COOKIES", "metrics_token": "FORMRULES_METRICS_TOKEN",
    "session_idle_hours": "FORMRULES_SESSION_IDLE_HOURS",
    "session_max_days": "FORMRULES_SESSION_MAX_DAYS",
    "login_account_limit": "FORMRULES_LOGIN_ACCOUNT_LIMIT",
    "login_client_limit": "FORMRULES_LOGIN_CLIENT_LIMIT",
    "api_auth_limit": "FORMRULES_API_AUTH_LIMIT",
    "submit_redis_seconds": "FORMRULES_SUBMIT_REDIS_TIMEOUT",
    "leader_lease_seconds": "FORMRULES_LEADER_LEASE", "tick_seconds": "FORMRULES_TICK",
    "retention": "FORMRULES_RETENTION", "purge_batch": "FORMRULES_PURGE_BATCH",
    "callback_secret": "FORMRULES_CALLBACK_SECRET",
    "callback_attempts": "FORMRULES_CALLBACK_ATTEMPTS",
    "callback_backoff_seconds": "FORMRULES_CALLBACK_BACKOFF",
    "sse_streams": "FORMRULES_SSE_STREAMS", "sse_seconds": "FORMRULES_SSE_SECONDS",
}


def from_env(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from environment variables, then `overrides` on top."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(Settings)}
    for name, var in _ENV.items():
        if var not in env or env[var] == "":
            continue
        raw, kind = env[var], types[name]
        if kind in ("int", "float"):
            try:
                values[name] = int(raw) if kind == "int" else float(raw)
            except ValueError:
                raise ConfigError(f"{var} must be a {'whole ' if kind == 'int' else ''}"
                                  f"number, got {raw!r}") from None
        elif kind == "bool":
            values[name] = raw.lower() in ("1", "true", "yes", "on")
        elif name == "http_allow":
            values[name] = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
        elif name == "queues":
            values[name] = parse_queues(raw, var)
        elif name == "http_limits":
            values[name] = parse_http_limits(raw, var)
        else:
            values[name] = raw
    values.update(overrides)
    if values.get("retention"):
        from formrules.language.retention import parse_setting
        try:
            parse_setting(values["retention"])
        except ValueError as exc:
            raise ConfigError(f"FORMRULES_RETENTION: {exc}") from None
    settings = Settings(**values)
    if not settings.secret_key:
        settings = replace(settings, secret_key=instance_secret(settings.instance_dir))
    return settings


def parse_queues(raw: str, source: str = "--queues") -> tuple[str, ...]:
    """`slow,default` -> ("slow", "default"), in that (priority) order; `*`: every queue."""
    from formrules.language.tree import QUEUE_NAME
    names = tuple(dict.fromkeys(q.strip() for q in raw.split(",") if q.strip()))
    for name in names:
        if name != "*" and not QUEUE_NAME.match(name):
            raise ConfigError(f"{source}: {name!r} is not a queue name (lowercase letters, "
                              f"digits, '_' or '-', starting with a letter)")
    if not names:
        raise ConfigError(f"{source}: name at least one queue")
    return names


def parse_http_limits(raw: str,
                      source: str = "FORMRULES_HTTP_LIMITS") -> tuple[tuple[str, str], ...]:
    """`api.example.com=10/second, 127.0.0.1:8080=2 per minute` -> ((host, limit), …).

    The limit is in the `limits` package's notation (`10/second`, `100 per minute`);
    `/s`, `/m`, `/h` and `/d` are accepted as short forms.
    """
    from limits import parse
    out = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, sep, limit = item.partition("=")
        limit = _short_limit(limit.strip())
        try:
            if not sep or not host.strip():
                raise ValueError
            parse(limit)
        except ValueError:
            raise ConfigError(f"{source}: expected host=N/second (or per minute, hour, "
                              f"day), got {item!r}") from None
        out.append((host.strip().lower(), limit))
    return tuple(out)


_SHORT_UNITS = {"s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day"}


def _short_limit(limit: str) -> str:
    count, sep, unit = limit.partition("/")
    return f"{count.strip()}/{_SHORT_UNITS.get(unit.strip(), unit.strip())}" if sep else limit


def instance_secret(instance_dir: str) -> str:
    """The SECRET_KEY kept in the instance folder, generated on first use."""
    path = Path(instance_dir) / "secret_key"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a private file, then linked into place: when web and worker start
    # together, exactly one key wins and nobody can read a half-written (empty) file.
    tmp = path.with_name(f".secret_key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race: use its key
    finally:
        tmp.unlink()
    return path.read_text().strip()
