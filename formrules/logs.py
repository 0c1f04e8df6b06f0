"""Logging setup: the one place every entry point (CLI, worker, reconciler) configures it.

Operators read a worker's `log:` action lines and schedule summaries at INFO, whichever
way the worker was started; FORMRULES_LOG_LEVEL (DEBUG, INFO, WARNING, ...) changes that.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str | None = None) -> None:
    """Send formrules' (and RQ's) log records to stderr at `level` (default: INFO).

    Idempotent: a process that passes through several entry points (the CLI starting a
    worker) configures once; a handler someone else installed (gunicorn, pytest) stays.
    """
    name = (level or os.environ.get("FORMRULES_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(numeric)
    logging.getLogger("formrules").setLevel(numeric)
    # Alembic narrates its plugins and every schema check at INFO; `db upgrade` prints its own.
    logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))


def level_name() -> str:
    """The level formrules logs at, by name (for RQ's own `logging_level`)."""
    return logging.getLevelName(logging.getLogger("formrules").getEffectiveLevel())
