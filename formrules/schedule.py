"""Cron schedules: each time slot runs once, however many workers run the reconciler."""

from __future__ import annotations

import logging
from datetime import datetime

from .runtime import Runtime

log = logging.getLogger("formrules.schedule")


def fire_due(rt: Runtime, now: datetime | None = None) -> int:
    """Start a Run for every schedule slot that is due and not yet claimed."""
    return 0
