"""Tests of worker.outputs.dicom_seg: the liver SEG is IOD-valid and overlays its source."""

from __future__ import annotations

import copy
import warnings
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.provenance import ModelProvenance, device_uid_for
from tests.fixtures_ct import CTPhantom, assert_dciodvfy_clean, make_ct_phantom
from worker.outputs.dicom_seg import (
    SEGMENTATION_STORAGE,
    EmptySegmentationError,
    build_liver_seg,
    sort_by_slice_position,
    write_seg_and_read_back,
)

SHA = "0123456789abcdef" * 4
WHEN = datetime(2024, 1, 2, 10, 30, 0)


def _provenance(demo: bool = True, sha: str = SHA) -> ModelProvenance:
    return ModelProvenance(
        name="liver-unet",
        version="0.1.0",
        device_uid=device_uid_for("liver-unet", "0.1.0"),
        weights_sha256=sha,
        demo=demo,
    )


@pytest.fixture(scope="module")
def phantom() -> CTPhantom:
    return make_ct_phantom()


def _code(item: Dataset, keyword: str) -> tuple[str, str]:
    code = getattr(item, keyword)[0]
    return code.CodeValue, code.CodingSchemeDesignator


def test_phantom_source_is_a_valid_ct(tmp_path: Path, phantom: CTPhantom) -> None:
    path = tmp_path / "ct.dcm"
    pydicom.dcmwrite(path, phantom.datasets[0], enforce_file_format=True)
    assert_dciodvfy_clean(path)


def test_seg_is_dciodvfy_clean_and_matches_source_geometry(
    tmp_path: Path, phantom: CTPhantom
) -> None:
    provenance = _provenance()
    # the slices arrive shuffled; the mask follows their order along the slice normal
    assert [d.SOPInstanceUID for d in phantom.datasets] != [
        d.SOPInstanceUID for d in phantom.sorted_datasets
    ]
    seg = build_liver_seg(phantom.datasets, phantom.mask, provenance, content_datetime=WHEN)
    path = tmp_path / "out" / "seg.dcm"
    read_back = write_seg_and_read_back(seg, path)
    assert read_back.SOPInstanceUID == seg.SOPInstanceUID
    assert_dciodvfy_clean(path)
    back = hd.seg.segread(path)  # the whole SEG parses with highdicom

    source = phantom.sorted_datasets[0]
    assert isinstance(back, hd.seg.Segmentation)
    assert back.SOPClassUID == SEGMENTATION_STORAGE
    assert back.Modality == "SEG"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SeriesNumber == 9902
    assert back.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert back.segmentation_type == hd.seg.SegmentationTypeValues.BINARY

    # Referenced Series: the source series, only its instances
    referenced = back.ReferencedSeriesSequence
    assert [item.SeriesInstanceUID for item in referenced] == [source.SeriesInstanceUID]
    source_uids = {d.SOPInstanceUID for d in phantom.datasets}
    assert {
        item.ReferencedSOPInstanceUID for item in referenced[0].ReferencedInstanceSequence
    } <= source_uids

    # one frame per slice with liver; each frame points at the slice at its position
    liver_slices = [k for k in range(len(phantom.mask)) if phantom.mask[k].any()]
    assert back.NumberOfFrames == len(liver_slices) < len(phantom.datasets)
    by_position = {
        tuple(round(float(v), 3) for v in d.ImagePositionPatient): (k, d)
        for k, d in enumerate(phantom.sorted_datasets)
    }
    frames = back.pixel_array.reshape(back.NumberOfFrames, back.Rows, back.Columns)
    seen = []
    for index, frame in enumerate(back.PerFrameFunctionalGroupsSequence):
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        k, slice_ds = by_position[tuple(round(float(v), 3) for v in position)]
        derivation = frame.DerivationImageSequence[0]
        ref = derivation.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == slice_ds.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == slice_ds.SOPClassUID
        assert np.array_equal(frames[index], phantom.mask[k])
        seen.append(k)
    assert sorted(seen) == liver_slices

    # the same through highdicom's own lookup by source instance
    pixels = back.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in phantom.sorted_datasets],
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(pixels[..., 0], phantom.mask)

    # the segment: SNOMED liver, automatic, with the model's identification
    assert list(back.segment_numbers) == [1]
    segment = back.SegmentSequence[0]
    assert segment.SegmentLabel == "Liver"
    assert _code(segment, "SegmentedPropertyCategoryCodeSequence") == ("91723000", "SCT")
    assert _code(segment, "SegmentedPropertyTypeCodeSequence") == ("10200004", "SCT")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == provenance.name
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == provenance.name
    assert algorithm.AlgorithmVersion == provenance.version
    assert _code(algorithm, "AlgorithmFamilyCodeSequence") == (
        codes.DCM.ArtificialIntelligence.value,
        "DCM",
    )
    assert SHA in algorithm.AlgorithmParameters
    assert "DEMO WEIGHTS" in algorithm.AlgorithmParameters
    assert segment.TrackingUID
    assert segment.TrackingID == "Liver"

    # IHE AIR contributing equipment and the AI / demo marking
    equipment = [
        item
        for item in back.ContributingEquipmentSequence
        if item.get("DeviceUID") == provenance.device_uid
    ]
    assert len(equipment) == 1
    assert _code(equipment[0], "PurposeOfReferenceCodeSequence") == ("109102", "DCM")
    assert equipment[0].ManufacturerModelName == provenance.name
    assert equipment[0].SoftwareVersions == provenance.version
    assert equipment[0].DeviceSerialNumber == SHA
    assert back.SeriesDescription.startswith("AI")
    assert "DEMO WEIGHTS - not for clinical use" in back.SeriesDescription
    assert provenance.name in back.SeriesDescription
    assert back.ContentDate == "20240102"


