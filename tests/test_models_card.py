"""The model directory format: card validation, atomic writing, digest checks, listing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from models.card import (
    CARD_FILE,
    LabelSpec,
    ModelCard,
    ModelCardDraft,
    ModelLoadError,
    list_model_dirs,
    load_weights,
    read_model_card,
    verify_weights,
    write_model_dir,
)
from models.provenance import CodedLabel, device_uid_for

LABELS = (
    CodedLabel("normal", "17621005", "SCT", "Normal"),
    CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia"),
)


def _draft(**overrides: object) -> ModelCardDraft:
    fields: dict[str, object] = {
        "name": "toy-linear",
        "version": "1.2.3",
        "task": "classification",
        "labels": tuple(LabelSpec.from_coded(label) for label in LABELS),
        "input": {"channels": 1, "size": [4, 4]},
        "preprocessing": {"id": "toy/1"},
        "architecture": {"family": "torch.nn.Linear", "in": 16, "out": 2},
        "training": {"data": "none", "epochs": 0, "seed": 1},
        "metrics": {"val_accuracy": 0.5},
        "demo": True,
    }
    fields.update(overrides)
    return ModelCardDraft.model_validate(fields)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 2).state_dict()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "toy"
    write_model_dir(path, _draft(), _state())
    return path


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "toy"
    state = _state()
    card = write_model_dir(path, _draft(), state)

    assert sorted(p.name for p in path.iterdir()) == [CARD_FILE, "weights.pt"]
    assert read_model_card(path) == card
    assert card.device_uid == device_uid_for("toy-linear", "1.2.3")
    assert card.created.tzinfo is not None
    digest = hashlib.sha256((path / "weights.pt").read_bytes()).hexdigest()
    assert card.weights.sha256 == digest
    assert verify_weights(path, card) == path / "weights.pt"

    loaded = load_weights(path, card)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value)

    prov = card.provenance
    assert (prov.name, prov.version, prov.weights_sha256) == ("toy-linear", "1.2.3", digest)
    assert prov.device_uid == card.device_uid and prov.demo is True
    assert prov.manufacturer == "carebridge"
    assert card.coded_labels == LABELS

    on_disk = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
    assert set(on_disk) == set(ModelCard.model_fields)
    assert on_disk["weights"] == {"file": "weights.pt", "sha256": digest}


def test_rewrite_replaces_weights_and_card(model_dir: Path) -> None:
    first = read_model_card(model_dir)
    state = {k: v + 1 for k, v in _state().items()}
    second = write_model_dir(model_dir, _draft(version="1.2.4"), state)
    assert second.weights.sha256 != first.weights.sha256
    assert read_model_card(model_dir) == second
    assert sorted(p.name for p in model_dir.iterdir()) == [CARD_FILE, "weights.pt"]


def test_corrupt_weights_refused_naming_both_digests(model_dir: Path) -> None:
    card = read_model_card(model_dir)
    weights = model_dir / "weights.pt"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    actual = hashlib.sha256(bytes(blob)).hexdigest()

    with pytest.raises(ModelLoadError) as err:
        verify_weights(model_dir, card)
    assert card.weights.sha256 in str(err.value)
    assert actual in str(err.value)
    with pytest.raises(ModelLoadError, match="does not match"):
        load_weights(model_dir, card)


def test_missing_weights_refused(model_dir: Path) -> None:
    card = read_model_card(model_dir)
    (model_dir / "weights.pt").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        verify_weights(model_dir, card)


def _edit_card(model_dir: Path, edit: object) -> None:
    path = model_dir / CARD_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data), encoding="utf-8")


def test_unknown_key_refused(model_dir: Path) -> None:
    _edit_card(model_dir, lambda d: d.update(colour="blue"))
    with pytest.raises(ModelLoadError, match="colour"):
        read_model_card(model_dir)


def test_unknown_nested_key_refused(model_dir: Path) -> None:
    _edit_card(model_dir, lambda d: d["weights"].update(url="http://example.invalid/w.pt"))
    with pytest.raises(ModelLoadError, match="url"):
        read_model_card(model_dir)


def test_missing_key_refused(model_dir: Path) -> None:
    _edit_card(model_dir, lambda d: d.pop("metrics"))
    with pytest.raises(ModelLoadError, match="metrics"):
        read_model_card(model_dir)


def test_bad_values_refused_by_constructor(model_dir: Path) -> None:
    data = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    ModelCard.model_validate(data)  # valid as written
    for key, value, pattern in [
        ("weights", {"file": "../outside.pt", "sha256": "0" * 64}, "plain file name"),
        ("weights", {"file": "weights.pt", "sha256": "abc"}, "64 lowercase"),
        ("device_uid", "not-a-uid", "DICOM UID"),
        ("labels", [], "at least one"),
        ("demo", "yes", "demo"),
        ("architecture", {}, "family"),
        ("created", "2024-01-01T00:00:00", "timezone"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            ModelCard.model_validate({**data, key: value})
    dup = [data["labels"][0], data["labels"][0]]
    with pytest.raises(ValueError, match="unique"):
        ModelCard.model_validate({**data, "labels": dup})


def test_card_not_json_or_absent(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        read_model_card(tmp_path)
    (tmp_path / CARD_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_model_card(tmp_path)


def test_weights_that_are_not_a_state_dict_refused(tmp_path: Path) -> None:
    card = write_model_dir(tmp_path / "m", _draft(), _state())
    torch.save([1, 2, 3], tmp_path / "m" / "weights.pt")
    digest = hashlib.sha256((tmp_path / "m" / "weights.pt").read_bytes()).hexdigest()
    forged = card.model_copy(update={"weights": card.weights.model_copy(update={"sha256": digest})})
    with pytest.raises(ModelLoadError, match="state dict"):
        load_weights(tmp_path / "m", forged)


def test_list_model_dirs(tmp_path: Path) -> None:
    good = write_model_dir(tmp_path / "a-good", _draft(), _state())
    write_model_dir(tmp_path / "b-bad", _draft(name="other"), _state())
    _edit_card(tmp_path / "b-bad", lambda d: d.update(surprise=1))
    write_model_dir(tmp_path / "c-noweights", _draft(name="third"), _state())
    (tmp_path / "c-noweights" / "weights.pt").unlink()
    (tmp_path / "d-empty").mkdir()
    (tmp_path / "stray.txt").write_text("x", encoding="utf-8")

    found = list_model_dirs(tmp_path)
    assert [p.name for p, _ in found] == ["a-good", "b-bad", "c-noweights"]
    assert found[0][1] == good
    assert isinstance(found[1][1], ModelLoadError)
    assert isinstance(found[2][1], ModelLoadError)
    assert list_model_dirs(tmp_path / "nowhere") == []
