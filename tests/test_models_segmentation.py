"""Liver segmentation: series to volume, phantoms, measurement, training, inference, evaluation."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.card import CARD_FILE, ModelLoadError, read_model_card
from models.segmentation import (
    LIVER,
    CtVolume,
    SeriesGeometryError,
    load_ct_series,
    mean_hu,
    sort_datasets,
    volume_ml,
)
from models.segmentation.data import phantom_case, read_dicom_seg_case, read_nifti_case
from models.segmentation.evaluate import dice_hd95, evaluate_liver
from models.segmentation.infer import InputSpec, LiverSegmenter
from models.segmentation.phantom import (
    make_phantom,
    phantom_origin,
    write_phantom_nifti,
    write_phantom_series,
)
from models.segmentation.train import MODEL_NAME, train_demo, train_from_folder

# A coarse grid keeps every phantom small: 192 x 307 x 307 mm in 60 x 96 x 96 voxels.
SHAPE = (60, 96, 96)
SPACING = (3.2, 3.2, 3.2)
SERIES_SEED = 11

TINY = {
    "spacing_mm": (8.0, 8.0, 8.0),
    "roi_size": (24, 40, 40),
    "hu_window": (-200.0, 250.0),
    "architecture": {
        "family": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 0,
        "norm": "instance",
    },
}


def _read(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One phantom CT series on disk, files foot first."""
    return write_phantom_series(
        tmp_path_factory.mktemp("series"), seed=SERIES_SEED, shape=SHAPE, spacing=SPACING
    )


@pytest.fixture(scope="module")
def nifti_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("nifti")
    for seed in range(5):
        write_phantom_nifti(directory, seed=100 + seed, shape=SHAPE, spacing=SPACING)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, nifti_dir: Path) -> Path:
    """A small liver model trained for a few seconds on NIfTI phantoms."""
    return train_from_folder(
        nifti_dir,
        tmp_path_factory.mktemp("models") / "liver",
        labels="nifti",
        epochs=30,
        patience=30,
        seed=0,
        progress=False,
        learning_rate=5e-3,
        **TINY,  # type: ignore[arg-type]
    )


# --- series to volume ---------------------------------------------------------------------------


def test_load_ct_series_sorts_shuffled_slices(series: list[Path]) -> None:
    datasets = _read(series)
    shuffled = random.Random(3).sample(datasets, len(datasets))
    volume = load_ct_series(shuffled)

    hu, _mask, _known = make_phantom(np.random.default_rng(SERIES_SEED), SHAPE, SPACING)
    assert volume.shape == SHAPE and volume.hu.dtype == np.float32
    assert np.array_equal(volume.hu, hu.astype(np.float32))  # rescale intercept -1024 applied
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.origin == pytest.approx(phantom_origin(SHAPE, SPACING))
    assert volume.slice_direction == pytest.approx((0.0, 0.0, 1.0))
    # Files were written foot first, so sorted order is file order.
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    assert [ds.SOPInstanceUID for ds in sort_datasets(shuffled)] == list(volume.sop_instance_uids)
    assert volume.series_instance_uid == datasets[0].SeriesInstanceUID
    assert volume.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    # The affine maps (k, i, j) to the slice's ImagePositionPatient plus the in-plane offset.
    k, i, j = 17, 5, 9
    offset = np.array([j * 3.2, i * 3.2, 0.0])
    expected = np.array(datasets[k].ImagePositionPatient, dtype=float) + offset
    assert volume.affine @ np.array([k, i, j, 1.0]) == pytest.approx([*expected, 1.0])
    assert volume.slice_positions[k] == pytest.approx(datasets[k].ImagePositionPatient)


def test_signed_pixel_data_gives_the_same_hu(tmp_path: Path, series: list[Path]) -> None:
    signed = write_phantom_series(
        tmp_path, seed=SERIES_SEED, shape=SHAPE, spacing=SPACING, signed=True
    )
    first = pydicom.dcmread(signed[0])
    assert first.PixelRepresentation == 1 and float(first.RescaleIntercept) == 0.0
    assert np.array_equal(load_ct_series(_read(signed)).hu, load_ct_series(_read(series)).hu)


