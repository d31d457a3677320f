"""Rollouts: whether the previous deployment is scaled down once the promotion succeeds.

Baseten's promote routes take ``scale_down_previous_production`` (a deployment's promote)
and ``scale_down_previous_deployment`` (an environment's). NULL, for rollouts begun before
and promotions that do not say: the previous deployment is deactivated after a rolling
promotion and keeps running after one all at once, as before.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("scale_down_previous", sa.Boolean, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("scale_down_previous")
