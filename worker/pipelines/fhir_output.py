"""The FHIR side of a pipeline's result: one transaction Bundle per result, in the archive.

Every pipeline that has something for the EHR builds its resources with
``worker.outputs.fhir`` and hands them here: the Bundle is validated against the R4
schema, written next to the DICOM outputs, read back, and recorded as an output object of
kind ``fhir-bundle``. ``complete_job`` then gives it a delivery to EHR_BASE_URL when one
is configured (and none otherwise: the Bundle stays in the archive as the FHIR form of
the result).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from db.schema import OutputObject, Result, utcnow
from models.provenance import ModelProvenance
from worker.outputs.fhir import (
    FhirOutput,
    ResultContext,
    SubjectRef,
    transaction_bundle,
    write_bundle,
)
from worker.results import FHIR_BUNDLE, WrittenOutput, sha256_file
from worker.runtime import Runtime

RESULT_IDENTIFIER_SYSTEM = "urn:carebridge:result"


def result_business_id(result_id: int, input_hash: str) -> str:
    """The stem of a result's business identifiers (``<stem>-<part>`` per resource)."""
    return f"r{result_id}-{input_hash[:16]}"


def result_context(
    result_id: int,
    input_hash: str,
    created_at: datetime,
    subject: SubjectRef,
    provenance: ModelProvenance,
) -> ResultContext:
    """The context shared by a result's resources; stable across retries.

    The business identifier joins the database id with the inputs' hash so that two
    carebridge installations writing to one EHR do not collide on ``r1``.
    """
    return ResultContext(
        result_id=result_business_id(result_id, input_hash),
        subject=subject,
        provenance=provenance,
        when=created_at.replace(tzinfo=UTC),
        identifier_system=RESULT_IDENTIFIER_SYSTEM,
    )


def fhir_relpath(result_id: int) -> str:
    return f"outputs/fhir/result-{result_id}.json"


def write_fhir_output(runtime: Runtime, result_id: int, outputs: list[FhirOutput]) -> WrittenOutput:
    """Validate, write and read back the result's transaction Bundle; record the object."""
    bundle = transaction_bundle(outputs)  # validated against the R4 schema
    relpath = fhir_relpath(result_id)
    path = runtime.settings.archive_dir.resolve() / relpath
    write_bundle(bundle, path)
    with runtime.database.session() as session:
        output = session.execute(
            select(OutputObject).where(
                OutputObject.result_id == result_id, OutputObject.kind == FHIR_BUNDLE
            )
        ).scalar_one_or_none()
        if output is None:
            output = OutputObject(
                result_id=result_id, kind=FHIR_BUNDLE, path="", sha256="", created_at=utcnow()
            )
            session.add(output)
            session.flush()
        output_id = output.id
    return WrittenOutput(output_id, relpath, sha256_file(Path(path)))


def stored_result(runtime: Runtime, result_id: int) -> Result:
    """A result row, detached (for building outputs outside the transaction)."""
    with runtime.database.session() as session:
        result = session.get(Result, result_id)
        assert result is not None
        session.expunge(result)
        return result
