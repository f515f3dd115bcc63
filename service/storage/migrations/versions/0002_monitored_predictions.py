"""monitored_predictions: what predict served, as numbers, and the labels fed back (issue 25)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-14
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "monitored_predictions",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("prediction_id", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("calibration_id", sa.String(length=200), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("batch_index", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("entropy", sa.Float(), nullable=False),
        sa.Column("predicted_class", sa.SmallInteger(), nullable=False),
        sa.Column("ood_flag", sa.Boolean(), nullable=True),
        sa.Column("set_size", sa.SmallInteger(), nullable=True),
        sa.Column("set_coverage", sa.Float(), nullable=True),
        sa.Column("prediction_set", sa.LargeBinary(), nullable=True),
        sa.Column("probabilities", sa.LargeBinary(), nullable=False),
        sa.Column("logits", sa.LargeBinary(), nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=True),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prediction_id", name="uq_monitored_predictions_prediction_id"),
    )
    op.create_index("ix_monitored_predictions_window", "monitored_predictions",
                    ["model_name", "model_version", "calibration_id", "id"])
    op.create_index("ix_monitored_predictions_request", "monitored_predictions", ["request_id", "batch_index"])
    op.create_index("ix_monitored_predictions_created", "monitored_predictions", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_monitored_predictions_created", table_name="monitored_predictions")
    op.drop_index("ix_monitored_predictions_request", table_name="monitored_predictions")
    op.drop_index("ix_monitored_predictions_window", table_name="monitored_predictions")
    op.drop_table("monitored_predictions")
