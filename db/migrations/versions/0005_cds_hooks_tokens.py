"""CDS Hooks: the client JWTs already accepted, so that a replay is refused

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'cds_hooks_tokens',
        sa.Column('token_key', sa.String(length=64), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('token_key', name=op.f('pk_cds_hooks_tokens')),
    )
    with op.batch_alter_table('cds_hooks_tokens', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_cds_hooks_tokens_expires_at'), ['expires_at'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('cds_hooks_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cds_hooks_tokens_expires_at'))
    op.drop_table('cds_hooks_tokens')
