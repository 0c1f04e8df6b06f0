"""Retention, pausing a form's work, and completion callbacks.

runs: an index (form_id, status, finished_at, id), so a purge pass reads only what is due.
records.purged_at: when retention removed Runs of the record (its page says so).
form_pauses: forms whose work an operator paused (survives restarts).
callbacks: completion callbacks of API clients, the outbox of their delivery.

Revision ID: 0003_retention
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_retention"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the index, the column and the tables."""
    op.create_index("ix_runs_form_status_finished", "runs",
                    ["form_id", "status", "finished_at", "id"])
    with op.batch_alter_table("records") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table("form_pauses",
                    sa.Column("form_id", sa.String(100), primary_key=True),
                    sa.Column("paused_by", sa.String(100), nullable=False),
                    sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False))
    op.create_table(
        "callbacks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("record_id", sa.Integer(),
                  sa.ForeignKey("records.id", ondelete="CASCADE"), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("body", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_callbacks_record_id", "callbacks", ["record_id"])
    op.create_index("ix_callbacks_state_next", "callbacks", ["state", "next_at"])


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_callbacks_state_next", "callbacks")
    op.drop_index("ix_callbacks_record_id", "callbacks")
    op.drop_table("callbacks")
    op.drop_table("form_pauses")
    with op.batch_alter_table("records") as batch:
        batch.drop_column("purged_at")
    op.drop_index("ix_runs_form_status_finished", table_name="runs")
