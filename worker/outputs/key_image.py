"""Key images for humans: a source slice with the AI result burned in, as DICOM and PNG.

This module holds no model logic. It renders one source image (windowed grayscale) with
either the outline of a segmentation or the text of a classification burned in, plus a
caption naming the model and marking the result as AI-generated and unverified (and demo
weights as such), and wraps it in a Secondary Capture Image (RGB, 8 bit) of the source's
study in a new series. :func:`key_image_png` gives the same picture as PNG bytes, e.g. for
a FHIR DiagnosticReport's presentedForm.

The caption never contains patient data. Burned In Annotation keeps its DICOM meaning
("enough burned-in text to identify the patient"): it is copied from the source, since the
caption adds nothing identifying; the overlay itself is stated by Image Type, Derivation
Description and the Source Image Sequence. The pixel work (window, outline, caption, PNG)
is in :mod:`worker.outputs.key_image_render`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

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
from worker.outputs.dicom_sr import ClassificationFinding
from worker.outputs.files import removed_on_failure
from worker.outputs.key_image_render import render_key_image, rgb_png

__all__ = [
    "SECONDARY_CAPTURE_STORAGE",
    "build_classification_key_image",
    "build_segmentation_key_image",
    "classification_key_image_png",
    "key_image_png",
    "key_slice_index",
    "write_key_image_and_read_back",
]

SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

#: (121322, DCM, "Source image for image processing operation"): purpose of the reference
#: from the key image to the image it was rendered from.
_SOURCE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation
_SINGLE_LETTERS = ("L", "P")


def key_slice_index(mask: np.ndarray) -> int:
    """Return the index (first axis) of the slice with the largest mask area.

    Raises ``ValueError`` for an empty or non-3-D mask.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 3:
        raise ValueError("the mask must be a (slices, rows, columns) array")
    # One whole-slice count each: count_nonzero along an axis is ten times slower.
    areas = np.array([np.count_nonzero(mask_slice) for mask_slice in mask])
    if not areas.any():
        raise ValueError("the mask is empty: there is no key slice")
    return int(np.argmax(areas))


def _provenance_lines(provenance: ModelProvenance) -> list[str]:
    lines = [f"Model {provenance.name} {provenance.version}", "AI-generated - UNVERIFIED"]
    if provenance.demo:
        lines.append(DEMO_NOTE)
    return lines


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Row and column directions as patient orientation letters, e.g. ("L", "P")."""
    orientation = source.get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        cosines = np.asarray(orientation, dtype=float)
        letters = []
        for vector in (cosines[:3], cosines[3:]):
            parts = [
                ("L" if value > 0 else "R", "P" if value > 0 else "A", "H" if value > 0 else "F")[
                    axis
                ]
                for axis, value in sorted(enumerate(vector), key=lambda item: -abs(item[1]))
                if abs(value) > 0.25
            ]
            letters.append("".join(parts))
        return letters[0], letters[1]
    given = source.get("PatientOrientation")
    if given is not None and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    return None


def _secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    provenance: ModelProvenance,
    *,
    what: str,
    series_number: int,
    instance_number: int,
    series_instance_uid: str | None,
    sop_instance_uid: str | None,
    content_datetime: datetime | None,
) -> hd.sc.SCImage:
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise ValueError(f"the source image lacks {keyword}")
    key = (
        "key-image",
        what,
        str(source.SOPInstanceUID),
        provenance.device_uid,
        provenance.weights_sha256,
    )
    series_instance_uid = series_instance_uid or derived_uid(*key, "series")
    sop_instance_uid = sop_instance_uid or derived_uid(*key, "instance")
    check_output_uids([source], series_instance_uid, sop_instance_uid, "key image")
    check_numbers(series_number, instance_number)

    when = content_datetime or datetime.now()
    equipment = contributing_equipment(provenance, when, f"AI key image ({what})")
    orientation = _patient_orientation(source)
    with no_phi_warnings():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=completed_sources([source], frame_of_reference=False)[0],
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            # highdicom takes single letters only; the full value is set below.
            patient_orientation=_SINGLE_LETTERS,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=lo(provenance.manufacturer),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[equipment],
            series_description=series_description_for(provenance),
            manufacturer_model_name=lo(provenance.name),
            software_versions=lo(provenance.version),
            device_serial_number=provenance.weights_sha256,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    # Oblique images have several letters per direction; unknown orientation is empty.
    image.PatientOrientation = list(orientation) if orientation else []
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = lo(f"AI {what} burned into the source image")
    image.ConversionType = "WSD"  # rendered on a workstation, not digitized
    # General Series Laterality is Type 2C (paired body parts): mirror the source. A
    # source with a body part but no laterality says the part is unpaired; without a
    # body part the laterality is sent empty ("unknown").
    if source.get("BodyPartExamined"):
        image.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        image.Laterality = source.Laterality
    elif not source.get("BodyPartExamined"):
        image.Laterality = ""
    if source.get("BurnedInAnnotation"):
        image.BurnedInAnnotation = source.BurnedInAnnotation
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept(
            _SOURCE_PURPOSE.value, _SOURCE_PURPOSE.scheme_designator, _SOURCE_PURPOSE.meaning
        )
    ]
    image.SourceImageSequence = [reference]
    pin_creation_time(image, equipment)
    return image


def build_segmentation_key_image(
    source: Dataset,
    mask_slice: np.ndarray,
    provenance: ModelProvenance,
    *,
    label: str = "Liver",
    volume_ml: float | None = None,
    window: tuple[float, float] | None = None,
    series_number: int = 9904,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> hd.sc.SCImage:
    """Build a Secondary Capture of ``source`` with the outline of ``mask_slice`` burned in.

    ``source`` is one slice with pixel data (pick it with :func:`key_slice_index`),
    ``mask_slice`` its 2-D 0/1 mask. The caption names the segment, the volume when
    given, the model and its status. ``window`` is (center, width) in modality units;
    CT defaults to a soft-tissue window, other images to their own window. UIDs default
    to ones derived from the source and the model.
    """
    if not isinstance(mask_slice, np.ndarray) or mask_slice.ndim != 2:
        raise ValueError("mask_slice must be a 2-D array")
    if not mask_slice.any():
        raise ValueError("the mask slice is empty: choose the slice with key_slice_index")
    heading = f"AI segmentation: {label} (outline)"
    if volume_ml is not None:
        heading += f" - volume {float(volume_ml):.0f} mL"
    rgb = render_key_image(
        source, mask_slice.astype(bool), [heading, *_provenance_lines(provenance)], window
    )
    return _secondary_capture(
        source,
        rgb,
        provenance,
        what=f"{label} segmentation outline",
        series_number=series_number,
        instance_number=instance_number,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        content_datetime=content_datetime,
    )


def build_classification_key_image(
    source: Dataset,
    finding: ClassificationFinding,
    provenance: ModelProvenance,
    *,
    window: tuple[float, float] | None = None,
    series_number: int = 9904,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> hd.sc.SCImage:
    """Build a Secondary Capture of ``source`` with the classification burned in as text.

    The caption gives the finding's code meaning and probability, the model and its
    status. Other arguments as in :func:`build_segmentation_key_image`.
    """
    return _secondary_capture(
        source,
        _classification_rendering(source, finding, provenance, window),
        provenance,
        what="classification",
        series_number=series_number,
        instance_number=instance_number,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        content_datetime=content_datetime,
    )


def _classification_rendering(
    source: Dataset,
    finding: ClassificationFinding,
    provenance: ModelProvenance,
    window: tuple[float, float] | None,
) -> np.ndarray:
    heading = (
        f"AI finding: {finding.label.code_meaning} (probability {float(finding.probability):.2f})"
    )
    return render_key_image(source, None, [heading, *_provenance_lines(provenance)], window)


def classification_key_image_png(
    source: Dataset,
    finding: ClassificationFinding,
    provenance: ModelProvenance,
    *,
    window: tuple[float, float] | None = None,
) -> bytes:
    """The picture of :func:`build_classification_key_image` as PNG, without the DICOM."""
    return rgb_png(_classification_rendering(source, finding, provenance, window))


def key_image_png(image: Dataset) -> bytes:
    """Return the pixels of an RGB key image as PNG bytes (8-bit RGB, no metadata)."""
    pixels = np.asarray(image.pixel_array)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError("key_image_png needs an 8-bit RGB single-frame image")
    return rgb_png(pixels)


def write_key_image_and_read_back(image: Dataset, path: Path) -> Dataset:
    """Write a key image to ``path`` atomically, read it back and decode its pixels.

    Returns the dataset as read back. Raises ``ValueError`` (and removes the file) when
    the UIDs differ or the pixels do not decode to the image's size.
    """
    path = Path(path)
    if str(image.get("SOPClassUID", "")) != SECONDARY_CAPTURE_STORAGE:
        raise ValueError("not a Secondary Capture Image Storage instance")
    write_dataset_durably(image, path)
    with removed_on_failure(path):
        try:
            back = pydicom.dcmread(path)
            shape = back.pixel_array.shape
        except Exception as exc:
            raise ValueError(f"key image does not read back: {type(exc).__name__}") from exc
        check_identity(back, image, "key image")
        if shape != (int(image.Rows), int(image.Columns), 3):
            raise ValueError("key image read back has a different size")
    return back
