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
pynetdicom's 4 KiB ``recv`` calls appended one by one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

log = logging.getLogger("carebridge.dicom")

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

    def _abort_after_error(self) -> None:
        """As pynetdicom does: an error in the reactor aborts the association."""
        log.exception("DICOM upper layer error: aborting the association")
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
    assoc.__class__ = EventDrivenAssociation
    assert isinstance(assoc, EventDrivenAssociation)
    assoc._activity = activity
    if dul.socket is not None:
        dul.socket.__class__ = _BufferedSocket


class EventDrivenRequestHandler(RequestHandler):
    """The server's request handler: pynetdicom's, with event-driven associations."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc
