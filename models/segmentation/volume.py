"""A CT series as one volume: sorted slices, Hounsfield units and patient geometry.

:func:`load_ct_series` is the lenient entry point from the outside world (DICOM datasets in
any order); :class:`CtVolume` is the validated result. The axis and ordering conventions are
described in :mod:`models.segmentation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import UID

#: CT Image Storage SOP Class (single-frame CT).
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

#: Direction cosines that differ by more than this between slices are a different orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Slice positions off the normal line by more than this (mm) mean a tilted gantry.
TILT_TOLERANCE_MM = 0.05
#: A slice step may differ from the median step by this fraction (plus 0.02 mm for rounding).
SPACING_TOLERANCE = 0.02

Vector3 = tuple[float, float, float]

_AXIAL: tuple[Vector3, Vector3] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


class SeriesGeometryError(ValueError):
    """The datasets cannot be turned into one regular CT volume.

    ``reason`` is a short machine-readable code (``empty``, ``not_ct``, ``mixed_series``,
    ``missing_attribute``, ``inconsistent_size``, ``mixed_orientation``, ``duplicate_slices``,
    ``gantry_tilt``, ``missing_slices``, ``non_uniform_spacing``, ``pixel_data``); the message
    says what is wrong in words.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _unit(vector: Sequence[float], name: str) -> Vector3:
    arr = np.asarray(vector, dtype=np.float64)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be three finite numbers, got {vector!r}")
    norm = float(np.linalg.norm(arr))
    if abs(norm - 1.0) > 1e-3:
        raise ValueError(f"{name} must be a unit vector, got length {norm:.4f}")
    arr = arr / norm
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True, eq=False)
class CtVolume:
    """One CT volume in Hounsfield units with the geometry of its source series.

    ``hu`` is float32 ``(z, y, x)``; ``spacing`` is ``(dz, dy, dx)`` in mm; ``origin`` is the
    patient position (LPS, mm) of the centre of voxel ``[0, 0, 0]``; ``row_direction`` and
    ``column_direction`` are ImageOrientationPatient (directions of increasing column ``x`` and
    row ``y``) and ``slice_direction`` their cross product, the direction of increasing ``z``.
    ``sop_instance_uids`` and ``slice_positions`` list the source slices in array order; both
    are empty for a volume that did not come from DICOM (see :meth:`from_array`).
    """

    hu: np.ndarray
    spacing: Vector3
    origin: Vector3
    row_direction: Vector3 = _AXIAL[0]
    column_direction: Vector3 = _AXIAL[1]
    sop_instance_uids: tuple[str, ...] = ()
    slice_positions: tuple[Vector3, ...] = ()
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    slice_direction: Vector3 = field(init=False)

    def __post_init__(self) -> None:
        hu = self.hu
        if not isinstance(hu, np.ndarray) or hu.dtype != np.float32 or hu.ndim != 3:
            raise TypeError("CtVolume.hu must be a 3-D float32 numpy array (z, y, x)")
        if min(hu.shape) < 1:
            raise ValueError(f"CtVolume.hu must not be empty, got shape {hu.shape}")
        if not hu.flags.c_contiguous:
            raise ValueError("CtVolume.hu must be C-contiguous (use np.ascontiguousarray)")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"CtVolume.spacing must be three positive mm values, got {spacing}")
        origin = tuple(float(v) for v in self.origin)
        if len(origin) != 3 or not all(np.isfinite(v) for v in origin):
            raise ValueError(f"CtVolume.origin must be three finite mm values, got {origin}")
        row = _unit(self.row_direction, "row_direction")
        col = _unit(self.column_direction, "column_direction")
        if abs(float(np.dot(row, col))) > 1e-3:
            raise ValueError("row_direction and column_direction must be orthogonal")
        normal = np.cross(row, col)
        normal /= np.linalg.norm(normal)
        n_slices = hu.shape[0]
        if self.sop_instance_uids and len(self.sop_instance_uids) != n_slices:
            raise ValueError(
                f"{len(self.sop_instance_uids)} SOP Instance UIDs for {n_slices} slices"
            )
        if len(set(self.sop_instance_uids)) != len(self.sop_instance_uids):
            raise ValueError("sop_instance_uids must be unique")
        positions = tuple(tuple(float(v) for v in p) for p in self.slice_positions)
        if positions and (len(positions) != n_slices or any(len(p) != 3 for p in positions)):
            raise ValueError(f"slice_positions must hold one (x, y, z) per slice ({n_slices})")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "row_direction", row)
        object.__setattr__(self, "column_direction", col)
        object.__setattr__(self, "slice_positions", positions)
        object.__setattr__(
            self, "slice_direction", (float(normal[0]), float(normal[1]), float(normal[2]))
        )

    @classmethod
    def from_array(
        cls,
        hu: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        row_direction: Sequence[float] = _AXIAL[0],
        column_direction: Sequence[float] = _AXIAL[1],
    ) -> CtVolume:
        """A volume from an array in HU (converted to C-contiguous float32), no DICOM source."""
        arr = np.ascontiguousarray(hu, dtype=np.float32)
        return cls(
            hu=arr,
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            origin=(float(origin[0]), float(origin[1]), float(origin[2])),
            row_direction=(
                float(row_direction[0]),
                float(row_direction[1]),
                float(row_direction[2]),
            ),
            column_direction=(
                float(column_direction[0]),
                float(column_direction[1]),
                float(column_direction[2]),
            ),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def axis_directions(self) -> np.ndarray:
        """3x3 array whose rows are the patient directions of array axes z, y and x."""
        return np.array([self.slice_direction, self.column_direction, self.row_direction])

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping ``(k, i, j, 1)`` (slice, row, column) to LPS mm."""
        out = np.eye(4)
        out[:3, :3] = (self.axis_directions * np.asarray(self.spacing)[:, None]).T
        out[:3, 3] = self.origin
        return out


def _require(ds: pydicom.Dataset, keyword: str, index: int) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise SeriesGeometryError(
            "missing_attribute",
            f"slice {index} (in the order given) has no {keyword}: the series cannot be placed "
            "in patient space",
        )
    return value


def _numbers(ds: pydicom.Dataset, keyword: str, index: int, count: int) -> np.ndarray:
    """A multi-valued numeric attribute as float64, checked for count and finiteness."""
    value = _require(ds, keyword, index)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise SeriesGeometryError(
            "missing_attribute",
            f"slice {index} (in the order given) has a malformed {keyword} "
            f"({count} numbers expected)",
        )
    return arr


def _same_uid(datasets: Sequence[pydicom.Dataset], keyword: str, reason: str) -> str | None:
    values = {str(ds.get(keyword, "") or "") for ds in datasets}
    present = values - {""}
    if len(present) > 1 or (present and "" in values):
        raise SeriesGeometryError(
            reason,
            f"the datasets hold {len(values)} different {keyword} values: "
            "give the slices of exactly one series",
        )
    return next(iter(present)) if present else None


def _check_ct(datasets: Sequence[pydicom.Dataset]) -> None:
    for index, ds in enumerate(datasets):
        sop_class = str(ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", ""))
        if sop_class != CT_IMAGE_STORAGE or modality != "CT":
            name = UID(sop_class).name if sop_class else "no SOP Class UID"
            raise SeriesGeometryError(
                "not_ct",
                f"slice {index} (in the order given) is {name} with Modality "
                f"{modality or 'missing'!r}: single-frame CT Image Storage is expected",
            )
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesGeometryError(
                "not_ct", f"slice {index} (in the order given) is multi-frame: not supported"
            )
        if "PixelData" not in ds:
            raise SeriesGeometryError(
                "missing_attribute", f"slice {index} (in the order given) has no Pixel Data"
            )


def _orientation(datasets: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    orientations = []
    for index, ds in enumerate(datasets):
        orientations.append(_numbers(ds, "ImageOrientationPatient", index, 6))
    first = orientations[0]
    differing = sum(
        1 for iop in orientations if np.max(np.abs(iop - first)) > ORIENTATION_TOLERANCE
    )
    if differing:
        raise SeriesGeometryError(
            "mixed_orientation",
            f"{differing} of {len(datasets)} slices have an ImageOrientationPatient different "
            "from the first: the series mixes orientations (e.g. a localizer or a reformat) "
            "and is not one volume",
        )
    row, col = first[:3], first[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3:
        raise SeriesGeometryError(
            "missing_attribute", "ImageOrientationPatient does not hold unit direction cosines"
        )
    if abs(float(np.dot(row, col))) > 1e-3:
        raise SeriesGeometryError(
            "missing_attribute", "ImageOrientationPatient row and column are not orthogonal"
        )
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _in_plane(datasets: Sequence[pydicom.Dataset]) -> tuple[int, int, float, float]:
    sizes = set()
    spacings = set()
    for index, ds in enumerate(datasets):
        rows = int(_require(ds, "Rows", index))
        cols = int(_require(ds, "Columns", index))
        pair = tuple(round(float(v), 6) for v in _numbers(ds, "PixelSpacing", index, 2))
        if not all(v > 0 for v in pair):
            raise SeriesGeometryError(
                "missing_attribute",
                f"slice {index} (in the order given) has an invalid PixelSpacing {pair}",
            )
        sizes.add((rows, cols))
        spacings.add(pair)
    if len(sizes) > 1 or len(spacings) > 1:
        raise SeriesGeometryError(
            "inconsistent_size",
            f"the slices differ in size {sorted(sizes)} or PixelSpacing {sorted(spacings)}: "
            "they are not one volume",
        )
    (rows, cols), (dy, dx) = sizes.pop(), spacings.pop()
    return rows, cols, dy, dx


def _slice_step(
    datasets: Sequence[pydicom.Dataset],
    positions: np.ndarray,
    along: np.ndarray,
    normal: np.ndarray,
) -> float:
    """Check positions form one straight, evenly spaced stack along ``normal``; return the step."""
    if len(datasets) == 1:
        ds = datasets[0]
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):
            value = ds.get(keyword)
            if value not in (None, "") and float(value) > 0:
                return float(value)
        raise SeriesGeometryError(
            "missing_attribute",
            "a single-slice series needs SliceThickness or SpacingBetweenSlices for its depth",
        )
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise SeriesGeometryError(
            "duplicate_slices",
            f"{int(np.sum(steps < 1e-3))} slice(s) share a position with another slice: "
            "the series holds duplicates or more than one stack",
        )
    lateral = positions - positions[0] - np.outer(along - along[0], normal)
    offset = float(np.max(np.linalg.norm(lateral, axis=1)))
    if offset > TILT_TOLERANCE_MM:
        extent = float(along[-1] - along[0])
        angle = float(np.degrees(np.arctan2(offset, extent)))
        tilt = datasets[0].get("GantryDetectorTilt")
        stated = f" (Gantry/Detector Tilt {float(tilt):g} deg)" if tilt not in (None, "") else ""
        raise SeriesGeometryError(
            "gantry_tilt",
            f"slice positions drift {offset:.2f} mm sideways over {extent:.1f} mm, about "
            f"{angle:.1f} deg off the slice normal{stated}: gantry-tilted series must be "
            "resampled to an untilted grid before segmentation",
        )
    median = float(np.median(steps))
    tolerance = SPACING_TOLERANCE * median + 0.02
    bad = np.flatnonzero(np.abs(steps - median) > tolerance)
    if bad.size:
        gaps = [
            (float(along[k]), float(along[k + 1]), round(float(steps[k] / median)) - 1) for k in bad
        ]
        if all(
            n >= 1 and abs(steps[k] - (n + 1) * median) <= tolerance * (n + 1)
            for k, (_, _, n) in zip(bad, gaps, strict=True)
        ):
            missing = sum(n for _, _, n in gaps)
            where = ", ".join(f"{a:.2f}..{b:.2f} mm" for a, b, _ in gaps[:3])
            raise SeriesGeometryError(
                "missing_slices",
                f"{missing} slice(s) missing from the series (slice step {median:.3f} mm; gaps "
                f"along the normal at {where}): wait for the whole series or resend it",
            )
        raise SeriesGeometryError(
            "non_uniform_spacing",
            f"slice steps range from {float(steps.min()):.3f} to {float(steps.max()):.3f} mm "
            f"(median {median:.3f} mm): a volume needs evenly spaced slices",
        )
    # The mean step over the stack is more precise than any single rounded step.
    return float((along[-1] - along[0]) / (len(along) - 1))


def sort_order(datasets: Sequence[pydicom.Dataset]) -> list[int]:
    """Indices of ``datasets`` sorted along the slice normal (the :class:`CtVolume` order)."""
    row, col = _orientation(datasets)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = [
        float(_numbers(ds, "ImagePositionPatient", i, 3) @ normal) for i, ds in enumerate(datasets)
    ]
    return sorted(range(len(datasets)), key=lambda i: along[i])


def sort_datasets(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """``datasets`` in the order of :func:`load_ct_series` (``mask[k]`` belongs to item ``k``)."""
    return [datasets[i] for i in sort_order(datasets)]


def _decode(ds: pydicom.Dataset, index: int) -> np.ndarray:
    """The stored values of one slice (2-D), as pydicom decodes them."""
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if tsuid is None:
            # Datasets built in memory without file meta: let pydicom work out the encoding.
            stored = ds.pixel_array
        else:
            # get_decoder does not cache the decoded array on the dataset (ds.pixel_array
            # would), so a 600-slice series is never held twice.
            stored, _ = get_decoder(tsuid).as_array(ds)
    except Exception as exc:
        raise SeriesGeometryError(
            "pixel_data",
            f"cannot decode the pixel data of slice {index} (transfer syntax "
            f"{tsuid or 'unknown'}): {type(exc).__name__}",
        ) from exc
    if stored.ndim != 2:
        raise SeriesGeometryError(
            "pixel_data", f"slice {index} decodes to shape {stored.shape}, expected 2-D"
        )
    return stored


def _integral_rescale(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """Rescale Slope and Intercept when float32 arithmetic gives pydicom's HU exactly.

    That is when no Modality LUT Sequence is present and both are integers small enough
    that every stored value (at most 16 bits) times the slope plus the intercept stays
    below 2**24: then each step is exact in float32, as it is in the float64 of
    :func:`~pydicom.pixels.apply_modality_lut`. ``None`` otherwise.
    """
    if ds.get("ModalityLUTSequence") or "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return None
    try:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    except (TypeError, ValueError):
        return None
    if not (slope.is_integer() and intercept.is_integer()):
        return None
    if abs(slope) > 2**7 or abs(intercept) > 2**23:
        return None
    return slope, intercept


def _to_hu(stored: np.ndarray, ds: pydicom.Dataset, out: np.ndarray) -> None:
    """Write the HU (float32) of one slice's stored values into ``out``.

    The common CT case (integral Rescale Slope and Intercept) is computed in float32 in
    place, which gives the same values as pydicom's float64 rescale without its
    temporary arrays; anything else goes through :func:`apply_modality_lut`.
    """
    rescale = _integral_rescale(ds) if stored.itemsize <= 2 else None
    if rescale is None:
        out[...] = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        return
    slope, intercept = rescale
    np.multiply(stored, np.float32(slope), out=out, dtype=np.float32)
    out += np.float32(intercept)


def load_ct_series(datasets: Sequence[pydicom.Dataset]) -> CtVolume:
    """Turn the datasets of one CT series (any order) into a :class:`CtVolume` in HU.

    Slices are sorted by ImagePositionPatient along the normal of ImageOrientationPatient; the
    slice step is the mean step (the single-slice depth is SliceThickness). Each slice's Rescale
    Slope/Intercept (or Modality LUT) is applied. Raises :class:`SeriesGeometryError` when the
    datasets are empty, not single-frame CT Image Storage, from more than one series or Frame of
    Reference, lack geometry, differ in size or orientation, repeat a position, come from a
    tilted gantry, miss slices or are unevenly spaced, or cannot be decoded.
    """
    if not datasets:
        raise SeriesGeometryError("empty", "no datasets given: a CT series needs slices")
    _check_ct(datasets)
    series_uid = _same_uid(datasets, "SeriesInstanceUID", "mixed_series")
    study_uid = _same_uid(datasets, "StudyInstanceUID", "mixed_series")
    for_uid = _same_uid(datasets, "FrameOfReferenceUID", "mixed_series")
    sop_uids = [str(_require(ds, "SOPInstanceUID", i)) for i, ds in enumerate(datasets)]
    if len(set(sop_uids)) != len(sop_uids):
        raise SeriesGeometryError(
            "duplicate_slices", "a SOP Instance UID appears more than once among the datasets"
        )
    rows, cols, dy, dx = _in_plane(datasets)
    row, col = _orientation(datasets)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.stack(
        [_numbers(ds, "ImagePositionPatient", i, 3) for i, ds in enumerate(datasets)]
    )
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    ordered = [datasets[int(i)] for i in order]
    dz = _slice_step(ordered, positions, positions @ normal, normal)

    hu = np.empty((len(ordered), rows, cols), dtype=np.float32)
    for k, ds in enumerate(ordered):
        stored = _decode(ds, int(order[k]))
        if stored.shape != (rows, cols):
            raise SeriesGeometryError(
                "inconsistent_size",
                f"slice {int(order[k])} decodes to {stored.shape}, expected {(rows, cols)}",
            )
        _to_hu(stored, ds, hu[k])
    return CtVolume(
        hu=hu,
        spacing=(dz, dy, dx),
        origin=(float(positions[0, 0]), float(positions[0, 1]), float(positions[0, 2])),
        row_direction=(float(row[0]), float(row[1]), float(row[2])),
        column_direction=(float(col[0]), float(col[1]), float(col[2])),
        sop_instance_uids=tuple(sop_uids[int(i)] for i in order),
        slice_positions=tuple((float(p[0]), float(p[1]), float(p[2])) for p in positions),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
    )
