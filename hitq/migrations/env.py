"""Alembic environment: always run with a connection handed in by hitq.jobqueue.database."""
from alembic import context

from hitq.jobqueue.models import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
