"""Encode a typed image-classification result as a DICOM Comprehensive 3D SR (TID 1500).

This module holds no model logic: it turns a :class:`ClassificationFinding` plus the
:class:`~models.provenance.ModelProvenance` of the model that produced it into an SR
document that follows IHE AI Results (AIR):

* root template TID 1500 "Imaging Measurement Report" with a device observer (the
  model's Device UID, manufacturer, model name), the procedure reported and an Image
  Library (TID 1600) of the source images;
* one TID 1501 measurement group with a Tracking Identifier and Tracking UID, the
  "Finding" (121071, DCM) CODE item whose value is the coded finding (TID 1501's finding
  row, highdicom's ``finding_type``), algorithm identification (name, version, weights
  digest as parameter), the source images, and the probability as a TID 300 NUM
  ((122157, DCM, "Probability"), unit (1, UCUM, "no units")); the probabilities of all
  classes are recorded as a JSON text item with a private code;
* Contributing Equipment (purpose (109102, DCM, "Processing Equipment")) naming the
  model, its version, its Device UID and the sha256 of its weights.

SR UIDs are passed in by the caller, so a retried delivery reproduces the same SOP
Instance UID. Exceptions and logs never contain patient data.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.provenance import CodedLabel, ModelProvenance

__all__ = [
    "CLASS_PROBABILITIES_CODE",
    "COMPREHENSIVE_3D_SR_STORAGE",
    "PRIVATE_CODING_SCHEME",
    "PROBABILITY_CODE",
    "ClassificationFinding",
    "SRReference",
    "build_classification_sr",
    "series_description_for",
    "write_and_read_back",
]

COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"

#: Private coding scheme of this project (PS3.16 8.2: designators beginning with "99").
PRIVATE_CODING_SCHEME = "99CAREBRIDGE"

#: Concept name of the numeric measurement: (122157, DCM, "Probability").
PROBABILITY_CODE: Code = codes.DCM.Probability

#: Concept name of the TEXT item holding the probabilities of all classes as JSON.
CLASS_PROBABILITIES_CODE = Code("CB0001", PRIVATE_CODING_SCHEME, "Class probabilities")

_DEFAULT_PROCEDURE: Code = codes.SCT.ImagingProcedure  # (363679005, SCT, "Imaging procedure")
_DEMO_NOTE = "DEMO WEIGHTS - not for clinical use"
_LO_MAX = 64
_UID_NAMESPACE = uuid.UUID("0b6f4d43-7c1e-4d8b-9a36-2f0f3e6a5c11")
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def _is_valid_uid(value: object) -> bool:
    """Return True for a syntactically valid UID of at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class ClassificationFinding:
    """The result of one image classification.

    ``label`` is the coded finding of the predicted class, ``probability`` its
    probability, and ``probabilities`` maps every class name to its probability.
    """

    label: CodedLabel
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_probability("probability", self.probability)
        for name, value in self.probabilities.items():
            if not isinstance(name, str) or not name:
                raise ValueError("ClassificationFinding.probabilities keys must be class names")
            _check_probability(f"probabilities[{name!r}]", value)
        if self.label.name in self.probabilities and not math.isclose(
            self.probabilities[self.label.name], self.probability, abs_tol=1e-6
        ):
            raise ValueError(
                "ClassificationFinding.probability disagrees with probabilities[label.name]"
            )


@dataclass(frozen=True)
class SRReference:
    """UIDs of an existing SR document, e.g. the one a new SR supersedes."""

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
            if not _is_valid_uid(getattr(self, name)):
                raise ValueError(f"SRReference.{name} is not a valid UID")


def _check_probability(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"ClassificationFinding.{what} must be a number")
    if not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"ClassificationFinding.{what} must lie in [0, 1]")


