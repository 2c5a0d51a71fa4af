"""Encode segment volumes and mean densities as a DICOM Comprehensive 3D SR (TID 1500).

This module holds no model logic. It measures a binary mask on its CT slices
(:func:`measure_segment`) and turns the :class:`VolumeMeasurement` of each segment of a
DICOM SEG into an SR that follows IHE AI Results (AIR):

* root template TID 1500 "Imaging Measurement Report" with the model as device
  observer, the procedure reported and an Image Library of the slices under the
  segments' frames;
* one TID 1411 Volumetric ROI Measurement Group per segment, with the segment's own
  Tracking Identifier and Tracking UID, a Referenced Segment pointing into the SEG, the
  segment's property type as Finding and its category as Finding Category, the
  algorithm identification, and two TID 300 measurements:
  Volume (118565006, SCT) in (ml, UCUM, "milliliter"), method (126030, DCM, "Sum of
  segmented voxel method for volume"); and Attenuation Coefficient (112031, DCM) in
  ([hnsf'U], UCUM, "Hounsfield unit") with derivation (373098007, SCT, "Mean");
* Contributing Equipment naming the model, evidence = the source series and the SEG,
  VerificationFlag UNVERIFIED, and optionally the SR it supersedes.

The SR UIDs default to ones derived from the SEG, so a retry reproduces them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.provenance import ModelProvenance
from worker.outputs.dicom_common import (
    DEFAULT_PROCEDURE,
    SRReference,
    check_numbers,
    check_output_uids,
    completed_sources,
    contributing_equipment,
    copy_top_level,
    derived_uid,
    device_observation_context,
    lo,
    no_phi_warnings,
    pin_creation_time,
    previous_versions,
    series_description_for,
    sr_algorithm_identification,
    write_dataset_durably,
)
from worker.outputs.dicom_seg import (
    SEGMENTATION_STORAGE,
    slice_positions,
    sort_by_slice_position,
)
from worker.outputs.dicom_sr import COMPREHENSIVE_3D_SR_STORAGE
from worker.outputs.files import removed_on_failure
from worker.outputs.sr_library import (
    image_library,
    insert_image_library,
    read_back_measurement_report,
)

__all__ = [
    "MEAN",
    "MEAN_DENSITY_CODE",
    "MILLILITER",
    "VOLUME_CODE",
    "VOLUME_METHOD",
    "VolumeMeasurement",
    "build_volume_sr",
    "measure_segment",
    "write_volume_sr_and_read_back",
]

# Code set of this module (PS3.16 / UCUM).
#: (118565006, SCT, "Volume"): concept name of the volume measurement.
VOLUME_CODE: Code = codes.SCT.Volume
#: (ml, UCUM, "milliliter"): pydicom's code dictionary has no plain millilitre.
MILLILITER = Code("ml", "UCUM", "milliliter")
#: (126030, DCM, "Sum of segmented voxel method for volume").
VOLUME_METHOD: Code = codes.DCM.SumOfSegmentedVoxelMethodForVolume
#: (112031, DCM, "Attenuation Coefficient"): concept name of the density measurement.
MEAN_DENSITY_CODE: Code = codes.DCM.AttenuationCoefficient
#: (373098007, SCT, "Mean"): derivation of the density measurement.
MEAN: Code = codes.SCT.Mean
_HOUNSFIELD: Code = codes.UCUM.HounsfieldUnit


@dataclass(frozen=True)
class VolumeMeasurement:
    """The volume (mL) and mean density (HU) of one segment of a SEG.

    ``mean_hu`` is ``None`` where no density could be measured (no pixel data).
    """

    volume_ml: float
    mean_hu: float | None
    segment_number: int = 1

    def __post_init__(self) -> None:
        if not _is_real(self.volume_ml) or not 0.0 <= float(self.volume_ml) < math.inf:
            raise ValueError("VolumeMeasurement.volume_ml must be a finite number >= 0")
        if self.mean_hu is not None and (
            not _is_real(self.mean_hu) or not math.isfinite(float(self.mean_hu))
        ):
            raise ValueError("VolumeMeasurement.mean_hu must be a finite number or None")
        number = self.segment_number
        if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < 1:
            raise ValueError("VolumeMeasurement.segment_number must be a positive integer")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _slice_extents_mm(sources: Sequence[Dataset]) -> np.ndarray:
    """Thickness of tissue each sorted slice stands for: half the gap to each neighbour.

    This keeps the volume right for series with uneven spacing; a single slice stands
    for its SliceThickness (or SpacingBetweenSlices).
    """
    if len(sources) == 1:
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):
            value = sources[0].get(keyword)
            if value not in (None, "") and float(value) > 0:
                return np.array([float(value)])
        raise ValueError("a single slice without SliceThickness has no volume")
    positions = slice_positions(sources)
    gaps = np.diff(positions)
    extents = np.empty(len(sources))
    extents[0] = gaps[0]
    extents[-1] = gaps[-1]
    extents[1:-1] = (gaps[:-1] + gaps[1:]) / 2.0
    return extents


def measure_segment(
    sources: Sequence[Dataset], mask: np.ndarray, *, segment_number: int = 1
) -> VolumeMeasurement:
    """Measure the volume (mL) and mean HU of a 0/1 ``mask`` on its CT ``sources``.

    The mask follows the convention of :func:`~worker.outputs.dicom_seg.build_liver_seg`
    (first axis = slices sorted by position along the normal). The mean HU applies each
    slice's Rescale Slope/Intercept; it is ``None`` when the slices have no pixel data.
    Raises ``ValueError`` for a mask that does not fit the series.
    """
    ordered = sort_by_slice_position(sources)
    expected = (len(ordered), int(ordered[0].Rows), int(ordered[0].Columns))
    if not isinstance(mask, np.ndarray) or mask.shape != expected:
        raise ValueError(f"mask shape does not match the source series {expected}")
    binary = mask.astype(bool)
    extents = _slice_extents_mm(ordered)
    volume_mm3 = 0.0
    total_hu = 0.0
    counted = 0
    have_pixels = all("PixelData" in src for src in ordered)
    for k, src in enumerate(ordered):
        voxels = int(binary[k].sum())
        if voxels == 0:
            continue
        row_mm, column_mm = (float(v) for v in src.PixelSpacing[:2])
        volume_mm3 += voxels * row_mm * column_mm * float(extents[k])
        if have_pixels:
            slope = float(src.get("RescaleSlope", 1) or 1)
            intercept = float(src.get("RescaleIntercept", 0) or 0)
            stored = src.pixel_array[binary[k]].astype(np.float64)
            total_hu += float(np.sum(stored * slope + intercept))
            counted += voxels
    mean_hu = total_hu / counted if counted else None
    return VolumeMeasurement(volume_mm3 / 1000.0, mean_hu, segment_number)


def _check_seg(seg: Dataset, sources: Sequence[Dataset]) -> dict[int, Dataset]:
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise ValueError("seg is not a Segmentation Storage instance")
    if str(seg.StudyInstanceUID) != str(sources[0].StudyInstanceUID):
        raise ValueError("the SEG and the source slices belong to different studies")
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if str(sources[0].SeriesInstanceUID) not in referenced:
        raise ValueError("the SEG does not reference the series of the source slices")
    return {int(item.SegmentNumber): item for item in seg.SegmentSequence}


def _coded(item: Dataset, keyword: str) -> hd.sr.CodedConcept:
    code = getattr(item, keyword)[0]
    return hd.sr.CodedConcept(code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)


def _segment_source_uids(seg: Dataset, segment_number: int) -> set[str]:
    """SOP Instance UIDs of the source slices under the frames of one segment.

    Read from the per-frame Derivation Image Sequence; the Segment Identification is
    looked up per frame and then in the shared functional groups, where a SEG with one
    segment (like ours) carries it.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    uids: set[str] = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        identification = frame.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        if not identification or int(identification[0].ReferencedSegmentNumber) != (segment_number):
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uids.add(str(source.ReferencedSOPInstanceUID))
    return uids


