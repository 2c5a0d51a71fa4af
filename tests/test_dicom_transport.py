"""The SCP's event-driven pynetdicom transport: reads, wake-ups and hostile PDU headers."""

from __future__ import annotations

import copy
import os
import queue
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

from db.engine import Database
from db.migrate import upgrade
from listeners.dicom import StorageSCP
from listeners.dicom_transport import (
    AcceptorContexts,
    DirectResponseDIMSE,
    _BufferedSocket,
    decode_c_store_request,
    decode_p_data,
    encode_c_store_response,
    encode_p_data_tf,
)
from tests.peers import free_port
from worker.settings import load_settings


@pytest.fixture
def scp_port(tmp_path: Path) -> Iterator[int]:
    """The port of a carebridge SCP serving for the test (SQLite in ``tmp_path``)."""
    port = free_port()
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'cb.db'}",
        archive_dir=tmp_path / "archive",
        dicom_port=port,
    )
    upgrade(settings.database_url)
    database = Database(settings.database_url)
    server = StorageSCP(settings, database).start()
    try:
        yield port
    finally:
        server.shutdown()
        database.dispose()


def _reader(sock: socket.socket) -> _BufferedSocket:
    reader = _BufferedSocket.__new__(_BufferedSocket)
    reader.socket = sock
    return reader


def _response(
    status: int, sop_class: str | None, sop_instance: str | None, **extra: object
) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = primitive.MessageIDBeingRespondedTo = 65535
    if sop_class is not None:
        primitive.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    for name, value in extra.items():
        setattr(primitive, name, value)
    return primitive


def _pynetdicom_command_set(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = message.encode_msg(1, 16382)
    ((_, data),) = pdata.presentation_data_value_list
    assert data[0] == 0x03  # a command, last fragment
    return bytes(data[1:])


@pytest.mark.parametrize(
    ("status", "sop_class", "sop_instance"),
    [
        (0x0000, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"),  # odd-length UIDs: NUL padded
        (0xA700, "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.4"),
        (0xC211, None, None),  # no UIDs to echo (the request's were invalid)
        (0xB000, "1.2.840.10008.5.1.4.1.1.66.4", "1." + "2" * 62),  # 64 characters
    ],
)
def test_a_plain_c_store_response_is_encoded_as_pynetdicom_encodes_it(
    status: int, sop_class: str | None, sop_instance: str | None
) -> None:
    primitive = _response(status, sop_class, sop_instance)
    assert encode_c_store_response(primitive) == _pynetdicom_command_set(primitive)


def test_other_responses_are_left_to_pynetdicom() -> None:
    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
    assert encode_c_store_response(_response(0xC210, sop_class, sop_instance)) is not None
    commented = _response(0xC210, sop_class, sop_instance, ErrorComment="cannot understand")
    assert encode_c_store_response(commented) is None
    offending = _response(0xA900, sop_class, sop_instance, OffendingElement=[0x00080016])
    assert encode_c_store_response(offending) is None
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, sop_instance
    assert encode_c_store_response(request) is None


def _pdv(context_id: int, value: bytes) -> bytes:
    return struct.pack(">IB", len(value) + 1, context_id) + value


def test_p_data_values_are_parsed_as_pynetdicom_parses_them() -> None:
    command, fragment = b"\x03" + bytes(range(40)), b"\x00" + os.urandom(5000)
    body = bytearray(_pdv(1, command) + _pdv(3, fragment))
    primitive = decode_p_data(body)
    assert primitive is not None
    assert [(cid, bytes(value)) for cid, value in primitive.presentation_data_value_list] == [
        (1, command),
        (3, fragment),
    ]
    reference = P_DATA_TF()
    reference.decode(struct.pack(">BBL", 0x04, 0, len(body)) + bytes(body))
    assert [
        (cid, bytes(value)) for cid, value in reference.to_primitive().presentation_data_value_list
    ] == [(1, command), (3, fragment)]


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no value at all
        struct.pack(">IB", 1, 1),  # a value without its message control header
        struct.pack(">IB", 100, 1) + b"\x03" * 10,  # longer than the PDU
        _pdv(1, b"\x03abc") + b"\x00\x00\x00",  # trailing bytes
    ],
)
def test_a_malformed_p_data_pdu_is_refused(body: bytes) -> None:
    assert decode_p_data(bytearray(body)) is None


