"""What carebridge's DICOM writers share: identity, provenance, sources, durable files.

The classification SR (:mod:`~worker.outputs.dicom_sr`), the liver SEG
(:mod:`~worker.outputs.dicom_seg`), the volume SR (:mod:`~worker.outputs.dicom_volume_sr`)
and the key images (:mod:`~worker.outputs.key_image`) all

* join the study of their source images in a new series whose description marks it
  AI-generated (and demo weights as such), with UIDs derived from their inputs so that a
  retry reproduces them;
* name the model as IHE AI Results (AIR) asks: Contributing Equipment with purpose
  (109102, DCM, "Processing Equipment"), the model's Device UID and weights sha256, and
  in SRs a device observer and the algorithm identification;
* copy the Patient and Study modules from a source that real archives send incomplete,
  without touching the caller's datasets;
* keep highdicom's person-name warning, which quotes the patient's name, out of logs;
* are written atomically and read back before anything sends them.

The two SRs share their Image Library (TID 1600) and their read-back check: both are
built here directly, because highdicom deep-copies and re-parses every content item of
a document, which for one library entry per CT slice cost seconds.
"""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.provenance import ModelProvenance
from worker.outputs.files import write_atomically

__all__ = [
    "DEFAULT_PROCEDURE",
    "DEMO_NOTE",
    "SRReference",
    "check_identity",
    "check_numbers",
    "check_output_uids",
    "completed_sources",
    "contributing_equipment",
    "copy_top_level",
    "derived_uid",
    "device_observation_context",
    "image_library",
    "insert_image_library",
    "is_valid_uid",
    "library_entry",
    "lo",
    "no_phi_warnings",
    "pin_creation_time",
    "previous_versions",
    "read_back_measurement_report",
    "series_description_for",
    "sr_algorithm_identification",
    "write_dataset_durably",
]

#: Procedure reported by default: (363679005, SCT, "Imaging procedure").
DEFAULT_PROCEDURE: Code = codes.SCT.ImagingProcedure
#: Marks every output of demo weights (series description, equipment, algorithm).
DEMO_NOTE = "DEMO WEIGHTS - not for clinical use"

_LO_MAX = 64
# Changing this namespace changes every derived UID: a retry would no longer match.
_UID_NAMESPACE = uuid.UUID("0b6f4d43-7c1e-4d8b-9a36-2f0f3e6a5c11")
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_MAX_NUMBER = 2**31 - 1  # IS


# ---------------------------------------------------------------------------- identity
def is_valid_uid(value: object) -> bool:
    """Return True for a syntactically valid UID of at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def derived_uid(*parts: str) -> str:
    """Return a deterministic 2.25 UID derived from ``parts`` (stable across retries)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def lo(text: str) -> str:
    """Clip a value to the 64 characters of a LO element."""
    return text[:_LO_MAX]


def series_description_for(provenance: ModelProvenance) -> str:
    """Return the SeriesDescription (LO, at most 64 characters) of an output of this model.

    It says the series is AI-generated, names the model and, for demo weights, carries
    "DEMO WEIGHTS - not for clinical use" in full (the model name is shortened instead).
    """
    model = f"{provenance.name} {provenance.version}"
    if not provenance.demo:
        return lo(f"AI-generated: {model}")
    suffix = f" - {DEMO_NOTE}"
    prefix = "AI: "
    room = _LO_MAX - len(prefix) - len(suffix)
    return f"{prefix}{model[:room].rstrip()}{suffix}"


