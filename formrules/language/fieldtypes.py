"""The field-type registry: one object per `type:` a form field may have.

Each type knows its stored form (JSON in `records.data`), its typed form (what
expressions see), the options it takes (`min`, `max_length`, `choices`, …), how a stored
value is validated (with the message people read), its JSON Schema (OpenAPI and the
API), how a JSON API value becomes a form post, and the `widget` the web side draws it
with. Adding a type is one class here and, for a new widget, one line in
`formrules.web.formbuilder.WIDGETS`. No Flask or WTForms here: the language is pure.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from formrules.language.tree import FieldDef

# Options any field takes; each type adds its own (`FieldType.options`) between them.
COMMON_OPTIONS = ("name", "type", "label", "help", "required")
COMMON_OPTIONS_LAST = ("default", "hidden")


def not_text(value: str) -> bool:
    """True for strings that cannot be stored as text: lone surrogates (from a JSON
    `\\ud800`), which UTF-8 cannot encode, and NUL, which PostgreSQL refuses."""
    if "\x00" in value:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class FieldType:
    """A field type. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    widget: ClassVar[str]  # the web side's drawing of it (formbuilder.WIDGETS)
    options: ClassVar[tuple[str, ...]] = ()  # type-specific option keys
    text: ClassVar[bool] = False  # free text: blank is empty, NUL refused
    default_max_length: ClassVar[int | None] = None
    json_kind: ClassVar[str] = "string"  # the JSON value the API takes: string/number/…
    editable: ClassVar[bool] = True  # False: set at submit only (not on edit pages, PATCH)
    upload: ClassVar[bool] = False  # True: the value comes as a file (multipart)

    def parse_options(self, item: dict[str, Any],
                      report: Callable[..., None]) -> dict[str, Any]:
        """This type's own options of a field's mapping as `FieldDef` keyword arguments;
        `report(key, message, index=None)` reports a mistake at that option's value (or at
        its list item `index`)."""
        return {}

    # -- stored and typed forms ----------------------------------------------------
    def to_storage(self, value: Any) -> Any:
        """`value` in its JSON storage form; ValueError/TypeError if it is not one."""
        if value is None or value == "":
            return None
        return self.store(value)

    def store(self, value: Any) -> Any:
        """A non-empty value's storage form (the part subclasses override)."""
        return str(value)

    def typed(self, stored: Any) -> Any:
        """The stored value as expressions see it."""
        return stored

    def from_text(self, text: str) -> Any:
        """A value typed on the command line (`formrules preview --set`), stored."""
        return self.to_storage(text)

    # -- validation ----------------------------------------------------------------
    def empty(self, stored: Any) -> bool:
        """True when a stored value counts as not filled in (for `required`)."""
        return stored in (None, "")

    def problem(self, fd: FieldDef, stored: Any) -> str | None:
        """What is wrong with a stored value for `fd` (None: nothing)."""
        if self.empty(stored):
            return "This field is required." if fd.required else None
        if fd.max_length and isinstance(stored, str) and len(stored) > fd.max_length:
            return f"At most {fd.max_length} characters."
        return None

    def default_problem(self, value: Any, choices: Any) -> str | None:
        """What is wrong with a rule's `default:` (None: it is a value of this type)."""
        try:
            self.to_storage(value)
        except (TypeError, ValueError):
            return f"'default' {value!r} is not a valid {self.name} value"
        return None

    # -- JSON API and JSON Schema --------------------------------------------------
    def from_json(self, value: Any) -> str | None:
        """A JSON API value as the form post WTForms validates (None: left empty).

        Raises ValueError with the field message when the JSON value has the wrong kind.
        """
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError(f"Expected a {self.name} value, not true or false.")
        if self.json_kind == "string" and not isinstance(value, str):
            raise ValueError("Expected a string.")  # as the OpenAPI document says
        if self.json_kind == "number" and not isinstance(value, int | float):
            raise ValueError(f"Not a valid {self.name} value.")  # a number, not a string
        if isinstance(value, str) and not_text(value):
            raise ValueError("Contains characters that are not valid text.")
        return self.post(value)

    def post(self, value: Any) -> str:
        """A JSON value of the right kind as form post text."""
        return str(value)

    def base_schema(self, fd: FieldDef) -> dict[str, Any]:
        return {"type": self.json_kind}

    def json_schema(self, fd: FieldDef) -> dict[str, Any]:
        """The field's JSON Schema as the API accepts it (without title and help)."""
        schema = self.base_schema(fd)
        if fd.min is not None:
            schema["minimum"] = fd.min
        if fd.max is not None:
            schema["maximum"] = fd.max
        if fd.max_length and self.text:
            schema["maxLength"] = fd.max_length
        if fd.required and self.text:
            schema["minLength"] = 1  # and not only blanks, as the form requires
            schema["pattern"] = r"\S"
        if not fd.required:  # empty is allowed: send null
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema


class StringType(FieldType):
    name, widget, text = "string", "string", True
    options = ("max_length",)
    default_max_length = 1000


class TextType(StringType):
    name, widget = "text", "textarea"
    default_max_length = 20_000


class EmailType(StringType):
    name, widget = "email", "email"
    default_max_length = 254  # RFC 5321

    def base_schema(self, fd: FieldDef) -> dict[str, Any]:
        return {"type": "string", "format": "email"}


class NumberType(FieldType):
    options = ("min", "max")
    json_kind = "number"

    def problem(self, fd: FieldDef, stored: Any) -> str | None:
        if not self.empty(stored):
            number = float(stored)
            if fd.min is not None and number < fd.min or fd.max is not None and number > fd.max:
                return f"Must be between {fd.min} and {fd.max}."
        return super().problem(fd, stored)


class IntegerType(NumberType):
    name, widget = "integer", "integer"

    def store(self, value: Any) -> Any:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(str(value).strip()) if isinstance(value, str) else int(value)

    def base_schema(self, fd: FieldDef) -> dict[str, Any]:
        return {"type": "integer"}

    def post(self, value: Any) -> str:
        # JSON Schema counts 3.0 as an integer; a fraction stays an error in the form.
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() else str(value)
        return str(value)


class DecimalType(NumberType):
    name, widget = "decimal", "decimal"

    def store(self, value: Any) -> Any:
        try:
            return str(Decimal(str(value).strip()))
        except InvalidOperation as exc:
            raise ValueError(f"{value!r} is not a number") from exc

    def typed(self, stored: Any) -> Any:
        try:
            return None if stored is None else Decimal(stored)
        except (TypeError, ValueError, InvalidOperation):
            return stored


class BooleanType(FieldType):
    name, widget, json_kind = "boolean", "checkbox", "boolean"

    def to_storage(self, value: Any) -> Any:
        if value is None or value == "":
            return False
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on", "y")
        return bool(value)

    def empty(self, stored: Any) -> bool:
        return stored in (None, "", False)

    def default_problem(self, value: Any, choices: Any) -> str | None:
        from formrules.language.checker import _kind  # the checker imports us
        return None if isinstance(value, bool) else f"expected true or false, got {_kind(value)}"

    def from_json(self, value: Any) -> str | None:
        if value is not None and not isinstance(value, bool):
            raise ValueError("Expected true or false.")
        return "y" if value else None

    def json_schema(self, fd: FieldDef) -> dict[str, Any]:
        if fd.required:
            return {"type": "boolean", "const": True}  # a required box must be ticked
        return {"type": "boolean"}  # unticked is false, never null


class DateType(FieldType):
    name, widget = "date", "date"

    def store(self, value: Any) -> Any:
        if isinstance(value, datetime):
            return value.date().isoformat()
        if isinstance(value, date):
            return value.isoformat()
        return date.fromisoformat(str(value).strip()[:10]).isoformat()

    def typed(self, stored: Any) -> Any:
        try:
            return None if stored is None else date.fromisoformat(stored)
        except (TypeError, ValueError):
            return stored

    def base_schema(self, fd: FieldDef) -> dict[str, Any]:
        return {"type": "string", "format": "date"}


class DateTimeType(FieldType):
    name, widget = "datetime", "datetime"

    def store(self, value: Any) -> Any:
        if not isinstance(value, datetime):
            value = datetime.fromisoformat(str(value).strip())
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat()

    def typed(self, stored: Any) -> Any:
        try:
            return None if stored is None else datetime.fromisoformat(stored)
        except (TypeError, ValueError):
            return stored

    def post(self, value: Any) -> str:
        try:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is not None:  # the HTML field is UTC wall time, minutes
                moment = moment.astimezone(UTC).replace(tzinfo=None)
        except (ValueError, OverflowError) as exc:  # Overflow: year 1 or 9999 shifted out
            raise ValueError("Not a valid datetime value (ISO 8601, e.g. "
                             "2025-05-01T09:30:00+02:00, between the years 1 and 9999).") \
                from exc
        return moment.isoformat(timespec="minutes")

    def base_schema(self, fd: FieldDef) -> dict[str, Any]:
        return {"type": "string", "format": "date-time"}


class ChoiceType(FieldType):
    name, widget = "choice", "select"
    options = ("choices",)

    def problem(self, fd: FieldDef, stored: Any) -> str | None:
        if not self.empty(stored) and stored not in fd.choices:
            return "Choose one of the options."
        return super().problem(fd, stored)

    def default_problem(self, value: Any, choices: Any) -> str | None:
        if isinstance(choices, list) and choices and str(value) not in map(str, choices):
            from formrules.language.checker import did_you_mean  # the checker imports us
            return f"'default' {value!r} is not one of the choices{did_you_mean(value, choices)}"
        return None

    def base_schema(self, fd: FieldDef) -> dict[str, Any]:
        return {"type": "string", "enum": list(fd.choices)}


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)?\s*$", re.I)
SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
ACCEPT_ENTRY = re.compile(r"^(\.[a-z0-9]+|[a-z]+/(\*|[a-z0-9][a-z0-9.+-]*))$")
STORAGE_KEY = re.compile(r"^[0-9a-f]{32}$")
UPLOAD_KEYS = ("name", "size", "type", "key")


def parse_size(value: Any) -> int:
    """`5MB`, `500 KB`, `1.5GB` or a number of bytes as bytes (KB = 1024 bytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = SIZE.match(value) if isinstance(value, str) else None
    if not match or float(match[1]) <= 0:
        raise ValueError(f"expected a size like 5MB, 500KB or a number of bytes, got {value!r}")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "B").upper()])


def format_size(size: int) -> str:
    """Bytes as people read them: `5 MB`, `300 KB`, `12 bytes`."""
    for unit in ("GB", "MB", "KB"):
        if size >= SIZE_UNITS[unit]:
            amount = size / SIZE_UNITS[unit]
            return f"{amount:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{size} bytes"


def guess_type(filename: str) -> str:
    """The content type a file name says (by its extension)."""
    return mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"


# Content that must start with these bytes when the name says this type: a cheap sniff
# that stops a renamed file from passing an `accept:` list by its extension alone.
MAGIC = {"application/pdf": (b"%PDF-",), "image/png": (b"\x89PNG\r\n\x1a\n",),
         "image/jpeg": (b"\xff\xd8\xff",), "image/gif": (b"GIF87a", b"GIF89a"),
         "application/zip": (b"PK\x03\x04",)}


def looks_like(mime: str, head: bytes) -> bool:
    """Whether the first bytes of a file agree with the type its name says."""
    if mime in MAGIC:
        return head.startswith(MAGIC[mime])
    if mime.startswith("text/") or mime in ("application/json", "text/csv"):
        if b"\x00" in head:
            return False
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:  # a character cut at the end of `head` is fine
            return exc.start >= len(head) - 3
    return True


class FileType(FieldType):
    """An uploaded file. Stored as metadata `{name, size, type, key}`; the bytes are kept
    under a random storage key (`formrules.store.uploads`), never under a user's name."""

    name, widget, json_kind = "file", "file", "object"
    options = ("max_size", "accept")
    editable = False  # a file comes with the submit; edits and PATCH keep it
    upload = True
    default_max_size = 10 * 1024 ** 2

    def parse_options(self, item: dict[str, Any],
                      report: Callable[..., None]) -> dict[str, Any]:
        out: dict[str, Any] = {"max_size": self.default_max_size, "accept": ()}
        if item.get("hidden") is True:
            report("hidden", "a file field cannot be hidden: files come with the form, "
                             "rules cannot set them")
        if "max_size" in item:
            try:
                out["max_size"] = parse_size(item["max_size"])
            except ValueError as exc:
                report("max_size", str(exc))
        if "accept" in item:
            accept = item["accept"]
            if not isinstance(accept, list) or not accept:
                report("accept", "'accept' is a non-empty list of content types and "
                                 "extensions, like [text/csv, .csv]")
                return out
            for i, entry in enumerate(accept):
                text = str(entry).strip().lower()
                if not ACCEPT_ENTRY.match(text):
                    hint = f" (did you mean '.{text}'?)" if re.fullmatch(r"[a-z0-9]+", text) \
                        else ""
                    report("accept", f"'accept' entry {entry!r} is neither a content type "
                                     f"(text/csv, image/*) nor an extension (.csv){hint}", i)
            out["accept"] = tuple(str(e).strip().lower() for e in accept)
        return out

    def to_storage(self, value: Any) -> Any:
        if value is None or value == "":
            return None
        if isinstance(value, dict) and STORAGE_KEY.fullmatch(str(value.get("key", ""))):
            return {k: value.get(k) for k in UPLOAD_KEYS}
        raise ValueError("a file is uploaded with the form; it cannot be set to a value")

    def default_problem(self, value: Any, choices: Any) -> str | None:
        return "a file field has no 'default': files come with the form"

    def from_text(self, text: str) -> Any:
        # A preview stands in a file by its name: nothing is read, nothing is stored.
        return {"name": text, "size": 0, "type": guess_type(text), "key": "0" * 32}

    def upload_problem(self, fd: FieldDef, filename: str, size: int,
                       head: bytes) -> str | None:
        """What is wrong with an uploaded file for `fd` (None: it is accepted)."""
        if fd.max_size is not None and size > fd.max_size:
            return f"The file is larger than {format_size(fd.max_size)}."
        if fd.accept and not self.accepts(fd, filename, head):
            return f"This type of file is not accepted here (allowed: {', '.join(fd.accept)})."
        return None

    def accepts(self, fd: FieldDef, filename: str, head: bytes) -> bool:
        """The name's extension or the type it says is in `accept`, and the content agrees
        with that type. The browser's claimed type is not trusted: anyone can send any."""
        suffix = PurePosixPath(filename.lower()).suffix
        mime = guess_type(filename)
        listed = any(a == suffix if a.startswith(".") else
                     (mime.startswith(a[:-1]) if a.endswith("/*") else mime == a)
                     for a in fd.accept)
        return listed and looks_like(mime, head)

    def problem(self, fd: FieldDef, stored: Any) -> str | None:
        if self.empty(stored):
            return "This field is required." if fd.required else None
        if fd.max_size is not None and int(stored.get("size") or 0) > fd.max_size:
            return f"The file is larger than {format_size(fd.max_size)}."
        return None

    def from_json(self, value: Any) -> str | None:
        if value is None:
            return None
        raise ValueError("Send files as multipart/form-data (see the API documentation).")

    def json_schema(self, fd: FieldDef) -> dict[str, Any]:
        # A multipart part: the file's bytes (OpenAPI 3.1 names binary this way).
        return {"type": "string", "contentMediaType": "application/octet-stream"}


REGISTRY: dict[str, FieldType] = {t.name: t for t in (
    StringType(), TextType(), EmailType(), IntegerType(), DecimalType(), BooleanType(),
    DateType(), DateTimeType(), ChoiceType(), FileType(),
)}


def is_upload(value: Any) -> bool:
    """Whether a stored value is an uploaded file's metadata."""
    return isinstance(value, dict) and STORAGE_KEY.fullmatch(str(value.get("key", ""))) is not None


def field_type(name: str) -> FieldType:
    """The registered type called `name` (KeyError for an unknown one)."""
    return REGISTRY[name]


def types_with(option: str) -> tuple[str, ...]:
    """The names of the types that take `option` (for the checker's messages)."""
    return tuple(n for n, t in REGISTRY.items() if option in t.options)


def option_keys() -> tuple[str, ...]:
    """Every key a field may have: the common ones, then each type's own."""
    extra = [o for t in REGISTRY.values() for o in t.options]
    return (*COMMON_OPTIONS, *dict.fromkeys(extra), *COMMON_OPTIONS_LAST)
