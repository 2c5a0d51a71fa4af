"""Imaging inference cost per study, end to end, against the bare network forward on the same input.

    .venv/bin/python bench/inference.py [--models-dir DIR] [--repeats 3] [--ct-shape 100,512,512]
        [--ct-spacing 2.5,0.8,0.8] [--cxr-size 2048] [--device cpu] [--threads 0]
        [--only cxr|liver] [--no-reference] [--networks demo|reference|both] [--default-malloc]

Both imaging pipelines run here as a worker runs them, without the database, the queue and the
PACS, and with the worker's allocator settings (:func:`worker.memory.keep_freed_memory`;
``--default-malloc`` leaves glibc's defaults, under which both the pipeline and the bare forward
fault their buffers in again on every call). Chest X-ray: a two-image study of generated 16-bit
radiographs (``--cxr-size`` square) is read, decoded, preprocessed, classified, reported as a
TID 1500 SR and written and read back. Liver: a generated CT phantom series is read, made a
volume, segmented, and its DICOM SEG, volume SR and key image are built and each written and
read back. The bare forward is what any MONAI
user runs on the input the pipeline prepared: the ResNet-18 on the preprocessed batch, and the
3-D U-Net's ``sliding_window_inference`` (same ROI, overlap and blending) on the resampled,
windowed model-grid volume. Model loading is left out (a worker loads a model once). End to end
and bare alternate in one process after a warm-up, with torch's default threads; medians are
compared (minimums are printed too: on a shared machine they are the least disturbed runs).
The target is an end-to-end time of at most 1.5x the bare forward. The bare sliding window is
also timed at sw_batch_size 1 and 4, and the CXR batch through an untrained ResNet-18 with
MONAI's default stride-1 stem for reference. Peak RSS is this process's (the inputs are
generated in a child process). Without --models-dir quick demo models are trained first
(their accuracy is not the demo models'). Nothing here is a pass/fail test.

``--networks reference`` runs both pipelines instead with networks of the sizes the seed and
the issue measured: MONAI's ResNet-18 with its default stride-1 stem (the seed's classifier),
untrained and loaded the way a hospital's own model loads, as a MONAI bundle (what it
classifies does not change the pipeline's work); and a 3-D U-Net of channels 16-256 on a
2.5 x 1.6 x 1.6 mm grid, which makes the default phantom a 100 x 256 x 256 volume (the issue's
reference is 128 x 256 x 256), trained for a few minutes on generated phantoms by the demo's
training so that its mask is a liver's, if a rough one (its held-out Dice is printed). The
work outside the forward is the same code; only the network's share grows. ``--networks
both`` runs the demo models, then these.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import resnet18
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.cxr.classifier import CXR_LABELS, INPUT_SIZE, CxrClassifier
from models.cxr.preprocess import preprocess_datasets
from models.cxr.synthetic import make_cxr_dataset
from models.segmentation.infer import SW_OVERLAP, InputSpec, LiverSegmenter, SegmentationResult
from models.segmentation.network import DEMO_ARCHITECTURE
from models.segmentation.phantom import write_phantom_series
from models.segmentation.preprocess import prepare_image
from models.segmentation.train import train_demo
from models.segmentation.volume import load_ct_series, sort_datasets
from worker.memory import keep_freed_memory
from worker.outputs.dicom_seg import build_liver_seg, write_seg_and_read_back
from worker.outputs.dicom_sr import (
    ClassificationFinding,
    build_classification_sr,
    write_and_read_back,
)
from worker.outputs.dicom_volume_sr import (
    VolumeMeasurement,
    build_volume_sr,
    write_volume_sr_and_read_back,
)
from worker.outputs.key_image import (
    build_segmentation_key_image,
    key_slice_index,
    write_key_image_and_read_back,
)

#: Demo model directories under MODELS_DIR (as ``listeners.cli models demo`` writes them).
CXR_MODEL = "cxr-resnet18"
LIVER_MODEL = "liver-unet3d"
TARGET_RATIO = 1.5
DEMO_OPTIONS = ("--only", "cxr,liver", "--quick")
#: ``--networks reference``: the liver network and grid of the issue's reference size.
REFERENCE_LIVER_ARCHITECTURE: dict[str, object] = {
    **DEMO_ARCHITECTURE,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}
REFERENCE_LIVER_SPEC = InputSpec(
    spacing_mm=(2.5, 1.6, 1.6), roi_size=(64, 96, 96), hu_window=(-200.0, 250.0)
)
#: Its short training on generated phantoms (a few minutes on two cores).
REFERENCE_LIVER_CASES = (16, 2, 2)  # train, validation, held out
REFERENCE_LIVER_EPOCHS = 25

Stages = dict[str, float]


def _shape(text: str) -> tuple[int, int, int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"three comma-separated sizes expected, got {text!r}")
    return values[0], values[1], values[2]


def _spacing(text: str) -> tuple[float, float, float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"three comma-separated mm expected, got {text!r}")
    return values[0], values[1], values[2]


def _write_inputs(
    root: Path,
    ct_shape: tuple[int, int, int],
    ct_spacing: tuple[float, float, float],
    cxr_size: int,
) -> None:
    """Write the CT phantom series and the two-image CXR study (run in a child process)."""
    write_phantom_series(root / "ct", seed=7, shape=ct_shape, spacing=ct_spacing)
    rng = np.random.default_rng(0)
    study_uid, series_uid = generate_uid(), generate_uid()
    (root / "cxr").mkdir()
    for number, label in enumerate(("pneumonia", "normal"), start=1):
        ds = make_cxr_dataset(
            label,
            rng,
            patient_name="Bench^Inference",
            patient_id="BENCH",
            study_uid=study_uid,
            series_uid=series_uid,
            shape=(cxr_size, cxr_size),
            instance_number=number,
        )
        ds.save_as(root / "cxr" / f"CR{number}.dcm", enforce_file_format=True)


def write_reference_cxr_bundle(out: Path) -> None:
    """A MONAI bundle of an untrained ResNet-18 with MONAI's default stride-1 stem at ``out``.

    Its metadata says what carebridge reads from a classification bundle (input, classes);
    the weights are drawn with a fixed seed and the BatchNorm statistics spread, so that the
    outputs vary with the input. What it classifies does not change the pipeline's work.
    """
    torch.manual_seed(0)
    network = resnet18(spatial_dims=2, n_input_channels=1, num_classes=len(CXR_LABELS)).eval()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    with torch.no_grad():
        traced = torch.jit.trace(network, torch.zeros(1, 1, INPUT_SIZE, INPUT_SIZE))
    traced.save(str(out / "models" / "model.pt"))
    metadata = {
        "name": "cxr-resnet18-stride1-untrained",
        "version": "0.0.0",
        "authors": "carebridge bench (untrained: for timing only)",
        "task": "chest X-ray classification",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [INPUT_SIZE, INPUT_SIZE]}},
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(CXR_LABELS),
                    "channel_def": {str(i): label.name for i, label in enumerate(CXR_LABELS)},
                }
            },
        },
    }
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    (out / "configs" / "inference.json").write_text(
        json.dumps({"bundle_root": "."}), encoding="utf-8"
    )


def train_reference_liver(out: Path) -> None:
    """A liver model of the reference size, trained briefly on generated phantoms, at ``out``.

    The demo's training (``train_demo``) with the reference grid and network: its mask is
    a liver's, if a rough one, so that the post-processing, SEG and SR do the work a real
    model's output gives them. Its held-out Dice is in the card and printed.
    """
    train_demo(
        out,
        spec=REFERENCE_LIVER_SPEC,
        architecture=REFERENCE_LIVER_ARCHITECTURE,
        version="0.1.0-bench-reference",
        train_cases=REFERENCE_LIVER_CASES[0],
        val_cases=REFERENCE_LIVER_CASES[1],
        test_cases=REFERENCE_LIVER_CASES[2],
        epochs=REFERENCE_LIVER_EPOCHS,
        patience=REFERENCE_LIVER_EPOCHS,
    )


def _in_child(target: Callable[..., object], *args: object) -> None:
    """Run ``target(*args)`` in a spawned process: what it allocates does not count in this
    process's peak RSS."""
    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Wall-clock stage timer; synchronises CUDA so device work lands in its own stage."""

    def __init__(self, device: torch.device) -> None:
        self.sync: Callable[[], None] = (
            torch.cuda.synchronize if device.type == "cuda" else lambda: None
        )
        self.stages: Stages = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (seconds, added to any earlier time of that stage)."""
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


def _amp(device: torch.device) -> contextlib.AbstractContextManager[object]:
    # As the models run: float16 autocast on CUDA, plain float32 on CPU.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def cxr_study(classifier: CxrClassifier, files: Sequence[Path], out: Path) -> Stages:
    """One CXR study as ``worker.pipelines.cxr`` runs it: read -> SR read back."""
    clock = Clock(classifier.device)
    with clock.stage("read files (dcmread)"):
        datasets = [pydicom.dcmread(path) for path in files]
    with clock.stage("decode pixels"):
        for ds in datasets:
            ds.pixel_array  # noqa: B018 (decodes and caches, as preprocess_dataset would)
    with clock.stage("preprocess (LUTs, window, resize)"):
        batch = preprocess_datasets(datasets, INPUT_SIZE)
    with clock.stage("predict (forward + softmax)"):
        per_image = classifier.predict_arrays(batch)
    with clock.stage("SR build"):
        labels = classifier.card.coded_labels
        mean = np.mean(
            [[image.probabilities[label.name] for label in labels] for image in per_image], axis=0
        )
        best = int(np.argmax(mean))
        finding = ClassificationFinding(
            label=labels[best],
            probability=float(mean[best]),
            probabilities={label.name: float(mean[i]) for i, label in enumerate(labels)},
        )
        sr = build_classification_sr(
            datasets,
            finding,
            classifier.provenance,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
        )
    with clock.stage("SR write + read back"):
        write_and_read_back(sr, out / "cxr-sr.dcm")
    return clock.stages


def liver_study(
    segmenter: LiverSegmenter, files: Sequence[Path], out: Path
) -> tuple[Stages, SegmentationResult]:
    """One CT series as ``worker.pipelines.liver`` runs it: read -> SEG, SR, key image read back."""
    clock = Clock(segmenter.device)
    with clock.stage("read files (dcmread)"):
        datasets = [pydicom.dcmread(path) for path in files]
    with clock.stage("decode + HU volume (load_ct_series)"):
        volume = load_ct_series(datasets)
        sources = sort_datasets(datasets)
    clock.sync()
    start = time.perf_counter()
    result = segmenter.segment(volume)
    segment_s = time.perf_counter() - start
    # segment() times its own stages; what it does outside them is counted as "other".
    inner = {k: v for k, v in result.timings.items() if k != "total"}
    names = {
        "preprocess": "preprocess (resample, window)",
        "inference": "sliding window + softmax",
        "postprocess": "largest component + holes (model grid)",
        "restore": "mask back to source grid",
        "measure": "volume + mean HU",
    }
    for key, value in inner.items():
        clock.stages[names.get(key, key)] = value
    clock.stages["segment: other"] = max(0.0, segment_s - sum(inner.values()))
    if result.empty:
        raise SystemExit(
            "the liver model found no liver in the phantom: the outputs cannot be built "
            "(train the demo model properly or pass another --models-dir)"
        )
    provenance = segmenter.provenance
    mask = result.mask
    with clock.stage("SEG build"):
        seg = build_liver_seg(sources, mask, provenance)
    with clock.stage("volume SR build"):
        measurement = VolumeMeasurement(
            round(float(result.volume_ml), 2),
            None if result.mean_hu is None else round(float(result.mean_hu), 1),
        )
        sr = build_volume_sr(sources, seg, [measurement], provenance)
    with clock.stage("key image build"):
        key_index = key_slice_index(mask)
        key_image = build_segmentation_key_image(
            sources[key_index], mask[key_index], provenance, volume_ml=measurement.volume_ml
        )
    with clock.stage("SEG write + read back"):
        write_seg_and_read_back(seg, out / "seg.dcm")
    with clock.stage("volume SR write + read back"):
        write_volume_sr_and_read_back(sr, out / "volume-sr.dcm")
    with clock.stage("key image write + read back"):
        write_key_image_and_read_back(key_image, out / "key.dcm")
    return clock.stages, result


def bare_sliding_window(
    network: torch.nn.Module,
    image: torch.Tensor,
    roi_size: tuple[int, int, int],
    sw_batch_size: int,
    device: torch.device,
) -> None:
    """The 3-D U-Net's sliding window on the prepared (1, 1, z, y, x) model-grid tensor."""
    with torch.inference_mode(), _amp(device):
        sliding_window_inference(
            image,
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            predictor=network,
            overlap=SW_OVERLAP,
            mode="gaussian",
        )


def bare_forward(network: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> None:
    """The classifier network alone on the preprocessed (N, 1, 224, 224) batch."""
    with torch.inference_mode(), _amp(device):
        network(batch)


def _timed(run: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def _row(name: str, values: Sequence[float], total: float | None = None) -> str:
    share = f"{statistics.median(values) / total:7.1%}" if total else ""
    return (
        f"  {name:<38} {statistics.median(values) * 1000:10.1f} {min(values) * 1000:9.1f} {share}"
    )


def _print_stages(title: str, runs: list[Stages], bare: list[float], bare_name: str) -> None:
    """Print each stage's median and minimum, the bare forward and the end-to-end ratio."""
    totals = [sum(stages.values()) for stages in runs]
    total, bare_median = statistics.median(totals), statistics.median(bare)
    print(f"\n{title}\n")
    print(f"  {'stage':<38} {'median ms':>10} {'min ms':>9} {'share':>7}")
    for name in runs[0]:
        print(_row(name, [stages[name] for stages in runs], total))
    print(_row("end to end (sum of stages)", totals))
    print(_row(bare_name, bare))
    # On a shared machine the minimum is the least disturbed run; the target is on medians.
    print(
        f"  end to end / bare = {total / bare_median:.2f}x on medians "
        f"({min(totals) / min(bare):.2f}x on minimums; target <= {TARGET_RATIO}x); "
        f"outside the bare forward: {(total - bare_median) * 1000:.1f} ms"
    )


def run_cxr(
    classifier: CxrClassifier, files: list[Path], out: Path, repeats: int, reference: bool
) -> None:
    """Time the CXR study and the bare ResNet-18 forward, alternately; print the table."""
    device = classifier.device
    sync = Clock(device).sync
    prepared = preprocess_datasets([pydicom.dcmread(p) for p in files], INPUT_SIZE)
    # As predict_arrays feeds the network: (N, 1, 224, 224) float32.
    prepared = prepared.reshape(len(files), 1, INPUT_SIZE, INPUT_SIZE)
    batch = torch.from_numpy(np.ascontiguousarray(prepared, dtype=np.float32)).to(device)
    network = classifier.network
    stride1: torch.nn.Module | None = None
    if reference:
        # MONAI's default stem (stride 1) for scale only: untrained, same input and threads.
        stride1 = resnet18(
            spatial_dims=2, n_input_channels=1, num_classes=len(classifier.labels)
        ).to(device)
        stride1.eval()
    cxr_study(classifier, files, out)  # warm-up: first calls allocate and import lazily
    bare_forward(network, batch, device)
    runs: list[Stages] = []
    bare: list[float] = []
    ref: list[float] = []
    for _ in range(repeats):
        gc.collect()
        runs.append(cxr_study(classifier, files, out))
        bare.append(_timed(partial(bare_forward, network, batch, device), sync))
        if stride1 is not None:
            ref.append(_timed(partial(bare_forward, stride1, batch, device), sync))
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    rows, cols = int(header.Rows), int(header.Columns)
    _print_stages(
        f"Chest X-ray: one study of {len(files)} images ({rows} x {cols}, 16-bit), "
        f"median of {repeats}",
        runs,
        bare,
        f"bare ResNet-18 forward (batch {len(files)})",
    )
    if ref:
        print(_row("reference: stride-1 stem, same batch", ref))
    print(f"  peak RSS so far: {_peak_rss_mib():.0f} MiB")


def run_liver(segmenter: LiverSegmenter, files: list[Path], out: Path, repeats: int) -> None:
    """Time the liver study and the bare sliding window (sw_batch_size 1 and 4); print."""
    device = segmenter.device
    sync = Clock(device).sync
    spec = segmenter.spec
    volume = load_ct_series([pydicom.dcmread(p) for p in files])
    image, geometry = prepare_image(volume, spec.spacing_mm, spec.hu_window)
    del volume
    tensor = torch.from_numpy(image)[None, None].to(device)
    network = segmenter.network
    batch_sizes = sorted({1, 4, segmenter.sw_batch_size})
    _, result = liver_study(segmenter, files, out)  # warm-up
    for size in batch_sizes:
        bare_sliding_window(network, tensor, spec.roi_size, size, device)
    runs: list[Stages] = []
    bare: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for _ in range(repeats):
        gc.collect()
        runs.append(liver_study(segmenter, files, out)[0])
        for size in batch_sizes:
            bare[size].append(
                _timed(
                    partial(bare_sliding_window, network, tensor, spec.roi_size, size, device), sync
                )
            )
    source = geometry.source_shape
    _print_stages(
        f"Liver: one CT series of {source[0]} slices of {source[1]} x {source[2]} "
        f"({' x '.join(f'{s:g}' for s in segmenter.spec.spacing_mm)} mm model grid "
        f"{' x '.join(str(s) for s in image.shape)}, ROI "
        f"{' x '.join(str(s) for s in spec.roi_size)}, sw_batch_size {segmenter.sw_batch_size}), "
        f"median of {repeats}",
        runs,
        bare[segmenter.sw_batch_size],
        f"bare sliding window (sw_batch_size {segmenter.sw_batch_size})",
    )
    for size in batch_sizes:
        print(_row(f"bare sliding window, sw_batch_size {size}", bare[size]))
    # The SEG's frames and the SR's Image Library grow with the slices holding liver.
    print(
        f"  mask: {result.volume_ml:.0f} mL on {int(result.mask.any(axis=(1, 2)).sum())} of "
        f"{source[0]} slices"
    )
    print(f"  peak RSS so far: {_peak_rss_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help=f"MODELS_DIR holding {CXR_MODEL}/ and {LIVER_MODEL}/ (default: train quick demos)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ct-shape",
        type=_shape,
        default=(100, 512, 512),
        help="phantom slices,rows,columns",
    )
    parser.add_argument(
        "--ct-spacing",
        type=_spacing,
        default=(2.5, 0.8, 0.8),
        help="phantom slice step,row,column spacing in mm",
    )
    parser.add_argument("--cxr-size", type=int, default=2048, help="radiograph rows = columns")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the stride-1 ResNet-18 reference"
    )
    parser.add_argument("--only", choices=("cxr", "liver"), default=None)
    parser.add_argument(
        "--networks",
        choices=("demo", "reference", "both"),
        default="demo",
        help="the demo models, untrained networks of the reference sizes as MONAI bundles, or both",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc's defaults instead of the worker's settings",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False if args.default_malloc else keep_freed_memory()
    malloc = "freed memory kept (as in the worker)" if kept else "glibc defaults"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
        f"malloc: {malloc}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="carebridge-bench-") as tmp:
        root = Path(tmp)
        models_dir: Path = args.models_dir or root / "models"
        model_sets: list[tuple[str, Path, Path]] = []
        if args.networks in ("demo", "both"):
            if args.models_dir is None:
                print("training quick demo models (cxr, liver) ...", flush=True)
                subprocess.run(
                    [sys.executable, "-m", "listeners.cli", "models", "demo", *DEMO_OPTIONS],
                    env={**os.environ, "CAREBRIDGE_MODELS_DIR": str(models_dir)},
                    check=True,
                    capture_output=True,
                )
            model_sets.append(("demo", models_dir / CXR_MODEL, models_dir / LIVER_MODEL))
        if args.networks in ("reference", "both"):
            refs = root / "reference"
            print(
                "writing an untrained stride-1 ResNet-18 as a MONAI bundle; training a "
                "reference-size liver model (a few minutes) ...",
                flush=True,
            )
            _in_child(write_reference_cxr_bundle, refs / "cxr")
            _in_child(train_reference_liver, refs / "liver")
            model_sets.append(("reference", refs / "cxr", refs / "liver"))
        print("writing the CT phantom series and the CXR study ...", flush=True)
        _in_child(_write_inputs, root, args.ct_shape, args.ct_spacing, args.cxr_size)
        out = root / "out"
        out.mkdir()
        print(f"peak RSS before loading models: {_peak_rss_mib():.0f} MiB", flush=True)
        for kind, cxr_dir, liver_dir in model_sets:
            if args.only in (None, "cxr"):
                classifier = CxrClassifier.load(cxr_dir, device=args.device)
                print(
                    f"\n[{kind}] CXR model: {classifier.card.name} {classifier.card.version}",
                    flush=True,
                )
                files = sorted((root / "cxr").glob("*.dcm"))
                reference = kind == "demo" and not args.no_reference
                run_cxr(classifier, files, out, args.repeats, reference=reference)
                del classifier
            if args.only in (None, "liver"):
                segmenter = LiverSegmenter.load(liver_dir, device=args.device)
                heldout = segmenter.card.metrics.get("heldout")
                dice = heldout.get("dice_mean") if isinstance(heldout, dict) else None
                print(
                    f"\n[{kind}] liver model: {segmenter.card.name} {segmenter.card.version}"
                    + ("" if dice is None else f" (held-out Dice {dice})"),
                    flush=True,
                )
                files = sorted((root / "ct").glob("*.dcm"))
                run_liver(segmenter, files, out, args.repeats)
                del segmenter
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
