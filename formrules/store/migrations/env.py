"""Alembic environment: run by `formrules.store.migrate`, never by a bare `alembic` call.

The connection comes from `config.attributes["connection"]`. Batch mode is on so that a
revision written once alters tables on SQLite (which has almost no ALTER TABLE) and on
PostgreSQL alike.
"""

from alembic import context

from formrules.store.models import Base, UTCDateTime
from formrules.store.search import include_name


def render_item(type_, obj, autogen_context):
    """Write our UTC type as the plain column type it stores, so revisions need no import."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online() -> None:
    """Migrate on the connection `formrules.store.migrate` hands over."""
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=True, compare_type=True, render_item=render_item,
                      include_name=include_name)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("formrules migrations run online only: use `formrules db upgrade`")
run_migrations_online()
