"""Labelled CT cases for training and evaluation: NIfTI pairs or DICOM series with DICOM SEG.

Two folder layouts are read:

* ``labels="nifti"``::

      DATA_DIR/images/<case>.nii.gz     CT in HU (any orientation; scl_slope/inter applied)
      DATA_DIR/labels/<case>.nii.gz     mask on the same grid: non-zero voxels are liver

  (``.nii`` works too). Names must match one to one; an image without a label, or the
  reverse, is an error. Any non-zero label counts as liver, so liver-with-tumour labels (1 and 2,
  as in LiTS or the Medical Segmentation Decathlon) give the whole organ.
* ``labels="seg"``::

      DATA_DIR/<case>/*.dcm             one CT series (single-frame CT Image Storage)
                                         and one DICOM SEG of that series

  The SEG segment used is the one coded SNOMED CT 10200004 (Liver), else the only segment, else
  the one labelled "liver". Frames are matched to the CT slices by SOP Instance UID; slices
  without a frame are empty.

Cases are yielded one at a time so a large folder never sits in memory at full resolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom

from models.segmentation import LIVER
from models.segmentation.phantom import make_phantom, phantom_origin
from models.segmentation.volume import CT_IMAGE_STORAGE, CtVolume, load_ct_series

LabelFormat = Literal["nifti", "seg"]

#: Segmentation Storage SOP Class.
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True, eq=False)
class LabelledCase:
    """One CT volume and its true liver mask (uint8, same shape, source geometry)."""

    name: str
    volume: CtVolume
    mask: np.ndarray

    def __post_init__(self) -> None:
        if self.mask.dtype != np.uint8 or self.mask.shape != self.volume.shape:
            raise ValueError(
                f"case {self.name!r}: mask must be uint8 of the volume's shape "
                f"{self.volume.shape}, got {self.mask.dtype} {self.mask.shape}"
            )


def phantom_case(
    seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> LabelledCase:
    """A generated phantom (:func:`~models.segmentation.phantom.make_phantom`) as a case."""
    hu, mask, _known = make_phantom(np.random.default_rng(seed), shape, spacing)
    volume = CtVolume.from_array(hu, spacing, origin=phantom_origin(shape, spacing))
    return LabelledCase(name=f"phantom-{seed}", volume=volume, mask=mask)


def _nifti_name(path: Path) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_geometry(
    affine: np.ndarray, shape: tuple[int, ...], what: str
) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray, np.ndarray, bool]:
    """(spacing z,y,x; origin LPS; row dir; column dir; flip k) of a RAS NIfTI affine."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3, :4]
    cols = lps[:, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise ValueError(f"{what}: the NIfTI affine is degenerate")
    dirs = cols / spacing
    if (
        abs(dirs[:, 0] @ dirs[:, 1]) > 1e-3
        or abs(dirs[:, 0] @ dirs[:, 2]) > 1e-3
        or abs(dirs[:, 1] @ dirs[:, 2]) > 1e-3
    ):
        raise ValueError(f"{what}: the NIfTI affine is sheared; resample it to an orthogonal grid")
    flip_k = float(np.cross(dirs[:, 0], dirs[:, 1]) @ dirs[:, 2]) < 0
    origin = lps[:, 3].copy()
    if flip_k:
        origin += dirs[:, 2] * spacing[2] * (shape[2] - 1)
    return (
        (float(spacing[2]), float(spacing[1]), float(spacing[0])),
        (float(origin[0]), float(origin[1]), float(origin[2])),
        dirs[:, 0],
        dirs[:, 1],
        flip_k,
    )


def _nifti_array(image: Any, what: str) -> np.ndarray:
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{what}: expected a 3-D NIfTI image, got shape {data.shape}")
    return data


def read_nifti_case(image_path: Path, label_path: Path) -> LabelledCase:
    """One NIfTI image (HU) and its label as a case on the image's own grid."""
    import nibabel as nib

    image: Any = nib.load(str(image_path))
    label: Any = nib.load(str(label_path))
    name = _nifti_name(Path(image_path)) or Path(image_path).name
    data = _nifti_array(image, name)
    spacing, origin, row, col, flip_k = _nifti_geometry(image.affine, data.shape, name)
    labels = _nifti_array(label, f"{name} label")
    if labels.shape != data.shape or not np.allclose(
        label.affine,
        image.affine,
        atol=1e-3,
    ):
        raise ValueError(f"{name}: the label's grid (shape or affine) differs from the image's")
    hu = data.transpose(2, 1, 0)
    mask = labels.transpose(2, 1, 0) != 0
    if flip_k:
        hu, mask = hu[::-1], mask[::-1]
    volume = CtVolume.from_array(hu, spacing, origin, row.tolist(), col.tolist())
    return LabelledCase(name=name, volume=volume, mask=np.ascontiguousarray(mask, dtype=np.uint8))


def _liver_segment(seg: Any, what: str) -> int:
    numbers = seg.get_segment_numbers()
    for number in numbers:
        item = seg.get_segment_description(number)
        prop = item.segmented_property_type
        if prop.value == LIVER.code_value and prop.scheme_designator in ("SCT", "SRT"):
            return int(number)
    if len(numbers) == 1:
        return int(numbers[0])
    for number in numbers:
        if str(seg.get_segment_description(number).segment_label).lower() == "liver":
            return int(number)
    raise ValueError(f"{what}: the DICOM SEG has {len(numbers)} segments and none is the liver")


def read_dicom_seg_case(case_dir: Path) -> LabelledCase:
    """One folder holding a CT series and a DICOM SEG of it, as a case."""
    import highdicom as hd

    case_dir = Path(case_dir)
    ct: list[pydicom.Dataset] = []
    segs: list[Path] = []
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: S112 - not DICOM: README files and the like are skipped
            continue
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class == SEGMENTATION_STORAGE:
            segs.append(path)
        elif sop_class == CT_IMAGE_STORAGE:
            ct.append(pydicom.dcmread(path))
    if not ct or len(segs) != 1:
        raise ValueError(
            f"case {case_dir.name!r}: expected CT slices and exactly one DICOM SEG, found "
            f"{len(ct)} CT slices and {len(segs)} SEG files"
        )
    volume = load_ct_series(ct)
    del ct
    seg = hd.seg.segread(segs[0])
    number = _liver_segment(seg, case_dir.name)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids),
        segment_numbers=[number],
        assert_missing_frames_are_empty=True,
    )
    mask = np.ascontiguousarray(pixels[..., 0] > 0, dtype=np.uint8)
    return LabelledCase(name=case_dir.name, volume=volume, mask=mask)