@dataclass(frozen=True)
class SRReference:
    """UIDs of an existing DICOM instance, e.g. the SR a new SR supersedes."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_class_uid",
            "sop_instance_uid",
        ):
            if not is_valid_uid(getattr(self, name)):
                raise ValueError(f"SRReference.{name} is not a valid UID")


def previous_versions(predecessor: SRReference | None) -> list[Dataset] | None:
    """The ``previous_versions`` argument of a highdicom SR superseding ``predecessor``."""
    if predecessor is None:
        return None
    previous = Dataset()
    previous.StudyInstanceUID = predecessor.study_instance_uid
    previous.SeriesInstanceUID = predecessor.series_instance_uid
    previous.SOPClassUID = predecessor.sop_class_uid
    previous.SOPInstanceUID = predecessor.sop_instance_uid
    return [previous]


def check_output_uids(
    sources: Sequence[Dataset],
    series_instance_uid: str,
    sop_instance_uid: str,
    what: str = "output",
) -> None:
    """Refuse invalid UIDs and UIDs of a source: an output has its own series and instance."""
    for name, value in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not is_valid_uid(value):
            raise ValueError(f"{name} is not a valid UID")
    if series_instance_uid in {str(src.SeriesInstanceUID) for src in sources}:
        raise ValueError(f"the {what} needs a new series, not a series of its sources")
    if sop_instance_uid in {str(src.SOPInstanceUID) for src in sources}:
        raise ValueError(f"the {what} SOP Instance UID must differ from its sources")


def check_numbers(series_number: int, instance_number: int) -> None:
    """Refuse a Series or Instance Number that is not a positive IS value."""
    if not 1 <= series_number <= _MAX_NUMBER or not 1 <= instance_number <= _MAX_NUMBER:
        raise ValueError("series_number and instance_number must be positive integers")


# -------------------------------------------------------------------------- provenance
def contributing_equipment(
    provenance: ModelProvenance, when: datetime, what: str
) -> hd.ContributingEquipment:
    """IHE AIR Contributing Equipment naming the model that made ``what``.

    Purpose (109102, DCM, "Processing Equipment"); the model's name, version, Device UID
    and weights sha256 (as Device Serial Number), and the demo note where so.
    """
    description = f"{what} by {provenance.name} {provenance.version}; "
    description += f"weights sha256 {provenance.weights_sha256}"
    if provenance.demo:
        description += f"; {DEMO_NOTE}"
    equipment = hd.ContributingEquipment(
        manufacturer=lo(provenance.manufacturer),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=lo(provenance.name),
        software_versions=lo(provenance.version),
        device_serial_number=provenance.weights_sha256,
        contribution_datetime=when,
        contribution_description=description[:1024],  # ST
    )
    equipment.DeviceUID = provenance.device_uid
    return equipment


def device_observation_context(provenance: ModelProvenance) -> hd.sr.ObservationContext:
    """SR observation context whose observer is the model, a device (TID 1004)."""
    device_observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid,
            name=lo(provenance.name),
            manufacturer_name=lo(provenance.manufacturer),
            model_name=lo(provenance.name),
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device_observer)


def sr_algorithm_identification(provenance: ModelProvenance) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification: name, version, weights digest (and demo note)."""
    parameters = [f"weights sha256: {provenance.weights_sha256}"]
    if provenance.demo:
        parameters.append(DEMO_NOTE)
    return hd.sr.AlgorithmIdentification(
        name=lo(provenance.name), version=lo(provenance.version), parameters=parameters
    )


def pin_creation_time(ds: Dataset, equipment: hd.ContributingEquipment) -> None:
    """Replace highdicom's "now" stamps by the content time so a rebuild is identical."""
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = equipment.ContributionDateTime


@contextmanager
def no_phi_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning: its message quotes the patient's name."""
    with warnings.catch_warnings():
        # (?s): a name holding a line break must not slip past the filter.
        warnings.filterwarnings("ignore", message="(?s).*unlikely to represent the intended person")
        yield


# ----------------------------------------------------------------------------- sources
# Patient/study attributes highdicom copies from the first source; Type 2 in the output,
# but sometimes absent from real images. Missing ones are sent empty instead of failing.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_DEIDENTIFICATION_NOT_STATED = "Not stated by the source images"


def copy_top_level(src: Dataset) -> Dataset:
    """Return a new top level holding the same elements (the caller's dataset is kept)."""
    copy = Dataset()
    for element in src:
        copy.add(element)
    if hasattr(src, "file_meta"):
        copy.file_meta = src.file_meta
    return copy


def completed_sources(sources: Sequence[Dataset], *, frame_of_reference: bool) -> list[Dataset]:
    """Return the sources completed for highdicom; the caller's datasets are left untouched.

    highdicom copies the Patient and Study modules from the first source. Missing Type 2
    patient/study attributes are sent empty, and a source marked Patient Identity
    Removed without saying how gets the Type 1C De-identification Method that must then
    accompany it. With ``frame_of_reference``, slices without a FrameOfReferenceUID
    (non-conformant CT, seen in real archives) get one derived from their series, so
    that the output still carries a Frame of Reference.
    """
    completed = list(sources)
    first = sources[0]
    missing = [kw for kw in _TYPE2_PATIENT_STUDY if kw not in first]
    identity_removed_unstated = (
        str(first.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not first.get("DeidentificationMethod")
        and not first.get("DeidentificationMethodCodeSequence")
    )
    if missing or identity_removed_unstated:
        first = copy_top_level(first)
        for keyword in missing:
            setattr(first, keyword, "")
        if identity_removed_unstated:
            first.DeidentificationMethod = _DEIDENTIFICATION_NOT_STATED
        completed[0] = first
    if not frame_of_reference or str(sources[0].get("FrameOfReferenceUID", "") or ""):
        return completed
    uid = derived_uid("frame-of-reference", str(sources[0].SeriesInstanceUID))
    with_frame = []
    for src in completed:
        copy = copy_top_level(src)
        copy.FrameOfReferenceUID = uid
        if "PositionReferenceIndicator" not in copy:
            copy.PositionReferenceIndicator = ""
        with_frame.append(copy)
    return with_frame


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


# ------------------------------------------------------------------------------- files
def write_dataset_durably(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file to ``path`` atomically (temp file, fsync, rename)."""

    def write(fh: BinaryIO) -> None:
        pydicom.dcmwrite(fh, ds, enforce_file_format=True)

    write_atomically(path, write)


def check_identity(back: Dataset, ds: Dataset, what: str) -> None:
    """Refuse a file read back whose UIDs or file meta differ from the dataset written."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if str(back.get(keyword, "")) != str(ds.get(keyword, "")):
            raise ValueError(f"{what} read back from disk has a different {keyword}")
    if back.file_meta.MediaStorageSOPInstanceUID != back.SOPInstanceUID:
        raise ValueError(f"{what} file meta does not match its SOP Instance UID")
