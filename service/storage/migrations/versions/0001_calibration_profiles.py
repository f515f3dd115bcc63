"""calibration_profiles: persisted recalibration profiles (issue 24)

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calibration_profiles",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("num_classes", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("data_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("conformal", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_calibration_profiles_model", "calibration_profiles", ["model_name", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_calibration_profiles_model", table_name="calibration_profiles")
    op.drop_table("calibration_profiles")
