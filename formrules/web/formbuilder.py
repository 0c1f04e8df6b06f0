"""Build a WTForms form class from a form definition (visible fields only)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from functools import lru_cache
from typing import Any

from babel import support
from flask import current_app, request
from flask_babel import get_locale
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from werkzeug.datastructures import FileStorage
from wtforms import (
    BooleanField,
    DateField,
    DateTimeLocalField,
    DecimalField,
    EmailField,
    Field,
    HiddenField,
    IntegerField,
    SelectField,
    StringField,
    TextAreaField,
)
from wtforms.fields.choices import SelectChoice
from wtforms.i18n import messages_path
from wtforms.validators import (
    DataRequired,
    Email,
    InputRequired,
    Length,
    NumberRange,
    Optional,
    Regexp,
    StopValidation,
    ValidationError,
)

from formrules.language.fieldtypes import field_type
from formrules.language.tree import FieldDef, Form
from formrules.language.values import to_storage
from formrules.store import uploads

SUBMIT_KEY = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class FiniteDecimalField(DecimalField):
    """A DecimalField that refuses NaN, sNaN and Infinity: they are not amounts, and
    comparing them with a `min:` or `max:` raises instead of failing validation."""

    def process_formdata(self, valuelist):
        super().process_formdata(valuelist)
        if isinstance(self.data, Decimal) and not self.data.is_finite():
            self.data = None
            raise ValueError(self.gettext("Not a valid decimal value."))


def _no_nul(form, field) -> None:
    """NUL is not text: PostgreSQL refuses it in strings, so refuse it at the door."""
    if isinstance(field.data, str) and "\x00" in field.data:
        raise ValidationError("Contains characters that are not valid text.")


def _choices(fd: FieldDef) -> list[SelectChoice]:
    blank = [SelectChoice("", "Choose…")] if not fd.required and fd.default is None else []
    return blank + [SelectChoice(c) for c in fd.choices]


def _upload_check(fd: FieldDef):
    """The file type's size and `accept:` checks on an uploaded file, before it is saved."""
    kind = field_type(fd.type)

    def check(form, field) -> None:
        upload = field.data
        if not isinstance(upload, FileStorage) or not upload.filename:
            return
        stream = upload.stream
        stream.seek(0, os.SEEK_END)
        size = stream.tell()
        stream.seek(0)
        head = stream.read(2048)
        stream.seek(0)
        problem = kind.upload_problem(fd, upload.filename, size, head)
        if problem:
            raise StopValidation(problem)

    return check


def _file(fd: FieldDef, kwargs: dict[str, Any]) -> Field:
    first = FileRequired("This field is required.") if fd.required else Optional()
    return FileField(validators=[first, _upload_check(fd)],
                     render_kw={"accept": ",".join(fd.accept)} if fd.accept else None,
                     **kwargs)


def _decimal_default(fd: FieldDef) -> dict[str, Any]:
    return {} if fd.default is None else {"default": Decimal(str(fd.default))}


# A field type's `widget` (formrules.language.fieldtypes) to its WTForms field, given the
# validators its options call for and the common keyword arguments. A new widget is one
# line here; a new type that draws like an existing one needs none.
WIDGETS: dict[str, Callable[[FieldDef, list, dict[str, Any]], Field]] = {
    "string": lambda fd, v, kw: StringField(validators=v, **kw),
    "textarea": lambda fd, v, kw: TextAreaField(
        validators=[*v, Length(max=fd.max_length or 20000)], **kw),
    "email": lambda fd, v, kw: EmailField(
        validators=[*v, Email(check_deliverability=False)], **kw),
    "integer": lambda fd, v, kw: IntegerField(validators=v, **kw),
    "decimal": lambda fd, v, kw: FiniteDecimalField(
        validators=v, places=None, **{**kw, **_decimal_default(fd)}),
    # An unticked box is a value (false): only `required` (must be ticked) validates it.
    "checkbox": lambda fd, v, kw: BooleanField(
        validators=[DataRequired()] if fd.required else [], **kw),
    "date": lambda fd, v, kw: DateField(validators=v, **kw),
    "datetime": lambda fd, v, kw: DateTimeLocalField(validators=v, format="%Y-%m-%dT%H:%M",
                                                     **kw),
    # SelectField itself refuses values outside `choices` ("Not a valid choice.").
    "select": lambda fd, v, kw: SelectField(choices=_choices(fd), validators=v, **kw),
    "file": lambda fd, v, kw: _file(fd, kw),
}


