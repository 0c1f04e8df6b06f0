"""Lanes: the queue a Run waits in, and why a due Run waits (a `concurrency:` slot).

Revision ID: 0005_lanes
Revises: 0004_vocab
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_lanes"
down_revision = "0004_vocab"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `runs.queue` (existing Runs stay on the default queue) and `runs.waiting_for`."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("queue", sa.String(40), nullable=False,
                                   server_default="default"))
        batch.add_column(sa.Column("waiting_for", sa.String(20), nullable=True))


def downgrade() -> None:
    """Drop both columns."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("waiting_for")
        batch.drop_column("queue")
