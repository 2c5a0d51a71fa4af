"""DICOM C-STORE delivery (SCU) with pynetdicom.

One call of :func:`send_files` opens one association that proposes exactly the SOP
classes and transfer syntaxes of the files (one presentation context per pair), sends
each file and returns the C-STORE statuses. Failures raise :class:`DeliveryError`,
whose ``transient`` flag tells the caller whether a retry can help:

* transient: no connection, TCP/TLS error, association rejected with result
  "rejected-transient", association aborted, ACSE/DIMSE/network timeout, and the
  C-STORE statuses 0xA7xx (Refused: Out of Resources), 0x0110 (Processing failure),
  0x0210 (Duplicate invocation) and 0x0213 (Resource limitation);
* permanent: association rejected with result "rejected-permanent" (e.g. the peer does
  not know the called AE title), no presentation context accepted for a file's SOP
  class and transfer syntax, a file that cannot be read, and every other failure
  status, notably 0xA9xx (Data Set does not match SOP Class), 0xCxxx (Cannot
  understand), 0x0122 (SOP Class not supported) and 0x0124 (Not authorized).

Warnings (0x0001 and every 0xBxxx, e.g. 0xB000 Coercion of data elements, 0xB006
Elements discarded, 0xB007 Data Set does not match SOP Class) mean the instance was
stored: they count as delivered and are returned like successes (and logged).

pynetdicom does not set ``TCP_NODELAY``; an ``EVT_CONN_OPEN`` handler sets it on the
connected socket before the A-ASSOCIATE-RQ is sent, so small PDUs are not held back by
Nagle's algorithm. Logs and exception messages carry AE titles, addresses, counts and
status codes only, never patient data.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = [
    "DeliveryError",
    "DicomDestination",
    "echo",
    "is_success_status",
    "is_transient_status",
    "parse_destinations",
    "send_files",
]

LOG = logging.getLogger(__name__)

_MAX_CONTEXTS = 128
_AE_TITLE_MAX = 16
_TRANSIENT_STATUSES = frozenset({0x0110, 0x0210, 0x0213})
_DESTINATION_RE = re.compile(r"^(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:\[\]]+):(?P<port>[^:]+)$")


class DeliveryError(Exception):
    """A delivery failed; ``transient`` says whether retrying later can succeed."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient

    def __reduce__(self) -> tuple[type[DeliveryError], tuple[str, bool]]:
        # Keep ``transient`` through pickling (Celery sends exceptions between processes).
        return (type(self), (self.message, self.transient))


def _check_ae_title(title: str, what: str) -> str:
    """Return ``title`` stripped of insignificant spaces or raise ``ValueError``."""
    stripped = title.strip(" ")
    if not stripped:
        raise ValueError(f"{what} AE title must not be empty")
    if len(stripped) > _AE_TITLE_MAX:
        raise ValueError(f"{what} AE title must be at most {_AE_TITLE_MAX} characters")
    if "\\" in stripped:
        raise ValueError(f"{what} AE title must not contain a backslash")
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in stripped):
        raise ValueError(f"{what} AE title must be printable ASCII without control characters")
    return stripped


