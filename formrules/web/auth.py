"""Log in and out. Operators (`formrules users add NAME --operator`) reach /admin."""

from __future__ import annotations

import functools

from flask import Blueprint, redirect, render_template, request, session, url_for
from flask_wtf import FlaskForm
from sqlalchemy import select, update
from werkzeug.security import check_password_hash
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired

from ..models import Notification, Record, ResultFile, Run, User
from .state import db

bp = Blueprint("auth", __name__)


class LoginForm(FlaskForm):
    name = StringField("User name", validators=[DataRequired()])
    password = PasswordField("Password", validators=[DataRequired()])


def operator_required(view):
    """Send visitors without an operator session to the login page."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not session.get("operator"):
            return redirect(url_for("auth.login", next=request.path))
        return view(*args, **kwargs)
    return wrapped


@bp.route("/login", methods=("GET", "POST"))
def login():
    """Check the password; adopt this browser's anonymous tasks into the account."""
    form = LoginForm()
    error = None
    if form.validate_on_submit():
        user = db().scalar(select(User).where(User.name == form.name.data))
        if user is None or not check_password_hash(user.password_hash, form.password.data):
            error = "Unknown user name or wrong password."
        else:
            anon = session.get("anon")
            session.clear()  # a fresh session on login: no fixation
            session.permanent = True
            session["user_id"], session["user_name"] = user.id, user.name
            session["operator"] = user.is_operator
            if anon:
                _adopt(f"anon:{anon}", f"user:{user.id}")
            target = request.args.get("next", "")
            if not target.startswith("/") or target.startswith("//"):
                target = url_for("forms.index")
            return redirect(target, 303)
    return render_template("auth/login.html", form=form, error=error), 401 if error else 200


def _adopt(old: str, new: str) -> None:
    for model in (Record, Run, ResultFile, Notification):
        db().execute(update(model).where(model.owner == old).values(owner=new))
    db().commit()


@bp.post("/logout")
def logout():
    """Forget the session."""
    session.clear()
    return redirect(url_for("forms.index"), 303)
