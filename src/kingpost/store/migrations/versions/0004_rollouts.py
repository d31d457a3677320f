"""Promotions that roll: per-environment promotion settings and the rollouts table.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("environments") as batch:
        batch.add_column(
            sa.Column("promotion_settings", sa.JSON, nullable=False, server_default="{}")
        )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model_id", sa.String(32), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("environment", sa.String(100), nullable=False),
        sa.Column("previous_deployment_id", sa.String(32), nullable=False),
        sa.Column("candidate_deployment_id", sa.String(32), nullable=False),
        sa.Column("rolling", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("target_replicas", sa.Integer, nullable=False),
        sa.Column("previous_initial_replicas", sa.Integer, nullable=False),
        sa.Column("candidate_replicas", sa.Integer, nullable=False),
        sa.Column("previous_replicas", sa.Integer, nullable=False),
        sa.Column("candidate_traffic_percent", sa.Float, nullable=False),
        sa.Column("requested", sa.String(16), nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("phase_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_rollouts_model_id", "rollouts", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_rollouts_model_id", "rollouts")
    op.drop_table("rollouts")
    with op.batch_alter_table("environments") as batch:
        batch.drop_column("promotion_settings")