def _derived_uid(*parts: str) -> str:
    """Return a deterministic 2.25 UID derived from ``parts`` (stable across retries)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def series_description_for(provenance: ModelProvenance) -> str:
    """Return the SeriesDescription (LO, at most 64 characters) of an SR by this model.

    It says the series is AI-generated, names the model and, for demo weights, carries
    "DEMO WEIGHTS - not for clinical use" in full (the model name is shortened instead).
    """
    model = f"{provenance.name} {provenance.version}"
    if not provenance.demo:
        text = f"AI-generated: {model}"
        return text if len(text) <= _LO_MAX else text[:_LO_MAX]
    suffix = f" - {_DEMO_NOTE}"
    prefix = "AI: "
    room = _LO_MAX - len(prefix) - len(suffix)
    return f"{prefix}{model[:room].rstrip()}{suffix}"


def _lo(text: str) -> str:
    """Clip a value to the 64 characters of a LO element."""
    return text[:_LO_MAX]


def _check_sources(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise ValueError("build_classification_sr needs at least one source image")
    required = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    for index, src in enumerate(sources):
        missing = [kw for kw in required if not src.get(kw)]
        if missing:
            raise ValueError(f"source {index} lacks {', '.join(missing)}")
    studies = {str(src.StudyInstanceUID) for src in sources}
    if len(studies) != 1:
        raise ValueError("all source images must belong to the same study")
    patients = {str(src.get("PatientID", "")) for src in sources}
    if len(patients) != 1:
        raise ValueError("all source images must belong to the same patient")


_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_CROSS_SECTIONAL_KEYWORDS = (
    "PixelSpacing",
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
)


def _has_values(ds: Dataset, keyword: str, count: int) -> bool:
    value = ds.get(keyword)
    if value is None or value == "":
        return False
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    return len(values) >= count and all(v is not None and str(v) != "" for v in values)


def _library_entry(src: Dataset) -> Dataset:
    """Return the subset of ``src`` that highdicom needs for an Image Library entry.

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
        counts = {"PixelSpacing": 2, "SliceThickness": 1, "ImagePositionPatient": 3}
        counts["ImageOrientationPatient"] = 6
        if all(_has_values(src, kw, counts[kw]) for kw in _CROSS_SECTIONAL_KEYWORDS):
            entry.Modality = modality
            for keyword in _CROSS_SECTIONAL_KEYWORDS:
                entry[keyword] = src[keyword]
    return entry


# Patient/study attributes highdicom copies from the first source; Type 2 in the SR, but
# sometimes absent from real images. Missing ones are sent empty instead of failing.
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


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """Return the sources, the first one completed with empty Type 2 attributes."""
    first = sources[0]
    missing = [kw for kw in _TYPE2_PATIENT_STUDY if kw not in first]
    if not missing:
        return list(sources)
    patched = Dataset()  # a new top level; the caller's dataset is left untouched
    for element in first:
        patched.add(element)
    for keyword in missing:
        setattr(patched, keyword, "")
    return [patched, *sources[1:]]


def _coding_schemes(finding: ClassificationFinding) -> list[CodingSchemeIdentificationItem]:
    """Declare every private ("99...") coding scheme used in the document."""
    items = [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_CODING_SCHEME,
            name="carebridge private codes",
            responsible_organization="carebridge",
        )
    ]
    scheme = finding.label.coding_scheme
    if scheme.startswith("99") and scheme != PRIVATE_CODING_SCHEME:
        items.append(CodingSchemeIdentificationItem(designator=scheme))
    return items


def _probabilities_json(finding: ClassificationFinding) -> str:
    probs = dict(finding.probabilities) or {finding.label.name: finding.probability}
    return json.dumps(
        {name: round(float(value), 6) for name, value in sorted(probs.items())},
        separators=(",", ":"),
    )


