"""A CT study end to end: a modality sends a phantom CT series to carebridge, and a DICOM
SEG of the liver, a volume SR (TID 1500) and a key image arrive in Orthanc, in the same
study, each valid for dciodvfy; the SEG's frames point at the right source slices; the
audit trail has the volume and the model that measured it. The real head CT of
pydicom-data goes through the same pipeline and gives valid outputs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from models.segmentation.phantom import write_phantom_series
from tests.harness import Carebridge, wait_until
from tests.peers import OrthancPeer, run_dciodvfy, storescu

pytestmark = pytest.mark.slow

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def outputs_in_pacs(pacs: OrthancPeer, study_uid: str) -> dict[str, bytes]:
    """SOP Class UID -> file of every instance carebridge stored in the study."""
    found = {}
    for item in pacs.find_instances_by_study_uid(study_uid):
        data = pacs.instance_file(str(item["ID"]))
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if ds.Modality in ("SEG", "SR", "OT") or "AI" in str(ds.get("SeriesDescription", "")):
            found[str(ds.SOPClassUID)] = data
    return found


def test_ct_series_gives_seg_sr_and_key_image_in_the_pacs(tmp_path: Path, models_dir: Path) -> None:
    series_dir = tmp_path / "ct"
    study_uid = generate_uid()
    files = write_phantom_series(
        series_dir, seed=11, shape=(48, 160, 160), spacing=(5.0, 2.0, 2.0), study_uid=study_uid
    )
    with (
        OrthancPeer(tmp_path / "orthanc") as pacs,
        Carebridge(
            tmp_path / "cb",
            models_dir,
            pacs_destinations=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
        ) as carebridge,
    ):
        carebridge.start()
        for path in files:
            pacs.upload(path)
        result = storescu(
            "127.0.0.1",
            carebridge.dicom_port,
            [series_dir],
            calling_ae="CT1",
            called_ae="CAREBRIDGE",
        )
        assert result.returncode == 0, result.stderr

        def three_outputs() -> dict[str, bytes]:
            found = outputs_in_pacs(pacs, study_uid)
            return found if len(found) >= 3 else {}

        found = wait_until(three_outputs, timeout=240, what="SEG, SR and key image in Orthanc")
        assert SEGMENTATION in found and COMPREHENSIVE_3D_SR in found
        for sop_class, data in found.items():
            path = tmp_path / f"{sop_class}.dcm"
            path.write_bytes(data)
            assert run_dciodvfy(path) == [], sop_class
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
        seg = hd.seg.segread(io.BytesIO(found[SEGMENTATION]))
        assert seg.StudyInstanceUID == study_uid
        assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        (segment,) = seg.SegmentSequence
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        for frame in seg.PerFrameFunctionalGroupsSequence:
            source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0]
            source = by_uid[str(source_uid.ReferencedSOPInstanceUID)]
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            assert [float(v) for v in position] == pytest.approx(
                [float(v) for v in source.ImagePositionPatient]
            )
        sr = hd.sr.srread(io.BytesIO(found[COMPREHENSIVE_3D_SR]))
        assert sr.VerificationFlag == "UNVERIFIED"

        report = carebridge.audit_show(study_uid)
        (job,) = report["jobs"]
        assert job["pipeline"] == "liver-segmentation" and job["status"] == "succeeded"
        (liver,) = report["results"]
        assert liver["model"]["name"] == "liver-unet3d" and liver["model"]["demo_weights"]
        assert liver["details"]["volume_ml"] > 0
        kinds = {o["kind"] for o in report["outputs"]}
        assert kinds == {"dicom-seg", "dicom-sr", "dicom-key-image", "fhir-bundle"}
        assert all(d["status"] == "sent" for d in report["deliveries"])


def test_real_head_ct_gives_valid_outputs(tmp_path: Path, models_dir: Path) -> None:
    """pydicom-data's head CT (one slice, no Frame of Reference): whatever the demo model
    finds, the run ends cleanly and any object it makes is valid."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file("693_UNCR.dcm")
    assert source is not None
    with Carebridge(tmp_path / "cb", models_dir) as carebridge:
        carebridge.start()
        result = storescu(
            "127.0.0.1",
            carebridge.dicom_port,
            [Path(source)],
            calling_ae="CT1",
            called_ae="CAREBRIDGE",
        )
        assert result.returncode == 0, result.stderr
        study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        wait_until(
            lambda: carebridge.scalar(
                "select count(*) from jobs where status in ('succeeded', 'skipped', 'failed')"
            ),
            timeout=180,
            what="the liver job to finish",
        )
        (job,) = carebridge.audit_show(study_uid)["jobs"]
        assert job["status"] in ("succeeded", "skipped"), job["error"]
        archive = tmp_path / "cb" / "var" / "archive" / "outputs"
        for path in archive.rglob("*.dcm"):
            assert run_dciodvfy(path) == [], path.name


def test_real_chest_radiograph_gives_a_valid_sr_and_fhir_twin(
    tmp_path: Path, models_dir: Path
) -> None:
    """pydicom-data's chest CR through the classification pipeline: a valid SR (no accuracy
    claim) and the FHIR DiagnosticReport naming the same SR."""
    import json

    from pydicom.data import get_testdata_file

    source = get_testdata_file("RG1_UNCR.dcm")
    assert source is not None
    study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    with Carebridge(tmp_path / "cb", models_dir) as carebridge:
        carebridge.start()
        result = storescu(
            "127.0.0.1",
            carebridge.dicom_port,
            [Path(source)],
            calling_ae="CR1",
            called_ae="CAREBRIDGE",
        )
        assert result.returncode == 0, result.stderr
        wait_until(
            lambda: carebridge.scalar("select count(*) from jobs where status = 'succeeded'"),
            timeout=180,
            what="the chest X-ray job to succeed",
        )
        report = carebridge.audit_show(study_uid)
        outputs = {o["kind"]: o for o in report["outputs"]}
        archive = tmp_path / "cb" / "var" / "archive"
        (sr_path,) = (archive / "outputs").rglob(f"{outputs['dicom-sr']['sop_instance_uid']}.dcm")
        assert run_dciodvfy(sr_path) == []
        (bundle_path,) = (archive / "outputs" / "fhir").glob("*.json")
        bundle = json.loads(bundle_path.read_text())
        (diagnostic,) = [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "DiagnosticReport"
        ]
        identifiers = {i["value"] for i in diagnostic["identifier"]}
        assert f"urn:oid:{outputs['dicom-sr']['sop_instance_uid']}" in identifiers
        # The image with the finding burned in, for the clinician reading the EHR.
        (rendering,) = diagnostic["presentedForm"]
        assert rendering["contentType"] == "image/png"
        assert base64.b64decode(rendering["data"]).startswith(b"\x89PNG\r\n\x1a\n")
