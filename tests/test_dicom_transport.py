"""The SCP's event-driven pynetdicom transport: reads, wake-ups and hostile PDU headers."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from db.engine import Database
from db.migrate import upgrade
from listeners.dicom import StorageSCP
from listeners.dicom_transport import _BufferedSocket, decode_p_data, encode_c_store_response
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