def test_rescale_gives_pydicom_hu_for_any_slope_and_intercept(series: list[Path]) -> None:
    # Integral slopes and intercepts are applied in float32, others through pydicom: the
    # HU are pydicom's (float64 rescale, then float32) either way.
    from pydicom.pixels import apply_modality_lut

    datasets = _read(series)
    for slope, intercept in ((1, -1024), (2, -2048), (1, 0), (0.5, -1024), (1, -1024.5), (300, 7)):
        for ds in datasets:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        volume = load_ct_series(datasets)
        expected = np.stack(
            [
                np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
                for ds in datasets
            ]
        )
        assert np.array_equal(volume.hu, expected), (slope, intercept)


def test_feet_first_orientation_sorts_along_the_normal(series: list[Path]) -> None:
    datasets = _read(series)
    for ds in datasets:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]  # normal points to the feet
    volume = load_ct_series(datasets)
    assert volume.slice_direction == pytest.approx((0.0, 0.0, -1.0))
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in reversed(datasets))
    assert volume.spacing[0] == pytest.approx(3.2)


def _drop_middle(datasets: list[Dataset]) -> list[Dataset]:
    return datasets[:30] + datasets[31:]


def _mixed_orientation(datasets: list[Dataset]) -> list[Dataset]:
    datasets[7].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    return datasets


def _tilted(datasets: list[Dataset]) -> list[Dataset]:
    step = math.tan(math.radians(12.0)) * 3.2
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * step, z]
        ds.GantryDetectorTilt = 12
    return datasets


def _duplicate(datasets: list[Dataset]) -> list[Dataset]:
    twin = pydicom.dcmread(datasets[0].filename) if hasattr(datasets[0], "filename") else None
    assert twin is not None
    twin.SOPInstanceUID = generate_uid()
    return [*datasets, twin]


def _not_ct(datasets: list[Dataset]) -> list[Dataset]:
    datasets[3].SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    datasets[3].Modality = "CR"
    return datasets


def _mixed_series(datasets: list[Dataset]) -> list[Dataset]:
    datasets[4].SeriesInstanceUID = generate_uid()
    return datasets


def _uneven(datasets: list[Dataset]) -> list[Dataset]:
    x, y, z = (float(v) for v in datasets[20].ImagePositionPatient)
    datasets[20].ImagePositionPatient = [x, y, z + 1.0]
    return datasets


@pytest.mark.parametrize(
    ("damage", "reason", "words"),
    [
        (_drop_middle, "missing_slices", "1 slice(s) missing"),
        (_mixed_orientation, "mixed_orientation", "mixes orientations"),
        (_tilted, "gantry_tilt", "12.0 deg"),
        (_duplicate, "duplicate_slices", "share a position"),
        (_not_ct, "not_ct", "CT Image Storage is expected"),
        (_mixed_series, "mixed_series", "SeriesInstanceUID"),
        (_uneven, "non_uniform_spacing", "evenly spaced"),
    ],
)
def test_series_that_is_not_one_volume_is_refused(
    series: list[Path], damage, reason: str, words: str
) -> None:
    with pytest.raises(SeriesGeometryError) as info:
        load_ct_series(damage(_read(series)))
    assert info.value.reason == reason
    assert words in str(info.value)


def test_empty_series_is_refused() -> None:
    with pytest.raises(SeriesGeometryError, match="no datasets"):
        load_ct_series([])


