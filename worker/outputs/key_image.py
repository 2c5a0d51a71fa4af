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
Description and the Source Image Sequence.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from models.provenance import ModelProvenance
from worker.outputs.dicom_seg import (
    _check_identity,
    _check_output_uids,
    _completed_sources,
    _contributing_equipment,
    _no_phi_warnings,
    _pin_creation_time,
    _write_durably,
)
from worker.outputs.dicom_sr import (
    _DEMO_NOTE,
    ClassificationFinding,
    _derived_uid,
    _lo,
    series_description_for,
)

__all__ = [
    "SECONDARY_CAPTURE_STORAGE",
    "build_classification_key_image",
    "build_segmentation_key_image",
    "key_image_png",
    "key_slice_index",
    "write_key_image_and_read_back",
]

SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

#: (121322, DCM, "Source image for image processing operation"): purpose of the reference
#: from the key image to the image it was rendered from.
_SOURCE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation
_SOFT_TISSUE_WINDOW = (40.0, 400.0)  # (center, width) HU: shows the liver against fat
_MAX_SIDE = 1024  # larger sources are reduced: a key image is for viewing, not measuring
_MIN_SIDE = 256  # smaller ones are enlarged so that the caption stays readable
_OUTLINE_RGB = (255, 255, 0)
_TEXT_RGB = "#ffff00"
_SINGLE_LETTERS = ("L", "P")