def test_a_malformed_p_data_pdu_aborts_the_association(scp_port: int) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    body = struct.pack(">IB", 100, 1) + b"\x03" * 10
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    transport.socket.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    # The listener goes on serving.
    again = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert int(again.send_c_echo().Status) == 0
    again.release()


def test_reads_a_pdu_larger_than_the_preallocated_buffer() -> None:
    left, right = socket.socketpair()
    payload = os.urandom(3 * (1 << 20) + 17)
    sender = threading.Thread(target=right.sendall, args=(payload,))
    sender.start()
    try:
        assert bytes(_reader(left).recv(len(payload))) == payload
    finally:
        sender.join()
        left.close()
        right.close()


def test_a_claimed_length_is_not_allocated_before_the_bytes_come() -> None:
    left, right = socket.socketpair()
    right.sendall(b"0123456789")
    right.close()
    tracemalloc.start()
    try:
        received = _reader(left).recv(0xFFFFFFF0)  # a hostile PDU header's length
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        left.close()
    assert bytes(received) == b"0123456789"
    assert peak < 4 * (1 << 20)  # one preallocation step, not 4 GiB


def test_the_scp_survives_a_hostile_pdu_header(scp_port: int) -> None:
    with socket.create_connection(("127.0.0.1", scp_port)) as raw:
        raw.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFF0) + b"\x00" * 100)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert assoc.is_established
    # Many request/response turns on one association, each woken by its message.
    for _ in range(50):
        assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert assoc.is_released


# ------------------------------------------------------------------ C-STORE-RQ decoding


def _request(**fields: object) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00" + os.urandom(300))
    for name, value in fields.items():
        setattr(primitive, name, value)
    return primitive


def _request_pdata(primitive: C_STORE, max_pdu: int = 16382) -> list[P_DATA]:
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return list(message.encode_msg(1, max_pdu))


def _pynetdicom_request(command: bytes) -> C_STORE:
    message = DIMSEMessage()
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((1, b"\x03" + command))
    message.decode_msg(pdata)
    primitive = message.message_to_primitive()
    assert isinstance(primitive, C_STORE)
    return primitive


_REQUEST_FIELDS = (
    "MessageID",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "Priority",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"Priority": 0},
        {"Priority": 1, "MessageID": 65535},
        {"AffectedSOPInstanceUID": "1.2.3.44"},  # even length, no padding
        {"AffectedSOPInstanceUID": "1." + "2" * 62},  # 64 characters
        {"MoveOriginatorApplicationEntityTitle": "ORTHANC", "MoveOriginatorMessageID": 3},
        {"MoveOriginatorApplicationEntityTitle": "A B", "MoveOriginatorMessageID": 0},
    ],
)
def test_a_c_store_request_is_decoded_as_pynetdicom_decodes_it(fields: dict[str, object]) -> None:
    pdata = _request_pdata(_request(**fields))
    command = bytes(pdata[0].presentation_data_value_list[0][1][1:])
    ours = decode_c_store_request(command)
    assert ours is not None
    reference = _pynetdicom_request(command)
    for name in _REQUEST_FIELDS:
        assert getattr(ours, name) == getattr(reference, name), name
    assert isinstance(ours.AffectedSOPClassUID, str)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _store_command(
    *extra: bytes, field: bytes = b"\x01\x00", data_set: bytes = b"\x02\x00"
) -> bytes:
    return b"".join(
        (
            _element(0x0002, CTImageStorage.encode() + b"\0"),
            _element(0x0100, field),
            _element(0x0110, b"\x07\x00"),
            _element(0x0700, b"\x02\x00"),
            _element(0x0800, data_set),
            _element(0x1000, b"1.2.3.4"),
            *extra,
        )
    )


