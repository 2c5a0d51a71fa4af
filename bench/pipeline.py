"""Pipeline latency: from "study stable" to the SR stored in the PACS, minus model time.

    .venv/bin/python bench/pipeline.py [--studies 10] [--size 512] [--models-dir DIR]

carebridge runs as `listen-dicom` (with the sweeper) and one worker, on the embedded
defaults; the PACS is dcmtk storescp. For each study the time from the `study.stable`
audit event to the `delivery.sent` event is read from the audit trail, and the model's own
time (weights load + inference, from the job's recorded timings) is subtracted. The target
is a median of at most 250 ms. ``--size`` sets the radiographs' rows and columns (512 by
default; real chest radiographs are 2000-3000 pixels a side). Nothing here is a pass/fail
test.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.cxr.synthetic import make_cxr_dataset
from tests.harness import Carebridge, wait_until
from tests.peers import StoreSCP, storescu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each image")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="existing MODELS_DIR (default: train a small demo model first)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="carebridge-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        models_dir = args.models_dir or root / "models"
        if args.models_dir is None:
            print("training a small demo model ...", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "listeners.cli",
                    "models",
                    "demo",
                    "--images-per-class",
                    "24",
                    "--epochs",
                    "1",
                ],
                env={"CAREBRIDGE_MODELS_DIR": str(models_dir), "PATH": "/usr/bin:/bin"},
                check=True,
                capture_output=True,
            )
        pacs = stack.enter_context(StoreSCP(root / "pacs"))
        carebridge = stack.enter_context(
            Carebridge(
                root / "cb",
                models_dir,
                pacs_destinations=f"STORESCP@127.0.0.1:{pacs.port}",
                sweep_interval_seconds=0.05,
            )
        )
        carebridge.upgrade()
        carebridge.start_listener()
        carebridge.start_worker()
        rng = np.random.default_rng(0)
        overheads, totals, model_times = [], [], []
        stages: dict[str, list[float]] = {}
        for index in range(args.studies + 1):  # the first study warms the worker up
            folder = root / f"study{index}"
            folder.mkdir()
            study_uid = generate_uid()
            ds = make_cxr_dataset(
                "normal",
                rng,
                patient_name="Bench^Pipeline",
                patient_id="BENCH",
                study_uid=study_uid,
                shape=(args.size, args.size),
            )
            ds.save_as(folder / "cxr.dcm", enforce_file_format=True)
            storescu(
                "127.0.0.1",
                carebridge.dicom_port,
                [folder],
                calling_ae="BENCH",
                called_ae="CAREBRIDGE",
            )
            expected = index + 1
            wait_until(
                lambda: len(pacs.files()) == expected,  # noqa: B023 (called at once)
                timeout=120,
                what="the SR in the PACS",
            )
            report = wait_until(
                lambda: (
                    (r := carebridge.audit_show(study_uid))  # noqa: B023 (called at once)
                    and any(e["type"] == "delivery.sent" for e in r["events"])
                    and r
                ),
                timeout=30,
                what="the delivery event",
            )
            if index == 0:
                continue
            at = {e["type"]: datetime.fromisoformat(str(e["at"])) for e in report["events"]}
            total = (at["delivery.sent"] - at["study.stable"]).total_seconds() * 1000
            timings = report["jobs"][0]["timings_ms"]
            for stage, value in timings.items():
                stages.setdefault(stage, []).append(value)
            stages.setdefault("job start after stable", []).append(
                (at["job.started"] - at["study.stable"]).total_seconds() * 1000
            )
            stages.setdefault("delivery sent after job done", []).append(
                (at["delivery.sent"] - at["job.succeeded"]).total_seconds() * 1000
            )
            model = timings.get("model_load_ms", 0) + timings.get("inference_ms", 0)
            totals.append(total)
            model_times.append(model)
            overheads.append(total - model)
        print(
            f"\nPipeline latency over {args.studies} single-image CXR studies, "
            f"{args.size}x{args.size} (study stable -> SR stored in the PACS)\n"
        )
        print(
            f"total            median {statistics.median(totals):7.1f} ms   "
            f"max {max(totals):7.1f} ms"
        )
        print(f"model time       median {statistics.median(model_times):7.1f} ms")
        for stage, values in stages.items():
            print(f"  {stage:<30} median {statistics.median(values):7.1f} ms")
        print(
            f"total - model    median {statistics.median(overheads):7.1f} ms   "
            f"max {max(overheads):7.1f} ms   (target: median <= 250 ms)"
        )


if __name__ == "__main__":
    main()
