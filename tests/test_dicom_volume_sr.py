"""Tests of worker.outputs.dicom_volume_sr: measured volumes and the TID 1500 volume SR."""

from __future__ import annotations

import copy
import math
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from models.provenance import ModelProvenance, device_uid_for
from tests.fixtures_ct import LIVER_HU, CTPhantom, assert_dciodvfy_clean, make_ct_phantom
from worker.outputs.dicom_seg import build_liver_seg
from worker.outputs.dicom_sr import COMPREHENSIVE_3D_SR_STORAGE, SRReference
from worker.outputs.dicom_volume_sr import (
    MEAN,
    MEAN_DENSITY_CODE,
    MILLILITER,
    VOLUME_CODE,
    VolumeMeasurement,
    build_volume_sr,
    measure_segment,
    write_volume_sr_and_read_back,
)
from worker.outputs.sr_library import read_back_measurement_report

SHA = "0123456789abcdef" * 4
WHEN = datetime(2024, 1, 2, 10, 30, 0)
PROVENANCE = ModelProvenance(
    name="liver-unet",
    version="0.1.0",
    device_uid=device_uid_for("liver-unet", "0.1.0"),
    weights_sha256=SHA,
    demo=True,
)


@pytest.fixture(scope="module")
def phantom() -> CTPhantom:
    return make_ct_phantom()


def test_volume_of_a_known_phantom(phantom: CTPhantom) -> None:
    measured = measure_segment(phantom.datasets, phantom.mask)
    # exactly the voxels' volume, and within 2% of the analytical ellipsoid
    assert math.isclose(measured.volume_ml, int(phantom.mask.sum()) * phantom.voxel_ml)
    assert abs(measured.volume_ml - phantom.ellipsoid_ml) / phantom.ellipsoid_ml < 0.02
    assert measured.mean_hu is not None
    assert abs(measured.mean_hu - LIVER_HU) < 2.0  # noise sigma 8 HU over ~5000 voxels
    assert measured.segment_number == 1


def test_volume_with_a_missing_slice_is_still_right(phantom: CTPhantom) -> None:
    keep = [k for k in range(len(phantom.sorted_datasets)) if k != 6]
    sources = [phantom.sorted_datasets[k] for k in keep]
    measured = measure_segment(sources, phantom.mask[keep])
    # the neighbours of the gap stand for it: the volume stays near the ellipsoid's
    assert abs(measured.volume_ml - phantom.ellipsoid_ml) / phantom.ellipsoid_ml < 0.03


def test_measure_refuses_a_mask_of_another_shape(phantom: CTPhantom) -> None:
    with pytest.raises(ValueError, match="shape"):
        measure_segment(phantom.datasets, phantom.mask[1:])


def test_single_slice_without_pixels_has_no_mean(phantom: CTPhantom) -> None:
    source = pydicom.Dataset()
    for element in phantom.sorted_datasets[5]:
        if element.keyword != "PixelData":
            source.add(element)
    measured = measure_segment([source], phantom.mask[5:6])
    assert measured.mean_hu is None
    assert math.isclose(measured.volume_ml, int(phantom.mask[5].sum()) * phantom.voxel_ml)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"volume_ml": -1.0, "mean_hu": 0.0},
        {"volume_ml": math.nan, "mean_hu": 0.0},
        {"volume_ml": 1.0, "mean_hu": math.inf},
        {"volume_ml": True, "mean_hu": 0.0},
        {"volume_ml": 1.0, "mean_hu": 0.0, "segment_number": 0},
        {"volume_ml": 1.0, "mean_hu": 0.0, "segment_number": 1.5},
    ],
)
def test_volume_measurement_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        VolumeMeasurement(**kwargs)  # type: ignore[arg-type]


