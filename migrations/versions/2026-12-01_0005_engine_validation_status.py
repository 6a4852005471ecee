"""engine validation status: passed, or not_run with the reason

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 15:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("validation_status", sa.String(length=16),
                                      nullable=False, server_default="passed"))
        batch_op.add_column(sa.Column("validation_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.drop_column("validation_reason")
        batch_op.drop_column("validation_status")