def test_retry_reproduces_the_same_seg(tmp_path: Path, phantom: CTPhantom) -> None:
    first = build_liver_seg(phantom.datasets, phantom.mask, _provenance(), content_datetime=WHEN)
    # the same slices in another order are the same study: the same SEG, byte for byte
    second = build_liver_seg(
        phantom.sorted_datasets, phantom.mask, _provenance(), content_datetime=WHEN
    )
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    write_seg_and_read_back(first, a)
    write_seg_and_read_back(second, b)
    assert a.read_bytes() == b.read_bytes()
    other_weights = build_liver_seg(
        phantom.datasets, phantom.mask, _provenance(sha="f" * 64), content_datetime=WHEN
    )
    assert other_weights.SOPInstanceUID != first.SOPInstanceUID
    assert other_weights.SeriesInstanceUID != first.SeriesInstanceUID


def test_non_demo_seg_has_no_demo_note(phantom: CTPhantom) -> None:
    seg = build_liver_seg(phantom.datasets, phantom.mask, _provenance(demo=False))
    assert seg.SeriesDescription.startswith("AI-generated")
    assert "DEMO" not in seg.SeriesDescription
    assert "DEMO" not in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].get(
        "AlgorithmParameters", ""
    )


def test_empty_mask_builds_no_seg(phantom: CTPhantom) -> None:
    with pytest.raises(EmptySegmentationError, match="empty"):
        build_liver_seg(phantom.datasets, np.zeros_like(phantom.mask), _provenance())