def test_volume_sr_is_dciodvfy_clean_and_references_the_seg(
    tmp_path: Path, phantom: CTPhantom
) -> None:
    seg = build_liver_seg(phantom.datasets, phantom.mask, PROVENANCE, content_datetime=WHEN)
    measured = measure_segment(phantom.datasets, phantom.mask)
    source = phantom.sorted_datasets[0]
    predecessor = SRReference(
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=generate_uid(),
        sop_class_uid=COMPREHENSIVE_3D_SR_STORAGE,
        sop_instance_uid=generate_uid(),
    )
    sr = build_volume_sr(
        phantom.datasets,
        seg,
        [measured],
        PROVENANCE,
        predecessor=predecessor,
        content_datetime=WHEN,
    )
    path = tmp_path / "out" / "volume_sr.dcm"
    back = write_volume_sr_and_read_back(sr, path)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert_dciodvfy_clean(path)
    # the whole document, Image Library included, parses with highdicom
    doc = hd.sr.srread(path)

    assert doc.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE
    assert doc.StudyInstanceUID == source.StudyInstanceUID
    assert doc.SeriesInstanceUID not in {source.SeriesInstanceUID, seg.SeriesInstanceUID}
    assert doc.VerificationFlag == "UNVERIFIED"
    assert doc.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "DEMO WEIGHTS - not for clinical use" in doc.SeriesDescription
    # evidence: the source series and the SEG
    evidence = doc.CurrentRequestedProcedureEvidenceSequence[0]
    series = {item.SeriesInstanceUID: item for item in evidence.ReferencedSeriesSequence}
    assert {
        ref.ReferencedSOPInstanceUID
        for ref in series[source.SeriesInstanceUID].ReferencedSOPSequence
    } == {d.SOPInstanceUID for d in phantom.datasets}
    assert [
        ref.ReferencedSOPInstanceUID for ref in series[seg.SeriesInstanceUID].ReferencedSOPSequence
    ] == [seg.SOPInstanceUID]
    # one volumetric Measurement Group for the liver segment
    report = doc.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == hd.sr.CodedConcept("10200004", "SCT", "Liver")
    assert group.tracking_uid == seg.SegmentSequence[0].TrackingUID
    assert group.tracking_identifier == "Liver"
    segment = group.referenced_segment
    assert segment is not None
    assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert segment.referenced_segment_numbers == [1]
    source_series = segment.source_series_for_segmentation
    assert source_series is not None
    assert source_series.value == source.SeriesInstanceUID
    # the Image Library lists the slices under the liver frames; the geometry they share
    # is said once, for their group
    library = next(
        item
        for item in doc.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    )
    [group_item] = library.ContentSequence
    assert group_item.ConceptNameCodeSequence[0].CodeValue == "126200"  # Image Library Group
    entries = [e for e in group_item.ContentSequence if e.ValueType == "IMAGE"]
    liver_uids = {
        d.SOPInstanceUID for k, d in enumerate(phantom.sorted_datasets) if phantom.mask[k].any()
    }
    assert len(entries) == len(liver_uids)
    assert {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries} == liver_uids
    descriptors = {
        e.ConceptNameCodeSequence[0].CodeMeaning: e
        for e in group_item.ContentSequence
        if e.ValueType != "IMAGE"
    }
    assert descriptors["Modality"].ConceptCodeSequence[0].CodeValue == "CT"
    frame_of_reference = descriptors["Frame of Reference UID"].UID
    assert frame_of_reference == source.FrameOfReferenceUID
    assert descriptors["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue == source.Rows
    spacing = descriptors["Horizontal Pixel Spacing"].MeasuredValueSequence[0]
    assert math.isclose(spacing.FloatingPointValue, float(source.PixelSpacing[1]))
    assert "Image Orientation (Patient) Row X" in descriptors
    assert "Image Position (Patient) X" not in descriptors  # differs per slice
    volumes = group.get_measurements(name=VOLUME_CODE)
    assert len(volumes) == 1
    assert math.isclose(volumes[0].value, measured.volume_ml, rel_tol=1e-6)
    assert volumes[0].unit == MILLILITER
    assert volumes[0].unit.value == "ml"
    means = group.get_measurements(name=MEAN_DENSITY_CODE)
    assert len(means) == 1
    assert means[0].derivation == MEAN
    assert means[0].unit == codes.UCUM.HounsfieldUnit
    assert measured.mean_hu is not None
    assert math.isclose(means[0].value, measured.mean_hu, rel_tol=1e-6)
    # provenance: device observer, contributing equipment, predecessor
    device = report.get_observer_contexts(observer_type=codes.DCM.Device)[0]
    attributes = device.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == PROVENANCE.device_uid
    assert [
        item.DeviceSerialNumber
        for item in doc.ContributingEquipmentSequence
        if item.get("DeviceUID") == PROVENANCE.device_uid
    ] == [SHA]
    previous = doc.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert previous.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        predecessor.sop_instance_uid
    )


