"""A MONAI bundle as the liver model: what it expects, read from its ``configs/inference.json``.

A bundle's own pre- and post-processing is never executed (config expressions can run any
code). Instead, the values carebridge needs are read from the plain arguments of the usual
transforms of ``preprocessing.transforms`` and of the ``inferer``, and carebridge's own
preprocessing reproduces them:

* ``Orientationd(axcodes=...)``: the axis order and directions the network sees (MONAI's
  convention: ``"RAS"`` means the first axis increases towards the patient's right, the
  second towards anterior, the third towards superior). Default ``RAS``.
* ``Spacingd(pixdim=[...])``: the voxel spacing in mm, in the network's axis order.
* ``ScaleIntensityRanged(a_min, a_max, b_min, b_max)``: the HU window and the range it maps to.
* ``SlidingWindowInferer(roi_size=[...])`` as ``inferer``: the window size.

The network must output a background channel and a liver channel (``channel_def`` in the
metadata, when present, must say so). A value written as an expression (``$...``, ``@...``,
``%...``), or a transform that is missing, refuses the bundle with a message naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.card import ModelLoadError

DEFAULT_AXCODES = "RAS"

# Canonical array axes (z, y, x) point to superior, posterior and the patient's left.
_CANONICAL = {"S": (0, False), "I": (0, True), "P": (1, False), "A": (1, True)}
_CANONICAL |= {"L": (2, False), "R": (2, True)}


@dataclass(frozen=True)
class AxisMap:
    """Between the canonical (z, y, x) array and the axes a network was trained on.

    Network axis ``i`` is canonical axis ``order[i]``, reversed when ``flips[i]``.
    """

    order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def from_axcodes(cls, axcodes: str) -> AxisMap:
        codes = axcodes.strip().upper()
        picked = [_CANONICAL.get(code) for code in codes]
        if len(codes) != 3 or None in picked or len({p[0] for p in picked if p}) != 3:
            raise ValueError(
                f"axcodes {axcodes!r} must name three different axes with one letter each of "
                "L/R, A/P, S/I"
            )
        order = tuple(p[0] for p in picked if p)
        flips = tuple(p[1] for p in picked if p)
        return cls((order[0], order[1], order[2]), (flips[0], flips[1], flips[2]))

    def to_network(self, canonical: np.ndarray) -> np.ndarray:
        array = np.transpose(canonical, self.order)
        axes = tuple(i for i, flip in enumerate(self.flips) if flip)
        return np.ascontiguousarray(np.flip(array, axes) if axes else array)

    def from_network(self, network: np.ndarray) -> np.ndarray:
        axes = tuple(i for i, flip in enumerate(self.flips) if flip)
        array = np.flip(network, axes) if axes else network
        return np.ascontiguousarray(np.transpose(array, np.argsort(self.order)))

    def to_network_shape(self, zyx: tuple[int, int, int]) -> tuple[int, int, int]:
        """A canonical (z, y, x) size in the network's axis order."""
        return (zyx[self.order[0]], zyx[self.order[1]], zyx[self.order[2]])

    def to_canonical_order(self, values: tuple[float, float, float]) -> tuple[float, ...]:
        """Per-axis values (spacing, window size) given in network order, in (z, y, x)."""
        out = [0.0, 0.0, 0.0]
        for network_axis, canonical_axis in enumerate(self.order):
            out[canonical_axis] = values[network_axis]
        return tuple(out)


@dataclass(frozen=True)
class BundleInput:
    """What a liver bundle's network expects, in carebridge's canonical (z, y, x) order."""

    spacing_mm: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    hu_window: tuple[float, float]
    intensity_range: tuple[float, float]
    axes: AxisMap
    axcodes: str

    def preprocessing(self) -> dict[str, Any]:
        """The card's ``preprocessing``: what carebridge does before the network."""
        return {
            "id": "monai-bundle-ct/v1",
            "orientation": self.axcodes,
            "spacing_mm_zyx": list(self.spacing_mm),
            "hu_window": list(self.hu_window),
            "intensity_range": list(self.intensity_range),
            "roi_size_zyx": list(self.roi_size),
        }


def read_bundle_input(bundle_dir: Path) -> BundleInput:
    """Read ``configs/inference.json`` of a liver bundle; :class:`ModelLoadError` if unusable."""
    label = f"MONAI bundle {Path(bundle_dir).name!r}"
    path = Path(bundle_dir) / "configs" / "inference.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{label} has no configs/inference.json: the liver pipeline reads the bundle's "
            "Orientationd, Spacingd, ScaleIntensityRanged and SlidingWindowInferer from it"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"configs/inference.json of {label} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"configs/inference.json of {label} must hold a JSON object")
    return parse_bundle_input(config, label)