def key_slice_index(mask: np.ndarray) -> int:
    """Return the index (first axis) of the slice with the largest mask area.

    Raises ``ValueError`` for an empty or non-3-D mask.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 3:
        raise ValueError("the mask must be a (slices, rows, columns) array")
    areas = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
    if not areas.any():
        raise ValueError("the mask is empty: there is no key slice")
    return int(np.argmax(areas))


def _window(source: Dataset, values: np.ndarray) -> tuple[float, float]:
    if str(source.get("Modality", "")) == "CT":
        return _SOFT_TISSUE_WINDOW
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        first_center = float(center[0] if isinstance(center, Sequence) else center)
        first_width = float(width[0] if isinstance(width, Sequence) else width)
        if first_width > 1:
            return first_center, first_width
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low + high) / 2.0, max(float(high - low), 1.0)


def _display(source: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """Return the source as 8-bit display grayscale (modality LUT, window, polarity)."""
    if "PixelData" not in source:
        raise ValueError("the source image has no pixel data")
    if int(source.get("SamplesPerPixel", 1)) != 1 or int(source.get("NumberOfFrames", 1)) != 1:
        raise ValueError("the source must be a single-frame grayscale image")
    values = np.asarray(apply_modality_lut(source.pixel_array, source), dtype=np.float64)
    center, width = window or _window(source, values)
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError("the display window must have a finite center and positive width")
    scaled = np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _resize(gray: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduce by block means (mask: block max) or enlarge by pixel repetition."""
    rows, columns = gray.shape
    reduce = math.ceil(max(rows, columns) / _MAX_SIDE)
    if reduce > 1:
        r, c = rows // reduce, columns // reduce
        blocks = (r, reduce, c, reduce)
        gray = gray[: r * reduce, : c * reduce].reshape(blocks).mean(axis=(1, 3))
        gray = np.round(gray).astype(np.uint8)
        if mask is not None:
            mask = mask[: r * reduce, : c * reduce].reshape(blocks).max(axis=(1, 3))
        return gray, mask
    enlarge = max(1, _MIN_SIDE // max(rows, columns))
    if enlarge > 1:
        gray = np.kron(gray, np.ones((enlarge, enlarge), dtype=np.uint8))
        if mask is not None:
            mask = np.kron(mask, np.ones((enlarge, enlarge), dtype=mask.dtype))
    return gray, mask


def _burn_outline(rgb: np.ndarray, mask: np.ndarray) -> None:
    thickness = max(1, round(min(mask.shape) / 256))
    inside = mask.astype(bool)
    edge = inside & ~ndimage.binary_erosion(inside, iterations=thickness, border_value=0)
    rgb[edge] = _OUTLINE_RGB


def _burn_caption(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Draw ``lines`` top left on a dark box (matplotlib Agg) and blend them into ``rgb``."""
    # Imported here: matplotlib is only needed to render, not to import this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, columns = rgb.shape[:2]
    dpi = 72.0  # one point is one pixel
    figure = Figure(figsize=(columns / dpi, rows / dpi), dpi=dpi)
    figure.patch.set_alpha(0.0)
    canvas = FigureCanvasAgg(figure)
    size = max(9.0, min(rows, columns) / 30.0)
    text = figure.text(
        6.0 / columns,
        1.0 - 6.0 / rows,
        "\n".join(lines),
        ha="left",
        va="top",
        fontsize=size,
        family="DejaVu Sans",
        color=_TEXT_RGB,
        bbox={"facecolor": "black", "alpha": 0.65, "edgecolor": "none", "pad": size / 4},
    )
    canvas.draw()
    width = text.get_window_extent(canvas.get_renderer()).width
    if width > columns - 12:  # shrink a caption that is wider than the image
        text.set_fontsize(max(5.0, size * (columns - 12) / width))
        canvas.draw()
    overlay = np.asarray(canvas.buffer_rgba(), dtype=np.float64)[:rows, :columns]
    alpha = overlay[..., 3:] / 255.0
    blended = rgb[: overlay.shape[0], : overlay.shape[1]] * (1.0 - alpha)
    blended += overlay[..., :3] * alpha
    out = rgb.copy()
    out[: overlay.shape[0], : overlay.shape[1]] = np.round(blended).astype(np.uint8)
    return out


def _render(
    source: Dataset,
    mask: np.ndarray | None,
    lines: Sequence[str],
    window: tuple[float, float] | None,
) -> np.ndarray:
    gray = _display(source, window)
    if mask is not None and mask.shape != gray.shape:
        raise ValueError(f"mask slice shape {mask.shape} differs from the image {gray.shape}")
    gray, mask = _resize(gray, mask)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if mask is not None:
        _burn_outline(rgb, mask)
    return _burn_caption(rgb, lines)


def _provenance_lines(provenance: ModelProvenance) -> list[str]:
    lines = [f"Model {provenance.name} {provenance.version}", "AI-generated - UNVERIFIED"]
    if provenance.demo:
        lines.append(_DEMO_NOTE)
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
    series_instance_uid = series_instance_uid or _derived_uid(*key, "series")
    sop_instance_uid = sop_instance_uid or _derived_uid(*key, "instance")
    _check_output_uids([source], series_instance_uid, sop_instance_uid)
    if not 1 <= series_number <= 2**31 - 1 or not 1 <= instance_number <= 2**31 - 1:
        raise ValueError("series_number and instance_number must be positive integers")

    when = content_datetime or datetime.now()
    equipment = _contributing_equipment(provenance, when, f"AI key image ({what})")
    orientation = _patient_orientation(source)
    with _no_phi_warnings():
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=_completed_sources([source], frame_of_reference=False)[0],
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
            manufacturer=_lo(provenance.manufacturer),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[equipment],
            series_description=series_description_for(provenance),
            manufacturer_model_name=_lo(provenance.name),
            software_versions=_lo(provenance.version),
            device_serial_number=provenance.weights_sha256,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    # Oblique images have several letters per direction; unknown orientation is empty.
    image.PatientOrientation = list(orientation) if orientation else []
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = _lo(f"AI {what} burned into the source image")
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
    _pin_creation_time(image, equipment)
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
    rgb = _render(
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
    heading = (
        f"AI finding: {finding.label.code_meaning} (probability {float(finding.probability):.2f})"
    )
    rgb = _render(source, None, [heading, *_provenance_lines(provenance)], window)
    return _secondary_capture(
        source,
        rgb,
        provenance,
        what="classification",
        series_number=series_number,
        instance_number=instance_number,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        content_datetime=content_datetime,
    )


def key_image_png(image: Dataset) -> bytes:
    """Return the pixels of an RGB key image as PNG bytes (8-bit RGB, no metadata)."""
    pixels = np.asarray(image.pixel_array)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError("key_image_png needs an 8-bit RGB single-frame image")
    rows, columns = pixels.shape[:2]
    # Each PNG scanline starts with its filter type (0: none).
    scanlines = np.concatenate(
        [np.zeros((rows, 1), dtype=np.uint8), pixels.reshape(rows, columns * 3)], axis=1
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", columns, rows, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_key_image_and_read_back(image: Dataset, path: Path) -> Dataset:
    """Write a key image to ``path`` atomically, read it back and decode its pixels.

    Returns the dataset as read back. Raises ``ValueError`` (and removes the file) when
    the UIDs differ or the pixels do not decode to the image's size.
    """
    path = Path(path)
    if str(image.get("SOPClassUID", "")) != SECONDARY_CAPTURE_STORAGE:
        raise ValueError("not a Secondary Capture Image Storage instance")
    _write_durably(image, path)
    try:
        try:
            back = pydicom.dcmread(path)
            shape = back.pixel_array.shape
        except Exception as exc:
            raise ValueError(f"key image does not read back: {type(exc).__name__}") from exc
        _check_identity(back, image, "key image")
        if shape != (int(image.Rows), int(image.Columns), 3):
            raise ValueError("key image read back has a different size")
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return back
