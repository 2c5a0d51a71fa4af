"""The DICOM SCP with real associations: statuses on the wire, rows, files, audit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from db.engine import Database
from db.migrate import upgrade
from db.schema import AuditEvent, Instance, Study
from listeners.dicom import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES_DATABASE,
    STATUS_OUT_OF_RESOURCES_DISK,
    StorageSCP,
    file_meta_prefix,
    instance_relpath,
    is_valid_uid,
    scan_dataset,
)
from tests.fixtures_dicom import CR_IMAGE_STORAGE, make_cr_dataset
from tests.harness import wait_until
from tests.peers import free_port
from worker.settings import load_settings


class Running:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.port = free_port()
        settings = {
            "database_url": f"sqlite:///{tmp_path / 'var' / 'cb.db'}",
            "archive_dir": tmp_path / "var" / "archive",
            "dicom_port": self.port,
        }
        settings.update(overrides)
        self.settings = load_settings(**settings)
        if str(self.settings.database_url).startswith("sqlite"):
            upgrade(self.settings.database_url)
        self.database = Database(self.settings.database_url)
        self.scp = StorageSCP(self.settings, self.database)
        self.server = self.scp.start()

    def associate(self, calling: str = "TESTSCU", called: str = "CAREBRIDGE") -> object:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.add_requested_context(CR_IMAGE_STORAGE, pydicom.uid.ExplicitVRLittleEndian)
        return ae.associate("127.0.0.1", self.port, ae_title=called)

    def store(self, *datasets: object) -> list[int]:
        assoc = self.associate()
        assert assoc.is_established  # type: ignore[attr-defined]
        statuses = [
            int(assoc.send_c_store(ds).Status)  # type: ignore[attr-defined]
            for ds in datasets
        ]
        assoc.release()  # type: ignore[attr-defined]
        return statuses

    def count(self, model: type) -> int:
        with self.database.session() as session:
            return int(session.execute(select(func.count()).select_from(model)).scalar_one())

    def files(self) -> list[Path]:
        return [p for p in self.settings.archive_dir.rglob("*") if p.is_file()]

    def stop(self) -> None:
        self.server.shutdown()
        self.database.dispose()


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Running]:
    running = Running(tmp_path)
    yield running
    running.stop()


def test_uid_validation_refuses_traversal_and_malformed() -> None:
    for bad in ["../x", "/tmp/x", "..", "1." * 32 + "1", "1.2.abc", "", "1..2", "01.2", "1.2."]:
        assert not is_valid_uid(bad), bad
        if bad:
            with pytest.raises(ValueError):
                instance_relpath(bad, "1.2", "1.3")
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.1")
    assert len("1." * 32 + "1") == 65


def test_echo_and_store_commit_row_and_exact_bytes(scp: Running) -> None:
    assoc = scp.associate()
    assert int(assoc.send_c_echo().Status) == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]

    ds = make_cr_dataset()
    assert scp.store(ds) == [0]
    (stored,) = scp.files()
    assert stored.name == f"{ds.SOPInstanceUID}.dcm"
    assert stored.is_relative_to(scp.settings.archive_dir)
    read = pydicom.dcmread(stored)
    assert read.SOPInstanceUID == ds.SOPInstanceUID
    assert read.PixelData == ds.PixelData
    with scp.database.session() as session:
        row = session.execute(select(Instance)).scalar_one()
        assert row.calling_ae == "TESTSCU"
        assert row.path == instance_relpath(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        study = session.execute(select(Study)).scalar_one()
        assert study.instance_count == 1
        assert study.patient_key == ds.PatientID  # joins imaging to the EHR's patient


def test_duplicate_instance_is_noop_success(scp: Running) -> None:
    ds = make_cr_dataset()
    assert scp.store(ds, ds) == [0, 0]
    assert scp.store(ds) == [0]
    assert scp.count(Instance) == 1
    assert len(scp.files()) == 1
    with scp.database.session() as session:
        events = (
            session.execute(select(AuditEvent).where(AuditEvent.event_type == "dicom.received"))
            .scalars()
            .all()
        )
    assert [e.detail["stored"] for e in events] == [1, 0]
    assert [e.detail["duplicates"] for e in events] == [1, 1]


@pytest.mark.parametrize("attribute", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("bad", ["../x", "/tmp/x", "..", "1." * 32 + "1", "1.2.3.abc"])
def test_path_traversal_uids_refused(scp: Running, attribute: str, bad: str) -> None:
    ds = make_cr_dataset()
    setattr(ds, attribute, bad)
    if attribute == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = bad
    assoc = scp.associate()
    try:
        status = int(assoc.send_c_store(ds).Status)  # type: ignore[attr-defined]
    except ValueError:
        # pynetdicom itself will not put a 65-character Affected SOP Instance UID on the
        # wire; the other attributes cover the server side of that case.
        assert attribute == "SOPInstanceUID" and len(bad) > 64
        status = STATUS_INVALID_UID
    assoc.release()  # type: ignore[attr-defined]
    assert status == STATUS_INVALID_UID
    assert scp.files() == []
    assert scp.count(Instance) == 0
    assert not Path("/tmp/x.dcm").exists()


def test_garbage_and_truncated_datasets_refused(
    scp: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    # Send the files' bytes as they are (pynetdicom would otherwise decode and re-encode).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    good = make_cr_dataset()
    path = tmp_path / "good.dcm"
    good.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.dcm"
    meta_length = 132 + 12 + int.from_bytes(raw[140:144], "little")
    garbage.write_bytes(raw[:meta_length] + bytes(range(256)) * 4)
    assoc = scp.associate()
    statuses = []
    for candidate in (truncated, garbage):
        try:
            statuses.append(int(assoc.send_c_store(candidate).Status))  # type: ignore[attr-defined]
        except Exception:  # pynetdicom refuses to even send some of them
            statuses.append(-1)
    assoc.release()  # type: ignore[attr-defined]
    assert statuses == [STATUS_CANNOT_UNDERSTAND, STATUS_CANNOT_UNDERSTAND], statuses
    assert scp.count(Instance) == 0
    assert scp.files() == []


def test_unknown_calling_ae_rejected_and_audited(tmp_path: Path) -> None:
    running = Running(tmp_path, dicom_allowed_aes="ORTHANC,MODALITY1")
    try:
        assoc = running.associate(calling="INTRUDER")
        assert assoc.is_rejected  # type: ignore[attr-defined]
        result = assoc.acceptor.primitive  # type: ignore[attr-defined]
        assert (result.result, result.result_source, result.diagnostic) == (1, 1, 3)
        assoc = running.associate(calling="ORTHANC", called="NOTUS")
        assert assoc.is_rejected  # type: ignore[attr-defined]
        result = assoc.acceptor.primitive  # type: ignore[attr-defined]
        assert (result.result, result.result_source, result.diagnostic) == (1, 1, 7)
        assoc = running.associate(calling="ORTHANC")
        assert assoc.is_established  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]

        def rejected_calling_aes() -> list[str]:
            with running.database.session() as session:
                rejected = session.execute(
                    select(AuditEvent).where(AuditEvent.event_type == "dicom.association_rejected")
                ).scalars()
                return [e.detail["calling_ae"] for e in rejected]

        # The rejection is audited by the listener after it has answered the peer.
        wait_until(lambda: len(rejected_calling_aes()) >= 2, timeout=10, what="the audit rows")
        assert rejected_calling_aes() == ["INTRUDER", "ORTHANC"]
    finally:
        running.stop()


def test_database_unavailable_answers_out_of_resources(tmp_path: Path) -> None:
    # A PostgreSQL URL on a port nothing listens on: the database is down.
    running = Running(
        tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    )
    try:
        ds = make_cr_dataset()
        assert running.store(ds) == [STATUS_OUT_OF_RESOURCES_DATABASE]
        assert running.files() == []
    finally:
        running.stop()


def test_commit_failure_leaves_no_file(scp: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is written before the row; when the commit fails the file goes too."""
    from sqlalchemy.exc import OperationalError

    def fail(*_args: object, **_kwargs: object) -> bool:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(scp.scp.recorder, "record", fail)
    assert scp.store(make_cr_dataset()) == [STATUS_OUT_OF_RESOURCES_DATABASE]
    assert scp.files() == []


def test_archive_unwritable_answers_out_of_resources(tmp_path: Path) -> None:
    running = Running(tmp_path)
    # The disk "fails" while the listener runs: the archive is no longer a directory.
    archive = running.settings.archive_dir
    archive.rmdir()
    archive.write_text("not a directory")
    try:
        ds = make_cr_dataset()
        assert running.store(ds) == [STATUS_OUT_OF_RESOURCES_DISK]
        assert running.count(Instance) == 0
    finally:
        running.stop()


def test_no_phi_in_logs(scp: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ds = make_cr_dataset()
    ds.PatientName = "ZZCANARY^PHI"
    ds.PatientID = "ZZCANARY-ID"
    bad = make_cr_dataset()
    bad.PatientName = "ZZCANARY^PHI"
    bad.SOPInstanceUID = "../x"
    assert scp.store(ds, bad) == [0, STATUS_INVALID_UID]
    assert "ZZCANARY" not in caplog.text
    assert caplog.text  # something was logged


def test_new_study_uid_per_dataset_creates_studies(scp: Running) -> None:
    study = generate_uid()
    datasets = [make_cr_dataset(study_instance_uid=study, seed=i) for i in range(3)]
    assert scp.store(*datasets) == [0, 0, 0]
    with scp.database.session() as session:
        study_row = session.execute(select(Study)).scalar_one()
    assert study_row.instance_count == 3
    assert study_row.study_instance_uid == study


def test_leftover_file_without_row_is_replaced(scp: Running) -> None:
    """A crash between the file write and the commit leaves a file and no row; the resend
    replaces it and is recorded."""
    ds = make_cr_dataset()
    leftover = scp.settings.archive_dir / instance_relpath(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    assert scp.store(ds) == [0]
    assert scp.count(Instance) == 1
    assert pydicom.dcmread(leftover).SOPInstanceUID == ds.SOPInstanceUID
    assert [p.name for p in leftover.parent.iterdir()] == [leftover.name]


@pytest.mark.parametrize(
    "sop_instance_uid",
    ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12"],  # odd and even length
)
def test_file_meta_is_pynetdicoms_encoding(sop_instance_uid: str) -> None:
    from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    expected = encode_file_meta(
        create_file_meta(
            sop_class_uid=CTImageStorage,
            sop_instance_uid=pydicom.uid.UID(sop_instance_uid),
            transfer_syntax=ImplicitVRLittleEndian,
        )
    )
    prefix = file_meta_prefix(CTImageStorage, sop_instance_uid, ImplicitVRLittleEndian)
    assert prefix[:132] == b"\x00" * 128 + b"DICM"
    assert prefix[132:] == expected


def test_stored_bytes_are_the_received_dataset(scp: Running) -> None:
    """The file is the File Meta Information followed by the dataset exactly as sent, and
    the row's hash and size are those of the file."""
    import hashlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = make_cr_dataset()
    assert scp.store(ds) == [0]
    (stored,) = scp.files()
    sent = DicomBytesIO()
    sent.is_little_endian, sent.is_implicit_VR = True, False
    write_dataset(sent, ds)
    raw = stored.read_bytes()
    assert raw.endswith(sent.getvalue())
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    with scp.database.session() as session:
        row = session.execute(select(Instance)).scalar_one()
    assert row.sha256 == hashlib.sha256(raw).hexdigest()
    assert row.size_bytes == len(raw)
    assert row.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian


def test_deflated_dataset_is_checked_and_stored_as_received(scp: Running) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CR_IMAGE_STORAGE, DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CAREBRIDGE")
    assert assoc.is_established
    ds = make_cr_dataset()
    ds.BodyPartExamined = "CHEST"
    status = int(assoc.send_c_store(ds).Status)
    assoc.release()
    assert status == 0
    (stored,) = scp.files()
    read = pydicom.dcmread(stored)
    assert read.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert read.PixelData == ds.PixelData
    with scp.database.session() as session:
        row = session.execute(select(Instance)).scalar_one()
        from db.schema import Series

        series = session.execute(select(Series)).scalar_one()
    assert row.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert series.attributes["BodyPartExamined"] == "CHEST"


def test_scan_refuses_truncated_pixel_data() -> None:
    """Large values are skipped over, not read: a short one is still caught."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, make_cr_dataset())
    encoded = buffer.getvalue()
    scanned = scan_dataset(encoded, implicit_vr=False, little_endian=True)
    assert str(scanned.SOPClassUID) == CR_IMAGE_STORAGE
    for cut in (1, 7, 1000):
        with pytest.raises(ValueError):
            scan_dataset(encoded[:-cut], implicit_vr=False, little_endian=True)


def test_files_whose_rows_were_undone_are_recorded_on_start(tmp_path: Path) -> None:
    """A power loss may undo the listener's last (unsynced) commits but not its synced
    files: the next start records each whole file without a row, and leaves partial ones
    (never acknowledged) for the sender's retry."""
    import hashlib

    from sqlalchemy import delete

    first = Running(tmp_path)
    kept, lost = make_cr_dataset(), make_cr_dataset()
    assert first.store(kept, lost) == [0, 0]
    first.stop()
    database = Database(first.settings.database_url)
    with database.session() as session:
        session.execute(delete(Instance).where(Instance.sop_instance_uid == lost.SOPInstanceUID))
    partial_ds = make_cr_dataset()
    partial = first.settings.archive_dir / instance_relpath(
        partial_ds.StudyInstanceUID, partial_ds.SeriesInstanceUID, partial_ds.SOPInstanceUID
    )
    partial.parent.mkdir(parents=True)
    stored_lost = first.settings.archive_dir / instance_relpath(
        lost.StudyInstanceUID, lost.SeriesInstanceUID, lost.SOPInstanceUID
    )
    partial.write_bytes(stored_lost.read_bytes()[:1000])

    second = Running(tmp_path)
    try:
        assert second.scp.index_unrecorded() == 1
        assert second.scp.index_unrecorded() == 0  # nothing left to do
        with second.database.session() as session:
            rows = {
                row.sop_instance_uid: row for row in session.execute(select(Instance)).scalars()
            }
            recovered = session.execute(
                select(AuditEvent).where(AuditEvent.event_type == "dicom.recovered")
            ).scalar_one()
        assert set(rows) == {kept.SOPInstanceUID, lost.SOPInstanceUID}
        row = rows[lost.SOPInstanceUID]
        assert row.sha256 == hashlib.sha256(stored_lost.read_bytes()).hexdigest()
        assert row.sop_class_uid == CR_IMAGE_STORAGE
        assert recovered.detail["recorded"] == 1
        assert recovered.detail["incomplete"] == 1
        # The sender's retry of the partial instance replaces it.
        assert second.store(partial_ds) == [0]
        assert second.count(Instance) == 3
    finally:
        second.stop()
        database.dispose()
