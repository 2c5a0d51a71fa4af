"""The DICOM SCP: C-ECHO and C-STORE into the archive, one committed row per instance.

The C-STORE handler is thin on purpose: check the identifiers, write the bytes exactly as
received (file meta + ``event.encoded_dataset()``) to a new file under a path built from
the validated UIDs (past the page cache where the filesystem allows it, see
``listeners.direct_io``), fsync file and directory, commit the row, answer. No decoding of
pixel data, no inference, no broker: the sweeper turns committed rows into work, so a
broker outage never refuses a study.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from db import audit
from db.engine import Database
from db.ingest import InstanceRecorder, ReceivedInstance, instance_exists
from db.schema import Instance
from listeners.dicom_transport import EventDrivenRequestHandler
from listeners.direct_io import write_parts
from worker.routing import ROUTED_ATTRIBUTES, series_attributes
from worker.settings import Settings

log = logging.getLogger("carebridge.dicom")

# pynetdicom's "standard" notification handlers format every PDU and DIMSE message for its
# debug log whatever the log level, and copy each received dataset to say that it has one.
# carebridge logs what it needs (without PHI) itself.
_config.LOG_HANDLER_LEVEL = "none"

# C-STORE statuses (PS3.4 B.2.3). 0xA7xx: the sender should retry; 0xCxxx / 0xA9xx: never.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES_DISK = 0xA700
STATUS_OUT_OF_RESOURCES_DATABASE = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC211
STATUS_UID_MISMATCH = 0xC212

MAX_PDU_SIZE = 262_144
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# What the C-STORE handler reads from a dataset: the UIDs, the routed attributes and the
# character set they are decoded with.
_SCANNED_TAGS = frozenset(
    BaseTag(tag_for_keyword(keyword) or 0)
    for keyword in (*UID_ATTRIBUTES, *ROUTED_ATTRIBUTES, "PatientID", "SpecificCharacterSet")
)


def is_valid_uid(value: object) -> bool:
    """A UID as PS3.5 9.1 defines it: digits and dots, no leading zeros, at most 64 chars."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def uid_digest(uid: str) -> str:
    """A short, stable digest of a UID, for logs (UIDs can identify a patient's study)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Archive path of an instance, built only from validated UIDs."""
    for uid in (study_uid, series_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError("refusing to build a path from an invalid UID")
    return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"


_SYNC_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-io")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_directory(path: Path) -> None:
    """Create ``path`` and its missing parents, syncing each new entry into its parent."""
    if path.is_dir():
        return
    ensure_directory(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _sha256(parts: tuple[bytes | memoryview, ...]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def write_new_file(final: Path, payload: tuple[bytes | memoryview, ...]) -> bool:
    """Create ``final`` (never replacing it), write ``payload`` and sync file and directory.

    The payload is written with ``O_DIRECT`` where the filesystem takes it: the file is
    synced before the answer anyway, and the copy into the page cache was the larger part
    of the write's CPU (``listeners.direct_io``).

    Returns False when ``final`` already exists. A crash mid-write can leave a partial file
    but never a row that points at it: rows are committed only after this returns.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        try:
            fd = os.open(final, flags, 0o640)
        except FileNotFoundError:  # the series' first instance: make its directories
            ensure_directory(final.parent)
            fd = os.open(final, flags, 0o640)
    except FileExistsError:
        return False
    try:
        write_parts(fd, payload)
        # The new directory entry and the file's data are synced concurrently: both are
        # waited for, and the filesystem folds them into one journal commit (on ext4 this
        # is ~7x faster than one after the other).
        directory_synced = _SYNC_POOL.submit(_fsync_dir, final.parent)
        os.fsync(fd)
        directory_synced.result()
    except BaseException:
        os.close(fd)
        final.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def replace_durably(final: Path, payload: tuple[bytes | memoryview, ...]) -> None:
    """Replace ``final`` atomically with ``payload``: synced temporary file, rename, sync."""
    ensure_directory(final.parent)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        write_parts(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(final.parent)


def scan_dataset(encoded: bytes | memoryview, *, implicit_vr: bool, little_endian: bool) -> Dataset:
    """Walk the top-level elements of ``encoded`` once; return the ones the SCP reads.

    Raises ValueError unless ``encoded`` is a sequence of whole data elements: pydicom
    decodes a truncated value silently (a short PixelData, say), and storing such an
    instance and answering success would lose data. Large values (pixel data) are skipped
    over, not copied: a truncated one ends the walk past the end of the bytes.
    """
    stream = io.BytesIO(encoded)
    found: dict[BaseTag, Any] = {}
    consumed = 0
    for raw in data_element_generator(stream, implicit_vr, little_endian, defer_size=1024):
        length = getattr(raw, "length", 0xFFFFFFFF)
        if length != 0xFFFFFFFF and raw.value is not None and len(raw.value) != length:
            raise ValueError("a data element is truncated")
        if raw.tag in _SCANNED_TAGS:
            found[raw.tag] = raw
        consumed = stream.tell()
    if consumed != len(encoded):
        raise ValueError("the dataset ends inside a data element")
    dataset = Dataset(found)
    dataset.set_original_encoding(implicit_vr, little_endian)
    return dataset


_UID_TAGS = {keyword: BaseTag(tag_for_keyword(keyword) or 0) for keyword in UID_ATTRIBUTES}


def uid_of(dataset: Dataset, keyword: str) -> str | None:
    """A UID element of a scanned dataset as text (None when absent).

    Read from the element's bytes as pydicom reads UI (ASCII, trailing NUL and spaces
    stripped) without converting the element: pydicom's conversion and value checks
    cost more than the rest of the bookkeeping of a C-STORE. Only ``is_valid_uid``
    decides what the text is worth.
    """
    tag = _UID_TAGS[keyword]
    if tag not in dataset:
        return None
    element = dataset.get_item(tag)
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\x00 ")
    return None if value is None else str(value)


def patient_key_of(dataset: Dataset) -> str | None:
    """The instance's Patient ID (LO, at most 64 characters), or None when it has none."""
    value = dataset.get("PatientID")
    text = str(value).strip() if value is not None else ""
    return text if 0 < len(text) <= 64 else None


def file_meta_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of a received instance (PS3.10 7.1).

    The same elements, in the same encoding, as pynetdicom's ``Event.encoded_dataset``
    writes; encoded here directly because pydicom's general writer costs more than the
    rest of the C-STORE's bookkeeping.
    """
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _uid_value(sop_class_uid)),
            _meta_element(0x0003, b"UI", _uid_value(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _uid_value(transfer_syntax)),
            _meta_element(0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
            _meta_element(0x0013, b"SH", _text_value(PYNETDICOM_IMPLEMENTATION_VERSION)),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def _text_value(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b" " if len(value) % 2 else value


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, element)
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):  # 4-byte length after 2 reserved bytes
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


@dataclass
class _AssociationTally:
    calling_ae: str
    peer: str
    stored: int = 0
    duplicates: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    studies: set[str] = field(default_factory=set)


class StorageSCP:
    """Receives instances into ``archive_dir`` and records them in ``database``."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self.archive_dir = settings.archive_dir.resolve()
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self.recorder = InstanceRecorder(database.dialect)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.dicom_ae_title)
        ae.maximum_associations = self.settings.dicom_max_associations
        # Larger PDUs: senders that honour our maximum send a 512 KiB slice in 2 PDUs
        # instead of 32, and per-PDU Python overhead is most of pynetdicom's cost.
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.require_called_aet = True  # wrong called AE: rejected (1, 1, 7)
        if self.settings.dicom_allowed_aes:
            ae.require_calling_aet = list(self.settings.dicom_allowed_aes)  # (1, 1, 3)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    # Events -------------------------------------------------------------------------

    def handlers(self) -> Any:
        return [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
            (evt.EVT_REJECTED, self.handle_rejected),
        ]

    def handle_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def handle_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with self._lock:
            self._tallies[id(event.assoc)] = _AssociationTally(
                calling_ae=str(requestor.ae_title).strip(), peer=str(requestor.address)
            )

    def handle_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        log.warning("association from calling AE %r (%s) rejected", calling, requestor.address)
        try:
            with self.database.session() as session:
                audit.append(
                    session,
                    "dicom.association_rejected",
                    actor="listener",
                    calling_ae=calling,
                    called_ae=str(event.assoc.acceptor.ae_title).strip(),
                    peer=str(requestor.address),
                )
        except SQLAlchemyError:
            log.exception("could not audit a rejected association")

    def handle_closed(self, event: evt.Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None or not (tally.stored or tally.duplicates or tally.failed):
            return
        log.info(
            "association from %s closed: %d stored, %d duplicate, %d failed",
            tally.calling_ae,
            tally.stored,
            tally.duplicates,
            sum(tally.failed.values()),
        )
        try:
            with self.database.session() as session:
                studies: list[str | None] = [*sorted(tally.studies)] or [None]
                for study_uid in studies:
                    audit.append(
                        session,
                        "dicom.received",
                        actor="listener",
                        study_instance_uid=study_uid,
                        calling_ae=tally.calling_ae,
                        peer=tally.peer,
                        stored=tally.stored,
                        duplicates=tally.duplicates,
                        failed=tally.failed,
                        aborted=event.event is evt.EVT_ABORTED,
                    )
        except SQLAlchemyError:
            log.exception("could not audit an association")

    def _count(self, event: evt.Event, outcome: str, study_uid: str | None = None) -> None:
        with self._lock:
            tally = self._tallies.get(id(event.assoc))
            if tally is None:
                return
            if outcome == "stored":
                tally.stored += 1
            elif outcome == "duplicate":
                tally.duplicates += 1
            else:
                tally.failed[outcome] = tally.failed.get(outcome, 0) + 1
            if study_uid is not None:
                tally.studies.add(study_uid)

    def handle_store(self, event: evt.Event) -> int:
        """C-STORE: validate, write durably, commit the row, answer."""
        request: Any = event.request
        try:
            transfer_syntax = event.context.transfer_syntax
            received_bytes: bytes = request.DataSet.getvalue()
            if transfer_syntax == DeflatedExplicitVRLittleEndian:
                scanned = zlib.decompressobj(-zlib.MAX_WBITS).decompress(received_bytes)
            else:
                scanned = received_bytes
            dataset = scan_dataset(
                scanned,
                implicit_vr=transfer_syntax.is_implicit_VR,
                little_endian=transfer_syntax.is_little_endian,
            )
            uids = {name: uid_of(dataset, name) for name in UID_ATTRIBUTES}
            attributes = series_attributes(dataset)
            patient_key = patient_key_of(dataset)
        except Exception:  # undecodable bytes: never log the dataset
            self._count(event, "undecodable")
            log.warning("C-STORE refused: dataset cannot be decoded")
            return STATUS_CANNOT_UNDERSTAND
        invalid = [name for name, value in uids.items() if not is_valid_uid(value)]
        if invalid:
            self._count(event, "invalid_uid")
            log.warning("C-STORE refused: invalid or missing %s", ", ".join(invalid))
            return STATUS_INVALID_UID
        if uids["SOPClassUID"] != str(request.AffectedSOPClassUID):
            self._count(event, "sop_class_mismatch")
            return STATUS_DATASET_MISMATCH
        if uids["SOPInstanceUID"] != str(request.AffectedSOPInstanceUID):
            self._count(event, "sop_instance_mismatch")
            return STATUS_UID_MISMATCH
        study_uid = str(uids["StudyInstanceUID"])
        sop_uid = str(uids["SOPInstanceUID"])
        relpath = instance_relpath(study_uid, str(uids["SeriesInstanceUID"]), sop_uid)

        # The bytes as received, behind their File Meta Information: written and hashed
        # in two parts, never joined into one copy.
        payload = (
            file_meta_prefix(str(request.AffectedSOPClassUID), sop_uid, str(transfer_syntax)),
            received_bytes,
        )
        final = self.archive_dir / relpath
        # Hashed on another thread while this one writes and waits for the disk (hashlib
        # releases the GIL on large buffers).
        digest = _SYNC_POOL.submit(_sha256, payload)
        try:
            created = write_new_file(final, payload)
        except OSError as exc:
            self._count(event, "disk_unavailable")
            log.error("C-STORE refused (out of resources): archive write failed: %s", exc.strerror)
            return STATUS_OUT_OF_RESOURCES_DISK
        if not created:
            # The file exists: a duplicate (its row is committed), or the remains of a crash
            # before the commit (no row), which is replaced.
            try:
                with self.database.session() as session:
                    duplicate = instance_exists(session, sop_uid)
            except SQLAlchemyError:
                self._count(event, "database_unavailable")
                log.error("C-STORE refused (out of resources): database unavailable")
                return STATUS_OUT_OF_RESOURCES_DATABASE
            if duplicate:
                self._count(event, "duplicate", study_uid)
                return STATUS_SUCCESS
            try:
                replace_durably(final, payload)
            except OSError as exc:
                self._count(event, "disk_unavailable")
                log.error(
                    "C-STORE refused (out of resources): archive write failed: %s", exc.strerror
                )
                return STATUS_OUT_OF_RESOURCES_DISK

        received = ReceivedInstance(
            study_instance_uid=study_uid,
            series_instance_uid=str(uids["SeriesInstanceUID"]),
            sop_instance_uid=sop_uid,
            sop_class_uid=str(uids["SOPClassUID"]),
            transfer_syntax_uid=str(transfer_syntax),
            path=relpath,
            size_bytes=sum(len(part) for part in payload),
            sha256=digest.result(),
            calling_ae=str(event.assoc.requestor.ae_title).strip()[:16],
            series_attributes=attributes,
            patient_key=patient_key,
        )
        try:
            # Core statements in a plain transaction: no ORM bookkeeping per C-STORE.
            with self.database.writer_turn(), self.database.transaction() as connection:
                new = self.recorder.record(connection, received)
        except SQLAlchemyError:
            self.recorder.forget()
            # Nothing half-written: no row, so no file either.
            final.unlink(missing_ok=True)
            self._count(event, "database_unavailable")
            log.error("C-STORE refused (out of resources): database unavailable")
            return STATUS_OUT_OF_RESOURCES_DATABASE
        self._count(event, "stored" if new else "duplicate", study_uid)
        log.debug("stored instance %s of study %s", uid_digest(sop_uid), uid_digest(study_uid))
        return STATUS_SUCCESS

    # Recovery -----------------------------------------------------------------------

    def index_unrecorded(self, margin_seconds: float = 300.0) -> int:
        """Record archive files whose row is missing; returns how many were recorded.

        The listener's SQLite commits are not synced one by one (the instance's file is):
        a power loss can undo the last rows of instances already acknowledged, whose files
        are on disk. On start, every series directory changed since shortly before the
        newest surviving row is looked through, and each complete instance file without a
        row is recorded as if just received. A partial file (a write that was never
        acknowledged) is left for the sender's retry to replace.
        """
        root = self.archive_dir / "instances"
        if not root.is_dir():
            return 0
        with self.database.session() as session:
            newest = session.execute(
                select(Instance.received_at).order_by(Instance.id.desc()).limit(1)
            ).scalar_one_or_none()
        cutoff = (
            newest.replace(tzinfo=UTC).timestamp() - margin_seconds if newest is not None else 0.0
        )
        recorded = skipped = 0
        studies: set[str] = set()
        for study_dir in _subdirectories(root):
            for series_dir in _subdirectories(study_dir):
                if series_dir.stat().st_mtime < cutoff:
                    continue  # no entry created in it since the cutoff
                candidates = {
                    path.name[: -len(".dcm")]: path
                    for path in series_dir.iterdir()
                    if path.name.endswith(".dcm")
                    and not path.name.startswith(".")
                    and path.stat().st_mtime >= cutoff
                }
                if not candidates:
                    continue
                with self.database.session() as session:
                    known = set(
                        session.execute(
                            select(Instance.sop_instance_uid).where(
                                Instance.sop_instance_uid.in_(list(candidates))
                            )
                        ).scalars()
                    )
                for sop_uid, path in candidates.items():
                    if sop_uid in known:
                        continue
                    received = _recovered_instance(
                        path, study_dir.name, series_dir.name, sop_uid, self.archive_dir
                    )
                    if received is None:
                        skipped += 1
                        continue
                    with self.database.session() as session:
                        if self.recorder.record(session.connection(), received):
                            recorded += 1
                            studies.add(received.study_instance_uid)
        if skipped:
            log.warning("%d incomplete archive files without a row, left for a resend", skipped)
        if recorded:
            log.warning("%d archive files without a row recorded", recorded)
            with self.database.session() as session:
                audited: list[str | None] = [*sorted(studies)]
                for study_uid in audited:
                    audit.append(
                        session,
                        "dicom.recovered",
                        actor="listener",
                        study_instance_uid=study_uid,
                        recorded=recorded,
                        incomplete=skipped,
                    )
        return recorded

    # Server -------------------------------------------------------------------------

    def tls_context(self) -> ssl.SSLContext | None:
        """The server TLS context (mutual when a CA is configured), or None."""
        settings = self.settings
        if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
        if settings.dicom_tls_ca is not None:
            context.load_verify_locations(settings.dicom_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def start(self, shared: socket.socket | None = None) -> Any:
        """Start serving in background threads; returns the pynetdicom server.

        The port is bound with SO_REUSEPORT, so several listeners can share it. The
        processes of one ``carebridge listen-dicom --processes N`` share one listening
        socket instead (``shared``, see :func:`listeners.net.listening_socket`): each connection
        goes to the process serving the fewest associations.
        """
        ensure_directory(self.archive_dir)
        server_class = type("ListenerServer", (_ReusePortServer,), {"shared": shared})
        server = self.ae.make_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            evt_handlers=self.handlers(),
            ssl_context=self.tls_context(),
            server_class=server_class,
            request_handler=EventDrivenRequestHandler,
        )
        self.ae._servers.append(server)  # as start_server does; shutdown() removes it
        threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True).start()
        log.info(
            "DICOM SCP %s listening on %s:%d",
            self.settings.dicom_ae_title,
            self.settings.dicom_host,
            self.settings.dicom_port,
        )
        return server


def _subdirectories(path: Path) -> list[Path]:
    return [Path(entry.path) for entry in os.scandir(path) if entry.is_dir(follow_symlinks=False)]


def _recovered_instance(
    path: Path, study_uid: str, series_uid: str, sop_uid: str, archive_dir: Path
) -> ReceivedInstance | None:
    """What an archive file says about itself, or None unless it is a whole instance whose
    UIDs are the ones its path was built from."""
    try:
        raw = path.read_bytes()
        if raw[128:132] != b"DICM":
            return None
        meta = dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta  # the bytes read once
        transfer_syntax = UID(str(meta.TransferSyntaxUID))
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        body: bytes = raw[start:]
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
        dataset = scan_dataset(
            body,
            implicit_vr=transfer_syntax.is_implicit_VR,
            little_endian=transfer_syntax.is_little_endian,
        )
        uids = {name: uid_of(dataset, name) or "" for name in UID_ATTRIBUTES}
        attributes = series_attributes(dataset)
        patient_key = patient_key_of(dataset)
    except Exception:  # partial or foreign file: never log its content
        return None
    expected = {
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "SOPInstanceUID": sop_uid,
    }
    if any(uids[name] != value for name, value in expected.items()):
        return None
    if not is_valid_uid(uids["SOPClassUID"]):
        return None
    return ReceivedInstance(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=str(transfer_syntax),
        path=path.relative_to(archive_dir).as_posix(),
        size_bytes=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        calling_ae="",
        series_attributes=attributes,
        patient_key=patient_key,
    )


#: How long a listener process of a group waits, per association it is already serving,
#: before it takes a new connection from the shared socket (at most ACCEPT_YIELD_MAX_S).
ACCEPT_YIELD_S = 0.005
ACCEPT_YIELD_MAX_S = 0.05


class _ReusePortServer(ThreadedAssociationServer):
    """The SCP's server socket: bound with SO_REUSEPORT (several ``listen-dicom`` commands
    may share a port), or, in a group of listener processes, the group's one listening
    socket (``shared``), from which the least busy process takes each connection."""

    shared: socket.socket | None = None
    _accepted: list[socket.socket] = []  # the class default is replaced, never mutated

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.shared is None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()
            return
        self.socket.close()
        self.socket = self.shared
        # Non-blocking: the processes race for each connection, and the ones that lose
        # find nothing to accept and go back to waiting.
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared is None:
            super().server_activate()  # a shared socket listens already

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.shared is None:
            return super().get_request()
        # Every process of the group is woken by a new connection: the one serving the
        # fewest connections takes it first, so a few long associations (one study each,
        # say) spread over the processes instead of piling up on one. Counted from the
        # accepted sockets still open (an association closes its socket when it ends).
        accepted = [sock for sock in self._accepted if sock.fileno() != -1]
        if accepted:
            time.sleep(min(len(accepted) * ACCEPT_YIELD_S, ACCEPT_YIELD_MAX_S))
        request = super().get_request()
        accepted.append(request[0])
        self._accepted = accepted
        return request


def quiet_pynetdicom() -> None:
    """pynetdicom logs dataset contents at DEBUG: keep it at WARNING (no PHI in logs)."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
