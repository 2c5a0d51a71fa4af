"""Tests of worker.outputs.key_image: key images a reader can open, in DICOM and PNG."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib import image as mpimg
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from models.provenance import CodedLabel, ModelProvenance, device_uid_for
from tests.fixtures_ct import CTPhantom, assert_dciodvfy_clean, make_ct_phantom
from worker.outputs import key_image_render
from worker.outputs.dicom_sr import ClassificationFinding
from worker.outputs.key_image import (
    SECONDARY_CAPTURE_STORAGE,
    build_classification_key_image,
    build_segmentation_key_image,
    classification_key_image_png,
    key_image_png,
    key_slice_index,
    write_key_image_and_read_back,
)

SHA = "0123456789abcdef" * 4
WHEN = datetime(2024, 1, 2, 10, 30, 0)
YELLOW = (255, 255, 0)


def _provenance(name: str = "liver-unet", demo: bool = True) -> ModelProvenance:
    return ModelProvenance(
        name=name,
        version="0.1.0",
        device_uid=device_uid_for(name, "0.1.0"),
        weights_sha256=SHA,
        demo=demo,
    )


@pytest.fixture(scope="module")
def phantom() -> CTPhantom:
    return make_ct_phantom()


def _real(name: str) -> Dataset:
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name)
    except Exception:
        path = None
    if path is None:
        pytest.skip(f"pydicom-data ({name}) is not installed")
    return pydicom.dcmread(path)


def _png_pixels(png: bytes) -> np.ndarray:
    decoded = mpimg.imread(io.BytesIO(png), format="png")
    return np.round(np.asarray(decoded)[..., :3] * 255).astype(np.uint8)


def _is_yellow(pixels: np.ndarray) -> np.ndarray:
    return np.all(pixels == YELLOW, axis=-1)


def test_key_slice_is_the_largest_mask_area(phantom: CTPhantom) -> None:
    areas = phantom.mask.reshape(len(phantom.mask), -1).sum(axis=1)
    assert areas[key_slice_index(phantom.mask)] == areas.max()
    with pytest.raises(ValueError, match="empty"):
        key_slice_index(np.zeros_like(phantom.mask))


def test_segmentation_key_image_shows_the_outline(tmp_path: Path, phantom: CTPhantom) -> None:
    k = key_slice_index(phantom.mask)
    source = phantom.sorted_datasets[k]
    provenance = _provenance()
    image = build_segmentation_key_image(
        source, phantom.mask[k], provenance, volume_ml=89.3, content_datetime=WHEN
    )
    path = tmp_path / "out" / "key.dcm"
    back = write_key_image_and_read_back(image, path)
    assert_dciodvfy_clean(path)

    assert back.SOPClassUID == SECONDARY_CAPTURE_STORAGE
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PhotometricInterpretation == "RGB"
    assert back.ImageType[:2] == ["DERIVED", "SECONDARY"]
    assert back.ConversionType == "WSD"
    assert back.PatientOrientation == ["L", "P"]
    reference = back.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "DEMO WEIGHTS - not for clinical use" in back.SeriesDescription
    assert any(
        item.get("DeviceUID") == provenance.device_uid
        for item in back.ContributingEquipmentSequence
    )

    pixels = back.pixel_array
    # the 64 x 64 slice is enlarged 4x so that the caption is readable
    assert pixels.shape == (256, 256, 3)
    mask = np.kron(phantom.mask[k], np.ones((4, 4), dtype=np.uint8)).astype(bool)
    yellow = _is_yellow(pixels)
    from scipy import ndimage

    caption_rows = slice(0, 80)
    edge = mask & ~ndimage.binary_erosion(mask)
    interior = ndimage.binary_erosion(mask, iterations=4)
    edge[caption_rows] = interior[caption_rows] = False
    assert edge.sum() > 300
    assert yellow[edge].all()  # the outline is burned in
    assert not yellow[interior].any()  # the organ itself stays visible
    assert yellow[caption_rows].any()  # the caption is burned in
    # away from outline and caption the picture is the windowed grey CT
    grey = ~mask & ~ndimage.binary_dilation(mask, iterations=2)
    grey[caption_rows] = False
    assert np.all(pixels[grey][:, 0] == pixels[grey][:, 1])

    png = key_image_png(back)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(_png_pixels(png), pixels)


def test_classification_key_image_of_a_real_chest_cr(tmp_path: Path) -> None:
    source = _real("RG1_UNCR.dcm")
    finding = ClassificationFinding(
        label=CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia"), probability=0.83
    )
    image = build_classification_key_image(source, finding, _provenance("cxr-resnet18"))
    path = tmp_path / "key_cr.dcm"
    back = write_key_image_and_read_back(image, path)
    assert_dciodvfy_clean(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert max(back.Rows, back.Columns) <= 1024  # reduced from 1955 x 1841
    assert back.PatientOrientation == list(source.PatientOrientation)
    pixels = back.pixel_array
    assert _is_yellow(pixels[: back.Rows // 4]).sum() > 500  # the caption
    assert not _is_yellow(pixels[back.Rows // 2 :]).any()  # no outline on a classification
    assert np.array_equal(_png_pixels(key_image_png(back)), pixels)


def test_key_image_of_the_real_head_ct(tmp_path: Path) -> None:
    source = _real("693_UNCR.dcm")
    mask = np.zeros((source.Rows, source.Columns), dtype=np.uint8)
    mask[200:300, 150:260] = 1
    image = build_segmentation_key_image(source, mask, _provenance())
    path = tmp_path / "key_ct.dcm"
    back = write_key_image_and_read_back(image, path)
    assert_dciodvfy_clean(path)
    assert back.Rows == source.Rows
    assert _is_yellow(back.pixel_array[200:300, 150:260]).any()


def test_key_image_is_reproducible(phantom: CTPhantom) -> None:
    k = key_slice_index(phantom.mask)
    first = build_segmentation_key_image(
        phantom.sorted_datasets[k], phantom.mask[k], _provenance(), content_datetime=WHEN
    )
    second = build_segmentation_key_image(
        phantom.sorted_datasets[k], phantom.mask[k], _provenance(), content_datetime=WHEN
    )
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.PixelData == second.PixelData


def test_key_image_refuses_bad_input(tmp_path: Path, phantom: CTPhantom) -> None:
    source = phantom.sorted_datasets[5]
    with pytest.raises(ValueError, match="empty"):
        build_segmentation_key_image(source, np.zeros((64, 64), np.uint8), _provenance())
    with pytest.raises(ValueError, match="shape"):
        build_segmentation_key_image(source, np.ones((32, 64), np.uint8), _provenance())
    with pytest.raises(ValueError):
        build_segmentation_key_image(source, phantom.mask, _provenance())
    target = tmp_path / "x.dcm"
    with pytest.raises(ValueError):
        write_key_image_and_read_back(source, target)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- rendering, exactly


def _reference_display(source: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """The key image's gray levels computed pixel by pixel, in float64, as first written."""
    values = np.asarray(apply_modality_lut(source.pixel_array, source), dtype=np.float64)
    if window is None:
        if source.Modality == "CT":
            window = (40.0, 400.0)
        elif "WindowCenter" in source and float(source.WindowWidth) > 1:
            window = (float(source.WindowCenter), float(source.WindowWidth))
        else:
            low, high = np.percentile(values, [0.5, 99.5])
            window = (float(low + high) / 2.0, max(float(high - low), 1.0))
    center, width = window
    scaled = np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _synthetic(
    pixels: np.ndarray, *, modality: str = "CR", photometric: str = "MONOCHROME2", **extra: object
) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.PhotometricInterpretation = modality, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def _rendering_cases() -> list[tuple[str, Dataset, tuple[float, float] | None]]:
    rng = np.random.default_rng(3)
    smooth = rng.normal(2000, 600, (300, 260)).clip(0, 4095).astype(np.uint16)
    signed = rng.normal(0, 900, (200, 220)).clip(-1024, 3071).astype(np.int16)
    return [
        ("percentile window", _synthetic(smooth), None),
        ("its own window", _synthetic(smooth, WindowCenter=1800, WindowWidth=1500), None),
        ("window given", _synthetic(smooth), (2100.0, 900.0)),
        ("MONOCHROME1", _synthetic(smooth, photometric="MONOCHROME1"), None),
        (
            "signed CT, rescaled",
            _synthetic(signed, modality="CT", RescaleSlope=1.5, RescaleIntercept=-20),
            None,
        ),
        ("signed, percentiles", _synthetic(signed), None),
        ("8-bit", _synthetic(rng.integers(0, 256, (64, 80), dtype=np.uint8)), None),
    ]


