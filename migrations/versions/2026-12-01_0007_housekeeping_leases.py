"""housekeeping leases: one process per deployment runs each periodic task

Revision ID: 0006_housekeeping
Revises: 0006_dashboard
Create Date: 2026-12-01 16:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_housekeeping"
down_revision = "0006_dashboard"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "housekeeping",
        sa.Column("task", sa.String(length=32), primary_key=True),
        sa.Column("holder", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("last_run_at", sa.DateTime(), nullable=True),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("runs", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("items_total", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("housekeeping")
