"""End to end with real peers: Orthanc sends a chest X-ray study to carebridge, carebridge
classifies it and stores a DICOM SR back into Orthanc; the audit trail tells the story.
The same round trip runs on PostgreSQL + Redis. Faults: a worker killed mid-task, a PACS
that is down and comes back."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from models.cxr.synthetic import make_cxr_dataset
from tests.harness import Carebridge, postgres_database, redis_broker, wait_until
from tests.peers import OrthancPeer, StoreSCP, free_port, run_dciodvfy, storescu

CANARY = "ZZCANARY^PHI"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

pytestmark = pytest.mark.slow


def write_study(folder: Path, label: str = "pneumonia", images: int = 2, seed: int = 7) -> str:
    """A generated chest X-ray study of a canary patient; returns its StudyInstanceUID."""
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        ds = make_cxr_dataset(
            label,
            rng,
            patient_name=CANARY,
            patient_id="ZZCANARY-ID",
            study_uid=study_uid,
            series_uid=series_uid,
            shape=(256, 256),
        )
        ds.InstanceNumber = index + 1
        ds.save_as(folder / f"img{index}.dcm", enforce_file_format=True)
    return study_uid


def send_from_modality(carebridge: Carebridge, folder: Path) -> None:
    """C-STORE a folder to carebridge with dcmtk storescu, as a modality would."""
    result = storescu(
        "127.0.0.1", carebridge.dicom_port, [folder], calling_ae="MODALITY", called_ae="CAREBRIDGE"
    )
    assert result.returncode == 0, result.stderr


def assert_sr_valid(sr_bytes: bytes, tmp_path: Path, study_uid: str) -> pydicom.Dataset:
    path = tmp_path / f"sr-{generate_uid()}.dcm"
    path.write_bytes(sr_bytes)
    assert run_dciodvfy(path) == []
    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == study_uid
    assert sr.VerificationFlag == "UNVERIFIED"
    assert "DEMO WEIGHTS" in sr.SeriesDescription
    return sr


@pytest.fixture(params=["sqlite+embedded", "postgresql+redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if request.param == "sqlite+embedded":
        yield {}
        return
    with ExitStack() as stack:
        database_url = stack.enter_context(postgres_database())
        broker_url = stack.enter_context(redis_broker())
        yield {"database_url": database_url, "broker_url": broker_url}


def test_orthanc_round_trip(tmp_path: Path, models_dir: Path, backend: dict[str, str]) -> None:
    with ExitStack() as stack:
        pacs = stack.enter_context(OrthancPeer(tmp_path / "orthanc"))
        carebridge = stack.enter_context(
            Carebridge(
                tmp_path / "cb",
                models_dir,
                dicom_allowed_aes="ORTHANC",
                pacs_destinations=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                **backend,
            )
        )
        carebridge.start()
        pacs.add_modality("carebridge", "CAREBRIDGE", "127.0.0.1", carebridge.dicom_port)

        study_uid = write_study(tmp_path / "study")
        for path in sorted((tmp_path / "study").iterdir()):
            pacs.upload(path)
        (orthanc_study,) = pacs.studies()
        pacs.send_study_to_modality(orthanc_study, "carebridge")

        def sr_in_pacs() -> list[dict[str, object]]:
            return [
                item
                for item in pacs.find_instances_by_study_uid(study_uid)
                if item["MainDicomTags"].get("SOPInstanceUID")
                and pacs.instance_tags(str(item["ID"])).get("Modality") == "SR"
            ]

        (sr_item,) = wait_until(sr_in_pacs, timeout=120, what="the SR to arrive in Orthanc")
        sr = assert_sr_valid(pacs.instance_file(str(sr_item["ID"])), tmp_path, study_uid)
        source_uids = {
            str(item["MainDicomTags"]["SOPInstanceUID"])
            for item in pacs.find_instances_by_study_uid(study_uid)
        } - {sr.SOPInstanceUID}
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert evidence == source_uids and len(evidence) == 2

        report = carebridge.audit_show(study_uid)
        assert len(report["instances"]) == 2
        assert {i["calling_ae"] for i in report["instances"]} == {"ORTHANC"}
        (job,) = report["jobs"]
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert set(job["timings_ms"]) >= {"inference_ms", "sr_ms"}
        (result,) = report["results"]
        assert result["model"]["name"] == "cxr-resnet18"
        assert result["model"]["demo_weights"] is True
        assert len(result["model"]["weights_sha256"]) == 64
        assert result["finding"]["scheme"] == "SCT"
        outputs = {output["kind"]: output for output in report["outputs"]}
        assert outputs["dicom-sr"]["sop_instance_uid"] == sr.SOPInstanceUID
        # The FHIR twin is kept in the archive; no EHR is configured, so it has no delivery.
        assert set(outputs) == {"dicom-sr", "fhir-bundle"}
        (delivery,) = report["deliveries"]
        assert delivery["status"] == "sent" and delivery["attempts"] == 1
        types = [event["type"] for event in report["events"]]
        assert (
            types.index("study.stable")
            < types.index("job.started")
            < types.index("job.succeeded")
            < types.index("delivery.sent")
        )
        text = carebridge.cli("audit", "show", study_uid).stdout
        assert "cxr-resnet18" in text and "DEMO WEIGHTS" in text and "sent" in text
        assert carebridge.cli("audit", "verify").returncode == 0
        assert study_uid in carebridge.cli("audit", "studies").stdout
        carebridge.stop()
        assert CANARY.split("^")[0] not in carebridge.logs()


def test_worker_killed_mid_task_gives_one_result(tmp_path: Path, models_dir: Path) -> None:
    with ExitStack() as stack:
        pacs = stack.enter_context(StoreSCP(tmp_path / "pacs"))
        carebridge = stack.enter_context(
            Carebridge(
                tmp_path / "cb",
                models_dir,
                pacs_destinations=f"STORESCP@127.0.0.1:{pacs.port}",
                job_lease_seconds=4,
            )
        )
        carebridge.start()
        study_uid = write_study(tmp_path / "study", images=1)
        send_from_modality(carebridge, tmp_path / "study")

        # The first task of a fresh worker process loads torch and the model after it has
        # claimed the job: kill the whole worker then.
        wait_until(
            lambda: carebridge.scalar("SELECT count(*) FROM jobs WHERE status = 'running'"),
            timeout=60,
            interval=0.05,
            what="the job to start",
        )
        carebridge.kill("worker")
        assert carebridge.scalar("SELECT status FROM jobs") == "running"
        carebridge.start_worker()
        wait_until(
            lambda: carebridge.scalar("SELECT status FROM jobs") == "succeeded",
            timeout=120,
            what="the job to succeed after the lease expired",
        )
        assert carebridge.scalar("SELECT attempts FROM jobs") == 2
        assert carebridge.scalar("SELECT count(*) FROM results") == 1
        pacs.wait_for_files(1, timeout=60)
        wait_until(
            lambda: carebridge.scalar("SELECT status FROM deliveries") == "sent",
            timeout=30,
            what="the delivery to be recorded",
        )
        assert len(pacs.files()) == 1
        report = carebridge.audit_show(study_uid)
        types = [event["type"] for event in report["events"]]
        assert types.count("job.started") == 2 and "job.lease_expired" in types


def test_pacs_down_then_back_sr_arrives_once(tmp_path: Path, models_dir: Path) -> None:
    port = free_port()
    with ExitStack() as stack:
        carebridge = stack.enter_context(
            Carebridge(
                tmp_path / "cb",
                models_dir,
                pacs_destinations=f"STORESCP@127.0.0.1:{port}",
                delivery_backoff_seconds=0.5,
            )
        )
        carebridge.start()
        study_uid = write_study(tmp_path / "study", images=1)
        assert (
            carebridge.cli(
                "send",
                str(tmp_path / "study"),
                "--to",
                f"CAREBRIDGE@127.0.0.1:{carebridge.dicom_port}",
            ).returncode
            == 0
        )
        wait_until(
            lambda: (carebridge.scalar("SELECT attempts FROM deliveries") or 0) >= 2,
            timeout=120,
            what="two failed delivery attempts",
        )
        assert carebridge.scalar("SELECT status FROM deliveries") in ("pending", "sending")
        pacs = stack.enter_context(StoreSCP(tmp_path / "pacs", port=port))
        wait_until(
            lambda: carebridge.scalar("SELECT status FROM deliveries") == "sent",
            timeout=90,
            what="the delivery to succeed once the PACS is back",
        )
        files = pacs.wait_for_files(1, timeout=30)
        assert len(files) == 1
        sr = pydicom.dcmread(files[0])
        assert sr.StudyInstanceUID == study_uid
        report = carebridge.audit_show(study_uid)
        (delivery,) = report["deliveries"]
        assert delivery["attempts"] >= 3
        types = [event["type"] for event in report["events"]]
        assert types.count("delivery.retry") == delivery["attempts"] - 1
        assert types.count("delivery.sent") == 1


def test_later_instances_start_a_run_that_supersedes(tmp_path: Path, models_dir: Path) -> None:
    with ExitStack() as stack:
        pacs = stack.enter_context(StoreSCP(tmp_path / "pacs"))
        carebridge = stack.enter_context(
            Carebridge(
                tmp_path / "cb", models_dir, pacs_destinations=f"STORESCP@127.0.0.1:{pacs.port}"
            )
        )
        carebridge.start()
        study_uid = write_study(tmp_path / "first", images=1)
        send_from_modality(carebridge, tmp_path / "first")
        (first,) = pacs.wait_for_files(1, timeout=120)
        first_sr = pydicom.dcmread(first)
        # A late image of the same study.
        late = tmp_path / "late"
        late.mkdir()
        ds = pydicom.dcmread(next((tmp_path / "first").iterdir()))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = 2
        ds.save_as(late / "late.dcm", enforce_file_format=True)
        send_from_modality(carebridge, late)
        files = pacs.wait_for_files(2, timeout=120)
        second = pydicom.dcmread(next(f for f in files if f != first))
        assert second.StudyInstanceUID == study_uid
        (predecessor,) = second.PredecessorDocumentsSequence
        assert (
            predecessor.ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
            == first_sr.SOPInstanceUID
        )
        assert carebridge.scalar("SELECT count(*) FROM jobs") == 2
        assert carebridge.scalar("SELECT max(run_number) FROM studies") == 2


def test_broker_loses_messages_sweeper_requeues(tmp_path: Path, models_dir: Path) -> None:
    """Redis restarted empty between enqueue and execution: the job still runs, once."""
    import redis

    with ExitStack() as stack:
        broker_url = stack.enter_context(redis_broker())
        pacs = stack.enter_context(StoreSCP(tmp_path / "pacs"))
        carebridge = stack.enter_context(
            Carebridge(
                tmp_path / "cb",
                models_dir,
                broker_url=broker_url,
                pacs_destinations=f"STORESCP@127.0.0.1:{pacs.port}",
                requeue_after_seconds=3,
            )
        )
        carebridge.start(worker=False)  # no worker yet: the job waits in Redis
        study_uid = write_study(tmp_path / "study", images=1)
        send_from_modality(carebridge, tmp_path / "study")
        wait_until(
            lambda: carebridge.scalar("SELECT count(*) FROM jobs") == 1,
            timeout=30,
            what="the job to be created",
        )
        redis.Redis.from_url(broker_url).flushdb()  # the broker forgets everything
        carebridge.start_worker()
        (sr_file,) = pacs.wait_for_files(1, timeout=120)
        assert pydicom.dcmread(sr_file).StudyInstanceUID == study_uid
        assert carebridge.scalar("SELECT attempts FROM jobs") == 1
        assert carebridge.scalar("SELECT count(*) FROM results") == 1


def test_permanent_refusal_is_dead_lettered(tmp_path: Path, models_dir: Path) -> None:
    """A PACS that refuses the association permanently: no retries, the delivery is dead."""
    with ExitStack() as stack:
        pacs = stack.enter_context(StoreSCP(tmp_path / "pacs", refuse=True))
        carebridge = stack.enter_context(
            Carebridge(
                tmp_path / "cb", models_dir, pacs_destinations=f"STORESCP@127.0.0.1:{pacs.port}"
            )
        )
        carebridge.start()
        study_uid = write_study(tmp_path / "study", images=1)
        send_from_modality(carebridge, tmp_path / "study")
        wait_until(
            lambda: carebridge.scalar("SELECT status FROM deliveries") == "dead",
            timeout=120,
            what="the delivery to be dead-lettered",
        )
        report = carebridge.audit_show(study_uid)
        (delivery,) = report["deliveries"]
        attempts = [e["detail"] for e in report["events"] if e["type"].startswith("delivery.")]
        # Dead at the permanent refusal, long before the retries run out. (Under load the
        # first attempt can see the refusal as a dropped connection, which is retried.)
        assert delivery["last_status"] == "permanent", attempts
        assert delivery["attempts"] < delivery["max_attempts"], attempts
        assert delivery["last_error"]
        assert [e["type"] for e in report["events"]].count("delivery.dead") == 1
