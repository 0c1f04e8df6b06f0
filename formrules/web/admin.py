"""Placeholder blueprint 'admin' (being written)."""

from flask import Blueprint

bp = Blueprint("admin", __name__)