def parse_bundle_input(config: dict[str, Any], label: str) -> BundleInput:
    """The liver input of an ``inference.json`` (see the module docstring)."""
    transforms = _transforms(config, label)
    orientation = transforms.get("Orientationd", {})
    axcodes = _plain(orientation.get("axcodes", DEFAULT_AXCODES), "Orientationd axcodes", label)
    try:
        axes = AxisMap.from_axcodes(str(axcodes))
    except ValueError as exc:
        raise ModelLoadError(f"{label}: {exc}") from exc
    spacing = _numbers(transforms, "Spacingd", "pixdim", 3, label)
    scale = transforms.get("ScaleIntensityRanged")
    if scale is None:
        raise ModelLoadError(
            f"{label} declares no ScaleIntensityRanged in its preprocessing: the liver "
            "pipeline needs the HU window (a_min, a_max) the network was trained with"
        )
    window = tuple(
        float(_plain(scale.get(key), f"ScaleIntensityRanged {key}", label))
        for key in ("a_min", "a_max")
    )
    intensity = tuple(
        float(_plain(scale.get(key, default), f"ScaleIntensityRanged {key}", label))
        for key, default in (("b_min", 0.0), ("b_max", 1.0))
    )
    inferer = config.get("inferer")
    if not isinstance(inferer, dict) or "roi_size" not in inferer:
        raise ModelLoadError(
            f"{label} declares no inferer with a roi_size: the liver pipeline runs a sliding "
            "window of the size the network was trained on"
        )
    roi = _plain(inferer["roi_size"], "inferer roi_size", label)
    if not (isinstance(roi, list) and len(roi) == 3 and all(isinstance(v, int) for v in roi)):
        raise ModelLoadError(f"{label}: inferer roi_size must be three integers, got {roi!r}")
    if not window[0] < window[1]:
        raise ModelLoadError(f"{label}: ScaleIntensityRanged needs a_min < a_max")
    spacing_zyx = axes.to_canonical_order((spacing[0], spacing[1], spacing[2]))
    roi_zyx = axes.to_canonical_order((float(roi[0]), float(roi[1]), float(roi[2])))
    return BundleInput(
        spacing_mm=(spacing_zyx[0], spacing_zyx[1], spacing_zyx[2]),
        roi_size=(int(roi_zyx[0]), int(roi_zyx[1]), int(roi_zyx[2])),
        hu_window=(window[0], window[1]),
        intensity_range=(intensity[0], intensity[1]),
        axes=axes,
        axcodes=str(axcodes).upper(),
    )


def _transforms(config: dict[str, Any], label: str) -> dict[str, dict[str, Any]]:
    """The preprocessing transforms by class name (the last part of ``_target_``)."""
    section = config.get("preprocessing")
    listed = section.get("transforms") if isinstance(section, dict) else None
    if not isinstance(listed, list):
        raise ModelLoadError(
            f"{label} has no preprocessing.transforms list in configs/inference.json"
        )
    found: dict[str, dict[str, Any]] = {}
    for item in listed:
        if isinstance(item, dict) and isinstance(item.get("_target_"), str):
            found.setdefault(item["_target_"].rsplit(".", 1)[-1], item)
    return found


def _plain(value: Any, what: str, label: str) -> Any:
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ModelLoadError(
            f"{label}: {what} is a config expression ({value[:40]!r}), which carebridge never "
            "evaluates: write the value itself in configs/inference.json"
        )
    if isinstance(value, list):
        return [_plain(item, what, label) for item in value]
    return value


def _numbers(
    transforms: dict[str, dict[str, Any]], name: str, key: str, count: int, label: str
) -> list[float]:
    spec = transforms.get(name)
    if spec is None:
        raise ModelLoadError(
            f"{label} declares no {name} in its preprocessing: the liver pipeline needs the "
            f"{key} the network was trained with"
        )
    value = _plain(spec.get(key), f"{name} {key}", label)
    if not (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and 0.1 <= v <= 20 for v in value)
    ):
        raise ModelLoadError(f"{label}: {name} {key} must be {count} spacings in mm, got {value!r}")
    return [float(v) for v in value]
