"""Generated chest radiographs: test data and the demo model's training set.

Nothing here is a real patient. :func:`generate_radiograph` draws a frontal (PA) chest
radiograph-like image from a simple projection model, and :func:`make_cxr_dataset` wraps it into
a valid CR Image Storage DICOM dataset, so tests can push whole studies through a PACS.

The image model works in millimetres on a 430 mm detector field (the larger image side), in
"density" units where 0 is unattenuated air (black) and about 1 is dense bone (white):

* **Body/thorax** -- a soft-tissue column whose width narrows above the shoulders to the neck,
  denser along the midline (thicker body) than at the flanks; air outside it.
* **Lung fields** -- two large, dark ellipses either side of the midline, apex up, with a
  slightly tilted base (lateral costophrenic angle lower), fine vascular markings (smooth
  random texture) and denser hila.
* **Mediastinum, spine and heart** -- a dense vertical band over the spine and a cardiac shadow
  bulging into the lower left lung (image right, as in a PA film), both hiding the lungs behind
  them.
* **Ribs and clavicles** -- periodic, laterally descending rib arcs over the lungs and two
  clavicles across the apices.
* **Acquisition** -- random patient size, position, small rotation, lung/heart proportions,
  tissue contrast, gamma, exposure (gain/offset), a heel-effect gradient and quantum noise.

Findings, added on top of that anatomy and the only thing that differs between classes:

* ``normal`` -- none.
* ``pneumonia`` -- patchy, textured air-space consolidation with ill-defined margins in the
  lower zone of one or both lungs (a broad blob modulated by thresholded smooth noise), limited
  to the lung field.
* ``lung_cancer`` -- one round, well-defined mass/nodule of 12-35 mm diameter somewhere in a lung
  field (away from heart and mediastinum), shaded like the projection of a sphere.

Every anatomical and acquisition parameter is drawn the same way for all three classes, so a
classifier must learn the finding and not an artifact of one class. Detector values are 12-bit
(0..4095), higher = brighter (the MONOCHROME2 sense). Anatomy is rendered on a grid of at most
256 pixels a side and interpolated, quantum noise is added at full size; a 512x512 image takes
about 20 ms. The pixel spacing follows from the field: 430 mm / 512 = 0.84 mm at the default
size (a full-size CR of about 3000 pixels would be 0.143 mm).
"""

from __future__ import annotations

import functools
from datetime import datetime

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

CLASSES: tuple[str, str, str] = ("normal", "pneumonia", "lung_cancer")

#: CR Image Storage SOP Class.
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")

#: Name and version of this generator, recorded in the demo model's card.
GENERATOR_ID = "models.cxr.synthetic.generate_radiograph/1"

#: Width of the detector field (mm) along the larger image side.
FIELD_MM = 430.0

_BITS_STORED = 12
_MAX_VALUE = (1 << _BITS_STORED) - 1
_RENDER_MAX = 256


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function (float32, overflow-safe)."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, spacing_q: int, cell_q: int) -> np.ndarray:
    """Row-normalised Gaussian interpolation weights from a coarse grid to ``n`` pixels."""
    spacing = spacing_q / 1000.0
    cell = cell_q / 1000.0
    pos = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing
    grid = np.arange(pos[0] - 2 * cell, pos[-1] + 2 * cell + 1e-9, cell)
    weights = np.exp(-0.5 * ((pos[:, None] - grid[None, :]) / cell) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], spacing: float, cell_mm: float
) -> np.ndarray:
    """Smooth random field with features of about ``cell_mm``, zero mean and unit std."""
    wy = _blur_matrix(shape[0], round(spacing * 1000), round(cell_mm * 1000))
    wx = _blur_matrix(shape[1], round(spacing * 1000), round(cell_mm * 1000))
    coarse = rng.standard_normal((wy.shape[1], wx.shape[1])).astype(np.float32)
    field = wy @ coarse @ wx.T
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def _ellipse_radius(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    """Normalised elliptic radius (1 on the outline)."""
    return np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)


@functools.lru_cache(maxsize=32)
def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights (n_out, n_in) between pixel-centre-aligned grids."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights.astype(np.float32)


