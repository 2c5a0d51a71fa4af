"""Tests of worker.senders.dicom against real peers: dcmtk storescp and pynetdicom SCPs."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComputedRadiographyImageStorage,
    Verification,
)

from models.provenance import CodedLabel, ModelProvenance, device_uid_for
from tests.fixtures_dicom import write_cr
from worker.outputs.dicom_sr import (
    ClassificationFinding,
    build_classification_sr,
    write_and_read_back,
)
from worker.senders.dicom import (
    DeliveryError,
    DicomDestination,
    _set_tcp_nodelay,
    echo,
    is_success_status,
    is_transient_status,
    parse_destinations,
    send_files,
)

needs_storescp = pytest.mark.skipif(
    shutil.which("storescp") is None, reason="dcmtk storescp is not installed"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("storescp exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("storescp did not start listening")


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str, aet: str = "STORESCP") -> tuple[int, Path]:
        port = _free_port()
        out = tmp_path / f"received_{port}"
        out.mkdir()
        env = dict(os.environ, TCP_NODELAY="1")
        proc = subprocess.Popen(
            ["storescp", "-aet", aet, "-od", str(out), "+B", *extra, str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        _wait_listening(port, proc)
        return port, out

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def start_scp() -> Iterator[Callable[..., int]]:
    """Start a pynetdicom storage SCP; returns its port."""
    servers: list[Any] = []

    def start(
        status: int = 0x0000,
        *,
        require_called_aet: bool = False,
        contexts: tuple[str, ...] = (Comprehensive3DSRStorage, ComputedRadiographyImageStorage),
        maximum_associations: int = 10,
        received: list[str] | None = None,
        delay: float = 0.0,
    ) -> int:
        ae = AE(ae_title="PYSCP")
        ae.require_called_aet = require_called_aet
        ae.maximum_associations = maximum_associations
        for context in (*contexts, Verification):
            ae.add_supported_context(context)

        def on_store(event: Any) -> int:
            if received is not None:
                received.append(str(event.request.AffectedSOPInstanceUID))
            if delay:
                time.sleep(delay)
            return status

        port = _free_port()
        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    source = pydicom.dcmread(write_cr(tmp_path / "src.dcm"), stop_before_pixels=True)
    provenance = ModelProvenance(
        name="cxr-test",
        version="1.0",
        device_uid=device_uid_for("cxr-test", "1.0"),
        weights_sha256="f" * 64,
        demo=True,
    )
    finding = ClassificationFinding(
        label=CodedLabel("pneumonia", "233604007", "SCT", "Pneumonia"),
        probability=0.7,
        probabilities={"normal": 0.2, "pneumonia": 0.7, "other": 0.1},
    )
    sr = build_classification_sr(
        [source],
        finding,
        provenance,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        content_datetime=datetime(2024, 1, 2, 11, 0, 0),
    )
    path = tmp_path / "sr.dcm"
    write_and_read_back(sr, path)
    return path


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _received(directory: Path, sop_instance_uid: str) -> Path:
    for path in directory.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPInstanceUID == sop_instance_uid:
            return path
    raise AssertionError("instance not received")


# --------------------------------------------------------------------------- parsing


def test_parse_destinations() -> None:
    assert parse_destinations("PACS@pacs.local:104, AI2@10.0.0.5:11112") == [
        DicomDestination("PACS", "pacs.local", 104),
        DicomDestination("AI2", "10.0.0.5", 11112),
    ]
    assert parse_destinations("V6@[::1]:4242") == [DicomDestination("V6", "::1", 4242)]
    assert str(DicomDestination("V6", "::1", 4242)) == "V6@[::1]:4242"
    assert parse_destinations("") == []
    assert parse_destinations("   ") == []


@pytest.mark.parametrize(
    "spec",
    [
        "A" * 17 + "@h:104",
        "BAD\\AE@h:104",
        "BAD\tAE@h:104",
        "BÄD@h:104",
        "@h:104",
        "   @h:104",
        "AE@h:0",
        "AE@h:65536",
        "AE@h:-1",
        "AE@h:port",
        "AE@h",
        "AE@:104",
        "AEh:104",
        "AE@h:104,",
        "AE@h:104,,B@h:105",
    ],
)
def test_parse_destinations_rejects(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_destinations(spec)


def test_status_classification() -> None:
    for ok in (0x0000, 0x0001, 0xB000, 0xB006, 0xB007):
        assert is_success_status(ok)
    for failure in (0xA700, 0xA7FF, 0xA900, 0xC000, 0xC123, 0x0122, 0x0110):
        assert not is_success_status(failure)
    assert is_transient_status(0xA700) and is_transient_status(0xA7FF)
    assert is_transient_status(0x0110)
    for permanent in (0xA900, 0xC000, 0xCFFF, 0x0122, 0x0124):
        assert not is_transient_status(permanent)


def test_delivery_error_pickles_with_transient_flag() -> None:
    err = pickle.loads(pickle.dumps(DeliveryError("boom", transient=True)))
    assert isinstance(err, DeliveryError)
    assert err.transient is True
    assert str(err) == "boom"


def test_tcp_nodelay_handler_sets_option() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        event = SimpleNamespace(
            assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=sock)))
        )
        _set_tcp_nodelay(event)  # type: ignore[arg-type]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ------------------------------------------------------------------------- storescp


@pytest.mark.slow
@needs_storescp
def test_send_to_storescp_arrives_identical(
    start_storescp: Callable[..., tuple[int, Path]], sr_file: Path, tmp_path: Path
) -> None:
    port, out = start_storescp()
    destination = DicomDestination("STORESCP", "127.0.0.1", port)
    assert echo(destination, "CAREBRIDGE")
    cr_file = tmp_path / "src.dcm"
    statuses = send_files(destination, [sr_file, cr_file], timeout=10)
    assert statuses == [0x0000, 0x0000]
    for sent in (sr_file, cr_file):
        uid = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        got = _received(out, uid)
        assert _dataset_bytes(got) == _dataset_bytes(sent)
    # retry of the same instance is accepted again (idempotent delivery)
    assert send_files(destination, [sr_file], timeout=10) == [0x0000]


@pytest.mark.slow
@needs_storescp
def test_storescp_refusing_association_is_permanent(
    start_storescp: Callable[..., tuple[int, Path]], sr_file: Path
) -> None:
    port, _ = start_storescp("--refuse")
    with pytest.raises(DeliveryError) as info:  # a generous timeout: CI machines are busy
        send_files(DicomDestination("STORESCP", "127.0.0.1", port), [sr_file], timeout=30)
    assert info.value.transient is False
    assert "permanently rejected" in str(info.value)


@pytest.mark.slow
@needs_storescp
def test_storescp_abort_during_store_is_transient(
    start_storescp: Callable[..., tuple[int, Path]], sr_file: Path
) -> None:
    port, _ = start_storescp("--abort-after")
    with pytest.raises(DeliveryError) as info:
        send_files(DicomDestination("STORESCP", "127.0.0.1", port), [sr_file], timeout=10)
    assert info.value.transient is True


def test_closed_port_is_transient(sr_file: Path) -> None:
    destination = DicomDestination("NOBODY", "127.0.0.1", _free_port())
    with pytest.raises(DeliveryError) as info:
        send_files(destination, [sr_file], timeout=5)
    assert info.value.transient is True
    assert echo(destination, timeout=5) is False


# ----------------------------------------------------------------- pynetdicom peers


def test_tcp_nodelay_is_set_on_real_association(
    start_scp: Callable[..., int], sr_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.senders.dicom as sender

    seen: list[int] = []

    def spy(event: Any) -> None:
        _set_tcp_nodelay(event)
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(sender, "_set_tcp_nodelay", spy)
    port = start_scp()
    assert send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=5) == [0]
    assert len(seen) == 1
    assert seen[0] != 0


def test_wrong_called_ae_is_permanent(start_scp: Callable[..., int], sr_file: Path) -> None:
    port = start_scp(require_called_aet=True)
    with pytest.raises(DeliveryError) as info:
        send_files(DicomDestination("WRONGAE", "127.0.0.1", port), [sr_file], timeout=5)
    assert info.value.transient is False
    assert send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=5) == [0]


def test_transient_rejection_is_transient(start_scp: Callable[..., int], sr_file: Path) -> None:
    port = start_scp(maximum_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", port, ae_title="PYSCP")
    assert held.is_established
    try:
        with pytest.raises(DeliveryError) as info:
            send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=5)
        assert info.value.transient is True
        assert "transiently rejected" in str(info.value)
    finally:
        held.release()


def test_no_accepted_context_is_permanent(start_scp: Callable[..., int], sr_file: Path) -> None:
    port = start_scp(contexts=(ComputedRadiographyImageStorage,))
    with pytest.raises(DeliveryError) as info:
        send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=5)
    assert info.value.transient is False


def test_partly_accepted_contexts_send_nothing(
    start_scp: Callable[..., int], sr_file: Path, tmp_path: Path
) -> None:
    received: list[str] = []
    port = start_scp(contexts=(ComputedRadiographyImageStorage,), received=received)
    with pytest.raises(DeliveryError) as info:
        send_files(
            DicomDestination("PYSCP", "127.0.0.1", port),
            [tmp_path / "src.dcm", sr_file],
            timeout=5,
        )
    assert info.value.transient is False
    assert "1 of 2" in str(info.value)
    assert received == []


@pytest.mark.parametrize(
    ("status", "transient"),
    [(0xA700, True), (0xA702, True), (0xA900, False), (0xC000, False), (0x0122, False)],
)
def test_failure_status_classification(
    start_scp: Callable[..., int], sr_file: Path, status: int, transient: bool
) -> None:
    port = start_scp(status=status)
    with pytest.raises(DeliveryError) as info:
        send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=5)
    assert info.value.transient is transient
    assert f"0x{status:04X}" in str(info.value)


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warning_status_is_delivered(
    start_scp: Callable[..., int], sr_file: Path, status: int
) -> None:
    received: list[str] = []
    port = start_scp(status=status, received=received)
    assert send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=5) == [
        status
    ]
    assert received == [pydicom.dcmread(sr_file, stop_before_pixels=True).SOPInstanceUID]


def test_response_timeout_is_transient(start_scp: Callable[..., int], sr_file: Path) -> None:
    port = start_scp(delay=2.0)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        send_files(DicomDestination("PYSCP", "127.0.0.1", port), [sr_file], timeout=0.5)
    assert info.value.transient is True
    assert time.monotonic() - started < 2.0


def test_unreadable_file_is_permanent(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.dcm"
    bogus.write_bytes(b"not dicom at all")
    with pytest.raises(DeliveryError) as info:
        send_files(DicomDestination("X", "127.0.0.1", 104), [bogus], timeout=5)
    assert info.value.transient is False


def test_empty_paths_send_nothing() -> None:
    assert send_files(DicomDestination("X", "127.0.0.1", 1), []) == []
