"""Durations in rule files: `now`, `30s`, `10m`, `2h`, `3d`, `1w`, or ISO 8601 (`PT10M`)."""

from __future__ import annotations

import re
from datetime import timedelta

_SHORT = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)\s*)+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_ISO = re.compile(
    r"^P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """Parse a duration; raise ValueError with the accepted forms when it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 10m, 2h, 3d or PT10M, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=value)
    text = str(value).strip()
    if text == "now":
        return timedelta(0)
    if _SHORT.match(text):  # `30s`, `2h`, and compounds like `1h30m` (as format_duration writes)
        return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in _PART.findall(text)))
    match = _ISO.match(text.upper())
    if match and text.upper() not in ("P", "PT") and not text.upper().endswith("T"):
        parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
        return timedelta(
            weeks=parts["w"], days=parts["d"], hours=parts["h"],
            minutes=parts["m"], seconds=parts["s"],
        )
    raise ValueError(f"expected a duration like 30s, 10m, 2h, 3d or PT10M, got {text!r}")


def format_duration(delta: timedelta) -> str:
    """Show a duration the way authors write it (`90s` -> `1m30s`)."""
    seconds = int(delta.total_seconds())
    if seconds == 0:
        return "now"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out)
