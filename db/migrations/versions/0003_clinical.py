"""Clinical side: patients, clinical resources, patient-scoped jobs and results, EHR
responses on deliveries, the subject of audit events

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_state = sa.Enum('receiving', 'routed', name='studystate', native_enum=False, length=16)


def upgrade() -> None:
    op.create_table('patients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('reference', sa.String(length=300), nullable=False),
    sa.Column('state', _state, nullable=False),
    sa.Column('run_number', sa.Integer(), nullable=False),
    sa.Column('first_received_at', sa.DateTime(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(), nullable=False),
    sa.Column('routed_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patients')),
    sa.UniqueConstraint('reference', name=op.f('uq_patients_reference'))
    )
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.create_index('ix_patients_state_last', ['state', 'last_received_at'], unique=False)

    op.create_table('clinical_resources',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=True),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('code_system', sa.String(length=200), nullable=True),
    sa.Column('code', sa.String(length=64), nullable=True),
    sa.Column('effective_at', sa.DateTime(), nullable=True),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.Column('fhir_event_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['fhir_event_id'], ['fhir_events.id'], name=op.f('fk_clinical_resources_fhir_event_id_fhir_events')),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], name=op.f('fk_clinical_resources_patient_id_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clinical_resources')),
    sa.UniqueConstraint('resource_type', 'resource_id', name=op.f('uq_clinical_resources_resource_type_resource_id'))
    )
    with op.batch_alter_table('clinical_resources', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clinical_resources_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index('ix_clinical_resources_patient_type', ['patient_id', 'resource_type'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_id', sa.Integer(), nullable=True))
        batch_op.alter_column('study_id', existing_type=sa.Integer(), nullable=True)
        batch_op.create_index(batch_op.f('ix_jobs_patient_id'), ['patient_id'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_jobs_patient_id_pipeline_input_hash'), ['patient_id', 'pipeline', 'input_hash'])
        batch_op.create_foreign_key(batch_op.f('fk_jobs_patient_id_patients'), 'patients', ['patient_id'], ['id'])

    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_id', sa.Integer(), nullable=True))
        batch_op.alter_column('study_id', existing_type=sa.Integer(), nullable=True)
        batch_op.create_index(batch_op.f('ix_results_patient_id'), ['patient_id'], unique=False)
        batch_op.create_unique_constraint(batch_op.f('uq_results_patient_id_pipeline_model_version_input_hash'), ['patient_id', 'pipeline', 'model_version', 'input_hash'])
        batch_op.create_foreign_key(batch_op.f('fk_results_patient_id_patients'), 'patients', ['patient_id'], ['id'])

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('response', sa.JSON(), nullable=True))

    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('subject', sa.String(length=300), nullable=True))
        batch_op.create_index(batch_op.f('ix_audit_events_subject'), ['subject'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_subject'))
        batch_op.drop_column('subject')

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('response')

    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_results_patient_id_patients'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('uq_results_patient_id_pipeline_model_version_input_hash'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_results_patient_id'))
        batch_op.alter_column('study_id', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('patient_id')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_patient_id_patients'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('uq_jobs_patient_id_pipeline_input_hash'), type_='unique')
        batch_op.drop_index(batch_op.f('ix_jobs_patient_id'))
        batch_op.alter_column('study_id', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('patient_id')

    with op.batch_alter_table('clinical_resources', schema=None) as batch_op:
        batch_op.drop_index('ix_clinical_resources_patient_type')
        batch_op.drop_index(batch_op.f('ix_clinical_resources_patient_id'))

    op.drop_table('clinical_resources')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_index('ix_patients_state_last')

    op.drop_table('patients')
