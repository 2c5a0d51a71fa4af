"""MONAI bundles and TorchScript files as the chest X-ray pipeline's model.

Every bundle here is made by the test from one ResNet-18 whose weights are also written as a
carebridge model directory, so an external model must classify exactly like the native one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset

from models.bundle import is_bundle_dir, is_external_model
from models.card import CARD_FILE, LabelSpec, ModelCardDraft, ModelLoadError, write_model_dir
from models.cxr.classifier import (
    ARCHITECTURE,
    CXR_LABELS,
    INPUT_SPEC,
    TASK,
    CxrClassifier,
    build_network,
)
from models.cxr.preprocess import PREPROCESSING_SPEC
from models.cxr.synthetic import CLASSES, make_cxr_dataset
from models.provenance import device_uid_for

# The tests make bundles the way MONAI does, with TorchScript, which torch now marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network().eval()
    # Non-trivial BatchNorm statistics, so eval-mode outputs differ from image to image.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net


def _fc(net: torch.nn.Module) -> torch.nn.Linear:
    """The final classification layer of the ResNet."""
    fc = net.get_submodule("fc")
    assert isinstance(fc, torch.nn.Linear)
    return fc


def _draft(**overrides: Any) -> ModelCardDraft:
    fields: dict[str, Any] = {
        "name": "cxr-native",
        "version": "1.0.0",
        "task": TASK,
        "labels": tuple(LabelSpec.from_coded(label) for label in CXR_LABELS),
        "input": INPUT_SPEC,
        "preprocessing": PREPROCESSING_SPEC,
        "architecture": ARCHITECTURE,
        "training": {"data": "none: random weights for a test"},
        "metrics": {},
        "demo": False,
    }
    fields.update(overrides)
    return ModelCardDraft.model_validate(fields)


def _metadata(outputs: int = 3, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "cxr-test-bundle",
        "version": "1.2.0",
        "authors": "carebridge tests",
        "monai_version": "1.4.0",
        "task": "chest X-ray classification",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": [224, 224],
                    "dtype": "float32",
                    "value_range": [0, 1],
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": outputs,
                    "spatial_shape": [1, 1],
                    "channel_def": {str(i): name for i, name in enumerate(CLASSES[:outputs])},
                }
            },
        },
    }
    data.update(extra)
    return data


def _bundle(
    root: Path,
    network: torch.nn.Module,
    *,
    metadata: dict[str, Any] | None = None,
    weights: str = "torchscript",
    network_def: dict[str, Any] | None = None,
) -> Path:
    """Write a MONAI bundle: configs/metadata.json, configs/inference.json, models/model.pt."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    if metadata is not None:
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    inference: dict[str, Any] = {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network": "$@network_def.to(@device)",
    }
    if network_def is not None:
        inference["network_def"] = network_def
    (root / "configs" / "inference.json").write_text(json.dumps(inference), encoding="utf-8")
    if weights == "torchscript":
        torch.jit.save(torch.jit.script(network), str(root / "models" / "model.pt"))
    else:
        torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def _cxr(label: str, seed: int) -> Dataset:
    return make_cxr_dataset(
        label, np.random.default_rng(seed), patient_name="Test^Bundle", patient_id="B1"
    )


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    net = _network()
    path = tmp_path_factory.mktemp("native") / "cxr"
    write_model_dir(path, _draft(), net.state_dict())
    return path, net


@pytest.fixture(scope="module")
def images() -> list[Dataset]:
    return [_cxr(label, 40 + i) for i, label in enumerate(CLASSES)]


def _probabilities(clf: CxrClassifier, datasets: list[Dataset]) -> list[dict[str, float]]:
    return [result.probabilities for result in clf.predict_datasets(datasets)]


def _assert_same(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y) == set(CLASSES)
        assert x == pytest.approx(y, abs=1e-5)


