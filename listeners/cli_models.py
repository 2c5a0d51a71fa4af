"""`carebridge models ...`, `carebridge train ...` and `carebridge evaluate ...`.

Model code (torch, MONAI, transformers) is imported inside each command, so the other
commands start fast and the listeners never load it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from worker.settings import Settings, SettingsError, load_settings

models_app = typer.Typer(help="Model directories.", no_args_is_help=True)
train_app = typer.Typer(help="Train a model; writes a model directory.", no_args_is_help=True)
evaluate_app = typer.Typer(
    help="Evaluate a model; writes a report into its directory.", no_args_is_help=True
)

console = Console() if sys.stdout.isatty() else Console(width=240)
err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        err.print(f"[red]carebridge: {exc}[/red]")
        raise typer.Exit(2) from None


def _print_report(report: dict[str, Any], path: Path | None) -> None:
    console.print_json(json.dumps(report, default=str))
    if path is not None:
        console.print(f"report written to {path}")


# Demo models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoModel:
    """A pipeline's demo model: its directory under MODELS_DIR and how to make it."""

    key: str
    directory: str
    description: str
    make: Callable[[Path, bool, dict[str, Any]], str]  # (target, quick, options) -> summary


def _make_cxr(target: Path, quick: bool, options: dict[str, Any]) -> str:
    from models.cxr.train import train_demo

    if quick:
        options = {"images_per_class": 24, "epochs": 2, **options}
    card = train_demo(target, progress=lambda line: console.print(line), **options)
    return f"trained {card.version}; metrics {json.dumps(card.metrics)}"


def _make_liver(target: Path, quick: bool, options: dict[str, Any]) -> str:
    from models.card import read_model_card
    from models.segmentation.train import train_demo

    if quick:
        train_demo(target, train_cases=6, val_cases=2, test_cases=2, epochs=8, patience=8)
    else:
        train_demo(target, progress=lambda line: console.print(line))
    card = read_model_card(target)
    return f"trained {card.version}; metrics {json.dumps(card.metrics)}"


def _make_risk(target: Path, quick: bool, options: dict[str, Any]) -> str:
    from models.card import read_model_card
    from models.risk.train import train_demo

    if quick:
        train_demo(target, n_patients=6000, epochs=4)
    else:
        train_demo(target)
    card = read_model_card(target)
    return f"trained {card.version}; metrics {json.dumps(card.metrics)}"


def _make_symptoms(target: Path, quick: bool, options: dict[str, Any]) -> str:
    from models.card import read_model_card
    from models.symptoms.train import train_demo

    if quick:
        train_demo(target, notes_per_condition=4, calibration_per_condition=2, epochs=60)
    else:
        train_demo(target, progress=lambda line: console.print(line))
    card = read_model_card(target)
    return f"trained {card.version}; metrics {json.dumps(card.metrics)}"


def _make_treatment(target: Path, quick: bool, options: dict[str, Any]) -> str:
    from models.card import read_model_card
    from models.treatment import build_model_dir

    build_model_dir(target)
    card = read_model_card(target)
    return f"evidence table {card.version} ({len(card.labels)} therapies)"


DEMO_MODELS: dict[str, DemoModel] = {
    model.key: model
    for model in (
        DemoModel("cxr", "cxr-resnet18", "chest X-ray classifier (generated images)", _make_cxr),
        DemoModel("liver", "liver-unet3d", "liver 3-D U-Net (generated CT phantoms)", _make_liver),
        DemoModel(
            "symptoms",
            "symptoms-minilm",
            "symptom head on MiniLM (notes generated from the knowledge base)",
            _make_symptoms,
        ),
        DemoModel("risk", "risk-mlp", "risk MLP (cohort simulated from the PCE)", _make_risk),
        DemoModel("treatment", "treatment-evidence", "biomarker evidence table", _make_treatment),
    )
}


def missing_demo_models(models_dir: Path) -> list[str]:
    """Keys of the demo models whose directory is absent under ``models_dir``."""
    return [
        key
        for key, model in DEMO_MODELS.items()
        if not (models_dir / model.directory / "model-card.json").exists()
    ]


@models_app.command("list")
def models_list() -> None:
    """Show the model directories under MODELS_DIR and whether they load."""
    from models.card import ModelLoadError, list_model_dirs, verify_weights

    settings = _settings()
    table = Table("directory", "name", "version", "task", "weights sha256", "demo", "status")
    for path, card in list_model_dirs(settings.models_dir):
        if isinstance(card, Exception):
            table.add_row(path.name, "", "", "", "", "", f"[red]{card}[/red]")
            continue
        try:
            verify_weights(path, card)
            status = "ok"
        except ModelLoadError as exc:
            status = f"[red]refused: {exc}[/red]"
        table.add_row(
            path.name,
            card.name,
            card.version,
            card.task,
            card.weights.sha256[:16],
            "yes" if card.demo else "no",
            status,
        )
    from models.bundle import list_external_models

    for external in list_external_models(settings.models_dir):
        table.add_row(
            external.path.name,
            external.name,
            external.version,
            external.source,
            (external.weights_sha256 or "")[:16],
            "no",
            f"[red]{external.problem}[/red]"
            if external.problem
            else "found (checked against a pipeline when it loads it)",
        )
    console.print(table)


@models_app.command("demo")
def models_demo(
    only: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated subset of: {', '.join(DEMO_MODELS)}."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when the model exists.")] = False,
    quick: Annotated[
        bool, typer.Option(help="Tiny training runs (tests, smoke checks): not demo quality.")
    ] = False,
    images_per_class: Annotated[
        int | None, typer.Option(help="cxr: generated images per class.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="cxr: training epochs.")] = None,
) -> None:
    """Prepare demo weights for every pipeline in MODELS_DIR (offline, idempotent)."""
    from models.card import ModelLoadError, read_model_card, verify_weights

    settings = _settings()
    keys = [k.strip() for k in only.split(",")] if only else list(DEMO_MODELS)
    unknown = [k for k in keys if k not in DEMO_MODELS]
    if unknown:
        err.print(f"[red]unknown demo models {unknown}; choose from {list(DEMO_MODELS)}[/red]")
        raise typer.Exit(2)
    cxr_options: dict[str, Any] = {}
    if images_per_class is not None:
        cxr_options["images_per_class"] = images_per_class
    if epochs is not None:
        cxr_options["epochs"] = epochs
    for key in keys:
        model = DEMO_MODELS[key]
        target = settings.models_dir / model.directory
        if not force and (target / "model-card.json").exists():
            try:
                verify_weights(target, read_model_card(target))
                console.print(f"{model.directory}: present ({target})")
                continue
            except ModelLoadError as exc:
                console.print(f"{model.directory}: existing weights refused ({exc}); rebuilding")
        console.print(f"{model.directory}: {model.description} ...")
        summary = model.make(target, quick, cxr_options if key == "cxr" else {})
        console.print(f"{model.directory}: {summary}")


# Training and evaluation ---------------------------------------------------------------


@train_app.command("risk")
def train_risk(
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    patients: Annotated[int, typer.Option(help="Simulated cohort size.")] = 80000,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the risk MLP on a cohort simulated from the published equations."""
    from models.risk.train import train_demo

    train_demo(out, seed=seed, n_patients=patients, epochs=epochs)
    console.print(f"model directory written: {out}")


@evaluate_app.command("risk")
def evaluate_risk(
    model_dir: Annotated[Path, typer.Argument(help="The risk model directory.")],
    patients: Annotated[int, typer.Option(help="Held-out simulated patients.")] = 20000,
    seed: Annotated[int, typer.Option(help="Seed of the held-out cohort.")] = 1,
    missing_rate: Annotated[
        float, typer.Option(help="Fraction of features hidden, to see the effect.")
    ] = 0.0,
) -> None:
    """AUC and calibration of the risk model against the equations, on held-out patients."""
    from models.risk.train import evaluate

    report = evaluate(model_dir, n_patients=patients, seed=seed, missing_rate=missing_rate)
    data = report.to_dict()
    path = model_dir / "evaluation" / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    _print_report(data, path)


@train_app.command("symptoms")
def train_symptoms(
    notes_csv: Annotated[Path, typer.Argument(help="CSV with columns note,label.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    base: Annotated[
        Path | None, typer.Option(help="Start from this symptoms model directory.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs of the head.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the symptom head (MiniLM encoder + linear) on labelled notes.

    Labels are knowledge-base condition ids or ICD-10-CM codes; notes generated from the
    knowledge base are mixed in so that every condition keeps examples.
    """
    from models.symptoms.train import TrainingDataError, train_head_from_csv

    try:
        train_head_from_csv(notes_csv, out, base_dir=base, epochs=epochs, seed=seed)
    except TrainingDataError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"model directory written: {out}")


@evaluate_app.command("symptoms")
def evaluate_symptoms(
    model_dir: Annotated[Path, typer.Argument(help="The symptoms model directory.")],
) -> None:
    """Top-1 / top-3 accuracy and calibration on the shipped hand-written notes."""
    from models.symptoms.analyzer import SymptomAnalyzer
    from models.symptoms.train import evaluate_notes, load_eval_notes

    report = evaluate_notes(SymptomAnalyzer.load(model_dir), load_eval_notes())
    path = model_dir / "evaluation" / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    _print_report(report, path)


@train_app.command("cxr")
def train_cxr(
    data_dir: Annotated[Path, typer.Argument(help="Folder of DICOM images.")],
    labels: Annotated[Path, typer.Option(help="CSV with columns file,label.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this model directory (transfer learning).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="At most this many epochs.")] = 30,
    patience: Annotated[int, typer.Option(help="Early stopping patience (epochs).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the chest X-ray classifier on your labelled DICOM (labels: normal, pneumonia,
    lung_cancer); augmentation, class weights, Adam, early stopping."""
    from models.cxr.train import train_from_folder

    try:
        train_from_folder(
            data_dir,
            labels,
            out,
            init_from=init_from,
            epochs=epochs,
            patience=patience,
            batch_size=batch_size,
            seed=seed,
            progress=True,
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"model directory written: {out}")


@evaluate_app.command("cxr")
def evaluate_cxr_command(
    model_dir: Annotated[Path, typer.Argument(help="The chest X-ray model directory.")],
    data_dir: Annotated[
        Path | None, typer.Option("--data", help="Folder of labelled DICOM (else generated).")
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV with columns file,label.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated held-out images.")] = 0,
) -> None:
    """Accuracy, per-class precision/recall/F1/ROC AUC and the confusion matrix; writes
    report.json, roc.png and confusion.png into the model directory."""
    from models.cxr.evaluate import evaluate_cxr

    if (data_dir is None) != (labels is None):
        err.print("[red]give both --data and --labels, or neither (generated images)[/red]")
        raise typer.Exit(2)
    try:
        report = evaluate_cxr(model_dir, data_dir, labels, seed=seed, progress=True)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    _print_report(report.to_dict(), report.report_json)


@train_app.command("liver")
def train_liver(
    data_dir: Annotated[Path, typer.Argument(help="images/ + labels/ NIfTI, or DICOM + SEG.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    labels: Annotated[str, typer.Option(help="'nifti' or 'seg'.")] = "nifti",
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this model directory (transfer learning).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="At most this many epochs.")] = 100,
    patience: Annotated[int, typer.Option(help="Early stopping patience (epochs).")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the liver 3-D U-Net on your labelled CT; writes a model directory with its
    evaluation (Dice, HD95, an overlay PNG)."""
    from models.segmentation.train import train_from_folder

    if labels not in ("nifti", "seg"):
        err.print("[red]--labels must be 'nifti' or 'seg'[/red]")
        raise typer.Exit(2)
    try:
        train_from_folder(
            data_dir,
            out,
            labels=labels,  # type: ignore[arg-type]
            init_from=init_from,
            epochs=epochs,
            patience=patience,
            seed=seed,
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"model directory written: {out}")


@evaluate_app.command("liver")
def evaluate_liver_command(
    model_dir: Annotated[Path, typer.Argument(help="The liver model directory.")],
    data_dir: Annotated[
        Path | None, typer.Option("--data", help="Labelled CT (else generated phantoms).")
    ] = None,
    labels: Annotated[str, typer.Option(help="'nifti' or 'seg'.")] = "nifti",
    phantoms: Annotated[int, typer.Option(help="Generated phantoms when no --data.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the generated phantoms.")] = 90000,
) -> None:
    """Dice and HD95 per case and on average; writes evaluation/report.json and an overlay
    PNG into the model directory."""
    from models.segmentation.data import iter_cases, phantom_case
    from models.segmentation.evaluate import evaluate_liver

    cases: Any
    if data_dir is not None:
        cases = iter_cases(data_dir, labels)  # type: ignore[arg-type]
    else:
        cases = (phantom_case(seed + i, (64, 256, 256), (5.0, 1.5, 1.5)) for i in range(phantoms))
    folder = model_dir / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report = evaluate_liver(model_dir, cases, png_path=folder / "overlay.png")
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    _print_report(report, path)
