"""image labels from zero-shot classification

Revision ID: 0002_image_labels
Revises: 0001_initial_schema
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_image_labels"
down_revision = "0001_initial_schema"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_labels",
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), primary_key=True),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("classified_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_image_labels_label", "image_labels", ["label"])


def downgrade() -> None:
    op.drop_index("ix_image_labels_label", table_name="image_labels")
    op.drop_table("image_labels")
