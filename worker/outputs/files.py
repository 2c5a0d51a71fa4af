"""Durable output files: write to a temporary file, fsync, rename into place, read back.

Every output (DICOM or FHIR) is written the same way, so that a reader never sees a
half-written file and a crash after the rename cannot lose it: the bytes go to a
temporary file in the target's directory, are fsynced, the file is renamed over the
target and the directory is fsynced. The writer then reads the file back; a file that
fails that check is removed (:func:`removed_on_failure`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "removed_on_failure", "write_atomically"]


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable.

    Best effort: not every platform can open a directory.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write`` writes to the file it is given.

    ``write`` writes to a temporary file next to ``path`` (created with its parents);
    that file is fsynced and renamed over ``path``, and the directory fsynced. If
    ``write`` fails, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Remove ``path`` when the block raises, then re-raise.

    Wraps the read-back check of a file just written: a file that does not pass it must
    not stay where a sender would pick it up.
    """
    try:
        yield
    except Exception:
        Path(path).unlink(missing_ok=True)
        raise