def generate_radiograph(
    label: str, rng: np.random.Generator, shape: tuple[int, int] = (512, 512)
) -> np.ndarray:
    """Draw one chest-radiograph-like image of class ``label`` (one of :data:`CLASSES`).

    Returns uint16 detector values of shape ``shape`` in the 12-bit range, higher = brighter.
    See the module docstring for the image model. Anatomy is rendered on a grid of at most
    256 pixels a side and interpolated; quantum noise is added at full resolution.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
    h, w = int(shape[0]), int(shape[1])
    if h < 32 or w < 32:
        raise ValueError("shape must be at least 32x32 pixels")
    factor = max(1, -(-max(h, w) // _RENDER_MAX))
    rh, rw = -(-h // factor), -(-w // factor)
    density = _render_density(label, rng, rh, rw, FIELD_MM / max(rh, rw))

    # --- acquisition -----------------------------------------------------------------------
    heel = (
        1.0
        + np.float32(rng.uniform(-0.06, 0.06))
        * np.linspace(-1.0, 1.0, rh, dtype=np.float32)[:, None]
    )
    density = np.clip(density * heel, 0.0, 1.0) ** np.float32(rng.uniform(0.8, 1.25))
    if (rh, rw) != (h, w):
        density = _upsample_matrix(h, rh) @ density @ _upsample_matrix(w, rw).T
    offset = np.float32(rng.uniform(40.0, 260.0))
    gain = np.float32(rng.uniform(2600.0, 3700.0))
    values = offset + gain * density
    noise_sd = np.float32(rng.uniform(6.0, 22.0))
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= noise_sd * np.sqrt(np.maximum(values * np.float32(1.0 / 2048.0), 0.05))
    values += noise
    return np.clip(np.rint(values), 0, _MAX_VALUE).astype(np.uint16)


def _render_density(
    label: str, rng: np.random.Generator, h: int, w: int, spacing: float
) -> np.ndarray:
    """Render the density image (0 = air, ~1 = bone) on an (h, w) grid of ``spacing`` mm."""
    y = ((np.arange(h, dtype=np.float32) - (h - 1) / 2.0) * np.float32(spacing))[:, None]
    x = ((np.arange(w, dtype=np.float32) - (w - 1) / 2.0) * np.float32(spacing))[None, :]

    # --- patient and geometry --------------------------------------------------------------
    size = rng.uniform(0.85, 1.12)
    cx = rng.normal(0.0, 12.0)
    cy = rng.normal(10.0, 15.0)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    cos_a, sin_a = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    xx = cos_a * x + sin_a * y  # coordinates in the patient frame, shape (h, w)
    yy = -sin_a * x + cos_a * y
    dx = xx - np.float32(cx)
    adx = np.abs(dx)

    # --- body ------------------------------------------------------------------------------
    half_width = 165.0 * size * rng.uniform(0.93, 1.07)
    neck = 55.0 * size * rng.uniform(0.9, 1.1)
    shoulder_y = cy - 175.0 * size
    width_y = neck + (half_width - neck) * _sigmoid((yy - np.float32(shoulder_y)) / 14.0)
    body = _sigmoid((width_y - adx) / 3.0)
    soft = rng.uniform(0.36, 0.48)
    thickness = np.sqrt(np.clip(1.0 - (dx / width_y) ** 2, 0.0, 1.0))
    density = np.float32(soft) * body * (0.72 + 0.28 * thickness)

    # --- lungs, mediastinum, heart --------------------------------------------------------
    lung_y = cy - rng.uniform(5.0, 25.0) * size
    lung_h = rng.uniform(118.0, 150.0) * size
    lungs = []
    lung_geom = []
    for side in (-1.0, 1.0):
        lx = cx + side * rng.uniform(0.42, 0.50) * half_width
        lw = rng.uniform(0.36, 0.44) * half_width
        tilt = rng.uniform(0.02, 0.08)
        yy_t = yy + np.float32(tilt * lung_h / lw) * (side * (xx - np.float32(lx)))
        r = _ellipse_radius(xx, yy_t, lx, lung_y, lw, lung_h)
        lungs.append(_sigmoid((1.0 - r) * np.float32(min(lw, lung_h) / 3.0)))
        lung_geom.append((lx, lw))
    mediastinum_w = rng.uniform(20.0, 30.0) * size
    mediastinum = _sigmoid((np.float32(mediastinum_w) - np.abs(dx - 4.0)) / 3.0)
    heart_x = cx + rng.uniform(10.0, 32.0) * size
    heart_y = lung_y + rng.uniform(0.38, 0.55) * lung_h
    heart_w = rng.uniform(55.0, 78.0) * size
    heart_h = rng.uniform(44.0, 60.0) * size
    heart = _sigmoid((1.0 - _ellipse_radius(xx, yy, heart_x, heart_y, heart_w, heart_h)) * 12.0)
    hidden = 1.0 - np.maximum(mediastinum, heart)
    lung_side = [lung * hidden for lung in lungs]
    lung_field = np.maximum(lung_side[0], lung_side[1])

    markings = _smooth_noise(rng, (h, w), spacing, 4.0)
    lucency = np.float32(rng.uniform(0.24, 0.32))
    density -= lucency * lung_field * (1.0 - 0.05 * np.clip(markings, -2.5, 2.5))
    density += np.float32(rng.uniform(0.02, 0.05)) * heart
    hila = np.zeros((h, w), dtype=np.float32)
    for side in (-1.0, 1.0):
        hila += np.exp(
            -0.5
            * (
                ((xx - np.float32(cx + side * 45.0 * size)) / 16.0) ** 2
                + ((yy - np.float32(lung_y + 0.1 * lung_h)) / 26.0) ** 2
            )
        )
    density += 0.08 * hila * lung_field

    # --- bones -----------------------------------------------------------------------------
    spine = _sigmoid((np.float32(14.0 * size) - adx) / 2.0) * (
        0.9 + 0.1 * np.cos(yy * np.float32(2 * np.pi / 24.0))
    )
    density += np.float32(rng.uniform(0.05, 0.1)) * spine
    rib_spacing = rng.uniform(20.0, 27.0) * size
    rib_curve = np.float32(rng.uniform(0.0018, 0.0032) / size)
    rib_phase = (yy - np.float32(rng.uniform(0.0, rib_spacing)) - rib_curve * dx * dx) * (
        np.float32(2 * np.pi / rib_spacing)
    )
    ribs = _sigmoid((np.cos(rib_phase) - 0.3) / 0.25)
    cage = (
        _sigmoid((np.float32(0.93 * half_width) - adx) / 6.0)
        * _sigmoid((yy - np.float32(lung_y - lung_h - 10.0)) / 8.0)
        * _sigmoid((np.float32(lung_y + 0.85 * lung_h) - yy) / 10.0)
        * _sigmoid((adx - 12.0) / 4.0)
    )
    density += np.float32(rng.uniform(0.03, 0.07)) * ribs * cage
    clav_y = np.float32(lung_y - 0.8 * lung_h) + 0.22 * adx
    clavicles = (
        _sigmoid((np.float32(7.0 * size) - np.abs(yy - clav_y)) / 1.5)
        * _sigmoid((adx - 18.0) / 4.0)
        * _sigmoid((np.float32(135.0 * size) - adx) / 8.0)
    )
    density += np.float32(rng.uniform(0.05, 0.1)) * clavicles

    # --- finding ---------------------------------------------------------------------------
    if label == "pneumonia":
        choice = int(rng.integers(0, 3))
        sides = (0,) if choice == 0 else (1,) if choice == 1 else (0, 1)
        texture = _smooth_noise(rng, (h, w), spacing, rng.uniform(5.0, 9.0))
        fine = _smooth_noise(rng, (h, w), spacing, 2.5)
        patchy = _sigmoid((texture + 0.4 * fine + np.float32(rng.uniform(0.3, 0.8))) / 0.35)
        blob = np.zeros((h, w), dtype=np.float32)
        for idx in sides:
            lx, lw = lung_geom[idx]
            px = lx + rng.uniform(-0.35, 0.35) * lw
            py = lung_y + rng.uniform(0.25, 0.6) * lung_h
            sx = rng.uniform(28.0, 48.0) * size
            sy = rng.uniform(24.0, 42.0) * size
            blob += (
                np.exp(
                    -0.5 * (((xx - np.float32(px)) / sx) ** 2 + ((yy - np.float32(py)) / sy) ** 2)
                )
                * lung_side[idx]
            )
        density += np.float32(rng.uniform(0.22, 0.34)) * np.clip(blob, 0.0, 1.0) * patchy
    elif label == "lung_cancer":
        radius = rng.uniform(12.0, 35.0) / 2.0
        nx, ny = _nodule_centre(
            rng,
            lung_geom,
            lung_y,
            lung_h,
            (cx, mediastinum_w),
            (heart_x, heart_y, heart_w, heart_h),
            radius,
        )
        rr = np.sqrt((xx - np.float32(nx)) ** 2 + (yy - np.float32(ny)) ** 2) * np.float32(
            1.0 / radius
        )
        sphere = np.sqrt(np.clip(1.0 - rr * rr, 0.0, 1.0))
        edge = _sigmoid((1.0 - rr) * np.float32(radius / max(0.6, spacing * 0.6)))
        density += np.float32(rng.uniform(0.24, 0.36)) * (0.5 + 0.5 * sphere) * edge
    return density.astype(np.float32, copy=False)


def _nodule_centre(
    rng: np.random.Generator,
    lung_geom: list[tuple[float, float]],
    lung_y: float,
    lung_h: float,
    mediastinum: tuple[float, float],
    heart: tuple[float, float, float, float],
    radius: float,
) -> tuple[float, float]:
    """Pick a nodule centre well inside a lung field, clear of heart and mediastinum."""
    cx, mediastinum_w = mediastinum
    hx, hy, hw, hh = heart
    centre = (lung_geom[0][0], lung_y)
    for _ in range(100):
        lx, lw = lung_geom[int(rng.integers(0, 2))]
        u, v = rng.uniform(-0.72, 0.72, size=2)
        if u * u + v * v > 0.72**2:
            continue
        px, py = lx + u * lw, lung_y + v * lung_h
        if abs(px - cx) < mediastinum_w + radius + 5.0:
            continue
        if ((px - hx) / (hw + radius)) ** 2 + ((py - hy) / (hh + radius)) ** 2 < 1.0:
            continue
        return float(px), float(py)
    return float(centre[0]), float(centre[1])


def make_cxr_dataset(
    label: str,
    rng: np.random.Generator,
    *,
    patient_name: str,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    accession: str | None = None,
    photometric: str = "MONOCHROME2",
    shape: tuple[int, int] = (512, 512),
    modality: str = "CR",
    patient_birth_date: str = "",
    patient_sex: str = "",
    study_datetime: datetime | None = None,
    series_number: int = 1,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Return a generated PA chest radiograph as a CR Image Storage dataset with file meta.

    ``label`` picks the finding (see :data:`CLASSES`); UIDs not given are new. ``photometric``
    MONOCHROME1 stores inverted values so that the displayed image is the same as MONOCHROME2.
    The dataset carries the Patient, General Study, General Series, CR Series, General
    Equipment, General Image, Image Pixel, CR Image and SOP Common modules and is written with
    ``ds.save_as(path, enforce_file_format=True)``.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if not modality:
        raise ValueError("modality must not be empty")
    pixels = generate_radiograph(label, rng, shape)
    if photometric == "MONOCHROME1":
        pixels = (_MAX_VALUE - pixels).astype(np.uint16)
    spacing = FIELD_MM / max(pixels.shape)
    when = study_datetime or datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    sop = UID(sop_uid) if sop_uid else generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CAREBRIDGE_SYN"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    # General Study
    ds.StudyInstanceUID = UID(study_uid) if study_uid else generate_uid()
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession or ""
    ds.StudyDescription = "XR CHEST PA"
    # General Series + CR Series
    ds.Modality = modality
    ds.SeriesInstanceUID = UID(series_uid) if series_uid else generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    # General Equipment
    ds.Manufacturer = "carebridge"
    ds.ManufacturerModelName = "synthetic chest radiograph"
    ds.SoftwareVersions = GENERATOR_ID
    # General Image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = date
    ds.ContentTime = time
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "synthetic image, no patient"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    # CR Image
    ds.KVP = 120
    ds.ImagerPixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "nominal, synthetic image"
    return ds
