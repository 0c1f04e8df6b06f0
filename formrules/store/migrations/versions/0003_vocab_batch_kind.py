"""Runs of batches say so: `kind` "task" becomes "batch" (batches were called tasks).

Only the word changes; a batch child's `node_path` keeps its old `tasks/<name>` (it is part
of the Run's identity: checkpoints, idempotency keys, traces) and still loads.

Revision ID: 0003_vocab
Revises: 0002
"""

from alembic import op

revision = "0003_vocab"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Rename the kind of existing batch children."""
    op.execute("UPDATE runs SET kind = 'batch' WHERE kind = 'task'")


def downgrade() -> None:
    """Give them back the old word."""
    op.execute("UPDATE runs SET kind = 'task' WHERE kind = 'batch'")