@dataclass(frozen=True)
class DicomDestination:
    """A DICOM peer: called AE title, host and TCP port."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", _check_ae_title(self.ae_title, "called"))
        if not self.host or any(ch.isspace() for ch in self.host) or "@" in self.host:
            raise ValueError("destination host must be a non-empty name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError("destination port must be an integer")
        if not 1 <= self.port <= 65535:
            raise ValueError("destination port must lie in 1..65535")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_destinations(spec: str) -> list[DicomDestination]:
    """Parse ``"AE@host:port,AE2@host2:port2"`` into destinations.

    IPv6 addresses are written in brackets (``AE@[::1]:104``). Whitespace around
    entries is ignored and an empty or blank ``spec`` gives an empty list; an empty
    entry between commas, a malformed entry, an invalid AE title (empty, over 16
    characters, backslash, control or non-ASCII characters) or a port outside
    1..65535 raises ``ValueError``.
    """
    if not spec or not spec.strip():
        return []
    destinations: list[DicomDestination] = []
    for index, raw in enumerate(spec.split(",")):
        entry = raw.strip()
        if not entry:
            raise ValueError(f"destination {index + 1} is empty")
        match = _DESTINATION_RE.match(entry)
        if match is None:
            raise ValueError(f"destination {index + 1} is not of the form AE@host:port")
        host = match.group("host")
        if host.startswith("["):
            host = host[1:-1]
        port_text = match.group("port").strip()
        if not port_text.isdigit():
            raise ValueError(f"destination {index + 1} has a non-numeric port")
        try:
            destinations.append(DicomDestination(match.group("ae"), host.strip(), int(port_text)))
        except ValueError as exc:
            raise ValueError(f"destination {index + 1}: {exc}") from None
    return destinations


def is_success_status(status: int) -> bool:
    """Return True for C-STORE success (0x0000) and warnings (0x0001, 0xBxxx): stored."""
    return status in (0x0000, 0x0001) or (status & 0xF000) == 0xB000


def is_transient_status(status: int) -> bool:
    """Return True when a failed C-STORE status may succeed on a later retry."""
    return (status & 0xFF00) == 0xA700 or status in _TRANSIENT_STATUSES


def _set_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association socket."""
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # e.g. a non-TCP socket; delivery works regardless
        LOG.debug("could not set TCP_NODELAY on the association socket")


def _make_ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=_check_ae_title(calling_ae, "calling"))
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _associate(
    ae: AE,
    destination: DicomDestination,
    contexts: list[PresentationContext],
    tls: ssl.SSLContext | None,
) -> Association:
    """Open an association or raise :class:`DeliveryError`."""
    tls_args = (tls, destination.host) if tls is not None else None
    # The A-ASSOCIATE-RJ as received: when the peer closes its socket right after
    # rejecting, pynetdicom can report the association as aborted instead of rejected.
    rejections: list[A_ASSOCIATE_RJ] = []

    def remember_rejection(event: Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, _set_tcp_nodelay),
                (evt.EVT_PDU_RECV, remember_rejection),
            ],
        )
    except (OSError, ssl.SSLError) as exc:  # e.g. the host name does not resolve
        raise DeliveryError(
            f"cannot connect to {destination}: {type(exc).__name__}", transient=True
        ) from exc
    if assoc.is_established:
        return assoc
    if assoc.is_rejected or rejections:
        primitive = rejections[0] if rejections else assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        reason = getattr(primitive, "reason_str", "unknown reason")
        transient = result == 0x02
        kind = "transiently" if transient else "permanently"
        raise DeliveryError(
            f"{destination} {kind} rejected the association ({reason})", transient=transient
        )
    if (
        assoc.is_aborted
        and assoc.acceptor.primitive is not None
        and not assoc.accepted_contexts
        and assoc.rejected_contexts
    ):
        # Accepted, but no presentation context was: the peer supports none of the files.
        raise DeliveryError(
            f"{destination} accepted no presentation context for the files", transient=False
        )
    raise DeliveryError(
        f"association with {destination} could not be established "
        "(connection refused, timed out or aborted)",
        transient=True,
    )


def _read_meta(path: Path, index: int) -> tuple[str, str]:
    """Return (SOP Class UID, Transfer Syntax UID) from a file's meta information."""
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        raise DeliveryError(
            f"file {index + 1} cannot be read as DICOM: {type(exc).__name__}", transient=False
        ) from exc
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not sop_class or not syntax or not meta.get("MediaStorageSOPInstanceUID"):
        raise DeliveryError(
            f"file {index + 1} lacks SOP class, SOP instance or transfer syntax in its meta",
            transient=False,
        )
    return sop_class, syntax


