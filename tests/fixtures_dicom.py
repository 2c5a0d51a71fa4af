"""Small helpers that make valid, synthetic DICOM source images for tests.

Everything here is synthetic: no real patient data. The CR image is valid against the
Computed Radiography Image IOD (checked with dciodvfy in the SR tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")


def make_cr_dataset(
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    size: int = 64,
    seed: int = 0,
) -> Dataset:
    """Return a synthetic, IOD-valid CR image dataset (``size`` x ``size``, 12-bit)."""
    sop_instance_uid = UID(sop_instance_uid or generate_uid())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.ContentDate = "20240102"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101530"
    ds.AccessionNumber = "SYNACC0001"
    ds.Modality = "CR"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic chest radiograph"
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_cr(path: Path, **kwargs: object) -> Path:
    """Write a synthetic CR (see :func:`make_cr_dataset`) to ``path`` and return it."""
    ds = make_cr_dataset(**kwargs)  # type: ignore[arg-type]
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
