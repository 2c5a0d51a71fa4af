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
    "is_valid_uid",
    "lo",
    "no_phi_warnings",
    "pin_creation_time",
    "previous_versions",
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


#: Purpose of Reference of the sources' acquisition equipment (its time is the source's).
_ACQUISITION_EQUIPMENT = "109101"


def pin_creation_time(ds: Dataset, equipment: hd.ContributingEquipment) -> None:
    """Replace highdicom's "now" stamps by the content time so a rebuild is identical.

    The sources' acquisition equipment keeps its own contribution time (the source's
    acquisition date and time, as highdicom copies it).
    """
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    for item in ds.get("ContributingEquipmentSequence", []):
        purposes = item.get("PurposeOfReferenceCodeSequence") or []
        if any(code.get("CodeValue") == _ACQUISITION_EQUIPMENT for code in purposes):
            continue
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