def _field(fd: FieldDef) -> Field:
    kind = field_type(fd.type)
    # Text must have content (DataRequired strips blanks); parsed types must have been
    # typed at all (InputRequired), so "31/02" says "Not a valid date", not "required".
    validators = [DataRequired() if kind.text else InputRequired()] if fd.required \
        else [Optional()]
    if "min" in kind.options and (fd.min is not None or fd.max is not None):
        validators.append(NumberRange(min=fd.min, max=fd.max))
    if fd.max_length and kind.text:
        validators.append(Length(max=fd.max_length))
    if kind.text:
        validators.append(_no_nul)
    kwargs: dict[str, Any] = {"label": fd.label, "description": fd.help,
                              "default": fd.default}
    return WIDGETS[kind.widget](fd, validators, kwargs)


@lru_cache(maxsize=32)  # one per locale offered
def _catalogue(locale: str) -> support.Translations:
    return support.Translations.load(messages_path(), [locale], domain="wtforms")


class _Translations:
    """WTForms' messages in the request's locale, as flask_wtf gives them, but with each
    locale's catalogue loaded once: flask_wtf reads it from disk on every request
    (about 2 ms of each form page and submit)."""

    def gettext(self, string: str) -> str:
        return _catalogue(str(get_locale())).ugettext(string)

    def ngettext(self, singular: str, plural: str, n: int) -> str:
        return _catalogue(str(get_locale())).ungettext(singular, plural, n)


_TRANSLATIONS = _Translations()


class RuleForm(FlaskForm):
    """The base of every rule form class: FlaskForm with cached message catalogues."""

    class Meta(FlaskForm.Meta):
        def get_translations(self, form):
            if not current_app.config.get("WTF_I18N_ENABLED", True):
                return super().get_translations(form)
            if not request or "babel" not in current_app.extensions:
                return None  # as flask_wtf: no request or no Babel, no translation
            return _TRANSLATIONS


def form_class(form: Form, *, include_hidden: bool = False) -> type[FlaskForm]:
    """A FlaskForm subclass for `form`; hidden fields are set by rules, not by users.

    `include_hidden`: the operator's edit page, where hidden fields (a status, a flag)
    can be corrected too; they are optional there and say that rules set them.
    Built once per form definition (a request only instantiates it).
    """
    cached = _classes.get((id(form), include_hidden))
    if cached is not None and cached[0] is form:
        return cached[1]
    cls = _build_class(form, include_hidden)
    _classes[(id(form), include_hidden)] = (form, cls)  # the form is kept: its id stays unique
    return cls


_classes: dict[tuple[int, bool], tuple[Form, type[FlaskForm]]] = {}


def _build_class(form: Form, include_hidden: bool) -> type[FlaskForm]:
    attrs: dict[str, Any] = {
        "submit_key": HiddenField(validators=[Optional(), Regexp(SUBMIT_KEY)]),
    }
    for fd in form.fields:
        if include_hidden and not field_type(fd.type).editable:
            continue  # an upload comes with the submit; an edit keeps it as it is
        if not fd.hidden:
            attrs[fd.name] = _field(fd)
        elif include_hidden and field_type(fd.type).editable:
            note = "Hidden from users; normally set by the form's rules."
            attrs[fd.name] = _field(replace(fd, required=False,
                                            help=f"{fd.help} {note}".strip()))
    return type(f"Form_{form.id}{'_all' if include_hidden else ''}", (RuleForm,), attrs)


def record_values(form: Form, wtf: FlaskForm | None, data: dict[str, Any] | None = None,
                  *, settings=None):
    """Every field's stored value: defaults, then what the user (or API client) sent.

    Uploaded files are saved now (under `settings`' upload folder); a caller whose submit
    then fails removes them again (`uploads.remove(settings, uploads.in_data(values))`).
    """
    values: dict[str, Any] = {}
    for fd in form.fields:
        if wtf is not None and not fd.hidden:
            value = getattr(wtf, fd.name).data
        elif data is not None and not fd.hidden and fd.name in data:
            value = data[fd.name]
        else:
            value = fd.default
        if isinstance(value, FileStorage):
            value = uploads.save(settings, value.stream, value.filename) \
                if value.filename else None
        values[fd.name] = to_storage(value, fd.type)
    return values
