"""What an action sees when it runs: the record, field writes, progress, cancel, a logger.

The same class serves inline (submit-time) and worker execution; the engine passes in
callbacks for what differs (how progress is written, how cancellation is detected).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from formrules.config import Settings
from formrules.errors import Cancelled, PermanentError
from formrules.language.values import to_storage, typed_record
from formrules.language.variables import template_variables


@dataclass
class Attachment:
    """A result file an action produced; stored with the step's checkpoint."""

    filename: str
    data: bytes
    content_type: str


@dataclass
class Context:
    """The context handed to every action as its first argument."""

    settings: Settings
    form_id: str
    field_types: dict[str, str]
    data: dict[str, Any]  # the record as stored, including this step's writes so far
    path: str = ""
    run_id: str | None = None
    record_token: str | None = None
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # error, old, changed, run, …
    form_title: str | None = None
    on_progress: Callable[[float, float | None, str | None], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    all_records: Callable[[], list[dict[str, Any]]] | None = None  # the form's records
    updates: dict[str, Any] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    log: logging.Logger | logging.LoggerAdapter = field(
        default_factory=lambda: logging.getLogger("formrules.action"))

    @property
    def idempotency_key(self) -> str:
        """Stable across retries of this step: run id (or record token) + node path."""
        return f"{self.run_id or self.record_token}:{self.path}"

    @property
    def record(self) -> dict[str, Any]:
        """The record's fields, typed (dates as dates), with this step's writes applied."""
        return typed_record(self.data, self.field_types)

    def variables(self) -> dict[str, Any]:
        """What templates and expressions can name."""
        return template_variables(form_id=self.form_id, form_title=self.form_title,
                                  field_types=self.field_types, data=self.data, **self.extra)

    def set(self, name: str, value: Any) -> None:
        """Write a field; it is committed with this step's checkpoint."""
        if name not in self.field_types:
            raise PermanentError(f"set: no field named {name!r}")
        try:
            stored = to_storage(value, self.field_types[name])
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"set {name}: {exc}",
                                 "A value could not be saved in the expected format.") from exc
        self.updates[name] = stored
        self.data = {**self.data, name: stored}

    def progress(self, done: float, total: float | None = None, message: str | None = None):
        """Report progress (`done` of `total`); also a point where cancel takes effect."""
        self.check_cancelled()
        if self.on_progress is not None:
            self.on_progress(done, total, message)

    def cancelled(self) -> bool:
        """True once the owner or an operator has cancelled this run."""
        return bool(self.is_cancelled and self.is_cancelled())

    def check_cancelled(self) -> None:
        """Raise Cancelled if the run was cancelled; call it in long loops."""
        if self.cancelled():
            raise Cancelled()

    def attach(self, filename: str, data: bytes | str, content_type: str = "text/plain"):
        """Attach a result file the owner can download."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.attachments.append(Attachment(filename, data, content_type))
