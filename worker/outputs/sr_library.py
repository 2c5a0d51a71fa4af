"""The Image Library of carebridge's SRs (TID 1600) and the read-back of a written SR.

An SR's Image Library lists every source image it rests on. Images that share their
descriptors (modality, frame of reference, size, spacing, thickness, orientation) are one
Image Library Group that states them once (TID 1600 row 3), and each image is one IMAGE
entry in it. The library is built directly with pydicom: highdicom's builder deep-copies
every descriptor of every entry, which for a CT series costs seconds.
:func:`read_back_measurement_report` reads a written SR once and checks what matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from worker.outputs.dicom_common import check_identity

__all__ = [
    "image_library",
    "insert_image_library",
    "library_entry",
    "read_back_measurement_report",
]


_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_CROSS_SECTIONAL_COUNTS = {
    "PixelSpacing": 2,
    "SliceThickness": 1,
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
}


def _has_values(ds: Dataset, keyword: str, count: int) -> bool:
    value = ds.get(keyword)
    if value is None or value == "":
        return False
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    return len(values) >= count and all(v is not None and str(v) != "" for v in values)


def library_entry(src: Dataset) -> Dataset:
    """Return the subset of ``src`` that highdicom needs for an SR Image Library entry.

    highdicom adds the modality-specific descriptors (TID 1603 projection radiography,
    TID 1604 cross-sectional) whenever the Modality calls for them and fails when an
    attribute they use is absent or empty, which is common in real images (e.g. a CR
    without Imager Pixel Spacing). Those optional descriptors are therefore only
    requested when every attribute they use is present and non-zero.
    """
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        if keyword not in src or src[keyword].value in (None, ""):
            raise ValueError(f"source image lacks {keyword}")
        entry[keyword] = src[keyword]
    if src.get("FrameOfReferenceUID"):
        entry.FrameOfReferenceUID = src.FrameOfReferenceUID
    modality = str(src.get("Modality", "") or "")
    entry.Modality = "OT"  # no modality-specific descriptors unless complete below
    if modality in _PROJECTION:
        if (
            _has_values(src, "PatientOrientation", 2)
            and _has_values(src, "ImagerPixelSpacing", 2)
            and all(float(v) > 0 for v in src.ImagerPixelSpacing[:2])
        ):
            entry.Modality = modality
            entry.PatientOrientation = src.PatientOrientation
            entry.ImagerPixelSpacing = src.ImagerPixelSpacing
    elif modality in _CROSS_SECTIONAL:
        counts = _CROSS_SECTIONAL_COUNTS
        if all(_has_values(src, kw, count) for kw, count in counts.items()):
            entry.Modality = modality
            for keyword in counts:
                entry[keyword] = src[keyword]
    return entry


# ----------------------------------------------------------------------- image library
#: (260753009, SCT, "Source"): concept name of each TID 1601 Image Library Entry.
_LIBRARY_SOURCE = Code("260753009", "SCT", "Source")
#: TID 1604 rows that differ from slice to slice; left out (see image_library).
_PER_SLICE_CODES = frozenset(
    code.value
    for code in (
        codes.DCM.ImagePositionPatientX,
        codes.DCM.ImagePositionPatientY,
        codes.DCM.ImagePositionPatientZ,
    )
)


class _Codes:
    """One code item per code for one document, shared by the items that use it (a
    pydicom dataset in a sequence keeps no link to it, so it may sit in many)."""

    def __init__(self) -> None:
        self._items: dict[Code, Dataset] = {}

    def __call__(self, code: Code) -> Dataset:
        item = self._items.get(code)
        if item is None:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            self._items[code] = item
        return item


def _content_item(code_item: _Codes, relationship: str, value_type: str, name: Code) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [code_item(name)]
    return item


def _container(code_item: _Codes, name: Code, children: list[Dataset]) -> Dataset:
    item = _content_item(code_item, "CONTAINS", "CONTAINER", name)
    item.ContinuityOfContent = "CONTINUOUS"
    item.ContentSequence = children
    return item


#: What an Image Library entry's descriptors are made of (see library_entry).
_DESCRIPTOR_KEYWORDS = (
    "SOPClassUID",
    "Rows",
    "Columns",
    "FrameOfReferenceUID",
    "Modality",
    "PatientOrientation",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "SliceThickness",
    "ImageOrientationPatient",
)


def _group_key(src: Dataset) -> tuple[str, ...]:
    # Sources that agree on these have the same descriptors, all but the position (whose
    # presence still decides whether library_entry keeps the cross-sectional ones).
    position = str(_has_values(src, "ImagePositionPatient", 3))
    return (*(str(src.get(keyword, "")) for keyword in _DESCRIPTOR_KEYWORDS), position)


def image_library(sources: Sequence[Dataset]) -> Dataset:
    """Return the TID 1600 Image Library content item of ``sources`` (pixel data not needed).

    Images whose descriptors agree (TID 1602: modality, frame of reference, rows and
    columns, and the TID 1603/1604 ones :func:`library_entry` keeps: pixel spacing,
    slice thickness, orientation) form one Image Library Group that carries them once,
    for all its entries (TID 1600 row 3); each entry (TID 1601) is the IMAGE reference.
    The per-slice Image Position (Patient) is left out (TID 1602 descriptors are
    optional): one entry with 16 descriptors per CT slice cost more to build and encode
    than the network's forward, and each slice's position is in the SEG's per-frame
    Plane Position and in the source images, which the evidence lists. The group
    descriptors are highdicom's, built once per group; the rest is built directly.
    Raises ``ValueError`` for an empty list or a source that is not an image.
    """
    if not sources:
        raise ValueError("an Image Library needs at least one image")
    groups: dict[tuple[str, ...], list[Dataset]] = {}
    for src in sources:
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not src.get(keyword):
                raise ValueError(f"source image lacks {keyword}")
        groups.setdefault(_group_key(src), []).append(src)
    code_item = _Codes()
    library_groups = []
    for entries in groups.values():
        items: list[Dataset] = [
            item
            for item in hd.sr.ImageLibraryEntryDescriptors(library_entry(entries[0]))
            if item.ConceptNameCodeSequence[0].CodeValue not in _PER_SLICE_CODES
        ]
        for entry in entries:
            image = _content_item(code_item, "CONTAINS", "IMAGE", _LIBRARY_SOURCE)
            reference = Dataset()
            reference.ReferencedSOPClassUID = entry.SOPClassUID
            reference.ReferencedSOPInstanceUID = entry.SOPInstanceUID
            image.ReferencedSOPSequence = [reference]
            items.append(image)
        library_groups.append(_container(code_item, codes.DCM.ImageLibraryGroup, items))
    return _container(code_item, codes.DCM.ImageLibrary, library_groups)


def insert_image_library(sr: Dataset, library: Dataset) -> None:
    """Put ``library`` into a TID 1500 document built without one, where TID 1500 wants it.

    That is after the language, observation context and procedure reported (rows 1-3),
    before the first container (row 5, "Imaging Measurements").
    """
    content = list(sr.ContentSequence)
    index = next(
        (i for i, item in enumerate(content) if item.ValueType == "CONTAINER"), len(content)
    )
    # A new plain sequence: highdicom's own refuses items that are not its content items.
    sr.ContentSequence = [*content[:index], library, *content[index:]]


def _library_uids(content: Sequence[Dataset]) -> list[str]:
    uids = []
    for item in content:
        if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImageLibrary.value:
            continue
        for group in item.get("ContentSequence", []):
            for entry in group.get("ContentSequence", []):
                if entry.ValueType == "IMAGE":
                    uids.append(str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return uids


def _evidence(ds: Dataset) -> set[tuple[str, str, str]]:
    return {
        (
            str(series.SeriesInstanceUID),
            str(ref.ReferencedSOPClassUID),
            str(ref.ReferencedSOPInstanceUID),
        )
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedSOPSequence", [])
    }


def read_back_measurement_report(
    path: Path, sr: Dataset
) -> tuple[Dataset, hd.sr.MeasurementReport]:
    """Read a written TID 1500 SR back from ``path`` and check it against ``sr``.

    Checks the UIDs and file meta, the root (126000, DCM, "Imaging Measurement Report")
    with template 1500, the Image Library (the same images, structurally), the evidence
    (the same instances) and parses the rest of the content tree with highdicom (the
    library is left out of that parse: it would cost a full copy per entry).
    Returns the dataset read back and the parsed report (without its library).
    Raises ``ValueError`` when the file does not read back or a check fails.
    """
    try:
        back = pydicom.dcmread(path)
    except Exception as exc:
        raise ValueError(f"SR file does not read back: {type(exc).__name__}") from exc
    check_identity(back, sr, "SR")
    try:
        concept = back.ConceptNameCodeSequence[0]
        template = back.ContentTemplateSequence[0]
        content = list(back.ContentSequence)
        is_report = (
            back.ValueType == "CONTAINER"
            and (concept.CodeValue, concept.CodingSchemeDesignator)
            == (codes.DCM.ImagingMeasurementReport.value, "DCM")
            and (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
        )
        library = _library_uids(content)
    except (AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"SR read back is not a TID 1500 report: {type(exc).__name__}") from exc
    if not is_report:
        raise ValueError("SR read back is not a TID 1500 Imaging Measurement Report")
    if library != _library_uids(sr.ContentSequence):
        raise ValueError("SR read back has a different Image Library")
    if _evidence(back) != _evidence(sr):
        raise ValueError("SR read back has different evidence")
    root = Dataset()
    root.ValueType = back.ValueType
    root.ConceptNameCodeSequence = back.ConceptNameCodeSequence
    root.ContinuityOfContent = back.ContinuityOfContent
    root.ContentTemplateSequence = back.ContentTemplateSequence
    root.ContentSequence = [
        item
        for item in content
        if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImageLibrary.value
    ]
    try:
        report = hd.sr.MeasurementReport.from_sequence([root], copy=False)
    except Exception as exc:
        raise ValueError(f"SR content tree does not parse: {type(exc).__name__}") from exc
    return back, report