def build_classification_sr(
    sources: Sequence[Dataset],
    finding: ClassificationFinding,
    provenance: ModelProvenance,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    predecessor: SRReference | None = None,
    content_datetime: datetime | None = None,
    procedure_reported: Code | hd.sr.CodedConcept | None = None,
) -> Dataset:
    """Build a Comprehensive 3D SR (TID 1500) holding one classification finding.

    ``sources`` are the classified images (read with ``stop_before_pixels=True`` is
    enough); the SR joins their study with a new series. ``series_instance_uid`` and
    ``sop_instance_uid`` are supplied by the caller so that a retry reproduces the same
    instance; pass ``content_datetime`` as well to reproduce it byte for byte.
    ``predecessor`` names an SR this one supersedes (Predecessor Documents Sequence).
    ``procedure_reported`` defaults to (363679005, SCT, "Imaging procedure").

    Raises ``ValueError`` for inconsistent input (no sources, several studies or
    patients, invalid UIDs, an SR series equal to a source series, an SR superseding
    itself).
    """
    _check_sources(sources)
    for name, value in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not _is_valid_uid(value):
            raise ValueError(f"{name} is not a valid UID")
    if series_instance_uid in {str(src.SeriesInstanceUID) for src in sources}:
        raise ValueError("the SR needs a new series, not a series of its source images")
    if sop_instance_uid in {str(src.SOPInstanceUID) for src in sources}:
        raise ValueError("the SR SOP Instance UID must differ from its source images")
    if predecessor is not None and predecessor.sop_instance_uid == sop_instance_uid:
        raise ValueError("an SR cannot supersede itself")
    if not 1 <= series_number <= 2**31 - 1 or not 1 <= instance_number <= 2**31 - 1:
        raise ValueError("series_number and instance_number must be positive integers")

    when = content_datetime or datetime.now()
    label = finding.label
    finding_code = hd.sr.CodedConcept(
        value=label.code_value, scheme_designator=label.coding_scheme, meaning=label.code_meaning
    )

    device_observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=provenance.device_uid,
            name=_lo(provenance.name),
            manufacturer_name=_lo(provenance.manufacturer),
            model_name=_lo(provenance.name),
        ),
    )
    observation_context = hd.sr.ObservationContext(observer_device_context=device_observer)

    parameters = [f"weights sha256: {provenance.weights_sha256}"]
    if provenance.demo:
        parameters.append(_DEMO_NOTE)
    algorithm = hd.sr.AlgorithmIdentification(
        name=_lo(provenance.name), version=_lo(provenance.version), parameters=parameters
    )
    probability = hd.sr.Measurement(
        name=PROBABILITY_CODE,
        value=float(finding.probability),
        unit=codes.UCUM.NoUnits,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_derived_uid(sop_instance_uid, "tracking"),
            identifier=_lo(f"{provenance.name} classification"),
        ),
        # TID 1501 row "Finding" (121071, DCM): the coded finding itself. highdicom
        # reads it back as ``finding_type``; a second "Finding" CODE would be ambiguous.
        finding_type=finding_code,
        algorithm_id=algorithm,
        measurements=[probability],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(src) for src in sources
        ],
    )
    # TID 1501 is extensible: the probabilities of all classes, as JSON text.
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=CLASS_PROBABILITIES_CODE,
            value=_probabilities_json(finding),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )

    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure_reported or _DEFAULT_PROCEDURE,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=[_library_entry(src) for src in sources],
    )

    description = (
        f"AI classification by {provenance.name} {provenance.version}; "
        f"weights sha256 {provenance.weights_sha256}"
    )
    if provenance.demo:
        description += f"; {_DEMO_NOTE}"
    equipment = hd.ContributingEquipment(
        manufacturer=_lo(provenance.manufacturer),
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(provenance.name),
        software_versions=_lo(provenance.version),
        device_serial_number=provenance.weights_sha256,
        contribution_datetime=when,
        contribution_description=description[:1024],  # ST
    )
    equipment.DeviceUID = provenance.device_uid

    previous_versions = None
    if predecessor is not None:
        previous = Dataset()
        previous.StudyInstanceUID = predecessor.study_instance_uid
        previous.SeriesInstanceUID = predecessor.series_instance_uid
        previous.SOPClassUID = predecessor.sop_class_uid
        previous.SOPInstanceUID = predecessor.sop_instance_uid
        previous_versions = [previous]

    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(sources),
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=_lo(provenance.manufacturer),
        manufacturer_model_name=_lo(provenance.name),
        software_versions=_lo(provenance.version),
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous_versions,
        contributing_equipment=[equipment],
        series_description=series_description_for(provenance),
        coding_schemes=_coding_schemes(finding),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    # highdicom stamps the instance creation and its own contribution with "now"; use
    # the content time instead so that rebuilding with the same inputs (a retry) yields
    # the same document.
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    for item in sr.ContributingEquipmentSequence:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = equipment.ContributionDateTime
    return sr


def write_and_read_back(ds: Dataset, path: Path) -> Dataset:
    """Write ``ds`` to ``path`` atomically, read it back and check it.

    The file is written to a temporary file in the same directory, fsynced and renamed
    over ``path``. It is then read back and its SOP Class, SOP Instance and Study
    Instance UIDs are compared with ``ds`` and its content tree is parsed with
    highdicom. Returns the dataset as read back. Raises ``ValueError`` (and removes the
    file) when the check fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            pydicom.dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)

    try:
        try:
            back = pydicom.dcmread(path)
        except Exception as exc:
            raise ValueError(f"SR file does not read back: {type(exc).__name__}") from exc
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            if str(back.get(keyword, "")) != str(ds.get(keyword, "")):
                raise ValueError(f"SR read back from disk has a different {keyword}")
        if back.file_meta.MediaStorageSOPInstanceUID != back.SOPInstanceUID:
            raise ValueError("SR file meta does not match its SOP Instance UID")
        try:
            parsed = hd.sr.srread(path)
            content = parsed.content
        except Exception as exc:
            raise ValueError(f"SR content tree does not parse: {type(exc).__name__}") from exc
        if isinstance(content, hd.sr.MeasurementReport) and not (
            content.get_image_measurement_groups()
        ):
            raise ValueError("SR read back has no measurement group")
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return back


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open directories)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
