"""Drop three single-column indexes that composite indexes already cover.

`ix_records_form_id`, `ix_runs_form_id` and `ix_runs_owner` lead nothing the composite
indexes of revision 0002 (`ix_records_form_created`, `ix_runs_form_created`,
`ix_runs_owner_created`, all starting with the same column) do not; every submit paid
to keep them up to date (issue 9: a submit writes a record and a Run).

Revision ID: 0008_indexes
Revises: 0007_usertasks
"""

from alembic import op

revision = "0008_indexes"
down_revision = "0007_usertasks"
branch_labels = None
depends_on = None

REDUNDANT = [
    ("ix_records_form_id", "records", ["form_id"]),
    ("ix_runs_form_id", "runs", ["form_id"]),
    ("ix_runs_owner", "runs", ["owner"]),
]


def upgrade() -> None:
    """Drop the covered indexes."""
    for name, table, _ in REDUNDANT:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    """Create them again."""
    for name, table, columns in REDUNDANT:
        op.create_index(name, table, columns)
