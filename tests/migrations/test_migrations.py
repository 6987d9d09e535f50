"""An empty database upgraded to head equals the models; downgrade and upgrade round-trip."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from hitq.jobqueue import database
from hitq.jobqueue.models import metadata


def test_head_matches_models_and_round_trips(db_url):
    engine = database.create(db_url)
    assert database.current_revision(engine) is None
    database.upgrade(engine)
    assert database.current_revision(engine) == database.head_revision()
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    database.downgrade(engine, "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    database.upgrade(engine)
    assert {"runs", "jobs", "events", "workers"} <= set(sa.inspect(engine).get_table_names())


def test_open_queue_refuses_unmigrated_database_when_told_not_to_migrate(db_url):
    import pytest

    from hitq.errors import DatabaseError
    from hitq.jobqueue import open_queue

    with pytest.raises(DatabaseError, match="hitq db upgrade"):
        open_queue(db_url, migrate=False)
