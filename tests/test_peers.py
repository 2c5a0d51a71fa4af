"""The real-peer helpers work: Orthanc REST and DICOM, dcmtk storescp/storescu/echoscu."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.peers import (
    OrthancPeer,
    StoreSCP,
    echoscu,
    free_port,
    missing_tools,
    run_dciodvfy,
    storescu,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_tools("Orthanc", "storescp", "storescu", "echoscu")),
        reason="needs Orthanc and dcmtk (Debian packages orthanc, dcmtk)",
    ),
]


def make_secondary_capture(
    path: Path, *, study_uid: str | None = None, series_uid: str | None = None
) -> Dataset:
    """Write a small, complete Secondary Capture image (16x16, 8-bit) and return it."""
    now = dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Test^Peer"
    ds.PatientID = "PEER-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.Laterality = ""
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype=np.uint8)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_orthanc_peer_roundtrip_with_dcmtk(tmp_path: Path) -> None:
    source = make_secondary_capture(tmp_path / "sc.dcm")
    scp_port = free_port()
    modalities = {"STORESCP": ("STORESCP", "127.0.0.1", scp_port)}

    with (
        StoreSCP(tmp_path / "received", port=scp_port) as scp,
        OrthancPeer(tmp_path / "orthanc", modalities) as pacs,
    ):
        system = pacs.system()
        assert system["DicomAet"] == "ORTHANC"
        assert system["DicomPort"] == pacs.dicom_port
        assert pacs.studies() == []

        # REST upload, lookup by StudyInstanceUID, download byte for byte
        stored = pacs.upload(tmp_path / "sc.dcm")
        assert stored["Status"] == "Success"
        assert pacs.studies() == [stored["ParentStudy"]]
        assert [i["ID"] for i in pacs.study_instances(stored["ParentStudy"])] == [stored["ID"]]
        found = pacs.find_instances_by_study_uid(source.StudyInstanceUID)
        assert [i["MainDicomTags"]["SOPInstanceUID"] for i in found] == [source.SOPInstanceUID]
        assert pacs.find_instances_by_study_uid(generate_uid()) == []
        assert pacs.instance_file(stored["ID"]) == (tmp_path / "sc.dcm").read_bytes()

        # C-ECHO from Orthanc to storescp; a modality with nobody listening fails
        assert pacs.echo("STORESCP")
        pacs.add_modality("NOBODY", "NOBODY", "127.0.0.1", free_port())
        assert set(pacs.list_modalities()) == {"STORESCP", "NOBODY"}
        assert not pacs.echo("NOBODY", timeout=2)

        # C-STORE of the study from Orthanc to storescp
        pacs.send_study_to_modality(stored["ParentStudy"], "STORESCP")
        [received] = scp.wait_for_files(1, timeout=20)
        assert pydicom.dcmread(received).SOPInstanceUID == source.SOPInstanceUID

        # dcmtk towards Orthanc: C-ECHO, then C-STORE of a folder into the same study
        echo = echoscu("127.0.0.1", pacs.dicom_port, calling_ae="TESTSCU", called_ae="ORTHANC")
        assert echo.returncode == 0, echo.stderr
        folder = tmp_path / "more"
        folder.mkdir()
        second = make_secondary_capture(folder / "second.dcm", study_uid=source.StudyInstanceUID)
        sent = storescu(
            "127.0.0.1", pacs.dicom_port, [folder], calling_ae="TESTSCU", called_ae="ORTHANC"
        )
        assert sent.returncode == 0, sent.stderr
        uids = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in pacs.wait_for_instances(source.StudyInstanceUID, 2, timeout=10)
        }
        assert uids == {source.SOPInstanceUID, second.SOPInstanceUID}

    assert pacs.pid is None


@pytest.mark.skipif(bool(missing_tools("dciodvfy")), reason="needs dicom3tools")
def test_run_dciodvfy_reports_errors_only(tmp_path: Path) -> None:
    make_secondary_capture(tmp_path / "good.dcm")
    assert run_dciodvfy(tmp_path / "good.dcm") == []

    broken = pydicom.dcmread(tmp_path / "good.dcm")
    del broken.Rows
    del broken.StudyInstanceUID
    broken.save_as(tmp_path / "broken.dcm")
    errors = run_dciodvfy(tmp_path / "broken.dcm")
    assert errors
    assert all(line.startswith("Error") for line in errors)
