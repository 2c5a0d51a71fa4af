"""Generated abdominal CT phantoms: test data and the demo liver model's training set.

Nothing here is a real patient. :func:`make_phantom` draws a CT volume in Hounsfield units with
the true liver mask and the liver's known volume; :func:`write_phantom_series` writes it as a
valid CT Image Storage series and :func:`write_phantom_nifti` as a NIfTI image/label pair.

Geometry: the array is ``(z, y, x)`` in the patient frame of an axial, head-first supine scan
(ImageOrientationPatient ``1\\0\\0\\0\\1\\0``): ``x`` increases towards the patient's left,
``y`` towards the back, ``z`` towards the head. Positions are in mm from the volume centre.

Anatomy, painted in this order (later structures cover earlier ones), every size, position and
value drawn at random per phantom:

* **Air and table** -- -1000 HU outside the patient, a 200 HU table under the back.
* **Body** -- an elliptic cross-section 300-370 mm wide and 230-290 mm deep whose size varies
  slowly along ``z``; a subcutaneous fat layer (8-25 mm, about -105 HU), an abdominal wall of
  muscle (about 50 HU) and inside it a cavity of visceral fat mixed with bowel (smooth random
  texture between -95 and 30-70 HU) and a few gas pockets.
* **Spine and ribs** -- a vertebral body (cancellous ~250 HU with a ~750 HU cortex) and spinal
  canal behind the cavity, paraspinal muscles either side, rib cross-sections along the wall
  that come and go with ``z``.
* **Lungs** -- two ellipsoids (about -860 HU) at the top of the volume; where they meet the liver
  a diaphragm of muscle separates them.
* **Vessels** -- the aorta left of and the inferior vena cava right of the spine, along ``z``.
* **Neighbouring organs** -- kidneys (lower than the liver, the right one lowest), the spleen
  (left, back, along the wall, with an attenuation within 15 HU of the liver's, so position and
  shape must be used),
  the stomach (left, front; fluid with an air-fluid level) and the gallbladder (fluid, under the
  liver).
* **Liver** -- a star-shaped solid: an ellipsoid (semi-axes 80-100 x 55-75 x 65-85 mm along
  x, y, z, scaled by 0.85-1.12, turned up to 20 degrees about z and 8 about x and y) whose radius
  in each direction is multiplied by a cubic polynomial of the direction: a tapering left lobe
  plus random low-order bulges and dents (about 950-2200 mL). It lies against the right wall of
  the upper abdomen, anywhere along ``z`` inside the volume, its left lobe ending at most 40% of
  the way from the midline to the left wall (shrunk where it would not fit). Its attenuation is
  that of one of two contrast phases (unenhanced 52-66 HU, portal venous 95-120 HU) with faint
  texture, brighter (venous) or darker (unenhanced) vessels, and in 30% of phantoms a hypodense
  lesion -- all inside the liver mask.
* **Acquisition** -- partial-volume edges (each surface is blended over one voxel) and Gaussian
  noise of 6-20 HU standard deviation.

The liver mask holds the voxels whose centres lie inside the liver surface, and the known volume
is the exact volume of that surface (``det(A)/3`` times the integral of the cubed radius over the
unit sphere, by Gauss-Legendre quadrature), so a correct volume measurement on the true mask
differs from it only by the voxelisation of the surface (well under 1% at 2.5 mm).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from models.segmentation.volume import CT_IMAGE_STORAGE

#: Name and version of this generator, recorded in the demo model's card.
GENERATOR_ID = "models.segmentation.phantom.make_phantom/1"

#: Smallest field of view (mm, z then in-plane) that holds a whole phantom liver.
MIN_FIELD_MM = (180.0, 300.0)

DEFAULT_SHAPE = (100, 512, 512)
DEFAULT_SPACING = (2.0, 0.78125, 0.78125)

_HU_MIN, _HU_MAX = -1024, 3071

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]

# Monomials of degree 1..3 in the direction (wx, wy, wz) used for random liver bulges.
_MONOMIALS: tuple[tuple[int, int, int], ...] = tuple(
    (i, j, k) for i in range(4) for j in range(4) for k in range(4) if 1 <= i + j + k <= 3
)


@dataclass(frozen=True)
class _Star:
    """A star-shaped solid: ``centre + R @ (axes * r(w) * w)`` for unit directions ``w``.

    ``terms`` are (coefficient, exponents) of the polynomial added to 1 to give ``r(w)``
    (clipped to [0.35, 1.7]); an ellipsoid has no terms.
    """

    centre: np.ndarray
    rotation: np.ndarray
    axes: np.ndarray
    terms: tuple[tuple[float, tuple[int, int, int]], ...] = ()

    def radius(self, w: np.ndarray) -> np.ndarray:
        """r(w) for directions ``w`` of shape (3, ...)."""
        r = np.ones(w.shape[1:], dtype=w.dtype)
        for coef, (i, j, k) in self.terms:
            r = r + np.asarray(coef, dtype=w.dtype) * (w[0] ** i) * (w[1] ** j) * (w[2] ** k)
        return np.clip(r, 0.35, 1.7)

    def surface(self, n_theta: int = 24, n_phi: int = 48) -> np.ndarray:
        """Points on the surface (n, 3), from a regular angular grid."""
        theta = np.linspace(0.0, np.pi, n_theta)
        phi = np.linspace(0.0, 2 * np.pi, n_phi, endpoint=False)
        t, p = np.meshgrid(theta, phi, indexing="ij")
        w = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)]).reshape(3, -1)
        local = self.axes[:, None] * self.radius(w)[None, :] * w
        return (self.rotation @ local).T + self.centre[None, :]

    def volume_mm3(self) -> float:
        """Exact volume: det(R diag(axes)) / 3 * integral of r(w)^3 over the unit sphere."""
        mu, weights = _gauss_legendre(160)
        phi = np.linspace(0.0, 2 * np.pi, 320, endpoint=False)
        m, p = np.meshgrid(mu, phi, indexing="ij")
        s = np.sqrt(1.0 - m * m)
        w = np.stack([s * np.cos(p), s * np.sin(p), m])
        integral = float(np.sum(weights[:, None] * self.radius(w) ** 3) * (2 * np.pi / len(phi)))
        return float(np.prod(self.axes)) * integral / 3.0

    def signed_distance(self, dz: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm, positive inside) at offsets from the centre.

        ``dz, dy, dx`` are broadcastable arrays of offsets along z, y, x; the result is exact on
        the surface's zero level, which is all the mask depends on.
        """
        rot = self.rotation.astype(np.float32)
        # world (x, y, z) = rows of R applied to local; local = R^T @ world
        world = (dx, dy, dz)
        local = [sum(rot[a, i] * world[a] for a in range(3)) for i in range(3)]
        u = [local[i] / np.float32(self.axes[i]) for i in range(3)]
        rho = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2]) + np.float32(1e-6)
        w = np.stack(np.broadcast_arrays(u[0] / rho, u[1] / rho, u[2] / rho))
        reach = np.sqrt(sum((np.float32(self.axes[i]) * w[i]) ** 2 for i in range(3)))
        return ((self.radius(w) - rho) * reach).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return nodes, weights


