"""Autoscaling settings per deployment and per environment (Baseten's field names).

A deployment keeps ``min_replicas``/``max_replicas`` in their columns and the other
settings in ``autoscaling_settings`` (JSON; empty: the defaults). An environment's
``autoscaling_settings`` (NULL: none) apply to whichever deployment it points at.

Revision ID: 0005
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(
            sa.Column("autoscaling_settings", sa.JSON, nullable=False, server_default="{}")
        )
    with op.batch_alter_table("environments") as batch:
        batch.add_column(sa.Column("autoscaling_settings", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("environments") as batch:
        batch.drop_column("autoscaling_settings")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("autoscaling_settings")
