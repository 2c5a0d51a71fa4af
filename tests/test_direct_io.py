"""Archive writes past the page cache: the bytes on disk are exactly the parts given, on
every path (direct, refused by the filesystem, refused or cut short mid-file)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

from listeners import direct_io
from listeners.dicom import write_new_file

SIZES = [
    0,
    1,
    132,
    direct_io.ALIGNMENT - 1,
    direct_io.ALIGNMENT,
    direct_io.ALIGNMENT + 1,
    525_132,  # a 512x512 16-bit CT slice behind its file meta
    direct_io.CHUNK - 1,
    direct_io.CHUNK,
    direct_io.CHUNK + 1,
    2 * direct_io.CHUNK + direct_io.ALIGNMENT + 5,
]


def _parts(size: int) -> tuple[bytes, memoryview]:
    """A file meta-like prefix and the received bytes as a view, split at an odd offset."""
    data = os.urandom(size)
    cut = min(size, 139)
    return data[:cut], memoryview(data)[cut:]


def _joined(parts: tuple[bytes, memoryview]) -> bytes:
    return parts[0] + bytes(parts[1])


def _direct_on(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _filesystem_takes_direct_io(folder: Path) -> bool:
    probe = folder / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.mark.parametrize("size", SIZES)
def test_new_file_holds_exactly_the_parts(tmp_path: Path, size: int) -> None:
    parts = _parts(size)
    final = tmp_path / "study" / "series" / "instance.dcm"
    assert write_new_file(final, parts)
    assert final.read_bytes() == _joined(parts)
    assert not write_new_file(final, _parts(10))  # never replaces
    assert final.read_bytes() == _joined(parts)


@pytest.mark.parametrize("size", [525_132, 128 * direct_io.ALIGNMENT])
def test_direct_io_is_used_where_the_filesystem_takes_it(tmp_path: Path, size: int) -> None:
    parts = _parts(size)
    fd = os.open(tmp_path / "a.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        used = direct_io.write_parts(fd, parts)
        # The descriptor is left buffered for what follows (the caller's fsync).
        assert not _direct_on(fd)
    finally:
        os.close(fd)
    assert used == _filesystem_takes_direct_io(tmp_path)
    assert (tmp_path / "a.dcm").read_bytes() == _joined(parts)
    # Small files are written buffered whatever the filesystem.
    fd = os.open(tmp_path / "b.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        assert not direct_io.write_parts(fd, _parts(direct_io.ALIGNMENT - 1))
    finally:
        os.close(fd)


def test_filesystem_refusing_direct_io_gets_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fcntl = fcntl.fcntl

    def refusing(fd: int, command: int, arg: int = 0) -> Any:
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", refusing)
    parts = _parts(direct_io.CHUNK + 12_345)
    fd = os.open(tmp_path / "a.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        assert not direct_io.write_parts(fd, parts)
    finally:
        os.close(fd)
    assert (tmp_path / "a.dcm").read_bytes() == _joined(parts)


@pytest.mark.parametrize("failure", ["refused", "short"])
def test_direct_write_refused_or_cut_short_mid_file_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    real_write = os.write
    direct_writes: list[int] = []

    def flaky(fd: int, data: Any) -> int:
        if _direct_on(fd):
            direct_writes.append(len(data))
            if len(direct_writes) == 2:  # the second chunk
                if failure == "refused":
                    raise OSError(errno.EINVAL, "Invalid argument")
                return real_write(fd, memoryview(data)[: direct_io.ALIGNMENT])
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", flaky)
    parts = _parts(3 * direct_io.CHUNK + 777)
    final = tmp_path / "a.dcm"
    assert write_new_file(final, parts)
    assert final.read_bytes() == _joined(parts)
    assert len(direct_writes) == 2  # after the refusal, nothing more went direct


def test_disk_errors_are_raised_and_leave_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "write", full)
    final = tmp_path / "a.dcm"
    with pytest.raises(OSError) as raised:
        write_new_file(final, _parts(525_132))
    assert raised.value.errno == errno.ENOSPC
    assert not final.exists()


def test_buffers_are_reused_not_grown(tmp_path: Path) -> None:
    for index in range(40):
        assert write_new_file(tmp_path / f"{index}.dcm", _parts(100_000))
    assert len(direct_io._buffers) <= direct_io.KEPT_BUFFERS
