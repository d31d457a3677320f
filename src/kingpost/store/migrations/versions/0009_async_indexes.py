"""Async inference: indexes for the workers' per-tick reads.

The queue depth per deployment (``AsyncQueue.depths``: status QUEUED or IN_PROGRESS) and
the webhooks due (``AsyncQueue.due_webhooks``: webhook PENDING, by ``webhook_not_before``)
scanned every row, finished ones included (kept 7 days), on every worker tick: control-
plane CPU per async request that grew with the history.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_async_requests_status", "async_requests", ["status", "deployment_id"])
    op.create_index(
        "ix_async_requests_webhook_due",
        "async_requests",
        ["webhook_status", "webhook_not_before"],
    )


def downgrade() -> None:
    op.drop_index("ix_async_requests_webhook_due", "async_requests")
    op.drop_index("ix_async_requests_status", "async_requests")
