"""Owners' retries and notices: the failed step's name, e-mail copies of notices, users'
notification preferences, and records whose deletion waits for a cancel to land.

Revision ID: 0007_usertasks
Revises: 0006_perf
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0007_usertasks"
down_revision = "0006_perf"
branch_labels = None
depends_on = None

COLUMNS = [
    ("runs", sa.Column("error_step", sa.String(100), nullable=True)),
    ("records", sa.Column("delete_requested", sa.Boolean(), nullable=False,
                          server_default="0")),
    ("users", sa.Column("email", sa.String(254), nullable=True)),
    ("users", sa.Column("email_on_end", sa.Boolean(), nullable=False, server_default="0")),
    ("notifications", sa.Column("email_to", sa.String(254), nullable=True)),
    ("notifications", sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True)),
]


# The reconciler looks for the few records being deleted and notices to e-mail each pass.
INDEXES = [
    ("ix_records_delete_requested", "records", ["delete_requested"]),
    ("ix_notifications_email_to", "notifications", ["email_to"]),
]


def upgrade() -> None:
    """Add the columns and their indexes."""
    for table, column in COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.add_column(column)
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    """Drop them again. On SQLite dropping a column rebuilds the table, which takes its
    search triggers with it and may renumber `runs`' rowids: the search tables of
    revision 0006_perf are dropped first and made again (rebuilt) afterwards."""
    search = importlib.import_module(
        "formrules.store.migrations.versions.0006_perf_search")
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        search.downgrade()
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
    for table, column in reversed(COLUMNS):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column.name)
    if sqlite:
        search.upgrade()
