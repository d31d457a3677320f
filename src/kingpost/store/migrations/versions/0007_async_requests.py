"""Async inference: the durable queue of async requests and the webhook signing secrets.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "async_requests",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("model_id", sa.String(32), nullable=False),
        sa.Column("deployment_id", sa.String(32), nullable=False),
        sa.Column("environment", sa.String(100), nullable=True),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("model_input", sa.Text, nullable=False),
        sa.Column("webhook_endpoint", sa.Text, nullable=True),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("initial_delay_ms", sa.Integer, nullable=False),
        sa.Column("max_delay_ms", sa.Integer, nullable=False),
        sa.Column("max_time_in_queue_seconds", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("webhook_status", sa.String(24), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("not_before", _TS, nullable=False),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("errors", sa.JSON, nullable=False),
        sa.Column("webhook_attempts", sa.Integer, nullable=False),
        sa.Column("webhook_error", sa.Text, nullable=False),
        sa.Column("webhook_not_before", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("status_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
    )
    op.create_index("ix_async_requests_model_id", "async_requests", ["model_id"])
    # The workers' query: a deployment's queued requests, highest priority, then oldest.
    op.create_index(
        "ix_async_requests_queue",
        "async_requests",
        ["deployment_id", "status", "priority", "created_at"],
    )
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("webhook_secrets")
    op.drop_index("ix_async_requests_queue", "async_requests")
    op.drop_index("ix_async_requests_model_id", "async_requests")
    op.drop_table("async_requests")