def test_real_single_slice_ct_loads_and_segments(tiny_model: Path) -> None:
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("693_UNCR.dcm")
    except Exception:  # pragma: no cover - depends on the optional data package
        path = None
    if path is None:  # pragma: no cover
        pytest.skip("pydicom-data (693_UNCR.dcm) is not installed")
    volume = load_ct_series([pydicom.dcmread(path)])
    assert volume.shape == (1, 512, 512)
    assert volume.spacing[0] == pytest.approx(5.0)  # SliceThickness of the only slice
    assert volume.frame_of_reference_uid is None
    # In HU: air inside the scan circle, bone, and the scanner's padding outside it.
    assert np.count_nonzero(np.abs(volume.hu + 1000.0) < 60.0) > 1000
    assert float(volume.hu.max()) > 500.0 and float(volume.hu.min()) >= -3024.0
    result = LiverSegmenter.load(tiny_model).segment(volume)
    assert result.mask.shape == (1, 512, 512) and result.mask.dtype == np.uint8


# --- phantom and measurement --------------------------------------------------------------------


def test_phantom_volume_is_within_two_percent_of_the_known_volume(series: list[Path]) -> None:
    for seed in range(3):
        spacing = (2.5, 1.5625, 1.5625)
        hu, mask, known = make_phantom(np.random.default_rng(seed), (80, 256, 256), spacing)
        assert 700.0 < known < 2600.0  # an adult liver
        assert abs(volume_ml(mask, spacing) - known) / known < 0.02
        assert 40.0 < mean_hu(hu, mask) < 135.0  # liver attenuation, unenhanced or venous
    # The same through DICOM: the spacing read from the series measures the true mask.
    volume = load_ct_series(_read(series))
    _hu, mask, known = make_phantom(np.random.default_rng(SERIES_SEED), SHAPE, SPACING)
    assert abs(volume_ml(mask, volume.spacing) - known) / known < 0.02


def test_phantoms_vary_and_repeat() -> None:
    a = make_phantom(np.random.default_rng(1), SHAPE, SPACING)
    b = make_phantom(np.random.default_rng(1), SHAPE, SPACING)
    c = make_phantom(np.random.default_rng(2), SHAPE, SPACING)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2] != c[2] and not np.array_equal(a[1], c[1])
    with pytest.raises(ValueError, match="too small"):
        make_phantom(np.random.default_rng(1), (20, 64, 64), (2.0, 2.0, 2.0))


