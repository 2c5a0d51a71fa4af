"""FHIR events and Subscription state

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fhir_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('source', sa.Enum('direct', 'subscription', name='fhireventsource', native_enum=False, length=16), nullable=False),
    sa.Column('fhir_version', sa.String(length=8), nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=True),
    sa.Column('subscription', sa.String(length=300), nullable=True),
    sa.Column('event_number', sa.BigInteger(), nullable=True),
    sa.Column('webhook_id', sa.String(length=255), nullable=True),
    sa.Column('body_sha256', sa.String(length=64), nullable=False),
    sa.Column('body', sa.JSON(), nullable=True),
    sa.Column('status', sa.Enum('received', 'queued', 'processed', 'failed', name='fhireventstatus', native_enum=False, length=16), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('queued_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_events')),
    # NULLs never collide (SQLite and PostgreSQL): only real webhook ids are unique.
    sa.UniqueConstraint('webhook_id', name=op.f('uq_fhir_events_webhook_id'))
    )
    with op.batch_alter_table('fhir_events', schema=None) as batch_op:
        batch_op.create_index('ix_fhir_events_status_received', ['status', 'received_at'], unique=False)

    op.create_table('fhir_subscription_states',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subscription', sa.String(length=300), nullable=False),
    sa.Column('last_event_number', sa.BigInteger(), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fhir_subscription_states')),
    sa.UniqueConstraint('subscription', name=op.f('uq_fhir_subscription_states_subscription'))
    )


def downgrade() -> None:
    op.drop_table('fhir_subscription_states')
    with op.batch_alter_table('fhir_events', schema=None) as batch_op:
        batch_op.drop_index('ix_fhir_events_status_received')

    op.drop_table('fhir_events')
