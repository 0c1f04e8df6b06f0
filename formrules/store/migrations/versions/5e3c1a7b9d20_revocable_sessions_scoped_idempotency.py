"""Revocable sessions and scoped idempotency keys.

users.session_generation: bumped by "log out everywhere" and password changes.
revoked_sessions: sessions ended by "Log out", until they would have expired anyway.
records.submit_fingerprint: what an API request with an Idempotency-Key asked for.

Revision ID: 5e3c1a7b9d20
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "5e3c1a7b9d20"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns and the table."""
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("session_generation", sa.Integer(), nullable=False,
                                   server_default="0"))
    op.create_table("revoked_sessions",
                    sa.Column("sid", sa.String(32), primary_key=True),
                    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False))
    op.create_index("ix_revoked_sessions_expires_at", "revoked_sessions", ["expires_at"])
    with op.batch_alter_table("records") as batch:
        batch.add_column(sa.Column("submit_fingerprint", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_revoked_sessions_expires_at", "revoked_sessions")
    op.drop_table("revoked_sessions")
    with op.batch_alter_table("records") as batch:
        batch.drop_column("submit_fingerprint")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("session_generation")
