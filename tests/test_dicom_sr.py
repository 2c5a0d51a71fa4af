"""Tests of worker.outputs.dicom_sr: the classification SR is IOD-valid and complete."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from models.provenance import CodedLabel, ModelProvenance, device_uid_for
from tests.fixtures_dicom import make_cr_dataset, write_cr
from worker.outputs.dicom_sr import (
    CLASS_PROBABILITIES_CODE,
    COMPREHENSIVE_3D_SR_STORAGE,
    PROBABILITY_CODE,
    ClassificationFinding,
    SRReference,
    build_classification_sr,
    series_description_for,
    write_and_read_back,
)

PNEUMONIA = CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia")
SHA = "0123456789abcdef" * 4
WHEN = datetime(2024, 1, 2, 10, 30, 0)


def _provenance(demo: bool = True, name: str = "cxr-densenet121") -> ModelProvenance:
    return ModelProvenance(
        name=name,
        version="0.1.0",
        device_uid=device_uid_for(name, "0.1.0"),
        weights_sha256=SHA,
        demo=demo,
    )


def _finding() -> ClassificationFinding:
    return ClassificationFinding(
        label=PNEUMONIA,
        probability=0.83,
        probabilities={"normal": 0.1, "pneumonia": 0.83, "other": 0.07},
    )


@pytest.fixture
def source_path(tmp_path: Path) -> Path:
    return write_cr(tmp_path / "source_cr.dcm")


@pytest.fixture
def source(source_path: Path) -> Dataset:
    return pydicom.dcmread(source_path, stop_before_pixels=True)


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    return errors, output


def _build(
    sources: list[Dataset], provenance: ModelProvenance | None = None, **kwargs: object
) -> Dataset:
    return build_classification_sr(
        sources,
        _finding(),
        provenance or _provenance(),
        series_instance_uid=kwargs.pop("series_instance_uid", generate_uid()),  # type: ignore[arg-type]
        sop_instance_uid=kwargs.pop("sop_instance_uid", generate_uid()),  # type: ignore[arg-type]
        content_datetime=WHEN,
        **kwargs,  # type: ignore[arg-type]
    )


def test_sr_is_dciodvfy_clean_and_complete(tmp_path: Path, source: Dataset) -> None:
    predecessor = SRReference(
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=generate_uid(),
        sop_class_uid=COMPREHENSIVE_3D_SR_STORAGE,
        sop_instance_uid=generate_uid(),
    )
    series_uid, sop_uid = generate_uid(), generate_uid()
    provenance = _provenance(demo=True)
    sr = _build(
        [source],
        provenance,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        predecessor=predecessor,
    )
    path = tmp_path / "out" / "sr.dcm"
    back = write_and_read_back(sr, path)
    assert back.SOPInstanceUID == sop_uid

    errors, output = _dciodvfy_errors(path)
    assert errors == [], output

    doc = hd.sr.srread(path)
    assert isinstance(doc, hd.sr.Comprehensive3DSR)
    assert doc.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE
    # TID 1500 root: (126000, DCM, "Imaging Measurement Report")
    root = doc.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")
    assert doc.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # same study and patient, new series
    assert doc.StudyInstanceUID == source.StudyInstanceUID
    assert doc.PatientID == source.PatientID
    assert doc.AccessionNumber == source.AccessionNumber
    assert doc.SeriesInstanceUID == series_uid != source.SeriesInstanceUID
    assert doc.Modality == "SR"
    assert doc.SeriesNumber == 9901
    # evidence
    evidence = doc.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series_item = evidence.ReferencedSeriesSequence[0]
    assert series_item.SeriesInstanceUID == source.SeriesInstanceUID
    ref = series_item.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    # flags
    assert doc.VerificationFlag == "UNVERIFIED"
    assert doc.CompletionFlag == "COMPLETE"
    # content: device observer, image library, one measurement group
    report = doc.content
    assert isinstance(report, hd.sr.MeasurementReport)
    observers = report.get_observer_contexts(observer_type=codes.DCM.Device)
    assert observers
    device = observers[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == provenance.device_uid
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
    assert group.tracking_uid
    assert group.tracking_identifier
    texts_by_name = {
        item.name.value: item.value for item in group[0].ContentSequence if item.ValueType == "TEXT"
    }
    assert texts_by_name[codes.DCM.AlgorithmName.value] == provenance.name
    assert texts_by_name[codes.DCM.AlgorithmVersion.value] == provenance.version
    measurements = group.get_measurements(name=PROBABILITY_CODE)
    assert len(measurements) == 1
    assert math.isclose(measurements[0].value, 0.83)
    assert measurements[0].unit == codes.UCUM.NoUnits
    texts = [
        item
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and item.name == CLASS_PROBABILITIES_CODE
    ]
    assert json.loads(texts[0].value) == {"normal": 0.1, "other": 0.07, "pneumonia": 0.83}
    library = [
        item
        for item in doc.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    assert library
    # IHE AIR contributing equipment
    equipment = [
        item
        for item in doc.ContributingEquipmentSequence
        if item.get("DeviceUID") == provenance.device_uid
    ]
    assert len(equipment) == 1
    purpose = equipment[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert equipment[0].ManufacturerModelName == provenance.name
    assert equipment[0].SoftwareVersions == provenance.version
    assert equipment[0].DeviceSerialNumber == SHA
    assert equipment[0].Manufacturer == provenance.manufacturer
    # series description: AI + demo warning
    assert doc.SeriesDescription.startswith("AI")
    assert "DEMO WEIGHTS - not for clinical use" in doc.SeriesDescription
    assert provenance.name in doc.SeriesDescription
    # predecessor
    pre = doc.PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == predecessor.study_instance_uid
    pre_series = pre.ReferencedSeriesSequence[0]
    assert pre_series.SeriesInstanceUID == predecessor.series_instance_uid
    assert pre_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        predecessor.sop_instance_uid
    )
    # the private coding scheme is declared
    schemes = {item.CodingSchemeDesignator for item in doc.CodingSchemeIdentificationSequence}
    assert "99CAREBRIDGE" in schemes

    if shutil.which("dsrdump"):
        proc = subprocess.run(
            ["dsrdump", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert "Imaging Measurement Report" in proc.stdout
        assert "Pneumonia" in proc.stdout


def test_non_demo_has_no_demo_note_and_no_predecessor(tmp_path: Path, source: Dataset) -> None:
    sr = _build([source], _provenance(demo=False))
    back = write_and_read_back(sr, tmp_path / "sr.dcm")
    assert back.SeriesDescription.startswith("AI-generated")
    assert "DEMO" not in back.SeriesDescription
    assert "PredecessorDocumentsSequence" not in back
    errors, output = _dciodvfy_errors(tmp_path / "sr.dcm")
    assert errors == [], output


def test_series_description_fits_lo_and_keeps_demo_note() -> None:
    long = _provenance(demo=True, name="a-very-long-model-name-" * 4)
    text = series_description_for(long)
    assert len(text) <= 64
    assert text.endswith("DEMO WEIGHTS - not for clinical use")
    assert len(series_description_for(_provenance(demo=False, name="x" * 80))) <= 64


def test_real_chest_cr_source_is_dciodvfy_clean(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file("RG1_UNCR.dcm")
    except Exception:
        path = None
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    source = pydicom.dcmread(path, stop_before_pixels=True)
    sr = _build([source])
    out = tmp_path / "rg1_sr.dcm"
    back = write_and_read_back(sr, out)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    errors, output = _dciodvfy_errors(out)
    assert errors == [], output


def test_several_sources_and_rebuild_is_identical(tmp_path: Path) -> None:
    study = generate_uid()
    series = generate_uid()
    sources = [
        make_cr_dataset(study_instance_uid=study, series_instance_uid=series, seed=i)
        for i in range(2)
    ]
    series_uid, sop_uid = generate_uid(), generate_uid()
    first = _build(sources, series_instance_uid=series_uid, sop_instance_uid=sop_uid)
    second = _build(sources, series_instance_uid=series_uid, sop_instance_uid=sop_uid)
    a = tmp_path / "a.dcm"
    b = tmp_path / "b.dcm"
    write_and_read_back(first, a)
    write_and_read_back(second, b)
    assert a.read_bytes() == b.read_bytes()
    refs = first.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence} == {
        s.SOPInstanceUID for s in sources
    }
    errors, output = _dciodvfy_errors(a)
    assert errors == [], output


def test_image_library_groups_images_by_their_shared_descriptors(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    sources = [
        make_cr_dataset(study_instance_uid=study, series_instance_uid=series, size=size, seed=i)
        for i, size in enumerate((64, 64, 32))
    ]
    out = tmp_path / "sr.dcm"
    write_and_read_back(_build(sources), out)
    errors, output = _dciodvfy_errors(out)
    assert errors == [], output
    doc = hd.sr.srread(out)  # the whole document, Image Library included, parses
    library = next(
        item
        for item in doc.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    groups = {}
    for group in library.ContentSequence:
        rows = next(
            item.MeasuredValueSequence[0].NumericValue
            for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeMeaning == "Pixel Data Rows"
        )
        groups[int(rows)] = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in group.ContentSequence
            if item.ValueType == "IMAGE"
        }
    assert groups == {
        64: {sources[0].SOPInstanceUID, sources[1].SOPInstanceUID},
        32: {sources[2].SOPInstanceUID},
    }


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf])
def test_probability_must_lie_in_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError):
        ClassificationFinding(label=PNEUMONIA, probability=bad, probabilities={})
    with pytest.raises(ValueError):
        ClassificationFinding(label=PNEUMONIA, probability=0.5, probabilities={"normal": bad})


def test_numpy_probabilities_are_accepted() -> None:
    import numpy as np

    finding = ClassificationFinding(
        label=PNEUMONIA,
        probability=np.float32(0.75),  # type: ignore[arg-type]
        probabilities={"pneumonia": np.float32(0.75), "normal": np.float64(0.25)},  # type: ignore[dict-item]
    )
    assert math.isclose(float(finding.probability), 0.75)


def test_probability_must_agree_with_its_class() -> None:
    with pytest.raises(ValueError):
        ClassificationFinding(label=PNEUMONIA, probability=0.5, probabilities={"pneumonia": 0.6})


def test_rejects_bad_input_without_phi(source: Dataset) -> None:
    with pytest.raises(ValueError, match="new series"):
        _build([source], series_instance_uid=source.SeriesInstanceUID)
    other = make_cr_dataset()
    with pytest.raises(ValueError) as info:
        _build([source, other])
    assert "Synthetic" not in str(info.value)
    assert str(source.PatientID) not in str(info.value)
    with pytest.raises(ValueError):
        _build([])
    with pytest.raises(ValueError):
        _build([source], sop_instance_uid="not a uid")
    with pytest.raises(ValueError):
        SRReference("1.2.3", "1.2.4", "bad uid", "1.2.5")


@pytest.mark.parametrize("damage", ["finding changed", "group removed", "finding removed"])
def test_a_file_that_reads_back_without_the_finding_is_refused_and_removed(
    tmp_path: Path, source: Dataset, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """What reaches the disk is checked against what was built: a Measurement Group whose
    coded finding differs or is missing refuses the file, and it is removed."""
    import copy

    from worker.outputs import dicom_sr

    sr = _build([source])
    real_write = dicom_sr.write_dataset_durably

    def write_damaged(ds: Dataset, path: Path) -> None:
        damaged = copy.deepcopy(ds)
        measurements = damaged.ContentSequence[-1]
        assert measurements.ConceptNameCodeSequence[0].CodeValue == "126010"
        group = measurements.ContentSequence[0]
        (finding,) = [
            item
            for item in group.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "121071"
        ]
        if damage == "finding changed":
            finding.ConceptCodeSequence[0].CodeValue = "363358000"
        elif damage == "group removed":
            del measurements.ContentSequence[0]
            measurements.ContentSequence.append(group.ContentSequence[0])  # not a group
        else:  # (highdicom's ContentSequence.remove compares items loosely)
            group.ContentSequence = [item for item in group.ContentSequence if item is not finding]
        real_write(damaged, path)

    monkeypatch.setattr(dicom_sr, "write_dataset_durably", write_damaged)
    target = tmp_path / "sr.dcm"
    with pytest.raises(ValueError, match="finding"):
        write_and_read_back(sr, target)
    assert not target.exists()
    monkeypatch.setattr(dicom_sr, "write_dataset_durably", real_write)
    back = write_and_read_back(sr, target)
    assert back.SOPInstanceUID == sr.SOPInstanceUID


def test_write_and_read_back_rejects_non_sr(tmp_path: Path) -> None:
    target = tmp_path / "not_sr.dcm"
    with pytest.raises(ValueError):
        write_and_read_back(make_cr_dataset(), target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_source_without_type2_patient_study_attributes(tmp_path: Path) -> None:
    source = make_cr_dataset()
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        delattr(source, keyword)
    sr = _build([source])
    assert "PatientBirthDate" not in source  # the caller's dataset is left alone
    out = tmp_path / "sr.dcm"
    back = write_and_read_back(sr, out)
    assert back.PatientBirthDate == ""
    assert back.StudyID == ""
    errors, output = _dciodvfy_errors(out)
    assert errors == [], output


def test_identity_removed_without_method_is_dciodvfy_clean(tmp_path: Path) -> None:
    # A de-identified source that does not say how: the SR must still carry the Type 1C
    # De-identification Method that Patient Identity Removed YES requires.
    source = make_cr_dataset()
    source.PatientIdentityRemoved = "YES"
    sr = _build([source])
    assert "DeidentificationMethod" not in source  # the caller's dataset is left alone
    out = tmp_path / "sr.dcm"
    back = write_and_read_back(sr, out)
    assert back.PatientIdentityRemoved == "YES"
    assert back.DeidentificationMethod == "Not stated by the source images"
    errors, output = _dciodvfy_errors(out)
    assert errors == [], output


def test_identity_removed_with_method_keeps_the_source_method(tmp_path: Path) -> None:
    source = make_cr_dataset()
    source.PatientIdentityRemoved = "YES"
    source.DeidentificationMethod = "Basic Application Confidentiality Profile"
    back = write_and_read_back(_build([source]), tmp_path / "sr.dcm")
    assert back.DeidentificationMethod == "Basic Application Confidentiality Profile"


def test_single_component_patient_name_is_not_logged(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    name = "Quokkafield"
    # highdicom warns about a name without "^" and quotes it: that warning is PHI.
    with pytest.warns(UserWarning, match=name):
        hd.valuerep.check_person_name(name)
    recwarn.clear()
    source = make_cr_dataset()
    source.PatientName = name
    caplog.set_level(logging.DEBUG)
    back = write_and_read_back(_build([source]), tmp_path / "sr.dcm")
    assert str(back.PatientName) == name  # the SR still names the patient
    assert not [w for w in recwarn if name in str(w.message)]
    assert name not in caplog.text


def test_the_sources_acquisition_equipment_keeps_its_own_time(tmp_path: Path) -> None:
    """Pinning highdicom's "now" stamps for identical rebuilds leaves the source's
    acquisition equipment at the source's acquisition time, not the AI's."""
    source = make_cr_dataset(seed=3)
    source.Manufacturer = "Acme Radiography"
    source.AcquisitionDateTime = "20230405061500"
    back = write_and_read_back(_build([source]), tmp_path / "sr.dcm")
    by_purpose = {
        item.PurposeOfReferenceCodeSequence[0].CodeValue: item
        for item in back.ContributingEquipmentSequence
    }
    acquisition = by_purpose["109101"]
    assert acquisition.Manufacturer == "Acme Radiography"
    assert str(acquisition.ContributionDateTime).startswith("20230405061500")
    processing = [
        item
        for code, item in by_purpose.items()
        if code != "109101" and "ContributionDateTime" in item
    ]
    assert processing and all(
        str(item.ContributionDateTime) != str(acquisition.ContributionDateTime)
        for item in processing
    )