def _referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Reference one segment of ``seg`` and the series it was made on.

    The source series (one UIDREF) is used instead of one IMAGE item per slice: TID 1411
    allows either, and hundreds of slices would make the SR slow to build and parse.
    (highdicom's ``ReferencedSegment.from_segmentation`` cannot be used: it looks for the
    Segment Identification only in the per-frame functional groups.)
    """
    series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(series)),
    )


def _measurement_group(
    seg: Dataset,
    segment: Dataset,
    measurement: VolumeMeasurement,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    number = measurement.segment_number
    label = str(segment.get("SegmentLabel", "") or f"Segment {number}")
    tracking_uid = str(segment.get("TrackingUID", "") or "") or derived_uid(
        str(seg.SOPInstanceUID), "segment", str(number)
    )
    items = [
        hd.sr.Measurement(
            name=VOLUME_CODE,
            value=float(measurement.volume_ml),
            unit=MILLILITER,
            method=VOLUME_METHOD,
        )
    ]
    if measurement.mean_hu is not None:
        items.append(
            hd.sr.Measurement(
                name=MEAN_DENSITY_CODE,
                value=float(measurement.mean_hu),
                unit=_HOUNSFIELD,
                derivation=MEAN,
            )
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=lo(str(segment.get("TrackingID", "") or label))
        ),
        referenced_segment=_referenced_segment(seg, number),
        finding_type=_coded(segment, "SegmentedPropertyTypeCodeSequence"),
        finding_category=_coded(segment, "SegmentedPropertyCategoryCodeSequence"),
        algorithm_id=algorithm,
        measurements=items,
    )


def build_volume_sr(
    sources: Sequence[Dataset],
    seg: Dataset,
    measurements: Sequence[VolumeMeasurement],
    provenance: ModelProvenance,
    *,
    predecessor: SRReference | None = None,
    series_number: int = 9903,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: datetime | None = None,
    procedure_reported: Code | hd.sr.CodedConcept | None = None,
) -> Dataset:
    """Build a Comprehensive 3D SR (TID 1500) with one Measurement Group per segment.

    ``sources`` are the CT slices the SEG was made from (pixel data not needed), ``seg``
    the SEG (as built or as read back), ``measurements`` one :class:`VolumeMeasurement`
    per segment reported. ``predecessor`` names an SR this one supersedes. UIDs default
    to ones derived from the SEG; pass ``content_datetime`` to reproduce the file byte
    for byte. The Image Library lists the slices under the segments' frames, with the
    geometry they share said once (see :func:`~worker.outputs.sr_library.image_library`).
    Returns the SR as a pydicom dataset, ready to write.

    Raises ``ValueError`` when the SEG is not of these sources, a measurement names a
    segment the SEG lacks or twice, or UIDs are invalid.
    """
    ordered = sort_by_slice_position(sources)
    segments = _check_seg(seg, ordered)
    if not measurements:
        raise ValueError("build_volume_sr needs at least one measurement")
    numbers_given = [m.segment_number for m in measurements]
    if len(set(numbers_given)) != len(numbers_given):
        raise ValueError("one measurement per segment: a segment number appears twice")
    unknown = sorted(set(numbers_given) - set(segments))
    if unknown:
        raise ValueError(f"the SEG has no segment {unknown[0]}")
    series_instance_uid = series_instance_uid or derived_uid(
        "volume-sr", str(seg.SOPInstanceUID), "series"
    )
    sop_instance_uid = sop_instance_uid or derived_uid(
        "volume-sr", str(seg.SOPInstanceUID), "instance"
    )
    check_output_uids(ordered, series_instance_uid, sop_instance_uid, "SR")
    if sop_instance_uid == str(seg.SOPInstanceUID) or series_instance_uid == str(
        seg.SeriesInstanceUID
    ):
        raise ValueError("the SR needs its own series and instance, apart from the SEG")
    if predecessor is not None and predecessor.sop_instance_uid == sop_instance_uid:
        raise ValueError("an SR cannot supersede itself")
    check_numbers(series_number, instance_number)

    when = content_datetime or datetime.now()
    algorithm = sr_algorithm_identification(provenance)
    # Image Library: the slices under the reported segments' frames (as dcmqi does);
    # the evidence below still lists the whole source series.
    referenced: set[str] = set()
    for m in measurements:
        uids = _segment_source_uids(seg, m.segment_number)
        if not uids:
            raise ValueError(f"the SEG has no frame of segment {m.segment_number}")
        referenced |= uids
    library = [src for src in ordered if str(src.SOPInstanceUID) in referenced]
    if len(library) != len(referenced):
        raise ValueError("the SEG references slices that are not among the sources")
    groups = [
        _measurement_group(seg, segments[m.segment_number], m, algorithm) for m in measurements
    ]
    # The Image Library is added after highdicom has built the document: it deep-copies
    # and re-parses every content item it is given (seconds for one entry per slice).
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(provenance),
        procedure_reported=procedure_reported or DEFAULT_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    equipment = contributing_equipment(provenance, when, "AI segment volumes")
    with no_phi_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*completed_sources(ordered, frame_of_reference=False), seg],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=lo(provenance.manufacturer),
            manufacturer_model_name=lo(provenance.name),
            software_versions=lo(provenance.version),
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=previous_versions(predecessor),
            contributing_equipment=[equipment],
            series_description=series_description_for(provenance),
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    pin_creation_time(sr, equipment)
    insert_image_library(sr, image_library(library))
    # A plain dataset: highdicom's parsed ``content`` of ``sr`` lacks the library.
    return copy_top_level(sr)


def write_volume_sr_and_read_back(sr: Dataset, path: Path) -> Dataset:
    """Write a volume SR to ``path`` atomically, read it back and check it.

    The check (:func:`~worker.outputs.sr_library.read_back_measurement_report`)
    compares the UIDs, the Image Library and the evidence with ``sr``, and requires the
    content tree to parse with highdicom as a TID 1500 report with as many volumetric
    Measurement Groups as ``sr``, each with its volume. Returns the dataset as read back.
    Raises ``ValueError`` (and removes the file) when the check fails.
    """
    path = Path(path)
    expected = len(sr.ContentSequence[-1].ContentSequence) if "ContentSequence" in sr else 0
    if str(sr.get("SOPClassUID", "")) != COMPREHENSIVE_3D_SR_STORAGE:
        raise ValueError("not a Comprehensive 3D SR instance")
    write_dataset_durably(sr, path)
    with removed_on_failure(path):
        back, report = read_back_measurement_report(path, sr)
        groups = report.get_volumetric_roi_measurement_groups()
        if not groups or len(groups) != expected:
            raise ValueError("SR read back lacks its volumetric measurement groups")
        if any(not group.get_measurements(name=VOLUME_CODE) for group in groups):
            raise ValueError("SR read back lacks a volume measurement")
    return back
