"""GPU assignments: which devices each live replica holds, so a restarted control plane
re-adopts them (the docker engine's containers keep running with their devices).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gpu_assignments",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("deployment_id", sa.String(32), nullable=False),
        sa.Column("devices", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gpu_assignments")
