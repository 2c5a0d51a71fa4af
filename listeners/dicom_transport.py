"""pynetdicom's acceptor, made event-driven: the SCP's threads wait for work, not for a tick.

pynetdicom runs two threads per association, and both poll: the DUL reactor sleeps 1 ms
whenever it has nothing to do, and the association reactor sleeps 1 ms at the top of every
loop. A C-STORE crosses both threads twice (request in, response out), so each instance
waits up to 3-4 ms on timers while the CPU is idle, about half of a bare pynetdicom
handler's time per instance on one association.

Here the same reactors wait on what they are waiting for instead:

* the DUL thread waits in ``select`` on its socket and on a wake-up socket that is written
  whenever a primitive is queued for it to send (``to_provider_queue``);
* the association thread waits on an event that is set whenever a DIMSE message or an ACSE
  primitive is queued for it.

Both still wake at least every ``TIMER_CHECK_SECONDS`` to check their timers (ARTIM,
network idle, kill), exactly as pynetdicom's state machine expects. Everything else
(negotiation, the PS3.8 state machine, DIMSE, TLS, events) is pynetdicom's own, unchanged:
only the waiting is replaced, on acceptor associations of carebridge's server.

Socket reads are also done with ``recv_into`` a buffer of the PDU's size instead of
pynetdicom's 4 KiB ``recv`` calls appended one by one; a P-DATA-TF PDU's presentation data
values are handed to DIMSE as views of that buffer (pynetdicom copies the PDU twice and
builds an object per value); a C-STORE request's command set is decoded directly; and a
plain C-STORE response (a status, no error comment or offending element) is encoded
directly, in the bytes pynetdicom's general message encoder writes for it, without
building a pydicom dataset and encoding it twice. A C-STORE request is served on the DUL
thread that assembled it (which has nothing to do but wait for the answer) and its
response written there, instead of two thread hand-overs. New associations copy the
server's presentation contexts without ``deepcopy``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from io import BytesIO
from pathlib import PurePath
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

log = logging.getLogger("carebridge.dicom")


def _where() -> str:
    """The type of the exception being handled and the file and line that raised it.

    Not its message: an error raised while a request is decoded or served may quote the
    request's values (a patient's name among them).
    """
    kind, _value, tb = sys.exc_info()
    if kind is None:
        return "unknown error"
    frames = traceback.extract_tb(tb)
    if not frames:
        return kind.__name__
    last = frames[-1]
    return f"{kind.__name__} at {PurePath(last.filename).name}:{last.lineno} in {last.name}"


# The longest a reactor waits without looking at its timers. pynetdicom's timers (ARTIM,
# network idle) are in seconds, so a few milliseconds of lateness is invisible.
TIMER_CHECK_SECONDS = 0.005


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _Waker:
    """A socket pair the DUL thread selects on together with its peer's socket."""

    def __init__(self) -> None:
        self._receiver, self._sender = socket.socketpair()
        self._receiver.setblocking(False)
        self._sender.setblocking(False)

    def fileno(self) -> int:
        return self._receiver.fileno()

    def wake(self) -> None:
        # Full (a wake-up is already pending) or closed: nothing to do.
        with contextlib.suppress(OSError):
            self._sender.send(b"\0")

    def drain(self) -> None:
        try:
            while self._receiver.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._receiver.close()
        self._sender.close()


# PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ ... A-ABORT); P-DATA-TF is 0x04.
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04


