"""Build a WTForms form class from a form definition (visible fields only)."""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal
from functools import lru_cache
from typing import Any

from babel import support
from flask import current_app, request
from flask_babel import get_locale
from flask_wtf import FlaskForm
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
    ValidationError,
)

from formrules.language.tree import FieldDef, Form
from formrules.language.values import to_storage

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


def _field(fd: FieldDef) -> Field:
    # Text must have content (DataRequired strips blanks); parsed types must have been
    # typed at all (InputRequired), so "31/02" says "Not a valid date", not "required".
    text_like = fd.type in ("string", "text", "email")
    required = [DataRequired() if text_like else InputRequired()] if fd.required \
        else [Optional()]
    kwargs: dict[str, Any] = {"label": fd.label, "description": fd.help,
                              "default": fd.default}
    if fd.type in ("integer", "decimal") and (fd.min is not None or fd.max is not None):
        required.append(NumberRange(min=fd.min, max=fd.max))
    if fd.max_length and fd.type in ("string", "text", "email"):
        required.append(Length(max=fd.max_length))
    if text_like:
        required.append(_no_nul)
    if fd.type == "string":
        return StringField(validators=required, **kwargs)
    if fd.type == "text":
        return TextAreaField(validators=[*required, Length(max=fd.max_length or 20000)],
                             **kwargs)
    if fd.type == "email":
        return EmailField(validators=[*required, Email(check_deliverability=False)], **kwargs)
    if fd.type == "integer":
        return IntegerField(validators=required, **kwargs)
    if fd.type == "decimal":
        if fd.default is not None:
            kwargs["default"] = Decimal(str(fd.default))
        return FiniteDecimalField(validators=required, places=None, **kwargs)
    if fd.type == "boolean":
        return BooleanField(validators=[DataRequired()] if fd.required else [], **kwargs)
    if fd.type == "date":
        return DateField(validators=required, **kwargs)
    if fd.type == "datetime":
        return DateTimeLocalField(validators=required, format="%Y-%m-%dT%H:%M", **kwargs)
    if fd.type == "choice":
        choices = [SelectChoice("", "Choose…")] if not fd.required and fd.default is None \
            else []
        choices += [SelectChoice(c) for c in fd.choices]
        # SelectField itself refuses values outside `choices` ("Not a valid choice.").
        return SelectField(choices=choices, validators=required, **kwargs)
    raise ValueError(f"unknown field type {fd.type}")


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
        if not fd.hidden:
            attrs[fd.name] = _field(fd)
        elif include_hidden:
            note = "Hidden from users; normally set by the form's rules."
            attrs[fd.name] = _field(replace(fd, required=False,
                                            help=f"{fd.help} {note}".strip()))
    return type(f"Form_{form.id}{'_all' if include_hidden else ''}", (RuleForm,), attrs)


def record_values(form: Form, wtf: FlaskForm | None, data: dict[str, Any] | None = None):
    """Every field's stored value: defaults, then what the user (or API client) sent."""
    values: dict[str, Any] = {}
    for fd in form.fields:
        if wtf is not None and not fd.hidden:
            value = getattr(wtf, fd.name).data
        elif data is not None and not fd.hidden and fd.name in data:
            value = data[fd.name]
        else:
            value = fd.default
        values[fd.name] = to_storage(value, fd.type)
    return values
