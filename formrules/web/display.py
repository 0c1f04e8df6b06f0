"""Template helpers for showing times and durations the way people read them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape

from formrules.store.models import utcnow


def _parse(value: datetime | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # naive ones are UTC here


def relative(delta: timedelta) -> str:
    """`in 5 min`, `2 h ago`, `just now`."""
    seconds = int(delta.total_seconds())
    ahead, seconds = seconds > 0, abs(seconds)
    if seconds < 45:
        return "in a moment" if ahead else "just now"
    amount = "1 min"  # 45–57 s: below every threshold of the loop
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size * 0.95:  # 59 min 50 s reads as "1 h"
            amount = f"{round(seconds / size)} {unit}"
            break
    return f"in {amount}" if ahead else f"{amount} ago"


def when(value: datetime | str | None, tz: str = "UTC", show_relative: bool = True) -> Markup:
    """A `<time>` element: the local date and time, and how far from now it is."""
    moment = _parse(value)
    if moment is None:
        return Markup("")
    local = moment.astimezone(ZoneInfo(tz))
    today = utcnow().astimezone(ZoneInfo(tz)).date()
    if local.date() == today:
        day = "today"
    elif local.date() == today + timedelta(days=1):
        day = "tomorrow"
    elif local.date() == today - timedelta(days=1):
        day = "yesterday"
    else:
        day = f"{local.day} {local:%b %Y}"
    text = f"{day} at {local:%H:%M} {local.tzname()}"
    if show_relative:
        text += f" ({relative(moment - utcnow())})"
    return Markup('<time datetime="{}">{}</time>').format(
        moment.isoformat(timespec="seconds"), escape(text))


def clock(value: datetime | str | None, tz: str = "UTC") -> Markup:
    """A `<time>` with the date and the time to the second (for traces)."""
    moment = _parse(value)
    if moment is None:
        return Markup("")
    local = moment.astimezone(ZoneInfo(tz))
    return Markup('<time datetime="{}">{}</time>').format(
        moment.isoformat(timespec="milliseconds"), f"{local:%Y-%m-%d %H:%M:%S}")


def duration(ms: int | float | None) -> str:
    """`350 ms`, `4.2 s`, `3 min 5 s`."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{int(ms)} ms"
    if ms < 60000:
        return f"{ms / 1000:.1f} s"
    return f"{int(ms // 60000)} min {int(ms % 60000 // 1000)} s"
