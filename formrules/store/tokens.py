"""API tokens for machine clients: shown once when created, stored only as a SHA-256 hash.

A token is 256 random bits, so a fast hash is enough: there is nothing to brute-force
that a slow password hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from formrules.errors import FormrulesError
from formrules.store.models import ApiToken, utcnow

PREFIX = "frt_"  # recognisable in logs and by secret scanners


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def create(s: Session, name: str) -> str:
    """Create a token called `name`; returns the token itself (never stored)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise FormrulesError("a token name is 1 to 100 characters")
    if s.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise FormrulesError(f"a token named {name!r} exists; revoke it first or pick "
                             "another name")
    token = PREFIX + secrets.token_urlsafe(32)
    s.add(ApiToken(name=name, token_hash=hash_token(token)))
    return token


def revoke(s: Session, name: str) -> bool:
    """Delete the token called `name`; False when there is none."""
    found = s.scalar(select(ApiToken).where(ApiToken.name == name))
    if found is None:
        return False
    s.delete(found)
    return True


def lookup(s: Session, token: str) -> ApiToken | None:
    """The token row for a presented token, noting when it was last used (caller commits)."""
    if not token or len(token) > 200:
        return None
    found = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if found is not None:
        now = utcnow()
        # One write a minute at most: busy clients should not turn reads into writes.
        if found.last_used_at is None or now - found.last_used_at > timedelta(minutes=1):
            found.last_used_at = now
    return found
