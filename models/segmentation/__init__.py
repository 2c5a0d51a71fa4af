"""Liver segmentation on CT: series to volume, 3-D U-Net inference, measurement, training.

Conventions every caller relies on (the DICOM SEG and SR writers in particular):

**Volume** -- :func:`load_ct_series` turns the datasets of one CT series (any order) into a
:class:`CtVolume`:

* ``hu``: float32 Hounsfield units (Rescale Slope/Intercept applied), shape ``(z, y, x)``
  = (slices, Rows, Columns), C-contiguous.
* Slices are sorted by ImagePositionPatient projected on the slice normal
  ``row_direction x column_direction`` (the first and second triplets of
  ImageOrientationPatient), ascending. ``hu[k]`` is the pixel data of the dataset whose SOP
  Instance UID is ``sop_instance_uids[k]``, at ImagePositionPatient ``slice_positions[k]``;
  ``origin`` is ``slice_positions[0]``. :func:`sort_datasets` returns the datasets in that
  order.
* ``hu[k, i, j]`` is row ``i``, column ``j`` of slice ``k``, as stored (no flips, whatever the
  orientation). Its centre in patient coordinates (LPS, mm) is
  ``origin + k*dz*slice_direction + i*dy*column_direction + j*dx*row_direction`` with
  ``spacing = (dz, dy, dx)``: ``dz`` the slice step along the normal, ``dy`` = PixelSpacing[0]
  (between rows), ``dx`` = PixelSpacing[1] (between columns). ``CtVolume.affine`` is that map
  as a 4x4 matrix acting on ``(k, i, j, 1)``.
* Study, Series and Frame of Reference UIDs of the source are kept (Frame of Reference may be
  ``None`` when the source lacks it).

**Mask** -- :meth:`LiverSegmenter.segment <models.segmentation.infer.LiverSegmenter.segment>`
returns a :class:`~models.segmentation.infer.SegmentationResult` whose ``mask`` is uint8
(0 = background, 1 = liver) in the *source* geometry: the same shape ``(z, y, x)`` and axis
order as ``CtVolume.hu``. So ``mask[k]`` is the frame for source dataset ``k`` in sorted order
(``sop_instance_uids[k]``), and ``mask[k, i, j]`` covers row ``i``, column ``j`` of that image.
The segment is :data:`LIVER` (SNOMED CT 10200004 "Liver"). The result also carries
``volume_ml`` (:func:`volume_ml`) and ``mean_hu`` (:func:`mean_hu`, ``None`` for an empty
mask), timings per stage and the model's provenance.

Modules: :mod:`~models.segmentation.volume` (series to volume), :mod:`~.measure` (volume,
mean HU), :mod:`~.phantom` (generated CT phantoms, as arrays, DICOM series or NIfTI),
:mod:`~.preprocess` (source grid to model grid and back), :mod:`~.network` (MONAI 3-D UNet),
:mod:`~.infer` (:class:`~.infer.LiverSegmenter`), :mod:`~.data` (labelled folders),
:mod:`~.train` (demo and folder training) and :mod:`~.evaluate` (Dice, HD95, overlay PNG).
Importing this package loads numpy and pydicom only, never torch.
"""

from models.provenance import CodedLabel
from models.segmentation.measure import mean_hu, volume_ml
from models.segmentation.volume import (
    CT_IMAGE_STORAGE,
    CtVolume,
    SeriesGeometryError,
    load_ct_series,
    sort_datasets,
)

#: The one segment of the liver model (SNOMED CT "Liver", a body structure).
LIVER = CodedLabel("liver", "10200004", "SCT", "Liver")

__all__ = [
    "CT_IMAGE_STORAGE",
    "LIVER",
    "CtVolume",
    "SeriesGeometryError",
    "load_ct_series",
    "mean_hu",
    "sort_datasets",
    "volume_ml",
]
