"""The carebridge command as a user runs it: serve, rules test, models list, dcmtk peers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from models.cxr.synthetic import make_cxr_dataset
from tests.fixtures_dicom import make_cr_dataset
from tests.harness import Carebridge, wait_until
from tests.peers import echoscu, free_port, storescu, wait_for_port


def test_rules_test_explains_routing(deployment: Carebridge, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    cxr = make_cxr_dataset(
        "normal",
        np.random.default_rng(0),
        patient_name="ZZCANARY^PHI",
        patient_id="X",
        shape=(64, 64),
    )
    cxr.save_as(folder / "cxr.dcm", enforce_file_format=True)
    knee = make_cr_dataset()
    knee.BodyPartExamined = "KNEE"
    knee.save_as(folder / "knee.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    out = deployment.cli("rules", "test", str(folder)).stdout
    assert "cxr-classification" in out
    assert "KNEE" in out
    assert "ZZCANARY" not in out
    assert "skipped" in out.lower()


def test_rules_test_reports_bad_rules_file(deployment: Carebridge, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "pipelines:\n  cxr: {queue: gpu, model: cxr-resnet18}\n"
        "rules:\n  - name: x\n    pipeline: nope\n    match: {Modality: [CR]}\n"
    )
    result = deployment.cli("rules", "test", "--rules", str(rules), str(tmp_path), check=False)
    assert result.returncode == 2
    assert "nope" in result.stderr


def test_models_list_shows_and_refuses(
    deployment: Carebridge, models_dir: Path, tmp_path: Path
) -> None:
    out = deployment.cli("models", "list").stdout
    assert "cxr-resnet18" in out and "ok" in out
    broken_models = tmp_path / "models"
    shutil.copytree(models_dir, broken_models)
    weights = broken_models / "cxr-resnet18" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    deployment.env["CAREBRIDGE_MODELS_DIR"] = str(broken_models)
    out = deployment.cli("models", "list").stdout
    assert "refused" in out and "sha256" in out

    # A MONAI bundle and a bundle missing its weights are listed with what they say.
    import hashlib
    import json

    bundle = broken_models / "spleen_ct_segmentation"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(
        json.dumps({"name": "Spleen CT segmentation", "version": "0.5.9"})
    )
    (bundle / "models" / "model.pt").write_bytes(b"weights of a bundle")
    (broken_models / "half_bundle" / "configs").mkdir(parents=True)
    deployment.env["COLUMNS"] = "300"
    out = deployment.cli("models", "list").stdout
    (row,) = [line for line in out.splitlines() if "spleen_ct_segmentation" in line]
    assert "Spleen CT segmentation" in row and "0.5.9" in row and "monai-bundle" in row
    assert hashlib.sha256(b"weights of a bundle").hexdigest()[:16] in row
    (half,) = [line for line in out.splitlines() if "half_bundle" in line]
    assert "has no models/model" in half


def test_listener_with_dcmtk_peers(deployment: Carebridge, tmp_path: Path) -> None:
    deployment.env["CAREBRIDGE_DICOM_ALLOWED_AES"] = "MODALITY"
    deployment.start_listener()
    port = deployment.dicom_port
    ok = echoscu("127.0.0.1", port, calling_ae="MODALITY", called_ae="CAREBRIDGE")
    assert ok.returncode == 0, ok.stderr
    refused = echoscu("127.0.0.1", port, calling_ae="STRANGER", called_ae="CAREBRIDGE")
    assert refused.returncode != 0
    folder = tmp_path / "series"
    folder.mkdir()
    study = generate_uid()
    for i in range(3):
        make_cr_dataset(study_instance_uid=study, seed=i).save_as(
            folder / f"{i}.dcm", enforce_file_format=True
        )
    sent = storescu("127.0.0.1", port, [folder], calling_ae="MODALITY", called_ae="CAREBRIDGE")
    assert sent.returncode == 0, sent.stderr
    assert deployment.scalar("SELECT count(*) FROM instances") == 3
    stranger = storescu("127.0.0.1", port, [folder], calling_ae="STRANGER", called_ae="CAREBRIDGE")
    assert stranger.returncode != 0
    events = deployment.audit_show(study)["events"]
    assert events[0]["type"] == "dicom.received"
    assert events[0]["detail"]["stored"] == 3
    assert (
        deployment.scalar(
            "SELECT count(*) FROM audit_events WHERE event_type = 'dicom.association_rejected'"
        )
        == 2
    )


def test_serve_runs_embedded_default(models_dir: Path, tmp_path: Path) -> None:
    """`carebridge serve` in an empty directory: ./var is created, the SCP answers, and a
    SIGTERM stops every process."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREBRIDGE_")}
    env.update(
        CAREBRIDGE_MODELS_DIR=str(models_dir),
        CAREBRIDGE_DICOM_PORT=str(port),
        CAREBRIDGE_FHIR_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "listeners.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=90, proc=proc)
        assert echoscu("127.0.0.1", port, calling_ae="ANY", called_ae="CAREBRIDGE").returncode == 0
        assert (tmp_path / "var" / "carebridge.db").is_file()
        wait_until(
            lambda: " ready." in (tmp_path / "serve.log").read_text(),
            timeout=90,
            what="the worker to start",
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_database_not_migrated_is_a_clear_error(tmp_path: Path, models_dir: Path) -> None:
    with Carebridge(tmp_path / "cb", models_dir) as carebridge:
        result = carebridge.cli("audit", "studies", check=False)
    assert result.returncode == 3
    assert "carebridge db upgrade" in result.stderr


@pytest.mark.parametrize("bad_env", [{"CAREBRIDGE_DICOM_HOST": "0.0.0.0"}])
def test_fail_closed_settings_stop_the_listener(
    tmp_path: Path, models_dir: Path, bad_env: dict[str, str]
) -> None:
    with Carebridge(tmp_path / "cb", models_dir) as carebridge:
        carebridge.env.update(bad_env)
        result = carebridge.cli("listen-dicom", check=False)
    assert result.returncode == 2
    assert "CAREBRIDGE_DICOM_ALLOWED_AES" in result.stderr


def test_several_listener_processes_share_port_and_route_once(
    deployment: Carebridge, tmp_path: Path
) -> None:
    proc = deployment._spawn("listener", "listen-dicom", "--processes", "3")
    wait_for_port("127.0.0.1", deployment.dicom_port, timeout=60, proc=proc)
    wait_until(
        lambda: deployment.log_paths["listener"].read_text().count("listening on") == 3,
        timeout=60,
        what="three listener processes",
    )
    study = generate_uid()
    folders = []
    for part in range(3):
        folder = tmp_path / f"part{part}"
        folder.mkdir()
        for i in range(4):
            make_cr_dataset(study_instance_uid=study, seed=part * 10 + i).save_as(
                folder / f"{i}.dcm", enforce_file_format=True
            )
        folders.append(folder)
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", "MODALITY", "-aec", "CAREBRIDGE", "127.0.0.1",
             str(deployment.dicom_port), "+sd", str(folder)],
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for folder in folders
    ]  # fmt: skip
    assert [sender.wait(60) for sender in senders] == [0, 0, 0]
    assert deployment.scalar("SELECT count(*) FROM instances") == 12
    wait_until(
        lambda: deployment.scalar("SELECT state FROM studies") == "routed",
        timeout=30,
        what="the study to be routed",
    )
    assert deployment.scalar("SELECT instance_count FROM studies") == 12
    assert (
        deployment.scalar("SELECT count(*) FROM audit_events WHERE event_type = 'study.stable'")
        == 1
    )


