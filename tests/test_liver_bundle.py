"""A MONAI bundle as the liver model: its configs say how to feed it, and carebridge does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from models.card import ModelLoadError
from models.segmentation.bundle_input import AxisMap, parse_bundle_input
from models.segmentation.infer import LiverSegmenter
from models.segmentation.phantom import write_phantom_series
from models.segmentation.volume import CtVolume, load_ct_series

SHAPE = (48, 100, 100)  # on the 4 mm model grid: one window, 48 x 80 x 80
SPACING = (4.0, 3.2, 3.2)


def test_axis_map_ras_points_where_monai_says() -> None:
    canonical = np.zeros((4, 5, 6), dtype=np.float32)  # z to head, y to back, x to left
    canonical[3, 0, 0] = 1.0  # most superior, most anterior, most right
    ras = AxisMap.from_axcodes("RAS")
    network = ras.to_network(canonical)
    assert network.shape == (6, 5, 4)  # x, y, z
    # RAS: axis 0 grows to the right, 1 to anterior, 2 to superior: the voxel is at the end
    # of each.
    assert network[5, 4, 3] == 1.0
    assert np.array_equal(ras.from_network(network), canonical)
    assert ras.to_canonical_order((1.0, 2.0, 3.0)) == (3.0, 2.0, 1.0)
    assert ras.to_network_shape((4, 5, 6)) == (6, 5, 4)
    identity = AxisMap.from_axcodes("SPL")
    assert np.array_equal(identity.to_network(canonical), canonical)
    for bad in ("RAX", "RRS", "RA", "LPSI"):
        with pytest.raises(ValueError):
            AxisMap.from_axcodes(bad)


def _inference(axcodes: str, pixdim: list[float], roi: list[int]) -> dict[str, object]:
    return {
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": axcodes},
                {"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"},
                {
                    "_target_": "monai.transforms.ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -200,
                    "a_max": 250,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4},
    }


def test_bundle_input_is_read_in_carebridges_axis_order() -> None:
    spec = parse_bundle_input(_inference("RAS", [1.5, 1.6, 2.0], [96, 80, 64]), "b")
    assert spec.spacing_mm == (2.0, 1.6, 1.5)
    assert spec.roi_size == (64, 80, 96)
    assert spec.hu_window == (-200.0, 250.0)
    assert spec.intensity_range == (0.0, 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["preprocessing"]["transforms"].pop(3), "no Spacingd"),
        (lambda c: c["preprocessing"]["transforms"].pop(4), "no ScaleIntensityRanged"),
        (lambda c: c.pop("inferer"), "roi_size"),
        (
            lambda c: c["preprocessing"]["transforms"][3].update(pixdim="$@spacing"),
            "config expression",
        ),
        (lambda c: c["preprocessing"]["transforms"][2].update(axcodes="XYZ"), "axcodes"),
    ],
)
def test_bundle_input_refuses_what_it_cannot_reproduce(change, message: str) -> None:  # type: ignore[no-untyped-def]
    config = _inference("RAS", [1.5, 1.5, 2.0], [96, 96, 64])
    change(config)
    with pytest.raises(ModelLoadError, match=message):
        parse_bundle_input(config, "MONAI bundle 'b'")


class _OnNetworkAxes(torch.nn.Module):
    """A canonical-axes network seen through ``axes``: what a bundle trained on them holds."""

    def __init__(self, inner: torch.nn.Module, axes: AxisMap) -> None:
        super().__init__()
        self.inner = inner
        self.flipped = [2 + i for i, flip in enumerate(axes.flips) if flip]
        self.to_canonical = [0, 1, *(2 + int(i) for i in np.argsort(axes.order))]
        self.to_network = [0, 1, *(2 + i for i in axes.order)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flipped:
            x = torch.flip(x, self.flipped)
        y = self.inner(x.permute(self.to_canonical).contiguous())
        y = y.permute(self.to_network)
        if self.flipped:
            y = torch.flip(y, self.flipped)
        return y.contiguous()


def _export_bundle(native: LiverSegmenter, out: Path, axcodes: str) -> Path:
    axes = AxisMap.from_axcodes(axcodes)
    spec = native.spec
    roi = list(axes.to_network_shape(spec.roi_size))
    pixdim = [spec.spacing_mm[axis] for axis in axes.order]
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    wrapped = _OnNetworkAxes(native.network.cpu().eval(), axes).eval()
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, torch.zeros(1, 1, *roi))
    traced.save(str(out / "models" / "model.ts"))
    metadata = {
        "name": f"liver-bundle-{axcodes.lower()}",
        "version": "0.1.0",
        "authors": "carebridge tests",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": roi}},
            "outputs": {
                "pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "liver"}}
            },
        },
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata))
    inference = _inference(axcodes, pixdim, roi)
    scale = inference["preprocessing"]["transforms"][4]  # type: ignore[index]
    scale["a_min"], scale["a_max"] = spec.hu_window
    (out / "configs" / "inference.json").write_text(json.dumps(inference))
    return out


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> CtVolume:
    paths = write_phantom_series(
        tmp_path_factory.mktemp("phantom"), seed=21, shape=SHAPE, spacing=SPACING
    )
    return load_ct_series([pydicom.dcmread(p) for p in paths])


@pytest.mark.parametrize("axcodes", ["SPL", "RAS"])
def test_a_bundle_segments_like_the_network_it_holds(
    models_dir: Path, tmp_path: Path, volume: CtVolume, axcodes: str
) -> None:
    """The demo liver network exported as a MONAI bundle on other axes gives the same liver:
    carebridge fed it the bundle's orientation, spacing and window, and read it back."""
    native = LiverSegmenter.load(models_dir / "liver-unet3d")
    expected = native.segment(volume)
    assert not expected.empty
    bundle = _export_bundle(native, tmp_path / f"liver_{axcodes}", axcodes)
    segmenter = LiverSegmenter.load(bundle)
    got = segmenter.segment(volume)
    assert got.provenance.name == f"liver-bundle-{axcodes.lower()}"
    assert got.provenance.demo is False
    assert segmenter.card.weights.file == "model.ts"
    overlap = 2 * np.logical_and(got.mask, expected.mask).sum()
    dice = overlap / (got.mask.sum() + expected.mask.sum())
    # The model grid is one window here: on any axes the network sees the same voxels.
    assert dice > 0.999, dice
    assert got.volume_ml == pytest.approx(expected.volume_ml, rel=1e-3)


def test_a_bundle_without_a_background_channel_is_refused(models_dir: Path, tmp_path: Path) -> None:
    native = LiverSegmenter.load(models_dir / "liver-unet3d")
    bundle = _export_bundle(native, tmp_path / "one_channel", "SPL")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["outputs"]["pred"]["num_channels"] = 1
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match=r"has 1 channels .* needs 2"):
        LiverSegmenter.load(bundle)
    (tmp_path / "model.ts").write_bytes((bundle / "models" / "model.ts").read_bytes())
    with pytest.raises(ModelLoadError, match="MONAI bundle directory"):
        LiverSegmenter.load(tmp_path / "model.ts")


def test_a_bundle_window_outside_the_pipelines_limits_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "tiny_roi"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text(
        json.dumps(_inference("RAS", [1.5, 1.5, 2.0], [4, 4, 4]))
    )
    with pytest.raises(ModelLoadError, match=r"tiny_roi.*roi_size"):
        LiverSegmenter.load(bundle)
