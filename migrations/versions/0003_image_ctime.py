"""image inode change times: an edit that keeps a file's size and mtime is still noticed

Revision ID: 0003_image_ctime
Revises: 0002_image_labels
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_image_ctime"
down_revision = "0002_image_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for rows written before: the next index run records their ctime without reading.
    op.add_column("images", sa.Column("ctime_ns", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("ctime_ns")
