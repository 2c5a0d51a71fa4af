"""Imaging joins the patient context: the DICOM Patient ID of each study, and the imaging
results a clinical job was given

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_key', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_patient_key'), ['patient_key'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('imaging_inputs', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('imaging_inputs')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_patient_key'))
        batch_op.drop_column('patient_key')
