"""The durable job queue: tables, migrations, the claim protocol and checkpoint files. No torch."""
from __future__ import annotations

from hitq.jobqueue.database import mask, normalize_url, url_from_env
from hitq.jobqueue.store import Job, Queue, Run

__all__ = ["Job", "Queue", "Run", "mask", "normalize_url", "open_queue", "url_from_env"]


def open_queue(url: str | None = None, migrate: bool = True) -> Queue:
    """The queue at `url` (or $HITQ_DB, or sqlite:///hitq.db), upgraded to the latest schema."""
    from hitq.jobqueue import database

    engine = database.create(url_from_env(url))
    database.ensure_migrated(engine, migrate=migrate)
    return Queue(engine)
