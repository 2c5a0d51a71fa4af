"""Encode a liver mask as a DICOM Segmentation (SEG) of its source CT series.

This module holds no model logic: it turns a binary mask, the CT slices it was computed
on and the :class:`~models.provenance.ModelProvenance` of the model into a highdicom
Segmentation that follows IHE AI Results (AIR):

* one segment "Liver": property category (91723000, SCT, "Anatomical Structure"), type
  (10200004, SCT, "Liver"), algorithm type AUTOMATIC with the model named in the Segment
  Algorithm Identification (family (123110, DCM, "Artificial Intelligence"), version,
  weights sha256, demo note);
* the geometry of the source: its Frame of Reference, one frame per non-empty slice with
  that slice's position and a per-frame reference (Derivation Image / Source Image) to it,
  and the Referenced Series Sequence;
* Contributing Equipment (purpose (109102, DCM, "Processing Equipment")) naming the
  model, its version, its Device UID and the sha256 of its weights;
* the same study as the source, a new series whose description marks it AI-generated
  (and demo weights as such).

Mask convention: ``mask[k]`` belongs to the k-th source slice in ascending order of
position along the slice normal (the cross product of the row and column direction
cosines). :func:`sort_by_slice_position` gives that order; sources may be passed in any
order. UIDs are derived from the source instances and the model, so a retry of the same
study with the same model reproduces the same SEG. Exceptions and logs never contain
patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.provenance import ModelProvenance
from worker.outputs.dicom_common import (
    DEMO_NOTE,
    check_identity,
    check_numbers,
    check_output_uids,
    completed_sources,
    contributing_equipment,
    derived_uid,
    lo,
    no_phi_warnings,
    pin_creation_time,
    series_description_for,
    write_dataset_durably,
)
from worker.outputs.files import removed_on_failure

__all__ = [
    "ALGORITHM_FAMILY",
    "ANATOMICAL_STRUCTURE",
    "LIVER",
    "SEGMENTATION_STORAGE",
    "EmptySegmentationError",
    "build_liver_seg",
    "slice_positions",
    "sort_by_slice_position",
    "write_seg_and_read_back",
]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Code set of this module (PS3.16): the segmented property and the algorithm family.
#: (91723000, SCT, "Anatomical Structure"): Segmented Property Category of the liver.
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure
#: (10200004, SCT, "Liver"): Segmented Property Type.
LIVER: Code = codes.SCT.Liver
#: (123110, DCM, "Artificial Intelligence"): Algorithm Family.
ALGORITHM_FAMILY: Code = codes.DCM.ArtificialIntelligence

# Slicer's "liver" colour, so viewers show the segment in the colour readers expect.
_LIVER_RGB = (221, 130, 101)
_ORIENTATION_TOLERANCE = 1e-4
_POSITION_TOLERANCE_MM = 1e-3


class EmptySegmentationError(ValueError):
    """The mask has no foreground voxel: there is nothing to encode as a SEG.

    A SEG without frames is not a valid object, so the caller reports "no liver found"
    (e.g. in the SR or FHIR result) instead of sending a SEG.
    """


def _check_slices(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise ValueError("a SEG needs at least one source slice")
    required = (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Rows",
        "Columns",
        "PixelSpacing",
        "ImagePositionPatient",
        "ImageOrientationPatient",
    )
    for index, src in enumerate(sources):
        missing = [kw for kw in required if src.get(kw) in (None, "")]
        if missing:
            raise ValueError(f"source slice {index} lacks {', '.join(missing)}")
        if int(src.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"source {index} is multi-frame; single-frame slices are expected")
    for keyword, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series")):
        if len({str(src[keyword].value) for src in sources}) != 1:
            raise ValueError(f"all source slices must belong to the same {what}")
    if len({str(src.SOPInstanceUID) for src in sources}) != len(sources):
        raise ValueError("the source slices contain the same SOP Instance twice")
    if len({(int(src.Rows), int(src.Columns)) for src in sources}) != 1:
        raise ValueError("the source slices differ in Rows/Columns")
    frames = {str(src.get("FrameOfReferenceUID", "") or "") for src in sources}
    if len(frames) != 1:
        raise ValueError("the source slices differ in Frame of Reference")


def _slice_normal(sources: Sequence[Dataset]) -> np.ndarray:
    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
    for index, src in enumerate(sources):
        other = np.asarray(src.ImageOrientationPatient, dtype=float)
        if other.shape != (6,) or not np.allclose(other, orientation, atol=_ORIENTATION_TOLERANCE):
            raise ValueError(f"source slice {index} has a different orientation (mixed series)")
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length < 0.5:
        raise ValueError("ImageOrientationPatient does not define a plane")
    return normal / length


def slice_positions(sources: Sequence[Dataset]) -> np.ndarray:
    """Return each slice's position (mm) along the slice normal, in the order given.

    Raises ``ValueError`` for mixed orientations or missing geometry.
    """
    _check_slices(sources)
    normal = _slice_normal(sources)
    return np.array(
        [float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)) for s in sources]
    )


def sort_by_slice_position(sources: Sequence[Dataset]) -> list[Dataset]:
    """Return the slices sorted by ascending position along the slice normal.

    This is the order of the mask's first axis. Raises ``ValueError`` when two slices
    share a position or the series mixes orientations.
    """
    positions = slice_positions(sources)
    order = np.argsort(positions, kind="stable")
    if len(order) > 1 and float(np.min(np.diff(positions[order]))) < _POSITION_TOLERANCE_MM:
        raise ValueError("two source slices share a position (duplicate or mixed series)")
    return [sources[int(i)] for i in order]


def _check_mask(mask: object, sources: Sequence[Dataset]) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError("the mask must be a numpy array")
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if mask.shape != expected:
        raise ValueError(
            f"mask shape {mask.shape} does not match the source series "
            f"(slices, rows, columns) = {expected}"
        )
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"the mask must be boolean or integer, not {mask.dtype}")
    binary = mask.astype(np.uint8, copy=False)
    if int(binary.max(initial=0)) > 1 or int(mask.min(initial=0)) < 0:
        raise ValueError("the mask must hold only 0 (background) and 1 (liver)")
    if not binary.any():
        raise EmptySegmentationError("the mask is empty: no liver was segmented, no SEG is built")
    return binary


def _seg_key(sources: Sequence[Dataset], provenance: ModelProvenance) -> tuple[str, ...]:
    """What identifies one SEG: the source instances and the exact model."""
    return (
        "liver-seg",
        str(sources[0].StudyInstanceUID),
        str(sources[0].SeriesInstanceUID),
        *sorted(str(src.SOPInstanceUID) for src in sources),
        provenance.device_uid,
        provenance.weights_sha256,
    )


def build_liver_seg(
    sources: Sequence[Dataset],
    mask: np.ndarray,
    provenance: ModelProvenance,
    *,
    series_number: int = 9902,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG with one "Liver" segment from ``mask`` on ``sources``.

    ``sources`` are the CT slices of one series (any order; pixel data is not needed);
    ``mask`` is a (slices, rows, columns) array of 0/1 whose first axis follows
    :func:`sort_by_slice_position`. Slices without liver get no frame. The UIDs default
    to ones derived from the source instances and the model (a retry reproduces them);
    pass ``content_datetime`` as well to reproduce the file byte for byte.

    Raises :class:`EmptySegmentationError` (a ``ValueError``) for an empty mask and
    ``ValueError`` for a mask that does not fit the series, a multi-frame, mixed or
    duplicated series, or invalid UIDs.
    """
    ordered = sort_by_slice_position(sources)
    binary = _check_mask(mask, ordered)
    key = _seg_key(ordered, provenance)
    series_instance_uid = series_instance_uid or derived_uid(*key, "series")
    sop_instance_uid = sop_instance_uid or derived_uid(*key, "instance")
    check_output_uids(ordered, series_instance_uid, sop_instance_uid, "SEG")
    check_numbers(series_number, instance_number)

    when = content_datetime or datetime.now()
    parameters = {"weights_sha256": provenance.weights_sha256}
    if provenance.demo:
        parameters["note"] = DEMO_NOTE
    algorithm = hd.AlgorithmIdentificationSequence(
        name=lo(provenance.name),
        family=ALGORITHM_FAMILY,
        version=lo(provenance.version),
        source=lo(provenance.manufacturer),
        parameters=parameters,
    )
    liver = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=LIVER,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        # The volume SR's Measurement Group reuses this Tracking UID for the same liver.
        tracking_uid=derived_uid(sop_instance_uid, "segment", "1"),
        tracking_id="Liver",
        display_color=hd.color.CIELabColor.from_rgb(*_LIVER_RGB),
    )
    equipment = contributing_equipment(provenance, when, "AI liver segmentation")
    content = "AI liver segmentation" + (f"; {DEMO_NOTE}" if provenance.demo else "")
    with no_phi_warnings():
        seg = hd.seg.Segmentation(
            source_images=completed_sources(ordered, frame_of_reference=True),
            pixel_array=binary,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[liver],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=lo(provenance.manufacturer),
            manufacturer_model_name=lo(provenance.name),
            software_versions=lo(provenance.version),
            device_serial_number=provenance.weights_sha256,
            content_label="LIVER",
            content_description=lo(content),
            omit_empty_frames=True,
            contributing_equipment=[equipment],
            series_description=series_description_for(provenance),
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    pin_creation_time(seg, equipment)
    # highdicom draws a random Dimension Organization UID; derive it so a retry matches.
    dimension_uid = derived_uid(sop_instance_uid, "dimension-organization")
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = dimension_uid
    return seg


def _check_frames(back: Dataset, seg: Dataset) -> None:
    """Refuse a SEG read back whose frames differ from the ones written.

    Native (uncompressed) pixel data must hold exactly the bits of its frames and be the
    bytes written; encapsulated pixel data is decoded instead.
    """
    count = int(seg.NumberOfFrames)
    per_frame = back.get("PerFrameFunctionalGroupsSequence") or []
    if int(back.get("NumberOfFrames", 0) or 0) != count or len(per_frame) != count:
        raise ValueError("SEG read back has a different number of frames")
    pixels = int(back.Rows) * int(back.Columns) * count
    if back.file_meta.TransferSyntaxUID.is_encapsulated:
        if back.pixel_array.size != pixels:
            raise ValueError("SEG read back has a different number of frames")
        return
    expected = (pixels * int(back.BitsAllocated) + 7) // 8
    data = back.PixelData
    if len(data) != expected + expected % 2:  # values are padded to an even length
        raise ValueError("SEG read back has pixel data of the wrong length")
    written = seg.PixelData
    if data[: len(written)] != written or len(data) - len(written) not in (0, 1):
        raise ValueError("SEG read back has other pixel data than the SEG written")


def write_seg_and_read_back(seg: Dataset, path: Path) -> Dataset:
    """Write a SEG to ``path`` atomically, read it back and check it.

    The file is read back once with pydicom (highdicom's parse of every frame's
    functional groups cost as much as the write): the SOP Class, SOP Instance and Study
    Instance UIDs and the file meta, the segment numbers, the number of frames and of
    per-frame functional groups, and the pixel data (its length and its bytes) are
    compared with ``seg``. Returns the dataset as read back. Raises ``ValueError`` (and
    removes the file) when the check fails.
    """
    path = Path(path)
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise ValueError("not a Segmentation Storage instance")
    write_dataset_durably(seg, path)
    with removed_on_failure(path):
        try:
            back = pydicom.dcmread(path)
            segments = [int(item.SegmentNumber) for item in back.SegmentSequence]
        except Exception as exc:
            raise ValueError(f"SEG file does not read back: {type(exc).__name__}") from exc
        check_identity(back, seg, "SEG")
        if segments != [int(item.SegmentNumber) for item in seg.SegmentSequence]:
            raise ValueError("SEG read back has different segments")
        try:
            _check_frames(back, seg)
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"SEG read back lacks its frames: {type(exc).__name__}") from exc
    return back
