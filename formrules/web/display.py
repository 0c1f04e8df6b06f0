"""Times and durations the way people read them, from Babel (CLDR) through Flask-Babel.

Dates, times and "in 5 minutes" come from a maintained library in the configured time
zone (`FORMRULES_TIMEZONE`) and the page's locale, so they are translatable and every
offset has a wording: the hand-written version had a gap that answered 500.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Flask, request
from flask_babel import (
    Babel,
    format_date,
    format_decimal,
    format_time,
    format_timedelta,
    gettext,
    to_user_timezone,
)
from flask_babel import format_datetime as babel_datetime
from markupsafe import Markup

from formrules.store.models import utcnow

SOON = timedelta(seconds=10)  # closer than this reads "just now" / "in a moment"


def init_app(app: Flask, timezone: str, locale: str = "en") -> Babel:
    """Set up Flask-Babel (zone, locale from the browser) and the time filters."""
    app.config.setdefault("BABEL_DEFAULT_TIMEZONE", timezone)
    app.config.setdefault("BABEL_DEFAULT_LOCALE", locale)
    babel = Babel()

    def pick_locale() -> str | None:
        offered = [str(t) for t in babel.list_translations()]
        return request.accept_languages.best_match(offered) if request else None

    babel.init_app(app, locale_selector=pick_locale)
    app.add_template_filter(when, "when")
    app.add_template_filter(clock, "clock")
    app.add_template_filter(duration, "duration")
    return babel


def _parse(value: datetime | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # naive ones are UTC here


def relative(delta: timedelta) -> str:
    """`in 5 minutes`, `2 hours ago`, `just now`: any offset has a wording."""
    if abs(delta) < SOON:
        return gettext("in a moment") if delta > timedelta(0) else gettext("just now")
    return format_timedelta(delta, granularity="second", add_direction=True)


def when(value: datetime | str | None, show_relative: bool = True) -> Markup:
    """A `<time>` element: the local date and time, and how far from now it is."""
    moment = _parse(value)
    if moment is None:
        return Markup("")
    now = utcnow()
    local = to_user_timezone(moment)
    day, today = local.date(), to_user_timezone(now).date()
    if day == today:
        text = gettext("today at %(time)s", time=format_time(moment, "short"))
    elif day == today + timedelta(days=1):
        text = gettext("tomorrow at %(time)s", time=format_time(moment, "short"))
    elif day == today - timedelta(days=1):
        text = gettext("yesterday at %(time)s", time=format_time(moment, "short"))
    else:
        text = babel_datetime(moment, "medium")
    text = f"{text} {local.tzname()}"  # CLDR's short zone names are mostly offsets
    if show_relative:
        text += f" ({relative(moment - now)})"
    return Markup('<time datetime="{}">{}</time>').format(
        moment.isoformat(timespec="seconds"), text)


def clock(value: datetime | str | None) -> Markup:
    """A `<time>` with the date and the time to the second (for traces)."""
    moment = _parse(value)
    if moment is None:
        return Markup("")
    return Markup('<time datetime="{}">{} {}</time>').format(
        moment.isoformat(timespec="milliseconds"), format_date(to_user_timezone(moment).date(),
                                                               "yyyy-MM-dd"),
        format_time(moment, "HH:mm:ss"))


def duration(ms: int | float | None) -> str:
    """`350 ms`, `4.2 s`, `3 minutes`: how long a step took."""
    if ms is None:
        return ""
    if ms < 1000:
        return gettext("%(ms)d ms", ms=int(ms))
    if ms < 60000:
        return gettext("%(s)s s", s=format_decimal(ms / 1000, "0.0"))
    return format_timedelta(timedelta(milliseconds=ms), granularity="second", threshold=1)