def decode_p_data(body: bytearray) -> P_DATA | None:
    """The P-DATA primitive of a P-DATA-TF PDU's body, or None when it is malformed.

    Each presentation data value item (PS3.8 9.3.5.1) is a 4-byte big-endian length, the
    presentation context ID and the value (its first byte the message control header).
    The values are views of ``body``: DIMSE copies each into the message it assembles.
    """
    view = memoryview(body)
    values: list[tuple[int, Any]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        (length,) = struct.unpack_from(">I", body, offset)
        # At least the context ID and the message control header; never past the PDU.
        if length < 2 or length > end - offset - 4:
            return None
        values.append((body[offset + 4], view[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    if not values:
        return None
    primitive = P_DATA()
    # Appended, as pynetdicom's own P_DATA_TF.to_primitive does (its setter wants bytes).
    primitive.presentation_data_value_list.extend(values)
    return primitive


class _ReceivedPData(P_DATA_TF):
    """A received P-DATA-TF PDU whose values were parsed by :func:`decode_p_data`."""

    def __init__(self, primitive: P_DATA) -> None:
        super().__init__()
        self._primitive = primitive

    def to_primitive(self) -> P_DATA:
        return self._primitive


class EventDrivenDUL(DULServiceProvider):
    """The DUL reactor loop of pynetdicom, waiting in ``select`` instead of sleeping."""

    _waker: _Waker

    def run_reactor(self) -> None:
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                # The ARTIM timer's event goes on the queue ahead of anything else.
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    # One primitive to send, or else one PDU received, per turn.
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    self._abort_after_error()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait()
                    continue
                self.state_machine.do_action(event)
        finally:
            self._waker.close()

    def _wait(self) -> None:
        """Block until the peer sent data, a primitive is queued, or a timer may be due."""
        if self.to_provider_queue.qsize():
            return
        sock = self.socket.socket if self.socket is not None else None
        if sock is None or not self.socket._is_connected:  # type: ignore[union-attr]
            time.sleep(0.001)  # no connection to wait on: pynetdicom's own pace
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select cannot see them
        try:
            select.select([sock.fileno(), self._waker.fileno()], [], [], TIMER_CHECK_SECONDS)
        except (OSError, ValueError):  # closed under us: the next turn sees it
            time.sleep(0.001)
        self._waker.drain()

    def _read_pdu_data(self) -> None:
        """Read one PDU, as pynetdicom does; a P-DATA-TF's values are parsed directly.

        The events are pynetdicom's: Evt17 when the connection closes before a whole PDU
        arrived, Evt19 for an unknown PDU type or one that does not decode (the
        association is then aborted), else the PDU's own event with the PDU queued.
        """
        assert self.socket is not None
        try:
            header = self.socket.recv(6)
            pdu_type, _, length = struct.unpack(">BBL", header)
        except (OSError, struct.error):
            self.event_queue.put("Evt17")
            return
        if pdu_type not in _PDU_TYPES:
            log.warning("unknown PDU type 0x%02X received: aborting the association", pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = self.socket.recv(length)
        except OSError:
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            self.event_queue.put("Evt17")
            return
        if pdu_type == _P_DATA_TF and not (
            self.assoc.get_handlers(evt.EVT_DATA_RECV) or self.assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            primitive = decode_p_data(body)
            if primitive is None:
                log.warning("malformed P-DATA-TF PDU received: aborting the association")
                self.event_queue.put("Evt19")
                return
            self.event_queue.put("Evt10")
            self._recv_pdu.put(_ReceivedPData(primitive))
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            log.warning("undecodable PDU received: aborting the association")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _abort_after_error(self) -> None:
        """As pynetdicom does: an error in the reactor aborts the association."""
        log.error("DICOM upper layer error (%s): aborting the association", _where())
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class EventDrivenAssociation(Association):
    """pynetdicom's acceptor loop, waiting on an event instead of sleeping each turn."""

    _activity: threading.Event
    _serving: threading.Lock  # held while a request is served, on either thread

    def _run_reactor(self) -> None:
        self._is_paused = False
        idle = False
        while not self._kill:
            if idle:
                self._activity.wait(TIMER_CHECK_SECONDS)
            self._activity.clear()

            # Paused while this side sends its own DIMSE or ACSE messages.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            idle = msg is None
            if msg is not None:
                with self._serving:
                    self._serve_request(msg, context_id)  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("DICOM network timeout: aborting the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class _BufferedSocket(AssociationSocket):
    """Reads a PDU with ``recv_into`` one buffer instead of 4 KiB ``recv`` calls.

    The buffer is allocated up front only up to ``_PREALLOCATE``: a PDU header may claim
    up to 4 GiB, and memory must follow what the peer actually sends, not what it claims.
    """

    _PREALLOCATE = 1 << 20
    _send_lock: threading.Lock  # set by make_event_driven

    def send(self, bytestream: bytes) -> None:
        # The DUL thread and, for C-STORE responses, the association thread send.
        with self._send_lock:
            super().send(bytestream)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(min(nr_bytes, self._PREALLOCATE))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):  # a large PDU that keeps coming: grow by a step
                buffer.extend(bytes(min(nr_bytes - received, self._PREALLOCATE)))
            with memoryview(buffer) as view:
                count = sock.recv_into(view[received:])
            if not count:  # connection closed: what arrived so far, as pynetdicom does
                del buffer[received:]
                return buffer
            received += count
        return buffer


# Command Field of a C-STORE-RSP, and Command Data Set Type "no data set" (PS3.7 E.1-1).
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def _command_element(element: int, value: bytes) -> bytes:
    """One group 0000 element, Implicit VR Little Endian (the command set's encoding)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _command_uid(uid: object) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def encode_c_store_response(primitive: C_STORE) -> bytes | None:
    """The command set of a plain C-STORE-RSP, or None when it is not one.

    Plain: a response (Message ID Being Responded To set) with a status and neither an
    Offending Element nor an Error Comment. The elements are those pynetdicom writes for
    it, in tag order, each optional UID left out when unset.
    """
    if type(primitive) is not C_STORE:
        return None
    responded_to = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    if (
        responded_to is None
        or not isinstance(status, int)
        or not 0 <= status <= 0xFFFF
        or primitive.OffendingElement is not None
        or primitive.ErrorComment is not None
    ):
        return None
    elements = []
    if primitive.AffectedSOPClassUID is not None:
        elements.append(_command_element(0x0002, _command_uid(primitive.AffectedSOPClassUID)))
    elements += [
        _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _command_element(0x0120, struct.pack("<H", responded_to)),
        _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", status)),
    ]
    if primitive.AffectedSOPInstanceUID is not None:
        elements.append(_command_element(0x1000, _command_uid(primitive.AffectedSOPInstanceUID)))
    body = b"".join(elements)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


# The command elements of a C-STORE-RQ (PS3.7 9.3.1.1): group length, Affected SOP Class
# UID, Command Field, Message ID, Priority, Command Data Set Type, Affected SOP Instance
# UID, Move Originator AE Title and Message ID.
_C_STORE_RQ_ELEMENTS = frozenset(
    (0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031)
)
_C_STORE_RQ = b"\x01\x00"


def decode_c_store_request(command: bytes | memoryview) -> C_STORE | None:
    """The C-STORE primitive of a C-STORE-RQ command set with a data set, or None.

    None also for anything unusual (another command, another element, an empty or
    multi-valued or malformed value, a value the primitive refuses): pynetdicom's own
    decoder then handles the message, with its own errors. The values are decoded as
    pydicom decodes them (UIDs without trailing nulls or spaces, an AE title without
    leading or trailing spaces) and set through the primitive's own validating setters.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if (
            group != 0x0000
            or element not in _C_STORE_RQ_ELEMENTS
            or element in values
            or not 0 < length <= end - offset
        ):
            return None
        values[element] = bytes(command[offset : offset + length])
        offset += length
    if values.get(0x0100) != _C_STORE_RQ:
        return None
    data_set_type = values.get(0x0800)
    if data_set_type is None or data_set_type == b"\x01\x01":  # no data set: not a store
        return None
    try:
        request = C_STORE()
        request.MessageID = _us(values[0x0110])
        request.AffectedSOPClassUID = _ui(values[0x0002])
        request.AffectedSOPInstanceUID = _ui(values[0x1000])
        if 0x0700 in values:
            request.Priority = _us(values[0x0700])
        if 0x1030 in values:
            title = values[0x1030].decode("ascii")
            if "\\" in title:
                return None
            request.MoveOriginatorApplicationEntityTitle = title.strip()
            if request.MoveOriginatorApplicationEntityTitle is None:  # refused by the setter
                return None
        if 0x1031 in values:
            request.MoveOriginatorMessageID = _us(values[0x1031])
    except (KeyError, ValueError, TypeError, struct.error):
        return None
    return request


def _us(value: bytes) -> int:
    (number,) = struct.unpack("<H", value)  # struct.error unless exactly 2 bytes
    return int(number)


def _ui(value: bytes) -> str:
    text = value.decode("ascii").rstrip("\0 ")
    if "\\" in text or not text:
        raise ValueError("not a single UID")
    return text


class _IncomingStore:
    """A C-STORE-RQ whose command set arrived and whose data set is arriving."""

    __slots__ = ("context_id", "fragments", "request")

    def __init__(self, request: C_STORE, context_id: int) -> None:
        self.request = request
        self.context_id = context_id
        self.fragments: list[Any] = []


class DirectResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with C-STORE's own messages handled directly.

    * A C-STORE-RQ whose command set comes whole in one fragment is decoded by
      :func:`decode_c_store_request`, and its data set fragments (views of the received
      PDUs) are joined once into the request's ``DataSet``. Any other message, and every
      message while someone has bound ``EVT_DIMSE_RECV`` or pynetdicom is set to spool
      data sets to files, goes through pynetdicom's decoder.
    * The request is served on the DUL thread that assembled it (:meth:`_serve_here`).
    * A plain C-STORE response is encoded directly (:func:`encode_c_store_response`) and,
      on a plain TCP association in data transfer, written by the thread that produced
      it instead of being queued for the DUL thread's next turn.
    """

    _incoming: _IncomingStore | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        values = primitive.presentation_data_value_list
        if self._incoming is None:
            if self.message is not None or not values:  # pynetdicom is assembling one
                super().receive_primitive(primitive)
                return
            context_id, data = values[0]
            request = None
            if (
                data[0] & 0b11 == 0b11  # a command, whole in this one fragment
                and not _config.STORE_RECV_CHUNKED_DATASET
                and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
            ):
                request = decode_c_store_request(memoryview(data)[1:])
            if request is None:
                super().receive_primitive(primitive)
                return
            self._incoming = _IncomingStore(request, context_id)
            values = values[1:]
        incoming = self._incoming
        for index, (context_id, data) in enumerate(values):
            header = data[0]
            if header & 0b01 or context_id != incoming.context_id:
                # A command, or another context, before the data set's last fragment.
                log.warning("C-STORE data set interrupted by another message: aborting")
                self._incoming = None
                self.dul.event_queue.put("Evt19")
                return
            incoming.fragments.append(memoryview(data)[1:])
            if header & 0b10:  # the data set's last fragment
                self._incoming = None
                request = incoming.request
                request.DataSet = BytesIO(b"".join(incoming.fragments))
                request._context_id = context_id
                if not self._serve_here(request, context_id):
                    self.msg_queue.put((context_id, request))
                rest = values[index + 1 :]
                if rest:  # the next message began in the same PDU
                    following = P_DATA()
                    following.presentation_data_value_list.extend(rest)
                    self.receive_primitive(following)
                return

    def _serve_here(self, request: C_STORE, context_id: int) -> bool:
        """Serve a C-STORE request on this (the DUL) thread; False to queue it instead.

        pynetdicom queues every request for the association's own thread, which wakes,
        serves it and queues the response back: two thread switches per C-STORE, while
        the DUL thread only waits (the peer sends nothing before the answer). The request
        is served here when the association is established, nothing else is queued
        (order) and the association's thread is not serving (it may still be returning
        from the previous request). An error that escapes pynetdicom's handler guard
        aborts the association, as an undecodable PDU does.
        """
        assoc = self.assoc
        if (
            not isinstance(assoc, EventDrivenAssociation)
            or not assoc.is_established
            or self.msg_queue.qsize()
            or not assoc._serving.acquire(blocking=False)
        ):
            return False
        try:
            assoc._serve_request(request, context_id)
        except Exception:
            log.error("C-STORE service error (%s): aborting the association", _where())
            self.dul.event_queue.put("Evt19")
        finally:
            assoc._serving.release()
        return True

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = encode_c_store_response(primitive)
        limit = self.maximum_pdu_size
        if (
            encoded is None
            or (limit and len(encoded) > limit - 6)  # would need several fragments
            or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)  # someone wants the message
        ):
            super().send_msg(primitive, context_id)
            return
        # Message Control Header 0x03: a command, its last fragment (PS3.8 E.2).
        value = b"\x03" + encoded
        if self._send_directly(context_id, value):
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, value))
        self.dul.send_pdu(pdata)

    def _send_directly(self, context_id: int, value: bytes) -> bool:
        """Write the P-DATA-TF PDU of one value on this thread; False when it must queue.

        pynetdicom hands every PDU to the DUL thread to send, a thread switch each way for
        every C-STORE. While the association transfers data (state Sta6), nothing else is
        queued to send (which would have to go first), the socket is plain TCP (an SSL
        object must not be used by two threads at once) and nobody listens for PDU-level
        events, the PDU the DUL would write (DT-1, staying in Sta6) is written here, under
        the socket's send lock.
        """
        dul = self.dul
        sock = dul.socket
        if (
            not isinstance(sock, _BufferedSocket)
            or isinstance(sock.socket, ssl.SSLSocket)
            or dul.state_machine.current_state != "Sta6"
            or dul.to_provider_queue.qsize()
            or any(self.assoc.get_handlers(event) for event in _SEND_EVENTS)
        ):
            return False
        sock.send(encode_p_data_tf(context_id, value))
        return True


#: Events pynetdicom triggers on the DUL thread when it sends a PDU.
_SEND_EVENTS = (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_FSM_TRANSITION)


def encode_p_data_tf(context_id: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5) holding one presentation data value."""
    item = struct.pack(">IB", len(value) + 1, context_id) + value
    return struct.pack(">BBI", _P_DATA_TF, 0x00, len(item)) + item


def make_event_driven(assoc: Association) -> None:
    """Switch a new acceptor association (not yet started) to the event-driven reactors."""
    activity = threading.Event()
    dul = assoc.dul
    waker = _Waker()
    dul.__class__ = EventDrivenDUL
    assert isinstance(dul, EventDrivenDUL)
    dul._waker = waker
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]
    dul.to_provider_queue = _WakingQueue(waker.wake)
    dul.to_user_queue = _WakingQueue(activity.set)
    assoc.dimse.msg_queue = _WakingQueue(activity.set)
    assoc.dimse.__class__ = DirectResponseDIMSE
    assoc.__class__ = EventDrivenAssociation
    assert isinstance(assoc, EventDrivenAssociation)
    assoc._activity = activity
    assoc._serving = threading.Lock()
    if dul.socket is not None:
        dul.socket.__class__ = _BufferedSocket
        assert isinstance(dul.socket, _BufferedSocket)
        dul.socket._send_lock = threading.Lock()


#: What a pynetdicom presentation context holds: IDs, UIDs (immutable strings), flags, and
#: the list of transfer syntaxes.
_CONTEXT_ATTRIBUTES = frozenset(
    (
        "_context_id",
        "_abstract_syntax",
        "_transfer_syntax",
        "result",
        "_scu_role",
        "_scp_role",
        "_as_scp",
        "_as_scu",
    )
)


class AcceptorContexts(list[PresentationContext]):
    """A server's supported presentation contexts, deep-copied cheaply.

    pynetdicom gives every new association a deep copy of the server's contexts (the
    negotiation writes its results into them). With every storage SOP class and transfer
    syntax that is 171 contexts of 45 UIDs each: about 60 ms of CPU per association, more
    than storing a dozen instances. A context holds only immutable values and one list, so
    a copy of each context with a copy of its list is the same deep copy; a context with
    anything else (another pynetdicom version) is deep-copied as before.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            if vars(context).keys() != _CONTEXT_ATTRIBUTES or any(
                type(uid) is not UID for uid in context._transfer_syntax
            ):
                copies.append(copy.deepcopy(context, memo))
                continue
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


class EventDrivenRequestHandler(RequestHandler):
    """The server's request handler: pynetdicom's, with event-driven associations."""

    def _create_association(self) -> Association:
        server = self.server
        if type(server.contexts) is list:  # copied cheaply for each association from now on
            server.contexts = AcceptorContexts(server.contexts)
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc
