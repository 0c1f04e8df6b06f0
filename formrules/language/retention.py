"""How long finished Runs are kept: a form's `retention:` key and FORMRULES_RETENTION.

Both take one duration for every finished status (`30d`) or one per status
(`{done: 30d, dead: 90d}`); `forever` keeps them. A status a form leaves out takes the
deployment's default, and a deployment without one keeps everything.
"""

from __future__ import annotations

from datetime import timedelta

from formrules.language.duration import parse_duration

# The statuses retention applies to: a Run in one of them will not change by itself
# (the FINAL set of `formrules.store.models`, spelled here: this package has no database).
STATUSES = ("done", "dead", "cancelled", "skipped")
FOREVER = "forever"

Retention = dict[str, timedelta | None]  # status -> keep this long (None: forever)


def parse_period(value: object) -> timedelta | None:
    """One period: a duration of at least a minute, or `forever` (None)."""
    if isinstance(value, str) and value.strip().lower() == FOREVER:
        return None
    period = parse_duration(value)
    if period < timedelta(minutes=1):
        raise ValueError(f"keep finished Runs at least 1m (or '{FOREVER}'), got {value!r}")
    return period


def parse_setting(text: str) -> Retention:
    """FORMRULES_RETENTION: `30d`, or `done=30d,dead=90d` (a status left out: forever)."""
    text = text.strip()
    if not text:
        return {}
    if "=" not in text:
        period = parse_period(text)
        return dict.fromkeys(STATUSES, period)
    out: Retention = {}
    for part in text.split(","):
        status, _, value = part.partition("=")
        status = status.strip()
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (use {', '.join(STATUSES)})")
        out[status] = parse_period(value)
    return out


def effective(form: Retention, default: Retention) -> Retention:
    """What applies to a form: its own periods, the deployment's for the rest."""
    return {status: form[status] if status in form else default.get(status)
            for status in STATUSES}