def _established_connections(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to local ``port`` each process holds (Linux
    /proc: the sockets of /proc/net/tcp whose inode is among the process's open files)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes[fields[9]] = local_port
    held: dict[int, int] = {}
    for pid in pids:
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
        held[pid] = count
    return held


def test_a_listener_group_spreads_associations_over_its_processes(
    deployment: Carebridge,
) -> None:
    """`listen-dicom --processes 2`: the processes share one listening socket and the
    least busy takes each new association, so four associations held open at once are
    served two by each process; `ready` comes once both serve."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    proc = deployment._spawn("listener", "listen-dicom", "--processes", "2")
    wait_until(
        lambda: (
            proc.poll() is not None
            or "ready (2 processes)" in deployment.log_paths["listener"].read_text()
        ),
        timeout=120,
        what="the listener group to be ready",
    )
    assert proc.poll() is None, deployment.log_paths["listener"].read_text()
    (helper,) = [
        int(pid)
        for children in Path(f"/proc/{proc.pid}/task").glob("*/children")
        for pid in children.read_text().split()
    ]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    associations = []
    try:
        for _ in range(4):
            assoc = ae.associate("127.0.0.1", deployment.dicom_port, ae_title="CAREBRIDGE")
            assert assoc.is_established
            associations.append(assoc)
        wait_until(
            lambda: (
                sum(_established_connections([proc.pid, helper], deployment.dicom_port).values())
                == 4
            ),
            timeout=10,
            what="four associations served",
        )
        held = _established_connections([proc.pid, helper], deployment.dicom_port)
        assert sorted(held.values()) == [2, 2], held
        assert all(assoc.send_c_echo().Status == 0 for assoc in associations)
    finally:
        for assoc in associations:
            assoc.release()


def test_a_bad_clinical_rules_file_stops_the_listener_before_it_listens(
    tmp_path: Path, models_dir: Path
) -> None:
    bad = tmp_path / "clinical.yaml"
    bad.write_text("version: 1\npipelines:\n  risk-scoring:\n    queue: tpu\n")
    with Carebridge(tmp_path / "cb", models_dir) as carebridge:
        carebridge.upgrade()
        carebridge.env["CAREBRIDGE_CLINICAL_RULES_FILE"] = str(bad)
        result = carebridge.cli("listen-dicom", check=False, timeout=120)
    assert result.returncode == 2
    assert "clinical.yaml" in result.stderr and "queue must be 'gpu' or 'cpu'" in result.stderr
    assert "ready" not in result.stdout
