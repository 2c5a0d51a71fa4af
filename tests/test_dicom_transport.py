"""The SCP's event-driven pynetdicom transport: reads, wake-ups and hostile PDU headers."""

from __future__ import annotations

import os
import socket
import struct
import threading
import tracemalloc
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.engine import Database
from db.migrate import upgrade
from listeners.dicom import StorageSCP
from listeners.dicom_transport import _BufferedSocket
from tests.peers import free_port
from worker.settings import load_settings


def _reader(sock: socket.socket) -> _BufferedSocket:
    reader = _BufferedSocket.__new__(_BufferedSocket)
    reader.socket = sock
    return reader


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


def test_the_scp_survives_a_hostile_pdu_header(tmp_path: Path) -> None:
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
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFF0) + b"\x00" * 100)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="CAREBRIDGE")
        assert assoc.is_established
        # Many request/response turns on one association, each woken by its message.
        for _ in range(50):
            assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        assert assoc.is_released
    finally:
        server.shutdown()
        database.dispose()
