"""A small synthetic CT series with a known ellipsoidal "liver", for the SEG/SR tests.

Everything here is synthetic: no real patient data. Every slice is a valid CT Image
Storage instance (checked with dciodvfy in tests/test_dicom_seg.py). The body is a
water-like cylinder (40 HU), the "liver" an ellipsoid of ``LIVER_HU`` inside it, air
(-1000 HU) around; noise is added so that the mean HU is a measurement, not a constant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from tests.peers import missing_tools, run_dciodvfy

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
LIVER_HU = 60.0
BODY_HU = 40.0
AIR_HU = -1000.0
RESCALE_INTERCEPT = -1024.0


def assert_dciodvfy_clean(path: Path) -> None:
    """Assert that dciodvfy reports no error on ``path`` (skip where it is not installed)."""
    if missing_tools("dciodvfy"):
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    assert run_dciodvfy(path) == []


@dataclass(frozen=True)
class CTPhantom:
    """A synthetic CT series and the mask of its ellipsoid.

    ``datasets`` are in the order they would arrive (shuffled when asked); ``sorted_datasets``
    are sorted by position along the slice normal, and ``mask[k]`` belongs to
    ``sorted_datasets[k]``. ``ellipsoid_ml`` is the analytical volume of the ellipsoid.
    """

    datasets: list[Dataset]
    sorted_datasets: list[Dataset]
    mask: np.ndarray
    ellipsoid_ml: float
    voxel_ml: float


def _ellipsoid(
    shape: tuple[int, int, int],
    center_mm: tuple[float, float, float],
    radii_mm: tuple[float, float, float],
    spacing_mm: tuple[float, float, float],
) -> np.ndarray:
    """Return a (z, y, x) uint8 mask of an axis-aligned ellipsoid (sampled at voxel centres)."""
    zz, yy, xx = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(shape, spacing_mm, strict=True)), indexing="ij"
    )
    inside = (
        ((zz - center_mm[0]) / radii_mm[0]) ** 2
        + ((yy - center_mm[1]) / radii_mm[1]) ** 2
        + ((xx - center_mm[2]) / radii_mm[2]) ** 2
    ) <= 1.0
    return inside.astype(np.uint8)


def make_ct_phantom(
    *,
    slices: int = 12,
    size: int = 64,
    pixel_spacing_mm: float = 2.0,
    slice_spacing_mm: float = 4.0,
    radii_mm: tuple[float, float, float] = (18.0, 30.0, 40.0),
    study_instance_uid: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    origin_z_mm: float = -100.0,
    descending: bool = False,
) -> CTPhantom:
    """Return a CT series (``slices`` axial images of ``size`` x ``size``) with an ellipsoid.

    ``radii_mm`` are the (z, y, x) semi-axes of the liver ellipsoid, centred in the volume.
    With ``descending`` the InstanceNumbers run against the slice position (as in many
    scanners' feet-first series), which an ordering by InstanceNumber would get wrong.
    """
    rng = np.random.default_rng(seed)
    spacing = (slice_spacing_mm, pixel_spacing_mm, pixel_spacing_mm)
    shape = (slices, size, size)
    middle_mm = (size - 1) * pixel_spacing_mm / 2.0
    center = ((slices - 1) * slice_spacing_mm / 2.0, middle_mm, middle_mm)
    mask = _ellipsoid(shape, center, radii_mm, spacing)
    body = _ellipsoid(shape, center, (1e6, size * 0.45 * 2.0, size * 0.48 * 2.0), spacing)
    hu = np.where(body > 0, BODY_HU, AIR_HU)
    hu = np.where(mask > 0, LIVER_HU, hu) + rng.normal(0.0, 8.0, size=shape)

    study = study_instance_uid or generate_uid()
    series = generate_uid()
    frame_of_reference = generate_uid()
    datasets: list[Dataset] = []
    for k in range(slices):
        stored = np.round(hu[k] - RESCALE_INTERCEPT).clip(0, 4095).astype(np.uint16)
        z = origin_z_mm + k * slice_spacing_mm
        instance_number = slices - k if descending else k + 1
        datasets.append(
            _ct_slice(
                stored,
                study=study,
                series=series,
                frame_of_reference=frame_of_reference,
                position=(-size * pixel_spacing_mm / 2.0, -size * pixel_spacing_mm / 2.0, z),
                pixel_spacing_mm=pixel_spacing_mm,
                slice_thickness_mm=slice_spacing_mm,
                instance_number=instance_number,
            )
        )
    arrived = list(datasets)
    if shuffle:
        random.Random(seed).shuffle(arrived)
    voxel_ml = slice_spacing_mm * pixel_spacing_mm * pixel_spacing_mm / 1000.0
    ellipsoid_ml = 4.0 / 3.0 * np.pi * float(np.prod(radii_mm)) / 1000.0
    return CTPhantom(arrived, datasets, mask, ellipsoid_ml, voxel_ml)


def _ct_slice(
    stored: np.ndarray,
    *,
    study: str,
    series: str,
    frame_of_reference: str,
    position: tuple[float, float, float],
    pixel_spacing_mm: float,
    slice_thickness_mm: float,
    instance_number: int,
) -> Dataset:
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.ContentDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101530"
    ds.AccessionNumber = "SYNACC0002"
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic abdomen CT"
    ds.SeriesDescription = "Synthetic phantom"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYN0002"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.KVP = "120"
    ds.SliceThickness = slice_thickness_mm
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = position[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 50
    ds.WindowWidth = 400
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    return ds
