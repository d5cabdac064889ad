"""scale-out: the queue and worker of each job, and the heartbeats of worker processes

Revision ID: 0005s
Revises: 0004
Create Date: 2026-12-03 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005s"
down_revision: str | None = "0005w"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("worker", sa.String(length=255), nullable=True))
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("worker", "queue", name=op.f("pk_worker_heartbeats")),
    )
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_heartbeats_seen_at"), ["seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_heartbeats_seen_at"))
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("worker")
        batch_op.drop_column("queue")
