"""Render a source image with an AI result burned in, for people to look at.

Pure pixel work, no DICOM encoding and no model logic: the source is windowed to 8-bit
grayscale (modality LUT, window, polarity), resized to a readable size, and a
segmentation outline and a caption are drawn on it (the caption with matplotlib's Agg
renderer). :func:`rgb_png` encodes the result as PNG without any metadata.
:mod:`worker.outputs.key_image` wraps the picture as a DICOM Secondary Capture.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from models.levels import level_index, percentiles_of_levels, stored_levels

__all__ = ["render_key_image", "rgb_png"]

_SOFT_TISSUE_WINDOW = (40.0, 400.0)  # (center, width) HU: shows the liver against fat
_MAX_SIDE = 1024  # larger sources are reduced: a key image is for viewing, not measuring
_MIN_SIDE = 256  # smaller ones are enlarged so that the caption stays readable
_OUTLINE_RGB = (255, 255, 0)
_TEXT_RGB = "#ffff00"


def _stored_window(source: Dataset) -> tuple[float, float] | None:
    """The window a key image of ``source`` is shown in when its values need not be seen."""
    if str(source.get("Modality", "")) == "CT":
        return _SOFT_TISSUE_WINDOW
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        first_center = float(center[0] if isinstance(center, Sequence) else center)
        first_width = float(width[0] if isinstance(width, Sequence) else width)
        if first_width > 1:
            return first_center, first_width
    return None


def _robust_window(low: float, high: float) -> tuple[float, float]:
    """(center, width) between the 0.5th and 99.5th percentiles of the values."""
    return float(low + high) / 2.0, max(float(high - low), 1.0)


def _to_gray(values: np.ndarray, window: tuple[float, float], photometric: str) -> np.ndarray:
    """Modality values (float64) through ``window`` and the polarity, as 8-bit gray."""
    center, width = window
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError("the display window must have a finite center and positive width")
    scaled = np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _display(source: Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """Return the source as 8-bit display grayscale (modality LUT, window, polarity).

    Integer pixels take few distinct values: each stored level goes through these
    elementwise steps once and the image is looked up in that table (the robust
    window's percentiles come from the levels' histogram), which gives the same bytes
    as computing every pixel.
    """
    if "PixelData" not in source:
        raise ValueError("the source image has no pixel data")
    if int(source.get("SamplesPerPixel", 1)) != 1 or int(source.get("NumberOfFrames", 1)) != 1:
        raise ValueError("the source must be a single-frame grayscale image")
    stored = source.pixel_array
    photometric = str(source.get("PhotometricInterpretation", ""))
    window = window or _stored_window(source)
    span = stored_levels(stored)
    if span is not None:
        base, levels = span
        index = level_index(stored, base, levels)
        table = np.arange(base, base + levels).astype(stored.dtype)
        values = np.asarray(apply_modality_lut(table, source), dtype=np.float64)
        if window is None:
            counts = np.bincount(index.ravel(), minlength=levels)
            present = counts > 0
            low, high = percentiles_of_levels(values[present], counts[present], (0.5, 99.5))
            window = _robust_window(low, high)
        return _to_gray(values, window, photometric)[index]
    values = np.asarray(apply_modality_lut(stored, source), dtype=np.float64)
    if window is None:
        low, high = np.percentile(values, [0.5, 99.5])
        window = _robust_window(float(low), float(high))
    return _to_gray(values, window, photometric)


def _resize(gray: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduce by block means (mask: block max) or enlarge by pixel repetition."""
    rows, columns = gray.shape
    reduce = math.ceil(max(rows, columns) / _MAX_SIDE)
    if reduce > 1:
        r, c = rows // reduce, columns // reduce
        blocks = (r, reduce, c, reduce)
        # The block sums are exact integers, added up one offset at a time: divided by
        # the block size they are the block means numpy's mean gives, without a float64
        # copy of every pixel.
        cropped = gray[: r * reduce, : c * reduce]
        sums = np.zeros((r, c), dtype=np.uint16 if reduce <= 16 else np.uint32)
        for i in range(reduce):
            for j in range(reduce):
                sums += cropped[i::reduce, j::reduce]
        gray = np.round(sums / float(reduce * reduce)).astype(np.uint8)
        if mask is not None:
            mask = mask[: r * reduce, : c * reduce].reshape(blocks).max(axis=(1, 3))
        return gray, mask
    enlarge = max(1, _MIN_SIDE // max(rows, columns))
    if enlarge > 1:
        gray = np.kron(gray, np.ones((enlarge, enlarge), dtype=np.uint8))
        if mask is not None:
            mask = np.kron(mask, np.ones((enlarge, enlarge), dtype=mask.dtype))
    return gray, mask


def _burn_outline(rgb: np.ndarray, mask: np.ndarray) -> None:
    thickness = max(1, round(min(mask.shape) / 256))
    inside = mask.astype(bool)
    edge = inside & ~ndimage.binary_erosion(inside, iterations=thickness, border_value=0)
    rgb[edge] = _OUTLINE_RGB


def _caption_overlay(rows: int, columns: int, lines: Sequence[str]) -> np.ndarray:
    """The caption of a ``rows`` x ``columns`` image as RGBA (matplotlib Agg), top left."""
    # Imported here: matplotlib is only needed to render, not to import this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 72.0  # one point is one pixel
    figure = Figure(figsize=(columns / dpi, rows / dpi), dpi=dpi)
    figure.patch.set_alpha(0.0)
    canvas = FigureCanvasAgg(figure)
    size = max(9.0, min(rows, columns) / 30.0)
    text = figure.text(
        6.0 / columns,
        1.0 - 6.0 / rows,
        "\n".join(lines),
        ha="left",
        va="top",
        fontsize=size,
        family="DejaVu Sans",
        color=_TEXT_RGB,
        bbox={"facecolor": "black", "alpha": 0.65, "edgecolor": "none", "pad": size / 4},
    )
    canvas.draw()
    width = text.get_window_extent(canvas.get_renderer()).width
    if width > columns - 12:  # shrink a caption that is wider than the image
        text.set_fontsize(max(5.0, size * (columns - 12) / width))
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:rows, :columns]


