"""Liver segmentation: a CT series -> 3-D U-Net -> DICOM SEG, volume SR (TID 1500), key
image, and the volume as a FHIR Observation.

A job holds every CT instance the routing rules picked in the study; the series with the
most slices is segmented (the primary axial series; localizers are excluded by the rules).
The stored result (volume, mean HU) is the truth: a rerun rebuilds the same objects, whose
UIDs are derived from the source instances and the model.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom import Dataset

from db.schema import Result
from models.segmentation import LIVER, SeriesGeometryError, load_ct_series, sort_datasets
from models.segmentation.infer import LiverSegmenter
from worker.jobs import ClaimedJob, NothingToReport, PermanentJobError
from worker.outputs.dicom_common import SRReference
from worker.outputs.dicom_seg import SEGMENTATION_STORAGE, build_liver_seg, write_seg_and_read_back
from worker.outputs.dicom_volume_sr import (
    VolumeMeasurement,
    build_volume_sr,
    write_volume_sr_and_read_back,
)
from worker.outputs.fhir import OrganVolume, SubjectRef, liver_volume_observation
from worker.outputs.key_image import (
    build_segmentation_key_image,
    key_slice_index,
    write_key_image_and_read_back,
)
from worker.pipelines.clinical import load_model
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


def _largest_series(datasets: list[Dataset]) -> list[Dataset]:
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        by_series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    return max(by_series.values(), key=len)


def _relpath(study: str, series: str, sop: str) -> str:
    return f"outputs/{study}/{series}/{sop}.dcm"


def run_liver_segmentation(runtime: Runtime, job: ClaimedJob) -> list[int]:
    """Segment the liver; SEG + volume SR + key image to the PACS, volume to the EHR."""
    if job.study_instance_uid is None:
        raise PermanentJobError("liver-segmentation runs on a study, not on a patient")
    study_uid = job.study_instance_uid
    archive = runtime.settings.archive_dir.resolve()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    with runtime.database.session() as session:
        instances = load_inputs(session, job)
    if not instances:
        raise PermanentJobError("the job's input instances are gone")
    datasets = _largest_series([pydicom.dcmread(archive / i.path) for i in instances])
    try:
        volume = load_ct_series(datasets)
    except SeriesGeometryError as exc:
        raise PermanentJobError(f"the CT series cannot be made a volume: {exc}") from exc
    sources = sort_datasets(datasets)
    timings["read_ms"] = (time.perf_counter() - clock) * 1000

    clock = time.perf_counter()
    segmenter: LiverSegmenter = load_model(
        runtime,
        "liver",
        job.model,
        lambda path: LiverSegmenter.load(path, device=runtime.settings.device),
    )
    timings["model_load_ms"] = (time.perf_counter() - clock) * 1000
    clock = time.perf_counter()
    segmentation = segmenter.segment(volume)
    timings["inference_ms"] = (time.perf_counter() - clock) * 1000
    if segmentation.empty:
        raise NothingToReport("no liver found in the series")

    clock = time.perf_counter()
    provenance = segmenter.provenance
    mask = segmentation.mask
    details = {
        "volume_ml": round(float(segmentation.volume_ml), 2),
        "mean_hu": None if segmentation.mean_hu is None else round(float(segmentation.mean_hu), 1),
        "series_instance_uid": volume.series_instance_uid,
        "slices": int(mask.shape[0]),
        "stages_ms": {k: round(v * 1000, 1) for k, v in segmentation.timings.items()},
    }
    seg = build_liver_seg(sources, mask, provenance)
    with runtime.database.session() as session:
        result, _ = get_or_create_result(session, job, provenance, LIVER, None, details)
        stored = dict(result.details)
        result_id, created_at = result.id, result.created_at
        seg_row = get_or_create_output(
            session,
            result,
            "dicom-seg",
            SEGMENTATION_STORAGE,
            lambda: (str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID)),
        )
        predecessor = superseded_sr(session, job, result.id)
        seg_id = seg_row.id
    measurement = VolumeMeasurement(stored["volume_ml"], stored["mean_hu"])
    sr = build_volume_sr(sources, seg, [measurement], provenance, predecessor=predecessor)
    key_index = key_slice_index(mask)
    key = build_segmentation_key_image(
        sources[key_index], mask[key_index], provenance, volume_ml=measurement.volume_ml
    )
    with runtime.database.session() as session:
        row = session.get(Result, result_id)
        assert row is not None
        sr_id = get_or_create_output(
            session,
            row,
            "dicom-sr",
            COMPREHENSIVE_3D_SR,
            lambda: (str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)),
        ).id
        key_id = get_or_create_output(
            session,
            row,
            "dicom-key-image",
            str(key.SOPClassUID),
            lambda: (str(key.SeriesInstanceUID), str(key.SOPInstanceUID)),
        ).id
    written = []
    writers: list[tuple[int, Dataset, Callable[[Dataset, Path], object]]] = [
        (seg_id, seg, write_seg_and_read_back),
        (sr_id, sr, write_volume_sr_and_read_back),
        (key_id, key, write_key_image_and_read_back),
    ]
    for output_id, dataset, write in writers:
        relpath = _relpath(study_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
        write(dataset, archive / relpath)
        written.append(WrittenOutput(output_id, relpath, sha256_file(Path(archive / relpath))))
    timings["dicom_ms"] = (time.perf_counter() - clock) * 1000

    patient_id = str(sources[0].get("PatientID", "") or "").strip()
    if patient_id:
        clock = time.perf_counter()
        context = result_context(
            result_id,
            job.input_hash,
            created_at,
            SubjectRef.by_identifier(runtime.settings.patient_id_system, patient_id),
            provenance,
        )
        observation = liver_volume_observation(
            context,
            OrganVolume(measurement.volume_ml),
            study_instance_uid=study_uid,
            dicom_outputs=(
                SRReference(
                    study_instance_uid=study_uid,
                    series_instance_uid=str(seg.SeriesInstanceUID),
                    sop_class_uid=SEGMENTATION_STORAGE,
                    sop_instance_uid=str(seg.SOPInstanceUID),
                ),
                SRReference(
                    study_instance_uid=study_uid,
                    series_instance_uid=str(sr.SeriesInstanceUID),
                    sop_class_uid=COMPREHENSIVE_3D_SR,
                    sop_instance_uid=str(sr.SOPInstanceUID),
                ),
            ),
        )
        written.append(write_fhir_output(runtime, result_id, [observation]))
        timings["fhir_ms"] = (time.perf_counter() - clock) * 1000
    timings["total_ms"] = sum(timings.values())
    return complete_job(runtime, job, result_id, written, timings)
