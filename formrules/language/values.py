"""Field values: how each field type is stored (JSON) and seen by expressions (typed).

The per-type rules live in the field-type registry (`formrules.language.fieldtypes`);
these are the by-name entry points the rest of the code uses.
"""

from __future__ import annotations

from typing import Any

from formrules.language.fieldtypes import REGISTRY


def to_storage(value: Any, ftype: str) -> Any:
    """Coerce a value to its JSON storage form for `ftype`; raise ValueError if it can't."""
    kind = REGISTRY.get(ftype)
    if kind is None:
        raise ValueError(f"unknown field type {ftype!r}")
    return kind.to_storage(value)


def typed(value: Any, ftype: str) -> Any:
    """The stored value as expressions see it: dates as dates, decimals as Decimal."""
    if value is None:
        return None
    kind = REGISTRY.get(ftype)
    return value if kind is None else kind.typed(value)


def typed_record(data: dict[str, Any], types: dict[str, str]) -> dict[str, Any]:
    """A record's data with every declared field present and typed."""
    out = {name: typed(data.get(name), ftype) for name, ftype in types.items()}
    for key, value in data.items():  # keep undeclared keys readable, as stored
        out.setdefault(key, value)
    return out