@pytest.mark.parametrize(
    "command",
    [
        _store_command(),
        _store_command(_element(0x1030, b"          ")),  # an AE title of spaces
        _store_command(_element(0x1030, b"  ORTHANC "), _element(0x1031, b"\xff\xff")),
        _store_command().replace(b"1.2.3.4", b"1.2.34 "),  # space-padded UID
    ],
)
def test_raw_c_store_commands_are_decoded_as_pynetdicom_decodes_them(command: bytes) -> None:
    ours = decode_c_store_request(command)
    assert ours is not None
    reference = _pynetdicom_request(command)
    for name in _REQUEST_FIELDS:
        assert getattr(ours, name) == getattr(reference, name), name


@pytest.mark.parametrize(
    "command",
    [
        _store_command(field=b"\x30\x00"),  # a C-ECHO-RQ
        _store_command(data_set=b"\x01\x01"),  # no data set
        _store_command(_element(0x0600, b"DEST")),  # an element a C-STORE-RQ does not have
        _store_command(_element(0x1031, b"")),  # an empty value
        _store_command(_element(0x1031, b"\x01\x00\x02")),  # a US of three bytes
        _store_command()[:-3],  # truncated
        _store_command(_element(0x0002, b"1.2")),  # an element twice
        _store_command().replace(b"1.2.3.4", b"1.2\\3.4"),  # two UIDs
        _store_command().replace(b"\x02\x00\x00\x00\x02\x00", b"\x02\x00\x00\x00\x07\x00"),
    ],
)
def test_unusual_commands_are_left_to_pynetdicom(command: bytes) -> None:
    assert decode_c_store_request(command) is None


class _StubDUL:
    def __init__(self) -> None:
        self.event_queue: queue.Queue[str] = queue.Queue()


class _StubAssociation:
    def __init__(self) -> None:
        self.dul = _StubDUL()

    def get_handlers(self, event: object) -> list[object]:
        return []


def _dimse() -> DirectResponseDIMSE:
    return DirectResponseDIMSE(_StubAssociation())  # type: ignore[arg-type]


def _stored(dimse: DirectResponseDIMSE) -> tuple[int | None, C_STORE, bytes]:
    """The next message the provider queued: context ID, C-STORE request, data set bytes."""
    context_id, request = dimse.msg_queue.get_nowait()
    assert isinstance(request, C_STORE) and request.DataSet is not None
    return context_id, request, request.DataSet.getvalue()


def test_a_fragmented_data_set_is_joined_into_the_request() -> None:
    data = os.urandom(100_000)
    pdata = _request_pdata(_request(DataSet=BytesIO(data)), max_pdu=4096)
    assert len(pdata) > 20
    dimse = _dimse()
    for primitive in pdata:
        assert dimse.msg_queue.empty()
        dimse.receive_primitive(primitive)
    context_id, request, received = _stored(dimse)
    assert context_id == 1 and request._context_id == 1
    assert received == data
    assert (
        request.MessageID == 7 and request.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.123"
    )
    assert dimse.message is None and dimse._incoming is None


def test_a_message_that_begins_in_the_pdu_that_ends_another_is_kept() -> None:
    first = _request_pdata(_request(DataSet=BytesIO(b"A" * 10)))
    second = _request_pdata(_request(MessageID=8, DataSet=BytesIO(b"B" * 10)))
    values = [value for pdata in (*first, *second) for value in pdata.presentation_data_value_list]
    together = P_DATA()
    together.presentation_data_value_list.extend(values)
    dimse = _dimse()
    dimse.receive_primitive(together)
    received = [_stored(dimse) for _ in range(2)]
    assert [request.MessageID for _, request, _ in received] == [7, 8]
    assert [data for _, _, data in received] == [b"A" * 10, b"B" * 10]


