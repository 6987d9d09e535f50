"""`hitq db upgrade|current`: the schema (a new database is upgraded on first use anyway)."""
from __future__ import annotations

import click

from hitq.cli.options import db_option


@click.group()
def db():
    """Database schema commands.

    \b
    Example:
      hitq db upgrade --db postgresql://hitq@dbhost/hitq
    """


@db.command()
@db_option
def upgrade(db: str):
    """Upgrade the schema to the newest revision.

    \b
    Example:
      hitq db upgrade --db runs/hitq.db
    """
    from hitq.jobqueue import database

    engine = database.create(db)
    database.upgrade(engine)
    click.echo(f"{database.mask(database.normalize_url(db))}: at revision {database.current_revision(engine)}")


@db.command()
@db_option
def current(db: str):
    """Print the schema revision of the database and the newest one.

    \b
    Example:
      hitq db current
    """
    from hitq.jobqueue import database

    engine = database.create(db)
    click.echo(f"current: {database.current_revision(engine) or 'empty'}; head: {database.head_revision()}")
