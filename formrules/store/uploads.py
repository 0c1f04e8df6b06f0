"""Uploaded files on disk: saved under a random storage key, read by actions, removed
with their record.

A record's data holds only the metadata (`{name, size, type, key}`, see
`formrules.language.fieldtypes.FileType`); the bytes live in `Settings.uploads_dir`
(FORMRULES_UPLOAD_DIR, or `uploads` in the instance folder) as `<key[:2]>/<key>`. The key
is 128 random bits: no name a user chose ever becomes part of a path.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from formrules.config import Settings
from formrules.language.fieldtypes import guess_type, is_upload

log = logging.getLogger("formrules.uploads")
_UNSAFE = re.compile(r"[^\w.\- ()]+")


def safe_filename(name: str) -> str:
    """A display name for an upload: its last path part, printable, at most 200 chars."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = unicodedata.normalize("NFC", base)
    base = _UNSAFE.sub("_", "".join(c for c in base if c.isprintable())).strip(" .")
    return base[-200:] or "upload"


def path_of(settings: Settings, meta: dict[str, Any]) -> Path:
    """Where an upload's bytes are; ValueError for metadata that is not an upload's."""
    if not is_upload(meta):
        raise ValueError("not an uploaded file")
    key = meta["key"]
    return settings.uploads_dir / key[:2] / key


def save(settings: Settings, stream: IO[bytes], filename: str) -> dict[str, Any]:
    """Store an uploaded stream; its metadata for the record's data."""
    key = secrets.token_hex(16)
    name = safe_filename(filename)
    meta = {"name": name, "size": 0, "type": guess_type(name), "key": key}
    target = path_of(settings, meta)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(key + ".part")
    if stream.seekable():  # from the start, also when a request is run a second time
        stream.seek(0)
    with open(partial, "wb") as out:
        shutil.copyfileobj(stream, out, 1024 * 1024)
    os.replace(partial, target)  # whole or not at all
    meta["size"] = target.stat().st_size
    return meta


def read(settings: Settings, meta: dict[str, Any]) -> bytes:
    """An upload's bytes (FileNotFoundError when they are gone)."""
    return path_of(settings, meta).read_bytes()


def in_data(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The uploads a record's data refers to (whatever its form declares now)."""
    return [v for v in (data or {}).values() if is_upload(v)]


def remove(settings: Settings, metas: Iterable[dict[str, Any]]) -> None:
    """Delete uploads' bytes; ones already gone are fine."""
    for meta in metas:
        try:
            path_of(settings, meta).unlink(missing_ok=True)
        except (OSError, ValueError) as exc:  # logged: a leftover file is not an outage
            log.warning("upload %s: could not remove: %s", meta.get("key"), exc)
