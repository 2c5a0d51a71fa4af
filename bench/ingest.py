"""Ingest benchmark: the same CT series C-STOREd by dcmtk storescu to carebridge's SCP,
to Orthanc and to dcmtk storescp (and a bare pynetdicom handler), on 1 and 4 associations.

    .venv/bin/python bench/ingest.py [--instances 300] [--listeners 1]

Every run sends a new series (the same pixels under new UIDs), after one warm-up
association of 10 instances to each target (to each new carebridge deployment, as each
run starts one with an empty database). Prints instances/s and the ratios the project's
targets are stated in. carebridge runs as
`carebridge listen-dicom` with its defaults: every instance's file and directory entry
fsynced and its row committed before the answer (SQLite WAL, synchronous=NORMAL: rows a
power loss undoes are rebuilt from the files at the next start). Nothing here is a
pass/fail test.

Every target creates one file per instance, so the filesystem weighs on all of them: on
ext4 without a journal, creating a file skips the inodes deleted in the last one to six
minutes, one by one. Right after something deleted thousands of files (a test run, say)
each create costs up to a millisecond more; run the bench a few minutes later.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Carebridge
from tests.peers import OrthancPeer, StoreSCP, free_port, wait_for_port

#: Instances sent to a target before it is measured.
WARM_UP = 10


def make_series(folder: Path, count: int) -> list[Path]:
    """``count`` CT slices, 512x512, 16-bit, one series (about 512 KiB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = (rng.normal(40, 20, (512, 512)) + 1024).clip(0, 4095).astype(np.uint16)
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Ingest", "BENCH", "CT"
        ds.BodyPartExamined = "ABDOMEN"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0, 0, -index * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.roll(pixels, index, axis=0).tobytes()
        path = folder / f"ct{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu_rate(port: int, called: str, files: list[Path], associations: int) -> float:
    """Instances/s for ``files`` split over ``associations`` concurrent storescu runs."""
    env = dict(os.environ, TCP_NODELAY="1")
    chunks = [files[i::associations] for i in range(associations)]

    def run(chunk: list[Path]) -> None:
        subprocess.run(
            ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            env=env,
            check=True,
            capture_output=True,
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(run, chunks))
    return len(files) / (time.perf_counter() - start)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


BARE_SCP = """
import sys
from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = int(sys.argv[3]) if len(sys.argv) > 3 else 16382
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
def handle(event):
    open(sys.argv[2] + "/" + str(event.request.AffectedSOPInstanceUID), "wb").write(
        event.encoded_dataset())
    return 0
ae.maximum_associations = 16
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, handle)])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1, help="runs per target; median kept")
    parser.add_argument(
        "--processes", type=int, default=2, help="listener processes for the multi-process row"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="carebridge-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        targets: dict[str, tuple[int, str, None]] = {}

        storescp = stack.enter_context(StoreSCP(root / "storescp"))
        targets["dcmtk storescp"] = (storescp.port, "STORESCP", None)

        orthanc = stack.enter_context(OrthancPeer(root / "orthanc"))
        targets["Orthanc"] = (orthanc.dicom_port, "ORTHANC", None)

        bare_port = free_port()
        (root / "bare").mkdir()
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE_SCP, str(bare_port), str(root / "bare")]
        )
        stack.callback(bare.kill)
        wait_for_port("127.0.0.1", bare_port, proc=bare)
        targets["bare pynetdicom"] = (bare_port, "BARE", None)

        fresh = iter(range(1000))

        def carebridge_listener(processes: int) -> tuple[Carebridge, int]:
            """A new deployment (empty database and archive) with N listener processes."""
            deployment = stack.enter_context(Carebridge(root / f"cb{next(fresh)}", root / "models"))
            deployment.env["CAREBRIDGE_STUDY_STABLE_SECONDS"] = "3600"  # ingest only
            deployment.upgrade()
            proc = deployment._spawn(
                "listener",
                "listen-dicom",
                "--no-sweeper",
                "--processes",
                str(processes),
                "--log-level",
                "WARNING",
            )
            wait_for_port("127.0.0.1", deployment.dicom_port, proc=proc)
            log = deployment.log_paths["listener"]
            deadline = time.monotonic() + 120
            # "ready" once every process of the group serves.
            while "listen-dicom: ready" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the listener did not get ready: see {log}")
                time.sleep(0.1)
            return deployment, proc.pid

        rates: dict[tuple[str, int], float] = {}
        memory: list[int] = []
        names = [*targets, "carebridge", f"carebridge x{args.processes}"]
        series = iter(range(10_000))

        def new_series(count: int) -> list[Path]:
            """The same pixels under new UIDs: every run stores new instances (Orthanc
            answers a repeated instance without storing it again)."""
            folder = root / f"series{next(series)}"
            return make_series(folder, count)

        # Each target is warmed up once (imports, caches, first connections), as a
        # listener that has been running is; carebridge gets a fresh deployment per run.
        for port, called, _ in targets.values():
            storescu_rate(port, called, new_series(WARM_UP), 1)
        # Round robin: every repeat runs each target once, so that the machine's drift
        # (its speed varies by tens of percent over minutes) reaches all targets alike.
        for associations in (1, 4):
            runs: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.repeat):
                for name in names:
                    files = new_series(args.instances)
                    if name.startswith("carebridge"):
                        processes = 1 if name == "carebridge" else args.processes
                        deployment, pid = carebridge_listener(processes)
                        storescu_rate(deployment.dicom_port, "CAREBRIDGE", new_series(WARM_UP), 1)
                        runs[name].append(
                            storescu_rate(deployment.dicom_port, "CAREBRIDGE", files, associations)
                        )
                        memory.append(rss_kib(pid))
                        deployment.stop()
                    else:
                        port, called, _ = targets[name]
                        runs[name].append(storescu_rate(port, called, files, associations))
            for name in names:
                rates[(name, associations)] = statistics.median(runs[name])

        print(
            f"\nIngest: {args.instances} CT instances 512x512 16-bit, dcmtk storescu "
            "(TCP_NODELAY=1)\n"
        )
        print(f"{'target':<18}{'1 assoc (inst/s)':>18}{'4 assoc (inst/s)':>18}")
        for name in names:
            print(f"{name:<18}{rates[(name, 1)]:>18.0f}{rates[(name, 4)]:>18.0f}")
        cb1 = rates[("carebridge", 1)]
        cb4 = max(rates[("carebridge", 4)], rates[(f"carebridge x{args.processes}", 4)])
        print()
        print(
            f"carebridge / Orthanc,  1 association : {cb1 / rates[('Orthanc', 1)]:.2f}x "
            "(target >= 1.2)"
        )
        print(
            f"carebridge / storescp, 1 association : {cb1 / rates[('dcmtk storescp', 1)]:.2f}x "
            "(target >= 0.5)"
        )
        print(
            f"carebridge / Orthanc,  4 associations: {cb4 / rates[('Orthanc', 4)]:.2f}x "
            "(target >= 1.0)"
        )
        print(f"carebridge listener RSS after each run (KiB): {memory}")


if __name__ == "__main__":
    main()