def test_a_command_inside_a_data_set_aborts_the_association() -> None:
    pdata = _request_pdata(_request(DataSet=BytesIO(os.urandom(10_000))), max_pdu=4096)
    dimse = _dimse()
    dimse.receive_primitive(pdata[0])
    dimse.receive_primitive(pdata[1])
    dimse.receive_primitive(pdata[0])  # a new command before the data set's end
    assert dimse.dul.event_queue.get_nowait() == "Evt19"
    assert dimse.msg_queue.empty()


def test_other_messages_still_go_through_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 3
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    dimse = _dimse()
    for primitive in message.encode_msg(1, 16382):
        dimse.receive_primitive(primitive)
    _, received = dimse.msg_queue.get_nowait()
    assert isinstance(received, C_ECHO) and received.MessageID == 3


def test_a_store_from_a_move_originator_is_stored(scp_port: int, tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "MOVE1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert assoc.is_established
    status = assoc.send_c_store(ds, originator_aet="ORTHANC", originator_id=12)
    assoc.release()
    assert int(status.Status) == 0x0000
    stored = list((tmp_path / "archive").rglob("*.dcm"))
    assert len(stored) == 1
    assert dcmread(stored[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_acceptor_contexts_are_copied_whole_and_independent() -> None:
    ae = AE()
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification, scp_role=True, scu_role=False)
    contexts = AcceptorContexts(ae.supported_contexts)
    before = [list(cx.transfer_syntax) for cx in contexts]
    copies = copy.deepcopy(contexts)
    assert type(copies) is list and len(copies) == 2
    for original, duplicate in zip(contexts, copies, strict=True):
        assert duplicate is not original
        assert vars(duplicate) == vars(original)
        assert duplicate.transfer_syntax is not original.transfer_syntax
    copies[0].transfer_syntax.append(UID("1.2.826.0.1.3680043.9.7433.1"))
    copies[0].result = 0x04
    copies[0].context_id = 9
    assert [list(cx.transfer_syntax) for cx in contexts] == before
    assert contexts[0].result is None and contexts[0].context_id is None


def test_each_association_negotiates_on_its_own_copy(scp_port: int) -> None:
    """A context accepted on one association, refused on the next: nothing carries over."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    first = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert [cx.result for cx in first.accepted_contexts] == [0x00]
    first.release()
    other = AE(ae_title="TESTSCU")
    other.add_requested_context(CTImageStorage, "1.2.3.999")  # a transfer syntax nobody has
    other.add_requested_context(Verification)
    second = other.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert second.is_established
    assert [cx.abstract_syntax for cx in second.accepted_contexts] == [Verification]
    assert [cx.result for cx in second.rejected_contexts] == [0x04]  # transfer syntax refused
    second.release()


# ------------------------------------------------------ responses sent on the association


class _SendingDUL:
    def __init__(self, sock: _BufferedSocket | None, state: str = "Sta6") -> None:
        self.socket = sock
        self.state_machine = type("FSM", (), {"current_state": state})()
        self.to_provider_queue: queue.Queue[object] = queue.Queue()
        self.event_queue: queue.Queue[str] = queue.Queue()

    def send_pdu(self, primitive: object) -> None:
        self.to_provider_queue.put(primitive)


class _SendingAssociation:
    def __init__(self, dul: _SendingDUL, bound: tuple[object, ...] = ()) -> None:
        self.dul = dul
        self.bound = bound
        self.is_requestor = False
        self.requestor = type("Requestor", (), {"maximum_length": 16382})()

    def get_handlers(self, event: object) -> list[object]:
        return [print] if event in self.bound else []


def _connected_socket() -> tuple[_BufferedSocket, socket.socket]:
    ours, peer = socket.socketpair()
    sock = _reader(ours)
    sock._send_lock = threading.Lock()
    return sock, peer


def test_a_p_data_tf_pdu_is_encoded_as_pynetdicom_encodes_it() -> None:
    value = b"\x03" + _pynetdicom_command_set(_response(0, CTImageStorage, "1.2.3.4"))
    primitive = P_DATA()
    primitive.presentation_data_value_list.append((5, value))
    assert encode_p_data_tf(5, value) == P_DATA_TF(primitive).encode()


def test_a_response_is_written_on_the_associations_thread() -> None:
    sock, peer = _connected_socket()
    dul = _SendingDUL(sock)
    association = _SendingAssociation(dul)
    sock._assoc = association  # type: ignore[assignment]
    dimse = DirectResponseDIMSE(association)  # type: ignore[arg-type]
    response = _response(0, CTImageStorage, "1.2.3.4")
    dimse.send_msg(response, 3)
    assert dul.to_provider_queue.empty()
    expected = encode_p_data_tf(3, b"\x03" + _pynetdicom_command_set(response))
    peer.settimeout(5)
    assert peer.recv(65536) == expected
    peer.close()


@pytest.mark.parametrize(
    ("state", "bound", "queued"),
    [
        ("Sta13", (), False),  # not in data transfer
        ("Sta6", (evt.EVT_PDU_SENT,), False),  # someone wants the PDUs
        ("Sta6", (evt.EVT_FSM_TRANSITION,), False),
        ("Sta6", (), True),  # something already waits to be sent
    ],
)
def test_otherwise_the_response_is_queued_for_the_dul(
    state: str, bound: tuple[object, ...], queued: bool
) -> None:
    sock, peer = _connected_socket()
    dul = _SendingDUL(sock, state)
    if queued:
        dul.to_provider_queue.put("earlier")
    dimse = DirectResponseDIMSE(_SendingAssociation(dul, bound))  # type: ignore[arg-type]
    dimse.send_msg(_response(0, CTImageStorage, "1.2.3.4"), 3)
    items = [dul.to_provider_queue.get_nowait() for _ in range(dul.to_provider_queue.qsize())]
    assert isinstance(items[-1], P_DATA)
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(65536)  # nothing written on this thread
    peer.close()


def test_stores_and_echoes_interleave_on_one_association(scp_port: int, tmp_path: Path) -> None:
    """C-STOREs are served on the DUL thread, C-ECHOs on the association's: in order."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    sent = []
    for index in range(6):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "INTERLEAVE", index
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert int(assoc.send_c_store(ds).Status) == 0x0000
        assert int(assoc.send_c_echo().Status) == 0x0000
        sent.append(ds.SOPInstanceUID)
    assoc.release()
    stored = {dcmread(path).SOPInstanceUID for path in (tmp_path / "archive").rglob("*.dcm")}
    assert stored == set(sent)


def test_a_service_error_is_logged_without_its_message(
    scp_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error escaping the C-STORE service aborts the association; its message, which may
    quote the request's values, is not logged: its type and where it was raised are."""
    from listeners import dicom_transport

    def fail(self: object, request: object, context_id: int) -> None:
        raise ValueError("PatientName ZZCANARY^PHI cannot be served")

    monkeypatch.setattr(dicom_transport.EventDrivenAssociation, "_serve_request", fail)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName = "CT", "ZZCANARY^PHI"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with caplog.at_level("DEBUG", logger="carebridge"):
        assoc = ae.associate("127.0.0.1", scp_port, ae_title="CAREBRIDGE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not status  # no response: the association was aborted
    assert assoc.is_aborted
    errors = [r.getMessage() for r in caplog.records if "C-STORE service error" in r.getMessage()]
    assert errors == [
        "C-STORE service error (ValueError at test_dicom_transport.py:"
        f"{fail.__code__.co_firstlineno + 1} in fail): aborting the association"
    ]
    assert all(
        "ZZCANARY" not in record.getMessage() and record.exc_info is None
        for record in caplog.records
    )