def test_bad_masks_and_series_are_refused_without_phi(phantom: CTPhantom) -> None:
    provenance = _provenance()
    bad_masks = [
        phantom.mask[:-1],  # one slice short
        phantom.mask[:, :, :-1],  # wrong matrix
        phantom.mask * 2,  # a label map, not 0/1
        phantom.mask.astype(np.float32),
    ]
    for mask in bad_masks:
        with pytest.raises(ValueError) as info:
            build_liver_seg(phantom.datasets, mask, provenance)
        assert "Synthetic" not in str(info.value)
        assert "SYN0002" not in str(info.value)
    with pytest.raises(ValueError, match="shape"):
        build_liver_seg(phantom.datasets, phantom.mask[:-1], provenance)
    with pytest.raises(TypeError):
        build_liver_seg(phantom.datasets, phantom.mask.tolist(), provenance)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_liver_seg([], phantom.mask, provenance)

    duplicate = [*phantom.datasets[:-1], phantom.datasets[0]]
    with pytest.raises(ValueError, match="same SOP Instance"):
        build_liver_seg(duplicate, phantom.mask, provenance)
    other = make_ct_phantom(seed=1)
    mixed = [*phantom.datasets[:-1], other.datasets[0]]
    with pytest.raises(ValueError, match="same"):
        build_liver_seg(mixed, phantom.mask, provenance)
    tilted = copy.deepcopy(phantom.datasets[0])
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    with pytest.raises(ValueError, match="orientation"):
        build_liver_seg([tilted, *phantom.datasets[1:]], phantom.mask, provenance)
    source = phantom.sorted_datasets[0]
    with pytest.raises(ValueError, match="new series"):
        build_liver_seg(
            phantom.datasets,
            phantom.mask,
            provenance,
            series_instance_uid=source.SeriesInstanceUID,
        )
    with pytest.raises(ValueError):
        build_liver_seg(phantom.datasets, phantom.mask, provenance, sop_instance_uid="1.2.x")


def test_slices_are_ordered_along_the_normal_not_by_z() -> None:
    phantom = make_ct_phantom(slices=4, radii_mm=(4.0, 20.0, 20.0), shuffle=False)
    # Column direction pointing anterior flips the normal to feet: ascending along the
    # normal is then descending z.
    flipped = []
    for ds in phantom.sorted_datasets:
        turned = copy.deepcopy(ds)
        turned.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        flipped.append(turned)
    ordered = sort_by_slice_position(flipped)
    z = [float(d.ImagePositionPatient[2]) for d in ordered]
    assert z == sorted(z, reverse=True)
    mask = np.zeros((4, 64, 64), dtype=np.uint8)
    mask[0, 10:20, 10:20] = 1  # on the slice with the highest z
    seg = build_liver_seg(flipped, mask, _provenance())
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert ref.SourceImageSequence[0].ReferencedSOPInstanceUID == ordered[0].SOPInstanceUID


def test_write_seg_and_read_back_refuses_other_objects(tmp_path: Path, phantom: CTPhantom) -> None:
    target = tmp_path / "x.dcm"
    with pytest.raises(ValueError):
        write_seg_and_read_back(phantom.datasets[0], target)
    assert list(tmp_path.iterdir()) == []


def test_real_head_ct_seg_is_dciodvfy_clean(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file("693_UNCR.dcm")
    except Exception:
        path = None
    if path is None:
        pytest.skip("pydicom-data (693_UNCR.dcm) is not installed")
    source = pydicom.dcmread(path)
    # a real, de-identified head CT: no Frame of Reference, identity removed without method
    assert "FrameOfReferenceUID" not in source
    mask = np.zeros((1, source.Rows, source.Columns), dtype=np.uint8)
    mask[0, 200:300, 150:260] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = build_liver_seg([source], mask, _provenance())
    assert not any(str(source.PatientID) in str(w.message) for w in caught)  # no PHI in logs
    out = tmp_path / "seg_693.dcm"
    write_seg_and_read_back(seg, out)
    assert_dciodvfy_clean(out)
    back = hd.seg.segread(out)
    assert "FrameOfReferenceUID" not in source  # the caller's dataset is left alone
    assert back.FrameOfReferenceUID
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.NumberOfFrames == 1
    assert np.array_equal(
        back.get_pixels_by_source_instance([source.SOPInstanceUID])[0, ..., 0], mask[0]
    )