def send_files(
    destination: DicomDestination,
    paths: Sequence[Path],
    *,
    calling_ae: str = "CAREBRIDGE",
    timeout: float = 30,
    tls: ssl.SSLContext | None = None,
    progress: Callable[[], object] | None = None,
) -> list[int]:
    """Send DICOM files to ``destination`` over one association; return their statuses.

    ``progress`` is called after each file is stored (e.g. to advance a progress bar).

    The association proposes one presentation context per distinct (SOP class,
    transfer syntax) of the files, nothing else, so each file goes in its own transfer
    syntax without conversion; if the peer does not accept every pair, nothing is sent. The
    returned list holds one C-STORE status per file, in order; every one is a success
    or warning (see :func:`is_success_status`). ``timeout`` (seconds) bounds the TCP
    connect and every ACSE, DIMSE and network wait. ``tls`` enables TLS with that
    client context (the host name is used for SNI and verification).

    Raises :class:`DeliveryError` (``transient`` as documented in the module) on the
    first failure; files before it may already be stored, so retries must resend the
    same SOP instances (idempotent on the receiving side). An empty ``paths`` sends
    nothing and returns ``[]``. ``ValueError`` is raised for an invalid calling AE
    title or timeout.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    ae = _make_ae(calling_ae, timeout)
    files = [Path(p) for p in paths]
    if not files:
        return []

    pairs: list[tuple[str, str]] = []
    for index, path in enumerate(files):
        pair = _read_meta(path, index)
        if pair not in pairs:
            pairs.append(pair)
    if len(pairs) > _MAX_CONTEXTS:
        raise DeliveryError(
            f"{len(pairs)} SOP class/transfer syntax pairs exceed the "
            f"{_MAX_CONTEXTS} presentation contexts of one association",
            transient=False,
        )
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]

    assoc = _associate(ae, destination, contexts, tls)
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    missing = [pair for pair in pairs if pair not in accepted]
    if missing:
        # Send nothing rather than part of the files: the peer cannot take them all.
        assoc.abort()
        raise DeliveryError(
            f"{destination} accepted no presentation context for {len(missing)} of "
            f"{len(pairs)} SOP class/transfer syntax pair(s) of the files",
            transient=False,
        )
    statuses: list[int] = []
    try:
        for index, path in enumerate(files):
            try:
                rsp = assoc.send_c_store(path, msg_id=(index % 0xFFFF) + 1)
            except ValueError as exc:
                # pynetdicom: no accepted presentation context for the file's SOP class
                # and transfer syntax, or the data set cannot be encoded in it
                raise DeliveryError(
                    f"cannot send file {index + 1} to {destination}: no accepted "
                    "presentation context for it, or it cannot be encoded",
                    transient=False,
                ) from exc
            except (RuntimeError, OSError) as exc:
                raise DeliveryError(
                    f"association with {destination} failed while sending file {index + 1}: "
                    f"{type(exc).__name__}",
                    transient=True,
                ) from exc
            status = rsp.get("Status") if rsp is not None else None
            if status is None:
                raise DeliveryError(
                    f"no C-STORE response from {destination} for file {index + 1} "
                    "(timeout, abort or invalid response)",
                    transient=True,
                )
            code = int(status)
            if not is_success_status(code):
                transient = is_transient_status(code)
                raise DeliveryError(
                    f"{destination} returned C-STORE status 0x{code:04X} for file {index + 1}",
                    transient=transient,
                )
            if code != 0x0000:
                LOG.warning(
                    "C-STORE to %s: file %d stored with warning status 0x%04X",
                    destination,
                    index + 1,
                    code,
                )
            statuses.append(code)
            if progress is not None:
                progress()
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    assoc.release()
    LOG.info("C-STORE to %s: %d file(s) stored", destination, len(statuses))
    return statuses


def echo(
    destination: DicomDestination,
    calling_ae: str = "CAREBRIDGE",
    *,
    timeout: float = 10,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Return True when ``destination`` answers a C-ECHO with status Success."""
    ae = _make_ae(calling_ae, timeout)
    try:
        assoc = _associate(ae, destination, [build_context(Verification)], tls)
    except DeliveryError as exc:
        LOG.info("C-ECHO to %s failed: %s", destination, exc.message)
        return False
    try:
        rsp = assoc.send_c_echo()
    except (RuntimeError, OSError, ValueError):
        assoc.abort()
        return False
    status = rsp.get("Status") if rsp is not None else None
    if assoc.is_established:
        assoc.release()
    return status is not None and int(status) == 0x0000
