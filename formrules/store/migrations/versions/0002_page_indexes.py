"""Indexes that keep list pages flat as tables grow (admin runs, records, dead, My tasks).

Revision ID: 0002
Revises: 5e3c1a7b9d20
"""

from alembic import op

revision = "0002"
down_revision = "5e3c1a7b9d20"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_records_created", "records", ["created_at", "id"]),
    ("ix_records_form_created", "records", ["form_id", "created_at", "id"]),
    ("ix_runs_created", "runs", ["created_at", "id"]),
    ("ix_runs_status_created", "runs", ["status", "created_at", "id"]),
    ("ix_runs_form_created", "runs", ["form_id", "created_at", "id"]),
    ("ix_runs_owner_created", "runs", ["owner", "created_at", "id"]),
    ("ix_runs_status_finished", "runs", ["status", "finished_at", "id"]),
]


def upgrade() -> None:
    """Create the list-page indexes."""
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    """Drop them again."""
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
