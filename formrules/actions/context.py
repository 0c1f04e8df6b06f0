"""What an action sees when it runs: the record, field writes, progress, cancel, a logger.

The same class serves inline (submit-time) and worker execution; the engine passes in
callbacks for what differs (how progress is written, how cancellation is detected).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from formrules.config import Settings
from formrules.errors import Cancelled, PermanentError
from formrules.language.fieldtypes import is_upload
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

    def upload(self, name: str) -> dict[str, Any] | None:
        """A file field's metadata (`name`, `size`, `type`, `key`), None when empty."""
        meta = self.data.get(name)
        return meta if is_upload(meta) else None

    def read_upload(self, name: str) -> bytes:
        """The bytes of the file uploaded into field `name`."""
        from formrules.store import uploads  # the store, only when a file is read

        meta = self.upload(name)
        if meta is None:
            raise PermanentError(f"{self.path}: no file in field {name!r}",
                                 "No file was uploaded for this.")
        try:
            return uploads.read(self.settings, meta)
        except FileNotFoundError as exc:
            raise PermanentError(f"{self.path}: upload {meta['key']} is missing on disk",
                                 "The uploaded file is no longer available.") from exc

    def csv_rows(self, name: str, message: str = "Row {row} of {total}"
                 ) -> Iterator[dict[str, str]]:
        """The rows of a CSV uploaded into field `name` (by header), reporting progress
        after each row (`message` may name {row} and {total}) and stopping on cancel."""
        try:
            text = self.read_upload(name).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PermanentError(f"{self.path}: {name} is not UTF-8: {exc}",
                                 "The file is not UTF-8 text; save it as CSV UTF-8.") from exc
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise PermanentError(f"{self.path}: {name}: {exc}",
                                 "The file could not be read as CSV.") from exc
        total = len(rows)
        self.progress(0, total or 1, message.format(row=0, total=total))
        for i, row in enumerate(rows, 1):
            yield {str(k).strip(): (v or "").strip() for k, v in row.items()
                   if k is not None and not isinstance(v, list)}
            self.progress(i, total, message.format(row=i, total=total))
