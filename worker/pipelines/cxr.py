"""Chest X-ray classification: images -> ResNet-18 -> one finding -> DICOM SR (TID 1500)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from models.card import ModelLoadError
from models.cxr.classifier import CxrClassifier
from worker.jobs import ClaimedJob, PermanentJobError
from worker.outputs.dicom_sr import (
    ClassificationFinding,
    SRReference,
    build_classification_sr,
    write_and_read_back,
)
from worker.outputs.fhir import Coding, Concept, ImagingFinding, SubjectRef, imaging_report
from worker.outputs.key_image import classification_key_image_png
from worker.pipelines.fhir_output import result_context, write_fhir_output
from worker.results import (
    WrittenOutput,
    complete_job,
    get_or_create_output,
    get_or_create_result,
    load_inputs,
    sha256_file,
    superseded_sr,
)
from worker.runtime import Runtime

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def load_classifier(runtime: Runtime, model_name: str) -> CxrClassifier:
    """The classifier of ``model_name``, loaded once per worker process."""
    model_dir = runtime.settings.models_dir / model_name
    try:
        classifier: CxrClassifier = runtime.model(
            f"cxr:{model_dir.resolve()}",
            lambda: CxrClassifier.load(model_dir, device=runtime.settings.device),
        )
    except ModelLoadError as exc:
        raise PermanentJobError(f"model {model_name!r}: {exc}") from exc
    return classifier


def output_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"outputs/{study_uid}/{series_uid}/{sop_uid}.dcm"


def run_cxr_classification(runtime: Runtime, job: ClaimedJob) -> list[int]:
    """Classify the job's images; one finding per study (mean of per-image probabilities)."""
    if job.study_instance_uid is None:
        raise PermanentJobError("cxr-classification runs on a study, not on a patient")
    study_uid = job.study_instance_uid
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    archive = runtime.settings.archive_dir.resolve()
    with runtime.database.session() as session:
        instances = load_inputs(session, job)
    if not instances:
        raise PermanentJobError("the job's input instances are gone")
    datasets = [pydicom.dcmread(archive / instance.path) for instance in instances]
    timings["read_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    classifier = load_classifier(runtime, job.model)
    timings["model_load_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    try:
        per_image = classifier.predict_datasets(datasets)
    except ValueError as exc:  # e.g. colour or multi-frame images the model cannot read
        raise PermanentJobError(f"input not suitable for {job.model}: {exc}") from exc
    timings["inference_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    labels = classifier.card.coded_labels
    mean = np.mean(
        [[image.probabilities[label.name] for label in labels] for image in per_image], axis=0
    )
    best = int(np.argmax(mean))
    probabilities = {label.name: float(mean[i]) for i, label in enumerate(labels)}
    finding = ClassificationFinding(
        label=labels[best], probability=float(mean[best]), probabilities=probabilities
    )
    provenance = classifier.provenance
    details = {
        "probabilities": probabilities,
        "per_image": [
            {"instance": instance.id, "label": image.label.name, "probability": image.probability}
            for instance, image in zip(instances, per_image, strict=True)
        ],
    }
    with runtime.database.session() as session:
        result, _ = get_or_create_result(
            session, job, provenance, finding.label, finding.probability, details
        )
        output = get_or_create_output(
            session,
            result,
            "dicom-sr",
            COMPREHENSIVE_3D_SR,
            lambda: (generate_uid(), generate_uid()),
        )
        predecessor = superseded_sr(session, job, result.id)
        # The stored result is the truth: a rerun rebuilds the same SR from it.
        stored_finding = ClassificationFinding(
            label=next(label for label in labels if label.code_value == result.finding_code),
            probability=float(result.probability or 0.0),
            probabilities=dict(result.details.get("probabilities", probabilities)),
        )
        result_id, created_at = result.id, result.created_at
        series_uid, sop_uid = str(output.series_instance_uid), str(output.sop_instance_uid)
        output_id = output.id

    sr = build_classification_sr(
        datasets,
        stored_finding,
        provenance,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        predecessor=predecessor,
        content_datetime=created_at,
    )
    relpath = output_relpath(study_uid, series_uid, sop_uid)
    write_and_read_back(sr, archive / relpath)
    timings["sr_ms"] = (time.perf_counter() - clock) * 1000
    written = [WrittenOutput(output_id, relpath, sha256_file(Path(archive / relpath)))]

    clock = time.perf_counter()
    patient_id = str(datasets[0].get("PatientID", "") or "").strip()
    if patient_id:  # the EHR's twin of the SR: same study, same finding, the SR's UIDs
        context = result_context(
            result_id,
            job.input_hash,
            created_at,
            SubjectRef.by_identifier(runtime.settings.patient_id_system, patient_id),
            provenance,
        )
        report = imaging_report(
            context,
            ImagingFinding(
                finding=Concept.of(
                    Coding.from_coded_label(stored_finding.label),
                    text=stored_finding.label.code_meaning,
                ),
                probability=stored_finding.probability,
                class_probabilities=stored_finding.probabilities,
            ),
            sr=SRReference(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_class_uid=COMPREHENSIVE_3D_SR,
                sop_instance_uid=sop_uid,
            ),
            # What a clinician sees in the EHR: the image with the finding burned in.
            rendering_png=classification_key_image_png(datasets[0], stored_finding, provenance),
        )
        written.append(write_fhir_output(runtime, result_id, [report]))
        timings["fhir_ms"] = (time.perf_counter() - clock) * 1000
    timings["total_ms"] = sum(timings.values())
    return complete_job(runtime, job, result_id, written, timings)
