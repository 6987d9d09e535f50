"""The tables (SQLAlchemy Core). Times are float epoch seconds: on PostgreSQL they come from the
database clock, so hosts with skewed clocks agree on who holds a lease."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

JSON = sa.JSON().with_variant(JSONB(), "postgresql")

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("config", JSON, nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("query_id", sa.Integer, nullable=False),
    sa.Column("file_name", sa.String(300), nullable=False),
    sa.Column("question_type", sa.String(100), nullable=False),
    sa.Column("sub_q_type", sa.String(200), nullable=False),
    sa.Column("question", sa.Text, nullable=False),
    sa.Column("reference", sa.Text, nullable=False),
    sa.Column("prefix_key", sa.String(64), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),  # 0, or 1: claimed first (Queue.claim)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("fence", sa.Integer, nullable=False, server_default="0"),
    sa.Column("prediction", sa.Text),
    sa.Column("raw_output", sa.Text),
    sa.Column("error_kind", sa.String(32)),
    sa.Column("error_message", sa.Text),
    sa.Column("original_tokens", sa.Integer),
    sa.Column("input_tokens", sa.Integer),
    sa.Column("output_tokens", sa.Integer),
    sa.Column("truncated", sa.Boolean),
    sa.Column("rows_dropped", sa.Integer),
    sa.Column("image_pixels_before", sa.BigInteger),
    sa.Column("image_pixels_after", sa.BigInteger),
    sa.Column("processing_time", sa.Float),
    sa.Column("queue_time", sa.Float),
    sa.Column("details", JSON),
    sa.Column("scores", JSON),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("run_id", "query_id", name="uq_jobs_run_query"),
    sa.Index("ix_jobs_lease", "status", "lease_expires_at"),
)

# The claim's ORDER BY (priority DESC, prefix_key, id) read straight from the index, no sort.
sa.Index("ix_jobs_claim", jobs.c.run_id, jobs.c.status, jobs.c.priority.desc(), jobs.c.prefix_key, jobs.c.id)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("worker", sa.String(200)),
    sa.Column("fence", sa.Integer),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("detail", sa.Text),
    sa.Index("ix_events_job", "job_id"),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("device", sa.String(50), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("jobs_done", sa.Integer, nullable=False, server_default="0"),
)
