"""Field values: how each field type is stored (JSON) and seen by expressions (typed)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any


def to_storage(value: Any, ftype: str) -> Any:
    """Coerce a value to its JSON storage form for `ftype`; raise ValueError if it can't."""
    if value is None or value == "":
        return None if ftype != "boolean" else False
    if ftype == "boolean":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on", "y")
        return bool(value)
    if ftype == "integer":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    if ftype == "decimal":
        try:
            return str(Decimal(str(value).strip()))
        except InvalidOperation as exc:
            raise ValueError(f"{value!r} is not a number") from exc
    if ftype == "date":
        if isinstance(value, datetime):
            return value.date().isoformat()
        if isinstance(value, date):
            return value.isoformat()
        return date.fromisoformat(str(value).strip()[:10]).isoformat()
    if ftype == "datetime":
        if not isinstance(value, datetime):
            value = datetime.fromisoformat(str(value).strip())
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat()
    return str(value)


def typed(value: Any, ftype: str) -> Any:
    """The stored value as expressions see it: dates as dates, decimals as Decimal."""
    if value is None:
        return None
    try:
        if ftype == "date":
            return date.fromisoformat(value)
        if ftype == "datetime":
            return datetime.fromisoformat(value)
        if ftype == "decimal":
            return Decimal(value)
    except (TypeError, ValueError, InvalidOperation):
        return value
    return value


def typed_record(data: dict[str, Any], types: dict[str, str]) -> dict[str, Any]:
    """A record's data with every declared field present and typed."""
    out = {name: typed(data.get(name), ftype) for name, ftype in types.items()}
    for key, value in data.items():  # keep undeclared keys readable, as stored
        out.setdefault(key, value)
    return out