def test_volume_sr_is_reproducible(phantom: CTPhantom) -> None:
    seg = build_liver_seg(phantom.datasets, phantom.mask, PROVENANCE, content_datetime=WHEN)
    measured = [VolumeMeasurement(89.3, 60.1)]
    first = build_volume_sr(phantom.datasets, seg, measured, PROVENANCE, content_datetime=WHEN)
    second = build_volume_sr(
        phantom.sorted_datasets, seg, measured, PROVENANCE, content_datetime=WHEN
    )
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID not in {seg.SOPInstanceUID}


def test_read_back_refuses_a_file_unlike_the_sr_written(tmp_path: Path, phantom: CTPhantom) -> None:
    seg = build_liver_seg(phantom.datasets, phantom.mask, PROVENANCE, content_datetime=WHEN)
    sr = build_volume_sr(
        phantom.datasets, seg, [VolumeMeasurement(89.3, 60.1)], PROVENANCE, content_datetime=WHEN
    )
    path = tmp_path / "sr.dcm"
    write_volume_sr_and_read_back(sr, path)
    back, report = read_back_measurement_report(path, sr)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert len(report.get_volumetric_roi_measurement_groups()) == 1
    # the same document with one Image Library entry less is not what is on disk
    shorter = copy.deepcopy(sr)
    library = next(
        item
        for item in shorter.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    entries = library.ContentSequence[0].ContentSequence
    entries.remove(next(e for e in entries if e.ValueType == "IMAGE"))
    with pytest.raises(ValueError, match="Image Library"):
        read_back_measurement_report(path, shorter)
    # a SEG is not an SR: refused, nothing left behind
    target = tmp_path / "not-sr.dcm"
    with pytest.raises(ValueError):
        write_volume_sr_and_read_back(seg, target)
    assert not target.exists()


def test_volume_sr_refuses_inconsistent_input(phantom: CTPhantom) -> None:
    seg = build_liver_seg(phantom.datasets, phantom.mask, PROVENANCE)
    with pytest.raises(ValueError, match="no segment 2"):
        build_volume_sr(phantom.datasets, seg, [VolumeMeasurement(1.0, 0.0, 2)], PROVENANCE)
    with pytest.raises(ValueError, match="twice"):
        build_volume_sr(
            phantom.datasets,
            seg,
            [VolumeMeasurement(1.0, 0.0), VolumeMeasurement(2.0, 0.0)],
            PROVENANCE,
        )
    with pytest.raises(ValueError):
        build_volume_sr(phantom.datasets, seg, [], PROVENANCE)
    other = make_ct_phantom(seed=3)
    with pytest.raises(ValueError, match="different studies"):
        build_volume_sr(other.datasets, seg, [VolumeMeasurement(1.0, 0.0)], PROVENANCE)
    with pytest.raises(ValueError, match="Segmentation"):
        build_volume_sr(
            phantom.datasets, phantom.datasets[0], [VolumeMeasurement(1.0, 0.0)], PROVENANCE
        )


def test_real_head_ct_volume_sr_is_dciodvfy_clean(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file("693_UNCR.dcm")
    except Exception:
        path = None
    if path is None:
        pytest.skip("pydicom-data (693_UNCR.dcm) is not installed")
    source = pydicom.dcmread(path)
    mask = np.zeros((1, source.Rows, source.Columns), dtype=np.uint8)
    mask[0, 200:300, 150:260] = 1
    seg = build_liver_seg([source], mask, PROVENANCE)
    measured = measure_segment([source], mask)
    # 100 x 110 pixels of 0.478516 mm, 5 mm thick
    assert math.isclose(measured.volume_ml, 100 * 110 * 0.478516**2 * 5 / 1000, rel_tol=1e-6)
    sr = build_volume_sr([source], seg, [measured], PROVENANCE)
    out = tmp_path / "sr_693.dcm"
    doc = write_volume_sr_and_read_back(sr, out)
    assert_dciodvfy_clean(out)
    assert doc.StudyInstanceUID == source.StudyInstanceUID
