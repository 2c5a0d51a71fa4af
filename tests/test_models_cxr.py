"""Chest X-ray pipeline: generator, preprocessing, tiny training run, loading and prediction."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.card import CARD_FILE, ModelCard, ModelLoadError, read_model_card
from models.cxr import CXR_LABELS, CxrClassifier, image_from_dataset, to_model_input
from models.cxr.classifier import LUNG_CANCER, NORMAL, PNEUMONIA
from models.cxr.preprocess import (
    preprocess_dataset,
    preprocess_datasets,
    robust_window,
)
from models.cxr.synthetic import CLASSES, CR_IMAGE_STORAGE, generate_radiograph, make_cxr_dataset
from models.cxr.train import MODEL_NAME, MODEL_VERSION, train_demo
from models.levels import percentiles_of_levels


def _cxr(label: str = "normal", seed: int = 0, **kwargs: object) -> Dataset:
    return make_cxr_dataset(
        label,
        np.random.default_rng(seed),
        patient_name="Test^Patient",
        patient_id="T1",
        **kwargs,  # type: ignore[arg-type]
    )


def _plain(pixels: np.ndarray, **attrs: object) -> Dataset:
    """A minimal single-frame greyscale dataset holding ``pixels`` (8- or 16-bit integers)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


# --- generator ------------------------------------------------------------------------------


def test_label_constants() -> None:
    assert tuple(label.name for label in CXR_LABELS) == CLASSES
    assert (NORMAL.code_value, NORMAL.coding_scheme) == ("17621005", "SCT")
    assert (PNEUMONIA.code_value, PNEUMONIA.code_meaning) == ("233604007", "Pneumonia")
    assert (LUNG_CANCER.code_value, LUNG_CANCER.code_meaning) == (
        "363358000",
        "Malignant tumor of lung",
    )


@pytest.mark.parametrize("label", CLASSES)
def test_generate_radiograph(label: str) -> None:
    img = generate_radiograph(label, np.random.default_rng(3))
    assert img.shape == (512, 512) and img.dtype == np.uint16
    assert img.max() <= 4095 and img.max() - img.min() > 1500
    again = generate_radiograph(label, np.random.default_rng(3))
    assert np.array_equal(img, again)
    other = generate_radiograph(label, np.random.default_rng(4), shape=(300, 240))
    assert other.shape == (300, 240)


def test_generate_rejects_unknown_label() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        generate_radiograph("fracture", np.random.default_rng(0))


def test_generator_is_fast() -> None:
    rng = np.random.default_rng(0)
    make_cxr_dataset("pneumonia", rng, patient_name="A^B", patient_id="1")
    start = time.perf_counter()
    for i in range(9):
        make_cxr_dataset(CLASSES[i % 3], rng, patient_name="A^B", patient_id="1")
    per_image = (time.perf_counter() - start) / 9
    assert per_image < 0.5  # ~25 ms on an idle core; only catches gross regressions


def test_cxr_dataset_is_cr_image(tmp_path: Path) -> None:
    ds = _cxr("pneumonia", accession="ACC1", study_uid="1.2.3", series_uid="1.2.3.4")
    assert ds.SOPClassUID == CR_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.AccessionNumber) == (
        "1.2.3",
        "1.2.3.4",
        "ACC1",
    )
    assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("CR", "CHEST", "PA")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert ds.pixel_array.shape == (512, 512)

    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.PatientName == "Test^Patient"
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    assert _cxr().SOPInstanceUID != _cxr().SOPInstanceUID  # new UIDs when not given

    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = out.stdout + out.stderr
        assert "Error" not in report, report


def test_monochrome1_stores_inverted_values() -> None:
    m2 = _cxr("lung_cancer", seed=5)
    m1 = _cxr("lung_cancer", seed=5, photometric="MONOCHROME1")
    assert m1.PhotometricInterpretation == "MONOCHROME1"
    assert np.array_equal(m1.pixel_array.astype(np.int32), 4095 - m2.pixel_array.astype(np.int32))


# --- preprocessing --------------------------------------------------------------------------