def nifti_pairs(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, label) for every case of a NIfTI folder, sorted by name."""
    images_dir, labels_dir = Path(data_dir) / "images", Path(data_dir) / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise ValueError(f"{Path(data_dir).name!r} needs images/ and labels/ subfolders")

    def index(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in folder.iterdir():
            name = _nifti_name(path)
            if name is not None and path.is_file():
                found[name] = path
        return found

    images, labels = index(images_dir), index(labels_dir)
    if set(images) != set(labels):
        lonely = sorted(set(images) ^ set(labels))
        raise ValueError(f"images and labels do not match one to one: {lonely[:5]}")
    if not images:
        raise ValueError(f"no NIfTI images in {images_dir.name}/")
    return [(name, images[name], labels[name]) for name in sorted(images)]


def case_names(data_dir: Path, labels: LabelFormat) -> list[str]:
    """The case names of a folder in the order :func:`iter_cases` yields them."""
    if labels == "nifti":
        return [name for name, _, _ in nifti_pairs(data_dir)]
    if labels == "seg":
        names = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
        if not names:
            raise ValueError(f"no case folders in {Path(data_dir).name!r}")
        return names
    raise ValueError(f"labels must be 'nifti' or 'seg', got {labels!r}")


def iter_cases(
    data_dir: Path, labels: LabelFormat, names: list[str] | None = None
) -> Iterator[LabelledCase]:
    """Yield the cases of a folder (all, or those in ``names``) one at a time."""
    wanted = case_names(data_dir, labels) if names is None else names
    if labels == "nifti":
        pairs = {name: (image, label) for name, image, label in nifti_pairs(data_dir)}
        for name in wanted:
            yield read_nifti_case(*pairs[name])
    else:
        for name in wanted:
            yield read_dicom_seg_case(Path(data_dir) / name)