def test_torchscript_bundle_loads_and_classifies(
    native: tuple[Path, torch.nn.Module], images: list[Dataset], tmp_path: Path
) -> None:
    native_dir, net = native
    bundle = _bundle(tmp_path / "bundle", net, metadata=_metadata())
    assert is_bundle_dir(bundle) and is_external_model(bundle)

    clf = CxrClassifier.load(bundle, device="auto")
    digest = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    prov = clf.provenance
    assert (prov.name, prov.version, prov.weights_sha256) == ("cxr-test-bundle", "1.2.0", digest)
    assert prov.device_uid == device_uid_for("cxr-test-bundle", f"1.2.0#{digest}")
    assert prov.demo is False and prov.manufacturer == "carebridge tests"
    assert clf.card.coded_labels == CXR_LABELS
    assert clf.card.architecture["format"] == "torchscript"

    _assert_same(
        _probabilities(clf, images), _probabilities(CxrClassifier.load(native_dir), images)
    )


def test_state_dict_bundle_builds_its_network_def(
    native: tuple[Path, torch.nn.Module], images: list[Dataset], tmp_path: Path
) -> None:
    native_dir, net = native
    network_def = {
        "_target_": "resnet18",
        "spatial_dims": 2,
        "n_input_channels": 1,
        "num_classes": 3,
        "conv1_t_size": 7,
        "conv1_t_stride": 2,
    }
    bundle = _bundle(
        tmp_path / "bundle",
        net,
        metadata=_metadata(),
        weights="state-dict",
        network_def=network_def,
    )
    clf = CxrClassifier.load(bundle)
    assert clf.card.architecture["family"] == "monai.networks.nets.resnet18"
    _assert_same(
        _probabilities(clf, images), _probabilities(CxrClassifier.load(native_dir), images)
    )

    # Config expressions are never evaluated, and only MONAI networks are built from a config.
    for bad_def, message in (
        ({**network_def, "num_classes": "$__import__('os').getpid()"}, "config syntax"),
        ({**network_def, "_target_": "torch.nn.Linear"}, "not a network of monai"),
        ({**network_def, "num_classes": 5}, "does not fit the network_def"),
    ):
        root = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        _bundle(root, net, metadata=_metadata(), weights="state-dict", network_def=bad_def)
        with pytest.raises(ModelLoadError, match=message):
            CxrClassifier.load(root)


def test_channel_def_gives_the_output_order(
    native: tuple[Path, torch.nn.Module], images: list[Dataset], tmp_path: Path
) -> None:
    native_dir, net = native
    order = ["lung_cancer", "normal", "pneumonia"]
    permuted = copy.deepcopy(net)
    rows = [CLASSES.index(name) for name in order]
    fc, permuted_fc = _fc(net), _fc(permuted)
    with torch.no_grad():
        permuted_fc.weight.copy_(fc.weight[rows])
        permuted_fc.bias.copy_(fc.bias[rows])
    metadata = _metadata()
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {
        str(i): name.replace("_", " ") for i, name in enumerate(order)
    }
    clf = CxrClassifier.load(_bundle(tmp_path / "bundle", permuted, metadata=metadata))
    assert [label.name for label in clf.labels] == order
    _assert_same(
        _probabilities(clf, images), _probabilities(CxrClassifier.load(native_dir), images)
    )

    metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["0"] = "fracture"
    with pytest.raises(ModelLoadError, match="'fracture'"):
        CxrClassifier.load(_bundle(tmp_path / "unknown", permuted, metadata=metadata))


def test_softmax_network_is_not_softmaxed_twice(
    native: tuple[Path, torch.nn.Module], images: list[Dataset], tmp_path: Path
) -> None:
    native_dir, net = native
    with_softmax = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()
    clf = CxrClassifier.load(_bundle(tmp_path / "bundle", with_softmax, metadata=_metadata()))
    assert clf.returns_probabilities is True
    _assert_same(
        _probabilities(clf, images), _probabilities(CxrClassifier.load(native_dir), images)
    )


