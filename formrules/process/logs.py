"""The one log set-up of every formrules process: text, or JSON lines (FORMRULES_LOG_FORMAT=json).

Each line carries the Run id and the record token of the work it belongs to, taken from
context variables that the job entry point (and the web, for URLs naming a record) set;
so `jq 'select(.run_id == "...")'` follows one Run through web, worker and reconciler.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

run_id: ContextVar[str | None] = ContextVar("formrules_run_id", default=None)
record_token: ContextVar[str | None] = ContextVar("formrules_record_token", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s%(context)s"


class ContextFilter(logging.Filter):
    """Put the current Run id and record token on every record (None when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = run_id.get()
        record.record_token = record_token.get()
        parts = [f"run={record.run_id}"] if record.run_id else []
        if record.record_token:
            parts.append(f"record={record.record_token}")
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for `fmt` ("text" or "json")."""
    if fmt == "json":
        return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(run_id)s "
                             "%(record_token)s %(process)d",
                             rename_fields={"asctime": "time", "levelname": "level",
                                            "name": "logger", "process": "pid"},
                             reserved_attrs=[*RESERVED_ATTRS, "context"])
    return logging.Formatter(TEXT_FORMAT)


def configure(fmt: str | None = None, level: str | None = None, replace: bool = True) -> None:
    """Send this process's logs to stderr in `fmt` at `level` (defaults: the environment).

    FORMRULES_LOG_FORMAT is `text` or `json`; FORMRULES_LOG_LEVEL is DEBUG, INFO (the
    default: operators read a worker's `log:` lines and schedule summaries there), ….
    `replace` swaps the root handlers, so RQ and gunicorn (which add their own only when the
    root has none) log through it too; without it a handler someone else installed
    (pytest, an embedding app) stays, and the call only sets levels where none was set.
    """
    fmt = (fmt or os.environ.get("FORMRULES_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        from formrules.errors import ConfigError
        raise ConfigError(f"FORMRULES_LOG_FORMAT must be text or json, got {fmt!r}")
    numeric = logging.getLevelName((level or os.environ.get("FORMRULES_LOG_LEVEL")
                                    or "INFO").upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    if replace or not root.handlers:
        for old in list(root.handlers) if replace else ():
            root.removeHandler(old)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter(fmt))
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
        root.setLevel(numeric)
    logging.getLogger("formrules").setLevel(numeric)
    # Alembic narrates every schema check; `formrules db upgrade` prints its own summary.
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))


def level_name() -> str:
    """The level formrules logs at, by name (for RQ's own `logging_level`)."""
    return logging.getLevelName(logging.getLogger("formrules").getEffectiveLevel())


def dict_config() -> dict:
    """The same set-up as a logging dictConfig (for gunicorn, whose own lines then match)."""
    fmt = (os.environ.get("FORMRULES_LOG_FORMAT") or "text").lower()
    handler = {"class": "logging.StreamHandler", "formatter": "formrules",
               "filters": ["context"], "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"formrules": {"()": formatter, "fmt": fmt}},
        "filters": {"context": {"()": ContextFilter}},
        "handlers": {"console": handler, "error_console": handler},
        "root": {"level": "INFO", "handlers": ["console"]},
        "loggers": {name: {"level": "INFO", "handlers": ["console"], "propagate": False}
                    for name in ("gunicorn.error", "gunicorn.access")},
    }


@contextmanager
def bound(run: str | None = None, record: str | None = None) -> Iterator[None]:
    """Log lines inside carry this Run id and record token."""
    tokens = [run_id.set(run), record_token.set(record)]
    try:
        yield
    finally:
        record_token.reset(tokens[1])
        run_id.reset(tokens[0])