@pytest.mark.parametrize(("what", "source", "window"), _rendering_cases())
def test_display_levels_are_those_of_every_pixel(
    what: str, source: Dataset, window: tuple[float, float] | None
) -> None:
    assert np.array_equal(
        key_image_render._display(source, window), _reference_display(source, window)
    )


def test_the_real_chest_cr_is_displayed_as_pixel_by_pixel() -> None:
    source = _real("RG1_UNCR.dcm")
    assert np.array_equal(key_image_render._display(source, None), _reference_display(source, None))


@pytest.mark.parametrize("shape", [(2048, 2048), (1955, 1841), (3100, 2500), (1100, 700)])
def test_reduction_is_the_block_mean(shape: tuple[int, int]) -> None:
    gray = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[100:400, 50:300] = 1
    reduced, reduced_mask = key_image_render._resize(gray, mask)
    k = -(-max(shape) // 1024)
    r, c = shape[0] // k, shape[1] // k
    blocks = gray[: r * k, : c * k].reshape(r, k, c, k)
    assert np.array_equal(reduced, np.round(blocks.mean(axis=(1, 3))).astype(np.uint8))
    assert reduced_mask is not None and reduced_mask.shape == (r, c) and reduced_mask.any()


def _reference_caption(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """The caption blended over the whole image, in float64, as first written."""
    overlay = np.asarray(
        key_image_render._caption_overlay(rgb.shape[0], rgb.shape[1], lines), dtype=np.float64
    )
    alpha = overlay[..., 3:] / 255.0
    blended = rgb * (1.0 - alpha) + overlay[..., :3] * alpha
    return np.round(blended).astype(np.uint8)


@pytest.mark.parametrize(("rows", "columns"), [(1024, 1024), (977, 920), (256, 256), (60, 300)])
def test_the_caption_is_blended_as_over_the_whole_image(rows: int, columns: int) -> None:
    lines = ["AI finding: Pneumonia (probability 0.83)", "cxr-resnet18 0.1.0", "DEMO WEIGHTS"]
    gray = np.random.default_rng(1).integers(0, 256, (rows, columns), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    expected = _reference_caption(rgb, lines)
    burned = key_image_render._burn_caption(rgb.copy(), lines)
    assert np.array_equal(burned, expected)
    assert not np.array_equal(burned, rgb)


def test_the_classification_png_is_the_key_images_picture() -> None:
    source = _real("RG1_UNCR.dcm")
    finding = ClassificationFinding(
        label=CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia"), probability=0.83
    )
    provenance = _provenance("cxr-resnet18")
    image = build_classification_key_image(source, finding, provenance, content_datetime=WHEN)
    png = classification_key_image_png(source, finding, provenance)
    assert png == key_image_png(image)