def _rotation(rng: np.random.Generator, about_z: float, tilt: float) -> np.ndarray:
    """Random rotation: up to ``about_z`` degrees about z and ``tilt`` about x and y."""
    az = np.deg2rad(rng.uniform(-about_z, about_z))
    ax = np.deg2rad(rng.uniform(-tilt, tilt))
    ay = np.deg2rad(rng.uniform(-tilt, tilt))
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rz @ rx @ ry


class _Canvas:
    """The HU volume being painted and its coordinates (mm from the centre)."""

    def __init__(self, shape: Shape3, spacing: Spacing3) -> None:
        self.shape = shape
        self.spacing = spacing
        self.z, self.y, self.x = (
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(s))
            for n, s in zip(shape, spacing, strict=True)
        )
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        # Blend width of a surface: one voxel, from the mean spacing.
        self.edge = float(np.cbrt(np.prod(spacing)))

    def box(
        self, lo: Sequence[float], hi: Sequence[float]
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index slices and coordinates of the voxels with lo <= (z, y, x) <= hi (mm)."""
        slices = []
        coords = []
        for axis, values in enumerate((self.z, self.y, self.x)):
            start = int(np.searchsorted(values, lo[axis] - self.edge, side="left"))
            stop = int(np.searchsorted(values, hi[axis] + self.edge, side="right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
            coords.append(values[start:stop])
        return (
            (slices[0], slices[1], slices[2]),
            coords[0][:, None, None],
            coords[1][None, :, None],
            coords[2][None, None, :],
        )

    def weight(self, distance: np.ndarray) -> np.ndarray:
        """Partial-volume weight of a voxel at a signed distance (mm) from a surface."""
        return np.clip(0.5 + distance / np.float32(self.edge), 0.0, 1.0)

    def paint(
        self,
        where: tuple[slice, slice, slice],
        weight: np.ndarray,
        value: float | np.ndarray,
    ) -> None:
        """Blend ``value`` into the box ``where`` with ``weight`` in [0, 1]."""
        region = self.hu[where]
        region += weight * (np.asarray(value, dtype=np.float32) - region)

    def star_distance(
        self, star: _Star, grow: float = 0.0
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Box around a star-shaped solid (grown by ``grow`` mm) and the distance inside it."""
        pts = star.surface()
        lo = pts.min(axis=0) - grow
        hi = pts.max(axis=0) + grow
        found = self.box((lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0]))
        if found is None:
            return None
        where, z, y, x = found
        c = star.centre.astype(np.float32)
        dist = star.signed_distance(z - c[2], y - c[1], x - c[0])
        dist += np.float32(grow)
        return where, dist

    def paint_star(
        self, star: _Star, value: float
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Paint a star-shaped solid with one value; return its box and distance."""
        found = self.star_distance(star)
        if found is not None:
            where, dist = found
            self.paint(where, self.weight(dist), value)
        return found


def _blur_matrix(n: int, spacing: float, cell: float) -> np.ndarray:
    """Gaussian interpolation weights (n, m) from a coarse grid of ``cell`` mm to ``n`` voxels."""
    pos = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing
    grid = np.arange(pos[0] - 2 * cell, pos[-1] + 2 * cell + 1e-9, cell)
    weights = np.exp(-0.5 * ((pos[:, None] - grid[None, :]) / cell) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, shape: Shape3, spacing: Spacing3, cell_mm: float
) -> np.ndarray:
    """Smooth random field (z, y, x) with features of about ``cell_mm``, mean 0 and std 1."""
    wz, wy, wx = (_blur_matrix(n, s, cell_mm) for n, s in zip(shape, spacing, strict=True))
    coarse = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1])).astype(np.float32)
    field = np.einsum("ia,abc->ibc", wz, coarse)
    field = np.einsum("jb,ibc->ijc", wy, field)
    field = np.einsum("kc,ijc->ijk", wx, field)
    field -= field.mean()
    std = float(field.std())
    return field / np.float32(std) if std > 0 else field


def _check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[Shape3, Spacing3]:
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError("shape and spacing must each hold three values (z, y, x)")
    shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    spc = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    if min(shp) < 8:
        raise ValueError(f"shape must be at least 8 voxels along every axis, got {shp}")
    if not all(np.isfinite(s) and 0.1 <= s <= 20.0 for s in spc):
        raise ValueError(f"spacing must be between 0.1 and 20 mm, got {spc}")
    field_z = shp[0] * spc[0]
    field_yx = min(shp[1] * spc[1], shp[2] * spc[2])
    if field_z < MIN_FIELD_MM[0] or field_yx < MIN_FIELD_MM[1]:
        raise ValueError(
            f"field of view {field_z:.0f} x {shp[1] * spc[1]:.0f} x {shp[2] * spc[2]:.0f} mm is "
            f"too small for a whole liver: at least {MIN_FIELD_MM[0]:.0f} mm along z and "
            f"{MIN_FIELD_MM[1]:.0f} mm in-plane are needed"
        )
    return shp, spc


def _liver(
    rng: np.random.Generator,
    canvas: _Canvas,
    cavity: tuple[float, float, float, float],
) -> _Star:
    """Draw a liver that lies in the right upper abdomen, inside the cavity and the volume."""
    cx0, cy0, ax_in, ay_in = cavity
    z_half = (canvas.shape[0] - 1) / 2.0 * canvas.spacing[0] - 2.0 * canvas.spacing[0]
    scale = rng.uniform(0.85, 1.12)
    base_axes = np.array([rng.uniform(80, 100), rng.uniform(55, 75), rng.uniform(65, 85)])
    terms: list[tuple[float, tuple[int, int, int]]] = [
        # thinner towards the patient's left (+x): the left lobe tapers to a tip
        (-rng.uniform(0.35, 0.7), (1, 2, 0)),
        (-rng.uniform(0.35, 0.7), (1, 0, 2)),
        # flatter underside and back
        (-rng.uniform(0.05, 0.2), (0, 0, 2)),
        (-rng.uniform(0.0, 0.15), (0, 2, 0)),
    ]
    terms += [(float(rng.normal(0.0, 0.05)), mono) for mono in _MONOMIALS]
    rotation = _rotation(rng, 20.0, 8.0)
    for _ in range(12):
        shape = _Star(np.zeros(3), rotation, base_axes * scale, tuple(terms))
        rel = shape.surface()
        lo, hi = rel.min(axis=0), rel.max(axis=0)
        if hi[2] - lo[2] < 2 * z_half:
            for _ in range(40):
                # against the right wall, somewhat anterior, anywhere along z that fits
                centre = np.array(
                    [
                        cx0 - (ax_in - 4.0) - lo[0] + rng.uniform(0.0, 25.0),
                        cy0 + rng.uniform(-0.3, 0.1) * ay_in,
                        rng.uniform(-z_half - lo[2], z_half - hi[2]),
                    ]
                )
                pts = rel + centre[None, :]
                inside = ((pts[:, 0] - cx0) / (ax_in - 4.0)) ** 2 + (
                    (pts[:, 1] - cy0) / (ay_in - 4.0)
                ) ** 2
                # the left lobe ends a little left of the midline, short of the spleen
                if np.all(inside <= 1.0) and pts[:, 0].max() <= cx0 + 0.4 * ax_in:
                    return _Star(centre, rotation, base_axes * scale, tuple(terms))
        scale *= 0.95
    raise ValueError("could not place a liver inside this field of view")  # pragma: no cover


def make_phantom(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw one abdominal CT phantom (see the module docstring for the model).

    ``shape`` and ``spacing`` are (z, y, x) in voxels and mm; the field of view must be at least
    180 mm along z and 300 mm in-plane. Returns the volume in HU (int16, (z, y, x)), the true
    liver mask (uint8, 1 = liver) and the liver's known volume in mL.
    """
    shp, spc = _check_geometry(shape, spacing)
    canvas = _Canvas(shp, spc)
    z, y, x = canvas.z[:, None, None], canvas.y[None, :, None], canvas.x[None, None, :]
    venous = bool(rng.random() < 0.6)

    # --- body -------------------------------------------------------------------------------
    field_x = shp[2] * spc[2]
    field_y = shp[1] * spc[1]
    bx = min(rng.uniform(150, 185), 0.47 * field_x)
    by = min(rng.uniform(115, 145), 0.47 * field_y - 12.0)
    cx0 = rng.uniform(-8, 8)
    cy0 = rng.uniform(-10, 5)
    wobble = 1.0 + 0.04 * np.sin(
        z * np.float32(2 * np.pi / rng.uniform(250, 500)) + rng.uniform(0, 6.3)
    )
    fat = rng.uniform(8, 25)
    wall = rng.uniform(8, 13)

    def ellipse_distance(ax: float, ay: float) -> np.ndarray:
        r = np.sqrt(((x - cx0) / (ax * wobble)) ** 2 + ((y - cy0) / (ay * wobble)) ** 2)
        return (1.0 - r) * np.float32(min(ax, ay))

    table_top = cy0 + by + 10.0
    table = (y >= table_top) & (y <= table_top + 12.0) & np.ones_like(z, dtype=bool)
    canvas.hu[np.broadcast_to(table, shp)] = 200.0
    everywhere = (slice(None), slice(None), slice(None))
    canvas.paint(everywhere, canvas.weight(ellipse_distance(bx, by)), rng.uniform(-115, -95))
    canvas.paint(
        everywhere, canvas.weight(ellipse_distance(bx - fat, by - fat)), rng.uniform(45, 55)
    )
    ax_in, ay_in = bx - fat - wall, by - fat - wall
    texture = _smooth_field(rng, shp, spc, rng.uniform(9, 15))
    bowel_hu = rng.uniform(55, 75) if venous else rng.uniform(25, 40)
    mix = np.clip(0.5 + (texture - rng.uniform(-0.4, 0.3)) / 0.6, 0.0, 1.0)
    cavity_hu = -95.0 + mix * (bowel_hu + 95.0)
    gas = _smooth_field(rng, shp, spc, 8.0) > rng.uniform(2.2, 2.8)
    cavity_hu[gas] = -1000.0
    canvas.paint(everywhere, canvas.weight(ellipse_distance(ax_in, ay_in)), cavity_hu)
    del texture, mix, cavity_hu, gas

    # --- spine, paraspinal muscles and ribs ---------------------------------------------------
    spine_y = cy0 + ay_in - rng.uniform(18, 26)
    vert_r = rng.uniform(16, 21)
    for side in (-1.0, 1.0):
        d = (
            1.0
            - np.sqrt(((x - cx0 - side * 32.0) / 24.0) ** 2 + ((y - spine_y - 18.0) / 20.0) ** 2)
        ) * 20.0
        canvas.paint(everywhere, canvas.weight(d), rng.uniform(45, 55))
    rr = np.sqrt((x - cx0) ** 2 + (y - spine_y) ** 2)
    canvas.paint(everywhere, canvas.weight(vert_r - rr), rng.uniform(700, 850))
    canvas.paint(everywhere, canvas.weight(vert_r - 2.5 - rr), rng.uniform(200, 300))
    canal = np.sqrt((x - cx0) ** 2 + (y - spine_y - vert_r - 9.0) ** 2)
    canvas.paint(everywhere, canvas.weight(8.0 - canal), rng.uniform(5, 15))
    rib_period = rng.uniform(28, 36)
    rib_phase = rng.uniform(0, rib_period)
    for angle in np.deg2rad(np.arange(-150, 151, 25) + rng.uniform(-5, 5)):
        if abs(np.rad2deg(angle)) < 40:  # no ribs in front of the abdomen
            continue
        px = cx0 + (bx - fat - wall / 2) * np.sin(angle)
        py = cy0 - (by - fat - wall / 2) * np.cos(angle)
        present = np.cos(2 * np.pi * (z + rib_phase + 0.15 * abs(px)) / rib_period) > 0.3
        d = 5.0 - np.sqrt((x - px) ** 2 + (y - py) ** 2)
        canvas.paint(everywhere, canvas.weight(d) * present, rng.uniform(500, 800))

    # --- liver geometry first: the lungs and other organs are placed around it ----------------
    liver = _liver(rng, canvas, (cx0, cy0, ax_in, ay_in))
    pts = liver.surface()
    liver_top, liver_bottom = float(pts[:, 2].max()), float(pts[:, 2].min())
    liver_hu = rng.uniform(95, 120) if venous else rng.uniform(52, 66)

    # --- lungs --------------------------------------------------------------------------------
    for side in (-1.0, 1.0):
        lung = _Star(
            np.array([cx0 + side * 0.5 * ax_in, cy0 + 10.0, liver_top + rng.uniform(75, 95)]),
            _rotation(rng, 5.0, 3.0),
            np.array([0.42 * ax_in, 0.8 * ay_in, rng.uniform(100, 120)]),
        )
        canvas.paint_star(lung, rng.uniform(-880, -830))

    # --- vessels ------------------------------------------------------------------------------
    aorta_r = rng.uniform(10, 13)
    d = aorta_r - np.sqrt((x - cx0 - 18.0) ** 2 + (y - spine_y + vert_r + aorta_r) ** 2)
    canvas.paint(
        everywhere, canvas.weight(d), rng.uniform(140, 190) if venous else rng.uniform(35, 50)
    )
    d = 11.0 - np.sqrt(((x - cx0 + 22.0) / 1.3) ** 2 + (y - spine_y + vert_r + 10.0) ** 2)
    canvas.paint(
        everywhere, canvas.weight(d), rng.uniform(100, 135) if venous else rng.uniform(35, 45)
    )

    # --- neighbouring organs ------------------------------------------------------------------
    kidney_hu = rng.uniform(140, 190) if venous else rng.uniform(28, 40)
    for side in (-1.0, 1.0):
        drop = rng.uniform(35, 60) if side < 0 else rng.uniform(15, 40)
        kidney = _Star(
            np.array([cx0 + side * rng.uniform(55, 70), spine_y - 5.0, liver_bottom + 30.0 - drop]),
            _rotation(rng, 25.0, 10.0),
            np.array([rng.uniform(24, 30), rng.uniform(20, 26), rng.uniform(48, 58)]),
            ((0.12 * side, (1, 0, 0)),),
        )
        canvas.paint_star(kidney, kidney_hu)
    spleen_hu = liver_hu + (rng.uniform(-5, 15) if venous else rng.uniform(-15, 0))
    spleen_angle = np.deg2rad(rng.uniform(30, 55))
    spleen = _Star(
        np.array([cx0 + 0.7 * ax_in, cy0 + 0.45 * ay_in, liver_top - rng.uniform(35, 55)]),
        np.array(
            [
                [np.cos(spleen_angle), -np.sin(spleen_angle), 0.0],
                [np.sin(spleen_angle), np.cos(spleen_angle), 0.0],
                [0.0, 0.0, 1.0],
            ]
        ),
        np.array([rng.uniform(18, 26), rng.uniform(40, 55), rng.uniform(45, 60)]),
        tuple((float(rng.normal(0.0, 0.06)), mono) for mono in _MONOMIALS[:9]),
    )
    canvas.paint_star(spleen, spleen_hu)
    stomach = _Star(
        np.array([cx0 + 0.3 * ax_in, cy0 - 0.35 * ay_in, liver_top - rng.uniform(30, 55)]),
        _rotation(rng, 25.0, 10.0),
        np.array([rng.uniform(35, 50), rng.uniform(28, 38), rng.uniform(40, 55)]),
    )
    painted = canvas.paint_star(stomach, rng.uniform(40, 60) if venous else rng.uniform(35, 45))
    if painted is not None:
        where, dist = painted
        ys = canvas.y[where[1]][None, :, None]
        level = stomach.centre[1] - rng.uniform(0.2, 0.5) * stomach.axes[1]
        contents = np.where(ys < level, -1000.0, rng.uniform(5, 25)).astype(np.float32)
        canvas.paint(where, canvas.weight(dist - 3.0), contents)
    gallbladder = _Star(
        liver.centre + np.array([rng.uniform(10, 35), -rng.uniform(25, 40), -rng.uniform(35, 50)]),
        _rotation(rng, 30.0, 20.0),
        np.array([rng.uniform(12, 18), rng.uniform(12, 18), rng.uniform(25, 38)]),
    )
    canvas.paint_star(gallbladder, rng.uniform(0, 20))

    # --- diaphragm: muscle between lung and liver ---------------------------------------------
    found = canvas.star_distance(liver)
    if found is None:  # pragma: no cover - _liver placed it inside the volume
        raise ValueError("the liver lies outside the volume")
    where, dist = found
    region = canvas.hu[where]
    lung_side = (region < -500.0) & (dist > -7.0) & (dist < 0.0)
    region[lung_side] = rng.uniform(40, 55)

    # --- liver --------------------------------------------------------------------------------
    box_shape = dist.shape
    sub = (box_shape[0], box_shape[1], box_shape[2])
    sub_spacing = spc
    liver_value = np.full(sub, liver_hu, dtype=np.float32)
    liver_value += 4.0 * _smooth_field(rng, sub, sub_spacing, 6.0)
    vessels = np.abs(_smooth_field(rng, sub, sub_spacing, rng.uniform(10, 16))) < 0.08
    liver_value[vessels] += rng.uniform(30, 60) if venous else -rng.uniform(8, 15)
    if rng.random() < 0.3:
        lesion = _Star(np.zeros(3), np.eye(3), np.full(3, rng.uniform(8, 25)))
        # lesion centre: a random point well inside the liver
        candidates = np.argwhere(dist > lesion.axes[0] + 5.0)
        if len(candidates):
            k, i, j = candidates[int(rng.integers(len(candidates)))]
            zz = canvas.z[where[0]][:, None, None] - canvas.z[where[0]][k]
            yy = canvas.y[where[1]][None, :, None] - canvas.y[where[1]][i]
            xx = canvas.x[where[2]][None, None, :] - canvas.x[where[2]][j]
            ldist = lesion.signed_distance(zz, yy, xx)
            liver_value -= canvas.weight(ldist) * np.float32(rng.uniform(20, 50))
    canvas.paint(where, canvas.weight(dist), liver_value)
    mask = np.zeros(shp, dtype=np.uint8)
    mask[where] = dist >= 0.0

    # --- acquisition --------------------------------------------------------------------------
    noise_sd = np.float32(rng.uniform(6, 20))
    hu = canvas.hu
    hu += noise_sd * rng.standard_normal(shp, dtype=np.float32)
    np.clip(np.rint(hu, out=hu), _HU_MIN, _HU_MAX, out=hu)
    return hu.astype(np.int16), mask, liver.volume_mm3() / 1000.0


def phantom_origin(shape: Sequence[int], spacing: Sequence[float]) -> Spacing3:
    """Patient position (LPS, mm) of voxel [0, 0, 0]: the volume is centred on the table axis.

    ``z`` is placed so the middle slice is at -300 mm (an abdomen below a head-first origin).
    """
    shp, spc = _check_geometry(shape, spacing)
    return (
        -(shp[2] - 1) / 2.0 * spc[2],
        -(shp[1] - 1) / 2.0 * spc[1],
        -300.0 - (shp[0] - 1) / 2.0 * spc[0],
    )


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def write_phantom_series(
    out_dir: Path,
    *,
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    signed: bool = False,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_datetime: datetime | None = None,
) -> list[Path]:
    """Write the phantom of ``seed`` as a CT Image Storage series; return the files, foot first.

    The phantom is ``make_phantom(np.random.default_rng(seed), shape, spacing)``, so a caller
    gets its truth (mask, known volume) by calling that. Slices are axial, head-first supine,
    named ``CT0001.dcm`` upwards. Pixel data is unsigned 12-bit with Rescale Intercept -1024
    (``signed=False``, the common encoding) or signed 16-bit with intercept 0. The patient is
    synthetic (``SYNTHETIC^PHANTOM``, ID ``PHANTOM-<seed>`` unless given); UIDs not given are new.
    Each file has the SOP Common, Patient, General Study, General Series, Frame of Reference,
    General Equipment, General Image, Image Plane, Image Pixel, CT Image and VOI LUT modules.
    """
    shp, spc = _check_geometry(shape, spacing)
    hu, _mask, _known = make_phantom(np.random.default_rng(seed), shp, spc)
    origin = phantom_origin(shp, spc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    when = study_datetime or datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    study = study_uid or generate_uid()
    series = series_uid or generate_uid()
    frame = frame_of_reference_uid or generate_uid()
    if signed:
        stored = hu
        intercept, bits, representation = 0, 16, 1
    else:
        stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        intercept, bits, representation = -1024, 12, 0
    paths = []
    for k in range(shp[0]):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CAREBRIDGE_SYN"
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        # Patient (synthetic)
        ds.PatientName = "SYNTHETIC^PHANTOM"
        ds.PatientID = patient_id or f"PHANTOM-{seed}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        # General Study
        ds.StudyInstanceUID = study
        ds.StudyDate = date
        ds.StudyTime = time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.StudyDescription = "CT ABDOMEN"
        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 2
        ds.SeriesDescription = "ABDOMEN PHANTOM"
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        # Frame of Reference
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "carebridge"
        ds.ManufacturerModelName = "synthetic CT phantom"
        ds.SoftwareVersions = GENERATOR_ID
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = date
        ds.ContentTime = time
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
        ds.DerivationDescription = "synthetic image, no patient"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        # Image Plane
        z = origin[2] + k * spc[0]
        ds.PixelSpacing = [_ds_number(spc[1]), _ds_number(spc[2])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [_ds_number(origin[0]), _ds_number(origin[1]), _ds_number(z)]
        ds.SliceThickness = _ds_number(spc[0])
        ds.SliceLocation = _ds_number(z)
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = shp[1], shp[2]
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = representation
        dtype = "<i2" if signed else "<u2"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype=dtype).tobytes()
        # CT Image
        ds.RescaleIntercept = str(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        # VOI LUT: an abdominal soft-tissue window
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_phantom_nifti(
    out_dir: Path,
    *,
    seed: int,
    name: str | None = None,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> tuple[Path, Path]:
    """Write the phantom of ``seed`` as ``images/<name>.nii.gz`` + ``labels/<name>.nii.gz``.

    This is the folder layout ``train_from_folder(..., labels="nifti")`` reads. The image is
    int16 HU, the label uint8 (1 = liver); both carry the same RAS affine (the LPS geometry of
    :func:`write_phantom_series` with x and y negated). ``name`` defaults to
    ``phantom-<seed>``. Returns (image path, label path).
    """
    import nibabel as nib

    shp, spc = _check_geometry(shape, spacing)
    label_name = name or f"phantom-{seed:04d}"
    if not label_name or "/" in label_name or "\\" in label_name or label_name.startswith("."):
        raise ValueError(f"name must be a plain file name, got {label_name!r}")
    hu, mask, _known = make_phantom(np.random.default_rng(seed), shp, spc)
    origin = phantom_origin(shp, spc)
    affine = np.diag([-spc[2], -spc[1], spc[0], 1.0])
    affine[:3, 3] = (-origin[0], -origin[1], origin[2])
    out = Path(out_dir)
    paths = []
    for sub, data in (("images", hu), ("labels", mask)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
        image.header.set_xyzt_units("mm")
        path = out / sub / f"{label_name}.nii.gz"
        nib.save(image, path)
        paths.append(path)
    return paths[0], paths[1]