def test_bundle_without_weights_says_so(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", _network(), metadata=_metadata())
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights: expected models/model\.ts"):
        CxrClassifier.load(bundle)


def test_incompatible_bundles_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(1)
    two_class = build_network()
    two_class.fc = torch.nn.Linear(_fc(two_class).in_features, 2)

    declared = _bundle(tmp_path / "declared", two_class, metadata=_metadata(outputs=2))
    with pytest.raises(ModelLoadError) as err:
        CxrClassifier.load(declared)
    assert "output 'pred' has 2 channels (classes), the pipeline needs 3" in str(err.value)

    undeclared = _bundle(tmp_path / "undeclared", two_class, metadata=None)
    with pytest.raises(ModelLoadError, match=r"returns shape \[1, 2\].*needs \[1, 3\]"):
        CxrClassifier.load(undeclared)

    metadata = _metadata()
    image = metadata["network_data_format"]["inputs"]["image"]
    image.update(num_channels=3, spatial_shape=[256, 256])
    wrong_input = _bundle(tmp_path / "input", _network(), metadata=metadata)
    with pytest.raises(ModelLoadError) as err:
        CxrClassifier.load(wrong_input)
    message = str(err.value)
    assert "input 'image' has 3 channels, the pipeline feeds 1" in message
    assert "spatial shape [256, 256], the pipeline feeds [224, 224]" in message


def test_corrupt_torchscript_is_refused(
    native: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _, net = native
    bundle = _bundle(tmp_path / "bundle", net, metadata=_metadata())
    weights = bundle / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot be loaded as TorchScript"):
        CxrClassifier.load(bundle)

    garbage = tmp_path / "model.ts"
    garbage.write_bytes(b"\x00not a torchscript archive" * 64)
    with pytest.raises(ModelLoadError, match="cannot be loaded as TorchScript"):
        CxrClassifier.load(garbage)


def test_torchscript_file_with_embedded_metadata(
    native: tuple[Path, torch.nn.Module], images: list[Dataset], tmp_path: Path
) -> None:
    native_dir, net = native
    path = tmp_path / "cxr.ts"
    extra = {"metadata.json": json.dumps(_metadata(name="cxr-scripted", version="2.0"))}
    torch.jit.save(torch.jit.script(net), str(path), _extra_files=extra)
    assert is_external_model(path)
    clf = CxrClassifier.load(path)
    assert (clf.provenance.name, clf.provenance.version) == ("cxr-scripted", "2.0")
    _assert_same(
        _probabilities(clf, images), _probabilities(CxrClassifier.load(native_dir), images)
    )

    bare = tmp_path / "bare.ts"
    torch.jit.save(torch.jit.script(net), str(bare))
    digest = hashlib.sha256(bare.read_bytes()).hexdigest()
    clf = CxrClassifier.load(bare)
    assert (clf.provenance.name, clf.provenance.version) == ("bare", f"sha256-{digest[:12]}")


def test_card_in_bundle_takes_precedence_and_is_checked(
    native: tuple[Path, torch.nn.Module], images: list[Dataset], tmp_path: Path
) -> None:
    native_dir, net = native
    bundle = _bundle(tmp_path / "bundle", net, metadata=_metadata())
    weights = bundle / "models" / "model.pt"
    # A carebridge card beside configs/: written for the bundle's weights file.
    card_dir = tmp_path / "card"
    card = write_model_dir(
        card_dir,
        _draft(
            name="cxr-carded",
            version="3.1.0",
            architecture={"family": "torchscript"},
            weights_file="model.pt",
        ),
        {},
    )
    data = json.loads(card.to_json())
    data["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (bundle / CARD_FILE).write_text(json.dumps(data), encoding="utf-8")

    clf = CxrClassifier.load(bundle)
    assert (clf.provenance.name, clf.provenance.version) == ("cxr-carded", "3.1.0")
    assert clf.provenance.device_uid == device_uid_for("cxr-carded", "3.1.0")
    _assert_same(
        _probabilities(clf, images), _probabilities(CxrClassifier.load(native_dir), images)
    )

    blob = bytearray(weights.read_bytes())
    blob[-40] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError) as err:
        CxrClassifier.load(bundle)
    assert data["weights"]["sha256"] in str(err.value)
    assert hashlib.sha256(bytes(blob)).hexdigest() in str(err.value)