def _burn_caption(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Draw ``lines`` top left on a dark box (matplotlib Agg) and blend them into ``rgb``.

    Only the rows the caption covers are blended (in float64, as a whole image was).
    """
    overlay = _caption_overlay(rgb.shape[0], rgb.shape[1], lines)
    covered = np.flatnonzero(overlay[..., 3].any(axis=1))
    if not len(covered):
        return rgb
    band = slice(int(covered[0]), int(covered[-1]) + 1)
    alpha = overlay[band, :, 3:] / 255.0
    blended = rgb[band] * (1.0 - alpha)
    blended += overlay[band, :, :3] * alpha
    rgb[band] = np.round(blended).astype(np.uint8)
    return rgb


def render_key_image(
    source: Dataset,
    mask: np.ndarray | None,
    lines: Sequence[str],
    window: tuple[float, float] | None,
) -> np.ndarray:
    """Return ``source`` as 8-bit RGB with ``mask``'s outline and ``lines`` burned in.

    ``window`` is (center, width) in modality units; ``None`` picks a soft-tissue window
    for CT and the image's own window (or its value range) otherwise. Large images are
    reduced and small ones enlarged so that the caption stays readable.
    """
    gray = _display(source, window)
    if mask is not None and mask.shape != gray.shape:
        raise ValueError(f"mask slice shape {mask.shape} differs from the image {gray.shape}")
    gray, mask = _resize(gray, mask)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if mask is not None:
        _burn_outline(rgb, mask)
    return _burn_caption(rgb, lines)


def rgb_png(pixels: np.ndarray) -> bytes:
    """Return a (rows, columns, 3) uint8 array as PNG bytes (8-bit RGB, no metadata)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError("a PNG key image needs an 8-bit RGB single-frame image")
    rows, columns = pixels.shape[:2]
    # Each PNG scanline starts with its filter type; 2 ("Up") stores each byte minus the
    # one above it (modulo 256), which suits a radiograph's smooth columns: at zlib level
    # 2 a key image compresses 5x faster and 15 % smaller than unfiltered at level 6
    # (level 3: 9 % smaller again, for 70 % more time).
    lines = pixels.reshape(rows, columns * 3)
    scanlines = np.empty((rows, 1 + columns * 3), dtype=np.uint8)
    scanlines[:, 0] = 2
    scanlines[0, 1:] = lines[0]  # the first line's "above" is zeros
    np.subtract(lines[1:], lines[:-1], out=scanlines[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", columns, rows, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 2))
        + chunk(b"IEND", b"")
    )
