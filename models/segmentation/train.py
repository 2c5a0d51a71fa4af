"""Training of the liver model: the demo on generated phantoms, and from labelled CT folders.

Both entry points prepare their labelled volumes on the model grid, run the shared loop of
:mod:`models.segmentation.fit` (augmentation, Dice + cross-entropy, Adam, early stopping on
validation Dice, fixed seeds), write the best weights as a model directory
(:func:`models.card.write_model_dir`), then evaluate that directory through the whole inference
path (:func:`models.segmentation.evaluate.evaluate_liver`) and write the card again with those
metrics, plus ``evaluation.json`` and ``evaluation-overlay.png`` beside it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.utils import set_determinism
from pydantic import JsonValue

from models.card import LabelSpec, ModelCardDraft, load_weights, read_model_card, write_model_dir
from models.device import resolve_device
from models.segmentation.data import LabelFormat, case_names, iter_cases, phantom_case
from models.segmentation.evaluate import evaluate_liver
from models.segmentation.fit import (
    AUGMENTATION,
    WEIGHT_DECAY,
    Reporter,
    ThreadScope,
    TrainingItem,
    fit,
    prepare_case,
)
from models.segmentation.infer import LABELS, TASK, InputSpec, check_card
from models.segmentation.network import DEMO_ARCHITECTURE, build_network, downsampling
from models.segmentation.phantom import GENERATOR_ID
from models.segmentation.preprocess import PREPROCESSING_SPEC

MODEL_NAME = "liver-unet3d"
DEMO_VERSION = "0.1.0-demo"

#: The demo model's input: a coarse 4 mm grid so it trains in minutes on two CPU cores.
DEMO_SPEC = InputSpec(spacing_mm=(4.0, 4.0, 4.0), roi_size=(48, 80, 80), hu_window=(-200.0, 250.0))

#: Defaults for training on a user's folder: a finer grid and a larger network.
FOLDER_SPEC = InputSpec(
    spacing_mm=(3.0, 3.0, 3.0), roi_size=(64, 128, 128), hu_window=(-200.0, 250.0)
)
FOLDER_ARCHITECTURE: dict[str, Any] = {
    **DEMO_ARCHITECTURE,
    "channels": [16, 32, 64, 128],
    "num_res_units": 2,
}

#: Held-out demo phantoms: a clinical-like grid (2.5 mm slices, 1.5625 mm pixels, 400 mm FOV).
DEMO_TEST_GEOMETRY = ((96, 256, 256), (2.5, 1.5625, 1.5625))


def _draft(
    *,
    name: str,
    version: str,
    spec: InputSpec,
    architecture: Mapping[str, Any],
    training: dict[str, JsonValue],
    metrics: dict[str, JsonValue],
    demo: bool,
) -> ModelCardDraft:
    return ModelCardDraft(
        name=name,
        version=version,
        task=TASK,
        labels=tuple(LabelSpec.from_coded(label) for label in LABELS),
        input=spec.card_input(),
        preprocessing=PREPROCESSING_SPEC,
        architecture=dict(architecture),
        training=training,
        metrics=metrics,
        demo=demo,
    )


def _check_spec(spec: InputSpec, architecture: Mapping[str, Any]) -> None:
    factor = downsampling(architecture)
    if any(r % factor for r in spec.roi_size):
        raise ValueError(f"roi_size {list(spec.roi_size)} must be a multiple of {factor}")


def _demo_geometry(seed: int) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A random acquisition grid for a training phantom: 1.5-4 mm pixels, 2-5 mm slices."""
    rng = np.random.default_rng([seed, 7])
    pixel = round(float(rng.uniform(1.5, 4.0)), 2)
    step = round(float(rng.uniform(2.0, 5.0)), 2)
    field = float(rng.uniform(360.0, 440.0))
    depth = float(rng.uniform(200.0, 280.0))
    n_xy = math.ceil(field / pixel)
    return (math.ceil(depth / step), n_xy, n_xy), (step, pixel, pixel)


def train_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    train_cases: int = 24,
    val_cases: int = 4,
    test_cases: int = 6,
    epochs: int = 30,
    patience: int = 6,
    batch_size: int = 2,
    learning_rate: float = 2e-3,
    progress: Callable[[str], None] | None = None,
    bar: bool = False,
    spec: InputSpec = DEMO_SPEC,
    architecture: Mapping[str, Any] = DEMO_ARCHITECTURE,
    version: str = DEMO_VERSION,
) -> Path:
    """Train the demo liver model on generated phantoms and write it to ``out_dir``.

    Phantoms (:mod:`models.segmentation.phantom`) are drawn with fixed seeds on varied grids,
    rendered through the inference preprocessing onto a 4 mm grid, and the network
    (:data:`~models.segmentation.network.DEMO_ARCHITECTURE`) is trained with early stopping on
    ``val_cases`` of them. ``test_cases`` further phantoms on a clinical-like grid are then
    segmented through the whole inference path; their Dice and HD95 go into the card's metrics,
    ``evaluation.json`` and ``evaluation-overlay.png`` in the model directory. The card says
    ``demo: true``. ``spec`` and ``architecture`` replace the demo's grid and network, under
    another ``version`` (the benchmarks train one of the seed's size this way). Returns
    ``out_dir``.
    """
    if train_cases < 1 or val_cases < 1 or test_cases < 1:
        raise ValueError("train_cases, val_cases and test_cases must be positive")
    if epochs < 1 or patience < 1 or batch_size < 1:
        raise ValueError("epochs, patience and batch_size must be positive")
    _check_spec(spec, architecture)
    out = Path(out_dir)
    base = 1000 * seed
    started = time.perf_counter()
    with ThreadScope(), Reporter(progress, bar) as reporter:
        set_determinism(seed=seed)
        reporter.start("generating phantoms", train_cases + val_cases)
        items = []
        for i in range(train_cases + val_cases):
            shape, spacing = _demo_geometry(base + i)
            items.append(prepare_case(phantom_case(base + i, shape, spacing), spec))
            reporter.advance()
        generation_s = time.perf_counter() - started
        reporter.say(f"generated {len(items)} phantoms ({generation_s:.0f} s)")
        train_items, val_items = items[:train_cases], items[train_cases:]
        network = build_network(architecture)
        result = fit(
            network,
            train_items,
            val_items,
            spec,
            epochs=epochs,
            patience=patience,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            device=torch.device("cpu"),
            reporter=reporter,
        )
        training: dict[str, JsonValue] = {
            "data": "generated CT phantoms only (no patient data)",
            "generator": GENERATOR_ID,
            "train_count": len(train_items),
            "val_count": len(val_items),
            "source_grids": "1.5-4 mm pixels, 2-5 mm slices, 360-440 mm field",
            "epochs": epochs,
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "patience": patience,
            "seed": seed,
            "batch_size": batch_size,
            "loss": "Dice + cross-entropy (monai.losses.DiceCELoss)",
            "optimizer": f"Adam (lr {learning_rate}, weight decay {WEIGHT_DECAY}), cosine decay",
            "augmentation": AUGMENTATION,
            "history": result.history,
            "generation_seconds": round(generation_s, 1),
            "torch": torch.__version__,
            "monai": monai.__version__,
        }
        metrics: dict[str, JsonValue] = {"val_dice": round(result.val_dice, 4)}
        draft = _draft(
            name=MODEL_NAME,
            version=version,
            spec=spec,
            architecture=architecture,
            training={**training, "seconds": round(time.perf_counter() - started, 1)},
            metrics=metrics,
            demo=True,
        )
        write_model_dir(out, draft, result.state)

        shape, spacing = DEMO_TEST_GEOMETRY
        test_seeds = [base + 800 + i for i in range(test_cases)]
        report = evaluate_liver(
            out,
            (phantom_case(s, shape, spacing) for s in test_seeds),
            png_path=out / "evaluation-overlay.png",
            progress=reporter.say,
        )
        (out / "evaluation.json").write_text(_json(report), encoding="utf-8")
        metrics["heldout"] = {
            "data": f"{test_cases} generated phantoms on a {spacing[0]} x {spacing[1]} mm grid",
            "dice_mean": report["dice_mean"],
            "dice_min": report["dice_min"],
            "hd95_mm_mean": report["hd95_mm_mean"],
        }
        training["seconds"] = round(time.perf_counter() - started, 1)
        write_model_dir(
            out,
            _draft(
                name=MODEL_NAME,
                version=version,
                spec=spec,
                architecture=architecture,
                training=training,
                metrics=metrics,
                demo=True,
            ),
            result.state,
        )
        reporter.say(
            f"wrote {MODEL_NAME} {version}: held-out Dice {report['dice_mean']}, "
            f"HD95 {report['hd95_mm_mean']} mm"
        )
    return out


def _json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def train_from_folder(
    data_dir: Path,
    out_dir: Path,
    *,
    labels: LabelFormat = "nifti",
    init_from: Path | None = None,
    epochs: int = 100,
    patience: int = 10,
    seed: int = 0,
    progress: bool = True,
    val_fraction: float = 0.2,
    spacing_mm: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    hu_window: Sequence[float] | None = None,
    architecture: Mapping[str, Any] | None = None,
    batch_size: int = 2,
    learning_rate: float = 1e-3,
    name: str = MODEL_NAME,
    version: str = "1.0.0",
    device: str = "cpu",
    message: Callable[[str], None] | None = None,
) -> Path:
    """Train a liver model on a labelled folder and write it to ``out_dir``; return ``out_dir``.

    ``labels`` picks the layout (see :mod:`models.segmentation.data`): ``"nifti"`` reads
    ``images/<case>.nii.gz`` with ``labels/<case>.nii.gz``, ``"seg"`` reads one folder per case
    holding a CT series and its DICOM SEG. A fixed-seed ``val_fraction`` of the cases (at least
    one) is held out for early stopping; the card's metrics report Dice/HD95 on them through the
    whole inference path. ``init_from`` names a liver model directory to start from (transfer
    learning): its weights are verified and loaded, and its input grid, window and network are
    kept (``spacing_mm``, ``roi_size``, ``hu_window`` and ``architecture`` must then be left
    unset). Otherwise they default to :data:`FOLDER_SPEC` and :data:`FOLDER_ARCHITECTURE`.
    ``progress`` shows a progress bar; ``message`` receives one line per epoch.
    """
    if epochs < 1 or patience < 1 or batch_size < 1:
        raise ValueError("epochs, patience and batch_size must be positive")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    names = case_names(Path(data_dir), labels)
    if len(names) < 2:
        raise ValueError("at least two labelled cases are needed (one is held out)")
    init_summary: JsonValue = None
    state: dict[str, torch.Tensor] | None = None
    if init_from is not None:
        if any(v is not None for v in (spacing_mm, roi_size, hu_window, architecture)):
            raise ValueError(
                "with init_from the input grid, window and network come from that model: "
                "leave spacing_mm, roi_size, hu_window and architecture unset"
            )
        init_card = read_model_card(Path(init_from))
        spec = check_card(init_card)
        arch: Mapping[str, Any] = init_card.architecture
        state = load_weights(Path(init_from), init_card)
        init_summary = {
            "name": init_card.name,
            "version": init_card.version,
            "weights_sha256": init_card.weights.sha256,
        }
    else:
        spec = InputSpec(
            spacing_mm=tuple(spacing_mm or FOLDER_SPEC.spacing_mm),  # type: ignore[arg-type]
            roi_size=tuple(roi_size or FOLDER_SPEC.roi_size),  # type: ignore[arg-type]
            hu_window=tuple(hu_window or FOLDER_SPEC.hu_window),  # type: ignore[arg-type]
        )
        arch = dict(architecture or FOLDER_ARCHITECTURE)
    _check_spec(spec, arch)
    network = build_network(arch)
    if state is not None:
        network.load_state_dict(state, strict=True)
    resolved = resolve_device(device)

    shuffled = list(np.random.default_rng([seed, 99]).permutation(len(names)))
    n_val = max(1, round(len(names) * val_fraction))
    val_names = [names[int(i)] for i in sorted(shuffled[:n_val])]
    train_names = [names[int(i)] for i in sorted(shuffled[n_val:])]
    out = Path(out_dir)
    started = time.perf_counter()
    with ThreadScope(), Reporter(message, progress) as reporter:
        set_determinism(seed=seed)
        reporter.start("reading cases", len(names))
        items: dict[str, TrainingItem] = {}
        for case in iter_cases(Path(data_dir), labels, train_names + val_names):
            items[case.name] = prepare_case(case, spec)
            reporter.advance()
        reading_s = time.perf_counter() - started
        result = fit(
            network,
            [items[n] for n in train_names],
            [items[n] for n in val_names],
            spec,
            epochs=epochs,
            patience=patience,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            device=resolved,
            reporter=reporter,
        )
        del items
        training: dict[str, JsonValue] = {
            "data": f"{len(names)} labelled cases ({labels})",
            "train_count": len(train_names),
            "val_count": len(val_names),
            "epochs": epochs,
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "patience": patience,
            "seed": seed,
            "batch_size": batch_size,
            "loss": "Dice + cross-entropy (monai.losses.DiceCELoss)",
            "optimizer": f"Adam (lr {learning_rate}, weight decay {WEIGHT_DECAY}), cosine decay",
            "augmentation": AUGMENTATION,
            "init_from": init_summary,
            "history": result.history,
            "reading_seconds": round(reading_s, 1),
            "torch": torch.__version__,
            "monai": monai.__version__,
        }
        metrics: dict[str, JsonValue] = {"val_dice": round(result.val_dice, 4)}
        write_model_dir(
            out,
            _draft(
                name=name,
                version=version,
                spec=spec,
                architecture=arch,
                training=training,
                metrics=metrics,
                demo=False,
            ),
            result.state,
        )
        report = evaluate_liver(
            out,
            iter_cases(Path(data_dir), labels, val_names),
            png_path=out / "evaluation-overlay.png",
            device=device,
            progress=reporter.say,
        )
        (out / "evaluation.json").write_text(_json(report), encoding="utf-8")
        metrics["validation"] = {
            "note": "the validation cases also chose the best epoch",
            "dice_mean": report["dice_mean"],
            "dice_min": report["dice_min"],
            "hd95_mm_mean": report["hd95_mm_mean"],
        }
        training["seconds"] = round(time.perf_counter() - started, 1)
        write_model_dir(
            out,
            _draft(
                name=name,
                version=version,
                spec=spec,
                architecture=arch,
                training=training,
                metrics=metrics,
                demo=False,
            ),
            result.state,
        )
    return out
