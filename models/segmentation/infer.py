"""Liver segmentation of a CT volume with a model directory (see :mod:`models.card`).

:class:`LiverSegmenter` loads a model directory, refuses one made for another task, label set,
preprocessing or network, and segments :class:`~models.segmentation.volume.CtVolume` s: model
grid and HU window from the card (:mod:`models.segmentation.preprocess`), sliding-window
inference (AMP on CUDA), post-processing, and the mask back on the source grid with its volume
and mean HU. Peak memory stays near the size of the source HU array plus its uint8 mask: the
model grid is small and the way back runs a few slices at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from models.bundle import ModelExpectation, is_external_model, load_external_model
from models.card import ModelCard, ModelLoadError, load_weights, read_model_card
from models.device import resolve_device
from models.provenance import CodedLabel, ModelProvenance
from models.segmentation import LIVER
from models.segmentation.bundle_input import BundleInput, read_bundle_input
from models.segmentation.measure import mean_hu, volume_ml
from models.segmentation.network import build_network, check_architecture, downsampling
from models.segmentation.preprocess import (
    PREPROCESSING_ID,
    THRESHOLD,
    ModelGeometry,
    clean_probability,
    prepare_image,
    probability_to_source,
)
from models.segmentation.volume import CtVolume

TASK = "segmentation"
LABELS: tuple[CodedLabel, ...] = (LIVER,)
SW_OVERLAP = 0.25


@dataclass(frozen=True)
class InputSpec:
    """What the network expects: canonical spacing (z, y, x) mm, ROI (z, y, x), HU window."""

    spacing_mm: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    hu_window: tuple[float, float]

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or not all(0.1 <= s <= 20.0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm must be three values in 0.1-20 mm, got {self.spacing_mm}")
        if len(self.roi_size) != 3 or not all(8 <= r <= 512 for r in self.roi_size):
            raise ValueError(f"roi_size must be three sizes in 8-512, got {self.roi_size}")
        low, high = self.hu_window
        if not -2000.0 <= low < high <= 4000.0:
            raise ValueError(
                f"hu_window must be (low, high) HU with low < high, got {self.hu_window}"
            )

    def card_input(self) -> dict[str, Any]:
        """The card's ``input`` entry."""
        return {
            "modality": "CT",
            "channels": 1,
            "axes": "z,y,x: z to head, y to back, x to patient left",
            "spacing_mm": list(self.spacing_mm),
            "roi_size": list(self.roi_size),
            "hu_window": list(self.hu_window),
        }

    @classmethod
    def from_card_input(cls, spec: Mapping[str, Any]) -> InputSpec:
        """Read and validate a card's ``input`` entry (raises :class:`ValueError`)."""
        if spec.get("modality") != "CT" or spec.get("channels") != 1:
            raise ValueError(
                f"input is for modality {spec.get('modality')!r} with {spec.get('channels')!r} "
                "channels, expected CT with 1"
            )
        try:
            spacing = tuple(float(v) for v in spec["spacing_mm"])
            roi = tuple(int(v) for v in spec["roi_size"])
            window = tuple(float(v) for v in spec["hu_window"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"input needs spacing_mm, roi_size and hu_window ({exc})") from exc
        if len(spacing) != 3 or len(roi) != 3 or len(window) != 2:
            raise ValueError("spacing_mm and roi_size need 3 values, hu_window 2")
        return cls(
            (spacing[0], spacing[1], spacing[2]), (roi[0], roi[1], roi[2]), (window[0], window[1])
        )


def check_card(card: ModelCard) -> InputSpec:
    """Raise :class:`ModelLoadError` unless ``card`` describes a liver model this code can run."""
    problems: list[str] = []
    if card.task != TASK:
        problems.append(f"task is {card.task!r}, expected {TASK!r}")
    if card.coded_labels != LABELS:
        got = [(label.name, label.code_value) for label in card.labels]
        problems.append(f"labels are {got}, expected [('liver', '10200004')]")
    if card.preprocessing.get("id") != PREPROCESSING_ID:
        problems.append(
            f"preprocessing id is {card.preprocessing.get('id')!r}, expected {PREPROCESSING_ID!r}"
        )
    problems += [f"architecture: {p}" for p in check_architecture(card.architecture)]
    spec: InputSpec | None = None
    try:
        spec = InputSpec.from_card_input(card.input)
    except ValueError as exc:
        problems.append(f"input: {exc}")
    if spec is not None and not problems:
        factor = downsampling(card.architecture)
        if any(r % factor for r in spec.roi_size):
            problems.append(f"roi_size {list(spec.roi_size)} is not a multiple of {factor}")
    if problems or spec is None:
        raise ModelLoadError(
            f"model {card.name} {card.version} is not a liver segmentation model this worker can "
            f"run: {'; '.join(problems)}. Configure the right pipeline for it or use a model "
            "directory written by models.segmentation.train"
        )
    return spec


def foreground_probability(
    network: torch.nn.Module,
    image: np.ndarray,
    roi_size: tuple[int, int, int],
    *,
    device: torch.device,
    sw_batch_size: int = 4,
    returns_probabilities: bool = False,
) -> np.ndarray:
    """Liver probability (float32, same shape) of a model-grid image in [0, 1].

    Sliding windows of ``roi_size`` overlap by 25% and are blended with gaussian weights;
    ``sw_batch_size`` windows go through the network at once. AMP (float16) on CUDA only.
    Channel 1 of the output is the liver: softmax is applied unless the network ends in one.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    amp = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), amp:
        logits = sliding_window_inference(
            x,
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            predictor=network,
            overlap=SW_OVERLAP,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        scores = logits.float()
        prob = (scores if returns_probabilities else torch.softmax(scores, dim=1))[0, 1]
    return np.ascontiguousarray(prob.cpu().numpy(), dtype=np.float32)


@dataclass(frozen=True)
class SegmentationResult:
    """The liver mask of one CT volume, its measurements and what made it.

    ``mask`` is uint8 (1 = liver) in the source geometry: same shape and axis order as the
    volume's ``hu``, so ``mask[k]`` belongs to the volume's ``sop_instance_uids[k]``.
    ``mean_hu`` is ``None`` when the mask is empty. ``timings`` are seconds per stage.
    """

    mask: np.ndarray
    label: CodedLabel
    volume_ml: float
    mean_hu: float | None
    spacing: tuple[float, float, float]
    model_spacing: tuple[float, float, float]
    provenance: ModelProvenance
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.mask, np.ndarray) or self.mask.dtype != np.uint8:
            raise TypeError("SegmentationResult.mask must be a uint8 numpy array")
        if self.mask.ndim != 3:
            raise ValueError(f"SegmentationResult.mask must be (z, y, x), got {self.mask.shape}")
        if self.volume_ml < 0:
            raise ValueError("volume_ml must not be negative")

    @property
    def empty(self) -> bool:
        """True when no voxel was segmented."""
        return self.volume_ml == 0.0


class LiverSegmenter:
    """A loaded liver segmentation model, ready to segment CT volumes."""

    def __init__(
        self,
        network: torch.nn.Module,
        card: ModelCard,
        device: torch.device,
        sw_batch_size: int = 4,
        bundle: BundleInput | None = None,
        returns_probabilities: bool = False,
    ) -> None:
        """Wrap a network whose weights match ``card``; prefer :meth:`load`.

        ``bundle``: the network is a MONAI bundle's, fed the way its configs say.
        """
        if sw_batch_size < 1:
            raise ValueError("sw_batch_size must be positive")
        self.bundle = bundle
        self.returns_probabilities = returns_probabilities
        self.spec = (
            check_card(card)
            if bundle is None
            else InputSpec(bundle.spacing_mm, bundle.roi_size, bundle.hu_window)
        )
        self.network = network.to(device).eval()
        self.card = card
        self.provenance: ModelProvenance = card.provenance
        self.device = device
        self.sw_batch_size = sw_batch_size

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu", sw_batch_size: int = 4) -> LiverSegmenter:
        """Load a model directory: read and check its card, verify the weights' sha256, load them.

        ``device`` is ``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"auto"`` (CUDA when available).
        Raises :class:`ModelLoadError` saying what is wrong and what to do.
        """
        if is_external_model(Path(model_dir)):
            return cls._load_bundle(Path(model_dir), device, sw_batch_size)
        card = read_model_card(Path(model_dir))
        check_card(card)
        resolved = resolve_device(device)
        state = load_weights(Path(model_dir), card, map_location="cpu")
        network = build_network(card.architecture)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"weights of model {card.name} {card.version} do not fit the network named by "
                "its card: write the model directory again with models.segmentation.train"
            ) from exc
        return cls(network, card, resolved, sw_batch_size=sw_batch_size)

    @classmethod
    def _load_bundle(cls, path: Path, device: str, sw_batch_size: int) -> LiverSegmenter:
        """A MONAI bundle directory (see :mod:`models.segmentation.bundle_input`)."""
        if not path.is_dir():
            raise ModelLoadError(
                f"{path.name!r}: the liver pipeline takes a MONAI bundle directory (its "
                "configs/inference.json says how to feed the network), not a bare TorchScript file"
            )
        bundle = read_bundle_input(path)
        try:  # the same limits as a carebridge card's input
            InputSpec(bundle.spacing_mm, bundle.roi_size, bundle.hu_window)
        except ValueError as exc:
            raise ModelLoadError(f"MONAI bundle {path.name!r}: {exc}") from exc
        expected = ModelExpectation(
            task=TASK,
            channels=1,
            spatial_size=bundle.axes.to_network_shape(bundle.roi_size),
            labels=LABELS,
            preprocessing=bundle.preprocessing(),
            output="segmentation",
            background=True,
        )
        resolved = resolve_device(device)
        loaded = load_external_model(path, expected, resolved)
        return cls(
            loaded.network,
            loaded.card,
            resolved,
            sw_batch_size=sw_batch_size,
            bundle=bundle,
            returns_probabilities=loaded.returns_probabilities,
        )

    def probability(self, volume: CtVolume) -> tuple[np.ndarray, dict[str, float], ModelGeometry]:
        """Cleaned canonical model-grid liver probability, timings, and the model geometry."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        image, geometry = prepare_image(volume, self.spec.spacing_mm, self.spec.hu_window)
        roi = self.spec.roi_size
        if self.bundle is not None:  # the bundle's intensity range and axes
            low, high = self.bundle.intensity_range
            if (low, high) != (0.0, 1.0):
                image = (image * (high - low) + low).astype(np.float32)
            image = self.bundle.axes.to_network(image)
            roi = self.bundle.axes.to_network_shape(roi)
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        prob = foreground_probability(
            self.network,
            image,
            roi,
            device=self.device,
            sw_batch_size=self.sw_batch_size,
            returns_probabilities=self.returns_probabilities,
        )
        del image
        if self.bundle is not None:
            prob = self.bundle.axes.from_network(prob)
        timings["inference"] = time.perf_counter() - start
        start = time.perf_counter()
        prob = clean_probability(prob, THRESHOLD)
        timings["postprocess"] = time.perf_counter() - start
        return prob, timings, geometry

    def segment(self, volume: CtVolume) -> SegmentationResult:
        """Segment the liver of ``volume``; the mask comes back on the volume's own grid."""
        if not isinstance(volume, CtVolume):
            raise TypeError(f"expected a CtVolume, got {type(volume).__name__}")
        started = time.perf_counter()
        prob, timings, geometry = self.probability(volume)
        start = time.perf_counter()
        mask = probability_to_source(prob, geometry, THRESHOLD)
        timings["restore"] = time.perf_counter() - start
        start = time.perf_counter()
        volume_measured = volume_ml(mask, volume.spacing)
        mean = mean_hu(volume.hu, mask) if volume_measured > 0 else None
        timings["measure"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started
        return SegmentationResult(
            mask=mask,
            label=LIVER,
            volume_ml=volume_measured,
            mean_hu=mean,
            spacing=volume.spacing,
            model_spacing=geometry.model_spacing,
            provenance=self.provenance,
            timings={k: round(v, 4) for k, v in timings.items()},
        )