def test_monochrome1_and_2_give_same_model_input() -> None:
    m2 = preprocess_dataset(_cxr("pneumonia", seed=7))
    m1 = preprocess_dataset(_cxr("pneumonia", seed=7, photometric="MONOCHROME1"))
    assert m2.shape == (1, 224, 224) and m2.dtype == np.float32
    np.testing.assert_allclose(m1, m2, atol=1e-4)


def test_rescale_then_window_applied() -> None:
    stored = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    ds = _plain(
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=1000,
        WindowWidth=2000,
        VOILUTFunction="LINEAR_EXACT",
    )
    values = stored.astype(np.float64) * 2 - 1000
    expected = np.clip((values - 1000) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(image_from_dataset(ds), expected, atol=1e-5)


def test_window_linear_on_signed_data() -> None:
    stored = np.linspace(-2000, 2000, 400).astype(np.int16).reshape(20, 20)
    ds = _plain(stored, WindowCenter=0, WindowWidth=1001)
    img = image_from_dataset(ds)
    assert img.min() == 0.0 and img.max() == 1.0
    assert img[stored < -600].max() == 0.0 and img[stored > 600].min() == 1.0
    np.testing.assert_allclose(img[stored == 0], 0.5, atol=2e-3)
    inverted = image_from_dataset(
        _plain(stored, WindowCenter=0, WindowWidth=1001, PhotometricInterpretation="MONOCHROME1")
    )
    np.testing.assert_allclose(inverted, 1.0 - img, atol=1e-6)


def test_voi_lut_sequence_applied() -> None:
    stored = np.arange(0, 1024, dtype=np.uint16).reshape(32, 32)
    ds = _plain(stored)
    item = Dataset()
    item.LUTDescriptor = [512, 256, 16]
    item.LUTData = [int(v) for v in np.linspace(1000, 3000, 512)]
    ds.VOILUTSequence = [item]
    img = image_from_dataset(ds)
    assert img[stored < 256].max() == 0.0 and img[stored >= 767].min() == 1.0
    mid = img[(stored > 300) & (stored < 700)]
    assert np.all(np.diff(mid) >= 0) and 0.0 < mid.mean() < 1.0


def test_robust_window_without_voi() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(100, 3000, size=(128, 128)).astype(np.uint16)
    stored[0, 0] = 65535  # a hot pixel must not set the window
    img = image_from_dataset(_plain(stored))
    lo, hi = np.percentile(stored.astype(np.float64), (0.5, 99.5))
    assert img.min() == 0.0 and img.max() == 1.0
    inside = (stored > lo) & (stored < hi)
    np.testing.assert_allclose(img[inside], (stored[inside] - lo) / (hi - lo), atol=1e-5)


def test_percentiles_from_a_histogram_equal_numpys() -> None:
    rng = np.random.default_rng(3)
    for size in (1, 2, 3, 7, 200, 5000):
        for values in (
            rng.integers(0, 4096, size).astype(np.uint16),
            rng.integers(-1000, 3000, size).astype(np.int16),
            rng.integers(0, 40, size) * 0.37 - 12.5,
            np.full(size, 7, dtype=np.uint16),
        ):
            levels, counts = np.unique(values, return_counts=True)
            for percentiles in ((0.5, 99.5), (0.0, 50.0, 100.0), (12.34, 87.6)):
                assert percentiles_of_levels(levels, counts, percentiles) == tuple(
                    float(v) for v in np.percentile(values, percentiles)
                )


@pytest.mark.parametrize(
    ("dtype", "attrs"),
    [
        (np.uint16, {}),
        (np.uint16, {"RescaleSlope": -0.7, "RescaleIntercept": 100}),
        (np.int16, {"PhotometricInterpretation": "MONOCHROME1"}),
        (np.int16, {"RescaleSlope": 2, "RescaleIntercept": -1024}),
        (np.uint8, {}),
        (np.int8, {"PhotometricInterpretation": "MONOCHROME1"}),
    ],
)
def test_robust_window_by_levels_equals_pixel_by_pixel(
    dtype: type[np.integer], attrs: dict[str, object]
) -> None:
    # The lookup-table path gives exactly what the pixel-by-pixel window gives.
    from pydicom.pixels import apply_modality_lut

    rng = np.random.default_rng(5)
    low, high = {np.uint16: (0, 3000), np.int16: (-1500, 3000), np.uint8: (0, 256)}.get(
        dtype, (-128, 128)
    )
    stored = rng.integers(low, high, size=(96, 80)).astype(dtype)
    ds = _plain(stored, **attrs)
    expected = np.clip(robust_window(apply_modality_lut(stored, ds)), 0.0, 1.0)
    if attrs.get("PhotometricInterpretation") == "MONOCHROME1":
        expected = 1.0 - expected
    assert np.array_equal(image_from_dataset(ds), expected)


def _voi_lut(first: int, entries: int, low: int, high: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first, 16]
    item.LUTData = [int(v) for v in np.linspace(low, high, entries)]
    return item


@pytest.mark.parametrize(
    ("dtype", "low", "high", "attrs"),
    [
        (np.uint16, 0, 4096, {"WindowCenter": 1000, "WindowWidth": 2000}),
        (
            np.uint16,
            0,
            4096,
            {"WindowCenter": 1000, "WindowWidth": 2000, "VOILUTFunction": "LINEAR_EXACT"},
        ),
        (
            np.int16,
            -1500,
            3000,
            {"WindowCenter": 500, "WindowWidth": 700, "VOILUTFunction": "SIGMOID"},
        ),
        (
            np.int16,
            -1500,
            3000,
            {
                "WindowCenter": [40, 400],
                "WindowWidth": [80, 1500],
                "RescaleSlope": 1,
                "RescaleIntercept": -1024,
            },
        ),
        (
            np.uint16,
            0,
            65536,
            {
                "WindowCenter": 100.5,
                "WindowWidth": 301,
                "RescaleSlope": 0.37,
                "RescaleIntercept": 12.5,
                "PhotometricInterpretation": "MONOCHROME1",
            },
        ),
        (np.uint8, 0, 256, {"WindowCenter": 10, "WindowWidth": 1}),
        (np.uint16, 0, 1024, {"VOILUTSequence": [_voi_lut(256, 512, 1000, 3000)]}),
        (np.int16, -100, 900, {"VOILUTSequence": [_voi_lut(0, 400, 7, 4000)], "RescaleSlope": 2.5}),
        (np.uint16, 0, 4096, {}),
    ],
)
def test_windowing_each_level_once_equals_windowing_each_pixel(
    dtype: type[np.integer],
    low: int,
    high: int,
    attrs: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Integer pixels are windowed level by level and looked up; with the lookup off
    # (no stored range is small enough) every pixel is windowed: the same values.
    from models import levels

    stored = np.random.default_rng(13).integers(low, high, size=(150, 110)).astype(dtype)
    if "RescaleSlope" in attrs:
        attrs = {"RescaleIntercept": 0, **attrs}
    ds = _plain(stored, **attrs)
    by_level = image_from_dataset(ds)
    model_input = preprocess_dataset(ds, 64)
    monkeypatch.setattr(levels, "MAX_LUT_LEVELS", 0)
    assert np.array_equal(by_level, image_from_dataset(ds))
    assert np.array_equal(model_input, preprocess_dataset(ds, 64))


@pytest.mark.parametrize(
    ("dtype", "low", "high", "shape", "attrs"),
    [
        (np.uint16, 0, 4096, (600, 500), {}),
        # above 2**15, inverted
        (np.uint16, 30000, 65536, (300, 700), {"PhotometricInterpretation": "MONOCHROME1"}),
        (np.int16, -1500, 3000, (257, 1031), {"RescaleSlope": 2, "RescaleIntercept": -1024}),
        (np.uint8, 0, 256, (90, 60), {}),  # enlarged
        (np.int8, -100, 100, (1, 500), {"RescaleSlope": -0.7, "RescaleIntercept": 3}),
        (np.uint16, 7, 8, (224, 224), {}),  # one level, no resize
    ],
)
def test_preprocess_dataset_is_the_two_functions_bit_for_bit(
    dtype: type[np.integer], low: int, high: int, shape: tuple[int, int], attrs: dict[str, object]
) -> None:
    # preprocess_dataset looks the window up band by band as it resizes (no full-size
    # float image): the result must be exactly what training's two functions give.
    stored = np.random.default_rng(11).integers(low, high, size=shape).astype(dtype)
    ds = _plain(stored, **attrs)
    for size in (224, 97):
        expected = to_model_input(image_from_dataset(ds), size)
        assert np.array_equal(preprocess_dataset(ds, size), expected)


def test_preprocess_dataset_of_a_full_size_radiograph_is_bit_for_bit() -> None:
    ds = _cxr("pneumonia", seed=3, shape=(2048, 1792))
    assert np.array_equal(preprocess_dataset(ds), to_model_input(image_from_dataset(ds)))


def test_a_study_is_preprocessed_in_order_in_parallel() -> None:
    datasets = [_cxr(label, seed=i) for i, label in enumerate(("normal", "pneumonia", "normal"))]
    expected = np.stack([preprocess_dataset(ds, 224) for ds in datasets])
    assert np.array_equal(preprocess_datasets(datasets, 224), expected)
    assert preprocess_datasets([], 224).shape == (0, 1, 224, 224)
    broken = _cxr()
    del broken.PixelData
    with pytest.raises(ValueError, match="Pixel Data"):
        preprocess_datasets([datasets[0], broken], 224)


def test_aspect_ratio_preserved() -> None:
    wide = np.ones((100, 200), dtype=np.float32)
    out = to_model_input(wide)
    assert out.shape == (1, 224, 224)
    rows = np.flatnonzero(out[0].max(axis=1) > 0.5)
    cols = np.flatnonzero(out[0].max(axis=0) > 0.5)
    assert (rows[0], rows[-1] + 1) == (56, 168)  # 112 rows, centred
    assert (cols[0], cols[-1] + 1) == (0, 224)
    assert out[0, :56].max() == 0.0 and out[0, 168:].max() == 0.0

    # A disc stays a disc: same extent in both directions after resizing a tall image.
    yy, xx = np.mgrid[0:400, 0:300]
    disc = (((yy - 200) ** 2 + (xx - 150) ** 2) < 100**2).astype(np.float32)
    small = to_model_input(disc)[0] > 0.5
    height = np.ptp(np.flatnonzero(small.any(axis=1)))
    width = np.ptp(np.flatnonzero(small.any(axis=0)))
    assert abs(int(height) - int(width)) <= 1


def test_bad_images_refused() -> None:
    no_pixels = _plain(np.zeros((4, 4), np.uint16))
    del no_pixels.PixelData
    with pytest.raises(ValueError, match="no Pixel Data"):
        image_from_dataset(no_pixels)

    multi = _plain(np.zeros((8, 4), np.uint16), NumberOfFrames=2)
    multi.Rows = 4
    with pytest.raises(ValueError, match="multi-frame"):
        image_from_dataset(multi)

    colour = _plain(np.zeros((4, 4, 3), np.uint8).reshape(4, 12))
    colour.Columns = 4
    colour.SamplesPerPixel = 3
    colour.PhotometricInterpretation = "RGB"
    with pytest.raises(ValueError, match="not greyscale"):
        image_from_dataset(colour)

    with pytest.raises(ValueError):
        to_model_input(np.zeros((3, 4, 5), np.float32))


def test_real_chest_cr_preprocesses() -> None:
    try:
        path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    except Exception:
        path = None
    if path is None:
        pytest.skip("RG1_UNCR.dcm not available (install pydicom-data)")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CR" and ds.pixel_array.ndim == 2
    arr = preprocess_dataset(ds)
    assert arr.shape == (1, 224, 224) and arr.dtype == np.float32
    assert np.isfinite(arr).all()
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0.05


# --- training, loading, prediction ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    model_dir = tmp_path_factory.mktemp("models") / "cxr"
    messages: list[str] = []
    card = train_demo(model_dir, images_per_class=24, epochs=2, seed=1, progress=messages.append)
    assert any("epoch 2/2" in m for m in messages)
    return model_dir, card


def test_tiny_training_writes_model_dir(tiny_model: tuple[Path, ModelCard]) -> None:
    model_dir, card = tiny_model
    assert read_model_card(model_dir) == card
    assert (card.name, card.version, card.demo, card.task) == (
        MODEL_NAME,
        MODEL_VERSION,
        True,
        "classification",
    )
    digest = hashlib.sha256((model_dir / card.weights.file).read_bytes()).hexdigest()
    assert card.weights.sha256 == digest
    assert card.input == {"channels": 1, "size": [224, 224]}
    assert card.training["images_per_class"] == 24 and card.training["epochs"] == 2
    assert card.training["train_count"] + card.training["val_count"] == 72
    assert 0.0 <= float(card.metrics["val_accuracy"]) <= 1.0  # type: ignore[arg-type]
    assert set(card.metrics["val_recall"]) == set(CLASSES)  # type: ignore[arg-type]


def test_classifier_loads_and_predicts(tiny_model: tuple[Path, ModelCard]) -> None:
    model_dir, card = tiny_model
    clf = CxrClassifier.load(model_dir, device="auto")
    assert clf.card == card
    assert clf.provenance.weights_sha256 == card.weights.sha256
    assert clf.provenance.demo is True

    datasets = [_cxr(label, seed=100 + i) for i, label in enumerate(CLASSES)]
    datasets.append(_cxr("normal", seed=200, photometric="MONOCHROME1", shape=(512, 400)))
    results = clf.predict_datasets(datasets)
    assert len(results) == 4
    for result in results:
        assert set(result.probabilities) == set(CLASSES)
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert result.label in CXR_LABELS
        assert result.probability == max(result.probabilities.values())
        assert result.probabilities[result.label.name] == result.probability

    arrays = np.stack([preprocess_dataset(ds) for ds in datasets])
    again = clf.predict_arrays(arrays)
    for a, b in zip(results, again, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert clf.predict_datasets([]) == []
    with pytest.raises(ValueError, match="shape"):
        clf.predict_arrays(np.zeros((2, 1, 100, 100), np.float32))


def _copy_with_card(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / CARD_FILE).read_text(encoding="utf-8"))
    edit(data)  # type: ignore[operator]
    (dst / CARD_FILE).write_text(json.dumps(data), encoding="utf-8")
    return dst


def test_classifier_refuses_mismatched_cards(
    tiny_model: tuple[Path, ModelCard], tmp_path: Path
) -> None:
    model_dir, _ = tiny_model
    swapped = _copy_with_card(model_dir, tmp_path / "swapped", lambda d: d["labels"].reverse())
    with pytest.raises(ModelLoadError, match="labels"):
        CxrClassifier.load(swapped)
    task = _copy_with_card(model_dir, tmp_path / "task", lambda d: d.update(task="segmentation"))
    with pytest.raises(ModelLoadError, match="task"):
        CxrClassifier.load(task)
    size = _copy_with_card(
        model_dir, tmp_path / "size", lambda d: d.update(input={"channels": 1, "size": [256, 256]})
    )
    with pytest.raises(ModelLoadError, match="input"):
        CxrClassifier.load(size)


def test_classifier_refuses_corrupt_weights(
    tiny_model: tuple[Path, ModelCard], tmp_path: Path
) -> None:
    model_dir, card = tiny_model
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    weights = bad / card.weights.file
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError) as err:
        CxrClassifier.load(bad)
    assert card.weights.sha256 in str(err.value)
    assert hashlib.sha256(bytes(blob)).hexdigest() in str(err.value)


def test_dataset_round_trips_through_bytes_before_prediction(
    tiny_model: tuple[Path, ModelCard],
) -> None:
    model_dir, _ = tiny_model
    clf = CxrClassifier.load(model_dir)
    ds = _cxr("lung_cancer", seed=9, sop_uid=generate_uid())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    a, b = clf.predict_datasets([ds])[0], clf.predict_datasets([back])[0]
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