def test_measurements() -> None:
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    assert volume_ml(mask, (2.0, 1.0, 1.0)) == pytest.approx(2.0)
    hu = np.where(mask == 1, 60.0, -1000.0).astype(np.float32)
    assert mean_hu(hu, mask) == pytest.approx(60.0)
    assert volume_ml(np.zeros_like(mask), (1.0, 1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="empty"):
        mean_hu(hu, np.zeros_like(mask))
    with pytest.raises(ValueError, match="shape"):
        mean_hu(hu[:-1], mask)


@pytest.mark.parametrize("kind", ["bool", "uint8", "labels", "full", "one voxel"])
def test_mean_hu_is_the_mean_of_the_selected_voxels(kind: str) -> None:
    # Measured slice by slice without copies: the same mean as selecting every voxel.
    rng = np.random.default_rng(3)
    hu = rng.normal(50.0, 300.0, (12, 40, 30)).astype(np.float32)
    mask: np.ndarray
    if kind == "full":
        mask = np.ones(hu.shape, dtype=np.uint8)
    elif kind == "one voxel":
        mask = np.zeros(hu.shape, dtype=bool)
        mask[7, 3, 29] = True
    else:
        mask = rng.random(hu.shape) < 0.3
        mask[:4] = False  # empty slices
        mask[9] = True  # a whole slice
        if kind == "uint8":
            mask = mask.astype(np.uint8)
        elif kind == "labels":  # any non-zero value counts
            mask = mask * rng.integers(1, 255, hu.shape).astype(np.uint8)
    expected = float(np.mean(hu[mask != 0], dtype=np.float64))
    assert mean_hu(hu, mask) == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_nifti_phantom_reads_back_on_its_grid(tmp_path: Path) -> None:
    image, label = write_phantom_nifti(tmp_path, seed=4, shape=SHAPE, spacing=SPACING)
    assert image.parent.name == "images" and label.parent.name == "labels"
    case = read_nifti_case(image, label)
    hu, mask, _known = make_phantom(np.random.default_rng(4), SHAPE, SPACING)
    assert np.array_equal(case.volume.hu, hu.astype(np.float32))
    assert np.array_equal(case.mask, mask)
    assert case.volume.spacing == pytest.approx(SPACING)
    assert case.volume.origin == pytest.approx(phantom_origin(SHAPE, SPACING))
    assert case.volume.row_direction == pytest.approx((1.0, 0.0, 0.0))


def _seg_case(case_dir: Path, seed: int) -> np.ndarray:
    """Write a phantom series and a DICOM SEG of its true liver into ``case_dir``; return mask."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    paths = write_phantom_series(case_dir, seed=seed, shape=SHAPE, spacing=SPACING)
    datasets = sort_datasets(_read(paths))
    _hu, mask, _known = make_phantom(np.random.default_rng(seed), SHAPE, SPACING)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=hd.sr.CodedConcept(
            LIVER.code_value, LIVER.coding_scheme, LIVER.code_meaning
        ),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=90,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(case_dir / "seg.dcm")
    return mask


def test_dicom_seg_labels_read_back_per_source_slice(tmp_path: Path) -> None:
    mask = _seg_case(tmp_path / "case-1", seed=SERIES_SEED)
    (tmp_path / "case-1" / "README.txt").write_text("not DICOM")  # skipped, not an error
    case = read_dicom_seg_case(tmp_path / "case-1")
    assert case.name == "case-1"
    assert np.array_equal(case.mask, mask)
    datasets = sort_datasets(_read(sorted((tmp_path / "case-1").glob("CT*.dcm"))))
    assert case.volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)


def test_training_from_dicom_series_with_seg_labels(tmp_path: Path) -> None:
    for k in range(2):
        _seg_case(tmp_path / "data" / f"case-{k}", seed=200 + k)
    model_dir = train_from_folder(
        tmp_path / "data",
        tmp_path / "model",
        labels="seg",
        epochs=1,
        progress=False,
        **TINY,  # type: ignore[arg-type]
    )
    card = read_model_card(model_dir)
    assert card.training["data"] == "2 labelled cases (seg)"
    assert card.training["train_count"] == 1 and card.training["val_count"] == 1
    LiverSegmenter.load(model_dir)


# --- training, loading, inference ---------------------------------------------------------------


def test_tiny_model_loads_and_segments_a_series_in_source_geometry(
    tiny_model: Path, series: list[Path]
) -> None:
    card = read_model_card(tiny_model)
    assert card.task == "segmentation" and card.demo is False and card.name == MODEL_NAME
    assert card.coded_labels == (LIVER,)
    assert card.input["modality"] == "CT" and card.input["spacing_mm"] == [8.0, 8.0, 8.0]
    assert card.training["train_count"] == 4 and card.training["val_count"] == 1
    assert "dice_mean" in card.metrics["validation"]  # type: ignore[operator]
    assert (tiny_model / "evaluation-overlay.png").is_file()

    volume = load_ct_series(random.Random(1).sample(_read(series), len(series)))
    result = LiverSegmenter.load(tiny_model, sw_batch_size=2).segment(volume)
    assert result.mask.shape == SHAPE and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1}
    assert result.label == LIVER
    assert result.provenance.weights_sha256 == card.weights.sha256
    assert result.provenance.device_uid == card.device_uid
    assert result.volume_ml == pytest.approx(volume_ml(result.mask, SPACING))
    assert set(result.timings) >= {"preprocess", "inference", "postprocess", "restore", "total"}
    # A few seconds of training already find most of the liver of an unseen phantom.
    _hu, truth, _known = make_phantom(np.random.default_rng(SERIES_SEED), SHAPE, SPACING)
    dice, _hd95 = dice_hd95(result.mask, truth, SPACING)
    assert dice > 0.6


def test_mask_follows_the_source_orientation(tiny_model: Path) -> None:
    case = phantom_case(21, SHAPE, SPACING)
    segmenter = LiverSegmenter.load(tiny_model)
    straight = segmenter.segment(case.volume)
    # The same anatomy stored right-to-left and head-to-foot (the normal of row (-1, 0, 0) and
    # column (0, 1, 0) points to the feet), as a feet-first scan would store it.
    turned = CtVolume.from_array(
        case.volume.hu[::-1, :, ::-1], SPACING, row_direction=(-1.0, 0.0, 0.0)
    )
    assert turned.slice_direction == pytest.approx((0.0, 0.0, -1.0))
    result = segmenter.segment(turned)
    # The mask comes back in the turned volume's own storage order.
    assert np.array_equal(result.mask, straight.mask[::-1, :, ::-1])


def test_transfer_learning_starts_from_a_checkpoint(
    tiny_model: Path, nifti_dir: Path, tmp_path: Path
) -> None:
    parent = read_model_card(tiny_model)
    child_dir = train_from_folder(
        nifti_dir, tmp_path / "child", init_from=tiny_model, epochs=1, progress=False, version="2"
    )
    child = read_model_card(child_dir)
    assert child.training["init_from"] == {
        "name": parent.name,
        "version": parent.version,
        "weights_sha256": parent.weights.sha256,
    }
    assert child.input == parent.input and child.architecture == parent.architecture
    with pytest.raises(ValueError, match="leave spacing_mm"):
        train_from_folder(
            nifti_dir, tmp_path / "x", init_from=tiny_model, spacing_mm=(4, 4, 4), progress=False
        )


def test_corrupt_weights_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / read_model_card(broken).weights.file
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="does not match its card"):
        LiverSegmenter.load(broken)


def test_a_card_for_another_task_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    card = json.loads((other / CARD_FILE).read_text())
    card["task"] = "classification"
    (other / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="not a liver segmentation model"):
        LiverSegmenter.load(other)


# --- evaluation ---------------------------------------------------------------------------------


def test_evaluation_reports_dice_hd95_and_writes_an_overlay(
    tiny_model: Path, tmp_path: Path
) -> None:
    png = tmp_path / "overlay.png"
    cases = [phantom_case(seed, SHAPE, SPACING) for seed in (31, 32)]
    report = evaluate_liver(tiny_model, cases, png_path=png)
    again = json.loads(json.dumps(report))  # JSON-able as it is
    assert again["n_cases"] == 2 and [c["case"] for c in again["cases"]] == [
        "phantom-31",
        "phantom-32",
    ]
    assert 0.0 <= again["dice_min"] <= again["dice_mean"] <= 1.0
    assert again["model"]["weights_sha256"] == read_model_card(tiny_model).weights.sha256
    assert again["overlay_png"] == "overlay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_largest_component_equals_labelling_and_hole_filling() -> None:
    # The holes come from the background labelled alongside the components and a graph
    # over the dropped components: the same as labelling the kept component's background.
    from scipy import ndimage

    from models.segmentation import preprocess

    structure = ndimage.generate_binary_structure(3, 3)

    def reference(binary: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(binary, structure=structure)
        if count == 0:
            return np.zeros(binary.shape, dtype=bool)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return np.asarray(ndimage.binary_fill_holes(labels == int(np.argmax(sizes))))

    rng = np.random.default_rng(11)
    cases = []
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(1, 10, 3))
        cases.append(rng.random(shape) < rng.uniform(0.05, 0.9))
        blob = ndimage.binary_dilation(rng.random(shape) < 0.1, iterations=2)
        cases.append(blob & ~(rng.random(shape) < 0.15))
    shell = np.zeros((9, 9, 9), dtype=bool)
    shell[1:8, 1:8, 1:8] = True
    shell[3:6, 3:6, 3:6] = False
    shell[4, 4, 4] = True  # a dropped component inside the hole
    cases.append(shell)
    for binary in cases:
        assert np.array_equal(preprocess.largest_component(binary), reference(binary))
    # the fall-backs: the kept component's background labelled afterwards
    for limit in ("_MAX_REMOVED_VOXELS", "_CONCURRENT_LABEL_VOXELS"):
        saved = getattr(preprocess, limit)
        setattr(preprocess, limit, 0)
        try:
            for binary in cases[:60]:
                assert np.array_equal(preprocess.largest_component(binary), reference(binary))
        finally:
            setattr(preprocess, limit, saved)


def _trilinear(prob: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        out = F.interpolate(
            torch.from_numpy(prob)[None, None], size=shape, mode="trilinear", align_corners=False
        )
    return out[0, 0].numpy()


def test_mask_on_the_source_grid_is_the_thresholded_trilinear_probability() -> None:
    # Only the box the above-threshold model voxels reach is interpolated; the mask is
    # still torch's trilinear interpolation thresholded at 0.5, in any orientation.
    from scipy import ndimage

    from models.segmentation.preprocess import (
        ModelGeometry,
        Reorientation,
        probability_to_source,
    )

    rng = np.random.default_rng(5)
    grids = [
        ((23, 50, 40), (9, 12, 10), Reorientation((0, 1, 2), (False, False, False))),
        ((7, 30, 33), (11, 8, 8), Reorientation((0, 1, 2), (True, False, True))),
        ((40, 12, 16), (10, 12, 5), Reorientation((2, 0, 1), (False, True, False))),
        ((12, 16, 16), (12, 16, 16), Reorientation((0, 1, 2), (False, False, False))),
        ((12, 16, 16), (6, 20, 24), Reorientation((1, 2, 0), (True, True, False))),
        ((1, 40, 40), (1, 9, 9), Reorientation((0, 1, 2), (False, False, False))),
    ]
    for source_shape, model_shape, reorientation in grids:
        for corner in (False, True):
            field = ndimage.gaussian_filter(rng.random(model_shape), 1.0)
            prob = ((field - field.min()) / (np.ptp(field) + 1e-9)).astype(np.float32)
            if corner:  # above the threshold only near one corner
                prob[tuple(slice(n // 2, None) for n in model_shape)] *= 0.4
                prob[tuple(slice(None, n // 2) for n in model_shape)] *= 0.4
            geometry = ModelGeometry(source_shape, (1.0, 1.0, 1.0), model_shape, reorientation)
            canonical = np.ascontiguousarray(reorientation.to_canonical(prob))
            mask = probability_to_source(canonical, geometry)
            reference = _trilinear(prob, source_shape)
            assert mask.shape == source_shape and mask.dtype == np.uint8
            clear = np.abs(reference - 0.5) > 1e-5  # not a rounding away from the threshold
            assert np.array_equal(mask[clear], (reference >= 0.5)[clear])
            assert 0 < int(mask.sum()) < mask.size


def test_fragments_dropped_on_the_model_grid_do_not_come_back() -> None:
    from scipy import ndimage

    from models.segmentation.preprocess import (
        ModelGeometry,
        Reorientation,
        clean_probability,
        probability_to_source,
    )

    model = np.full((10, 16, 16), 0.2, dtype=np.float32)
    model[2:8, 3:11, 3:11] = 0.9  # the liver ...
    model[4:6, 6:8, 6:8] = 0.1  # ... with a hole
    model[5, 14, 14] = 0.8  # a false positive two voxels away
    geometry = ModelGeometry(
        (25, 80, 80), (1.6, 0.8, 0.8), (10, 16, 16), Reorientation((0, 1, 2), (False,) * 3)
    )
    structure = ndimage.generate_binary_structure(3, 3)
    raw = probability_to_source(model, geometry)
    assert ndimage.label(raw, structure=structure)[1] == 2  # what cleaning is for
    mask = probability_to_source(clean_probability(model), geometry)
    assert ndimage.label(mask, structure=structure)[1] == 1
    assert not mask[:, 60:, 60:].any()  # the false positive is gone
    assert mask[11, 34:36, 34:36].all()  # the hole is filled
    # Elsewhere the liver keeps its edges, but for the block's 8 corner voxels: their blend
    # reaches diagonally past the 6-connected rim that clean_probability keeps.
    changed = mask != raw
    changed[:, 60:, 60:] = False
    changed[7:18, 25:45, 25:45] = False
    assert int(changed.sum()) == 8


def test_resampling_averages_boxes_where_the_grid_coarsens() -> None:
    # The box average runs in-plane, then across slices: the 3-D box average all the same.
    import torch
    import torch.nn.functional as F

    from models.segmentation.preprocess import resample

    rng = np.random.default_rng(3)
    for shape, size in (
        ((30, 64, 64), (11, 17, 20)),
        ((30, 64, 64), (60, 32, 32)),
        ((10, 40, 40), (5, 50, 40)),
        ((9, 9, 9), (9, 9, 9)),
    ):
        hu = rng.normal(40.0, 300.0, shape).astype(np.float32)
        shrunk = tuple(min(s, n) for s, n in zip(size, shape, strict=True))
        with torch.inference_mode():
            ref = F.interpolate(torch.from_numpy(hu)[None, None], size=shrunk, mode="area")
            if shrunk != size:
                ref = F.interpolate(ref, size=size, mode="trilinear", align_corners=False)
        out = resample(hu, size)
        assert out.shape == size and out.dtype == np.float32
        np.testing.assert_allclose(out, ref[0, 0].numpy(), rtol=0, atol=1e-3)


def test_dice_and_hd95_of_known_shapes() -> None:
    truth = np.zeros((20, 30, 30), dtype=np.uint8)
    truth[5:15, 5:15, 5:15] = 1
    assert dice_hd95(truth, truth, (1.0, 1.0, 1.0)) == (1.0, 0.0)
    shifted = np.roll(truth, 2, axis=2)
    dice, hd95 = dice_hd95(shifted, truth, (1.0, 1.0, 1.5))
    assert dice == pytest.approx(0.8)
    assert hd95 == pytest.approx(3.0)  # two voxels of 1.5 mm
    assert dice_hd95(np.zeros_like(truth), truth, (1.0, 1.0, 1.0)) == (0.0, None)


def test_the_demo_training_takes_another_grid_and_network(tmp_path: Path) -> None:
    """``train_demo`` with a grid and network of its caller's (as the inference benchmark
    trains a reference-size model): the card says so, under its own version, and loads."""
    spec = InputSpec(TINY["spacing_mm"], TINY["roi_size"], TINY["hu_window"])  # type: ignore[arg-type]
    architecture = TINY["architecture"]
    out = train_demo(
        tmp_path / "model",
        train_cases=2,
        val_cases=1,
        test_cases=1,
        epochs=1,
        patience=1,
        spec=spec,
        architecture=architecture,  # type: ignore[arg-type]
        version="0.0.1-tiny",
    )
    card = read_model_card(out)
    assert (card.name, card.version, card.demo) == (MODEL_NAME, "0.0.1-tiny", True)
    assert card.architecture == architecture
    assert InputSpec.from_card_input(card.input) == spec
    assert (out / "evaluation.json").is_file()
    segmenter = LiverSegmenter.load(out)
    assert segmenter.spec == spec
    with pytest.raises(ValueError, match="multiple of 4"):
        train_demo(
            tmp_path / "refused",
            spec=InputSpec((8.0, 8.0, 8.0), (26, 40, 40), (-200.0, 250.0)),
            architecture=architecture,  # type: ignore[arg-type]
        )
    assert not (tmp_path / "refused").exists()
