"""Placeholder blueprint 'updates' (being written)."""

from flask import Blueprint

bp = Blueprint("updates", __name__)
