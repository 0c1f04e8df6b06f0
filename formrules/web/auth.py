"""Log in and out. Operators (`formrules users add NAME --operator`) reach /admin."""

from __future__ import annotations

import functools

from flask import Blueprint, g, redirect, render_template, request, session, url_for
from flask_wtf import FlaskForm
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from formrules.runs import control
from formrules.store.models import User
from formrules.web import sessions
from formrules.web.state import db

bp = Blueprint("auth", __name__)
# Checked when the user name is unknown, so a wrong name costs as long as a wrong password
# and response times do not reveal which names exist.
_DUMMY_HASH = generate_password_hash("not a password")


class LoginForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired(), Length(max=100)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=500)])


OWNER_WORDS = {"schedule": "a schedule", "cli": "the command line"}


@bp.app_template_filter("owner")
def owner_name(owner: str | None) -> str:
    """`{{ run.owner|owner }}`: who that is, as people name them (`olga`, not `user:2`)."""
    kind, _, key = (owner or "").partition(":")
    if kind == "user" and key.isdigit():
        user = db().get(User, int(key))  # the session's identity map: one query per user
        return user.name if user is not None else f"a deleted user (#{key})"
    if kind == "anon":
        return f"an anonymous visitor ({key[:6]})"
    if kind == "api":
        return f"API client {key}"
    return OWNER_WORDS.get(owner or "", owner or "nobody")


def is_operator() -> bool:
    """True when the logged-in user is an operator now (read from the database on each
    request, so a demoted operator loses access at once, whatever their cookie says)."""
    user = g.get("user")
    return user is not None and user.is_operator


def operator_required(view):
    """Send visitors without a session to the login page; non-operators get 403."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if g.get("user") is None:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        if not is_operator():
            return render_template("error.html", title="Operators only",
                                   message="This page is for operators. Ask one to give "
                                           "your account access."), 403
        return view(*args, **kwargs)
    return wrapped


def safe_next(target: str | None) -> str:
    """A local path to go to after login; anything else (other hosts, `//x`, `/\\x`) is home."""
    target = target or ""
    # Control characters and spaces are refused outright: browsers and Werkzeug drop
    # some of them, so "/\t/evil.example" would otherwise become "//evil.example".
    if not target.startswith("/") or target.startswith("//") or "\\" in target \
            or any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        return url_for("forms.index")
    return target


@bp.route("/login", methods=("GET", "POST"))
def login():
    """Check the password; adopt this browser's anonymous tasks into the account."""
    form = LoginForm()
    error = None
    if form.validate_on_submit():
        user = db().scalar(select(User).where(User.name == form.name.data.strip()))
        valid = check_password_hash(user.password_hash if user else _DUMMY_HASH,
                                    form.password.data)
        if user is None or not valid:
            error = "Unknown user name or wrong password."
        else:
            anon = session.get("anon")
            sessions.start(user)
            if anon:
                _adopt(f"anon:{anon}", f"user:{user.id}")
            return redirect(safe_next(request.args.get("next")), 303)
    status = 401 if error else 422 if form.errors else 200
    return render_template("auth/login.html", form=form, error=error), status


def _adopt(old: str, new: str) -> None:
    """What this browser did before logging in now belongs to the account."""
    control.adopt(db(), old, new)
    db().commit()


@bp.post("/logout")
def logout():
    """End this session (on the server too); with `everywhere`, every session of the
    account, on every browser."""
    if g.get("user") is not None:
        if request.form.get("everywhere"):
            sessions.end_everywhere(g.user.id)
        else:
            sessions.end_this()
        try:
            db().commit()
        except IntegrityError:  # a second tab logged out at the same moment: already done
            db().rollback()
    session.clear()
    return redirect(url_for("forms.index"), 303)
