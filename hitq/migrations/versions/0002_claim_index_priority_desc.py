"""claim index in the claim's order: priority DESC

The first index was all ascending, so every claim sorted all pending jobs of the run
(SQLite: USE TEMP B-TREE FOR ORDER BY); found by bench/queue_load.py.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_claim", "jobs")
    op.create_index("ix_jobs_claim", "jobs", ["run_id", "status", sa.text("priority DESC"), "prefix_key", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_claim", "jobs")
    op.create_index("ix_jobs_claim", "jobs", ["run_id", "status", "priority", "prefix_key", "id"])
