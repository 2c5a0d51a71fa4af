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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.provenance import CodedLabel, ModelProvenance
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
from worker.outputs.files import removed_on_failure
from worker.outputs.sr_library import (
    image_library,
    insert_image_library,
    read_back_measurement_report,
)

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


def _check_probability(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"ClassificationFinding.{what} must be a number")
    if not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"ClassificationFinding.{what} must lie in [0, 1]")


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
    check_output_uids(sources, series_instance_uid, sop_instance_uid, "SR")
    if predecessor is not None and predecessor.sop_instance_uid == sop_instance_uid:
        raise ValueError("an SR cannot supersede itself")
    check_numbers(series_number, instance_number)

    when = content_datetime or datetime.now()
    label = finding.label
    finding_code = hd.sr.CodedConcept(
        value=label.code_value, scheme_designator=label.coding_scheme, meaning=label.code_meaning
    )

    probability = hd.sr.Measurement(
        name=PROBABILITY_CODE,
        value=float(finding.probability),
        unit=codes.UCUM.NoUnits,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(sop_instance_uid, "tracking"),
            identifier=lo(f"{provenance.name} classification"),
        ),
        # TID 1501 row "Finding" (121071, DCM): the coded finding itself. highdicom
        # reads it back as ``finding_type``; a second "Finding" CODE would be ambiguous.
        finding_type=finding_code,
        algorithm_id=sr_algorithm_identification(provenance),
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

    # The Image Library is added to the built document (see image_library).
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(provenance),
        procedure_reported=procedure_reported or DEFAULT_PROCEDURE,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    equipment = contributing_equipment(provenance, when, "AI classification")
    # The evidence is completed on copies: empty Type 2 patient/study attributes and the
    # Type 1C De-identification Method of a source whose identity was removed.
    with no_phi_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=completed_sources(sources, frame_of_reference=False),
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
            coding_schemes=_coding_schemes(finding),
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    # highdicom stamps the instance creation and its own contribution with "now"; use
    # the content time instead so that rebuilding with the same inputs (a retry) yields
    # the same document.
    pin_creation_time(sr, equipment)
    insert_image_library(sr, image_library(sources))
    # A plain dataset: highdicom's parsed ``content`` of ``sr`` lacks the library.
    return copy_top_level(sr)


def write_and_read_back(ds: Dataset, path: Path) -> Dataset:
    """Write ``ds`` to ``path`` atomically, read it back and check it.

    The file is written to a temporary file in the same directory, fsynced and renamed
    over ``path``. It is then read back once and checked against ``ds``
    (:func:`~worker.outputs.sr_library.read_back_measurement_report`: UIDs and file
    meta, TID 1500 root, Image Library, evidence, and the content tree parsed with
    highdicom); its Measurement Groups must carry the coded findings written. Returns the
    dataset as read back. Raises ``ValueError`` (and removes the file) when the check fails.
    """
    path = Path(path)
    if str(ds.get("SOPClassUID", "")) != COMPREHENSIVE_3D_SR_STORAGE:
        raise ValueError("not a Comprehensive 3D SR instance")
    written = _group_findings(ds)
    write_dataset_durably(ds, path)
    with removed_on_failure(path):
        back, _report = read_back_measurement_report(path, ds)
        found = _group_findings(back)
        if not found:
            raise ValueError("SR read back has no measurement group with a finding")
        if found != written:
            raise ValueError("SR read back has different findings")
    return back


def _group_findings(ds: Dataset) -> list[tuple[str, str]]:
    """The coded Finding (121071, DCM) of each Measurement Group under Imaging Measurements.

    Read from the dataset's own tree, which the read-back check has had highdicom parse
    whole: highdicom's ``get_image_measurement_groups`` would deep-copy every group only to
    be counted here.
    """
    findings = []
    for item in ds.get("ContentSequence", []):
        if _concept(item) != _IMAGING_MEASUREMENTS:
            continue
        for group in item.get("ContentSequence", []):
            if _concept(group) != _MEASUREMENT_GROUP or group.get("ValueType") != "CONTAINER":
                continue
            for entry in group.get("ContentSequence", []):
                if _concept(entry) == _FINDING and entry.get("ValueType") == "CODE":
                    code = entry.ConceptCodeSequence[0]
                    findings.append((str(code.CodeValue), str(code.CodingSchemeDesignator)))
    return findings


_IMAGING_MEASUREMENTS = (codes.DCM.ImagingMeasurements.value, "DCM")
_MEASUREMENT_GROUP = (codes.DCM.MeasurementGroup.value, "DCM")
_FINDING = (codes.DCM.Finding.value, "DCM")


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    return str(names[0].CodeValue), str(names[0].CodingSchemeDesignator)
