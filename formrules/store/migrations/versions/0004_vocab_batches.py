"""Batches by their name, and batches for end users.

- Runs of batches say so: `kind` "task" becomes "batch" (batches were called tasks). A
  batch child's `node_path` keeps its old `tasks/<name>` (it is part of the Run's
  identity: checkpoints, idempotency keys, traces) and still loads.
- batches.self_service: a batch a user started over records of their own (My tasks).
- notifications.batch_id: the notice of such a batch links to its page.

Revision ID: 0004_vocab
Revises: 0003_retention
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_vocab"
down_revision = "0003_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Rename the kind of existing batch children; add the two columns."""
    op.execute("UPDATE runs SET kind = 'batch' WHERE kind = 'task'")
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("self_service", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("notifications") as table:
        table.add_column(sa.Column("batch_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    """Drop the columns; give batch children back the old word."""
    with op.batch_alter_table("notifications") as table:
        table.drop_column("batch_id")
    with op.batch_alter_table("batches") as table:
        table.drop_column("self_service")
    op.execute("UPDATE runs SET kind = 'task' WHERE kind = 'batch'")
