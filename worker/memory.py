"""Keep a worker's freed memory for its next study instead of handing it back to the system.

Every study allocates the same large buffers again: a network's activations (tens to
hundreds of MB per layer for a 3-D U-Net's window batch or a stride-1 ResNet), decoded
pixels, masks. glibc's malloc serves a block above its mmap threshold with a fresh
``mmap`` and unmaps it on free, and returns free memory at the top of the heap above its
trim threshold; the dynamic threshold it starts with tops out at 32 MiB. So each study's
buffers came back as new pages: one page fault and a zeroed page per 4 KiB, every time.
On the development machine that was a quarter of a stride-1 ResNet-18's forward (about
15 000 faults per two-image study) and a third of the liver pipeline's time on a 2.5 x 1.6
x 1.6 mm grid (over a million faults per series).

:func:`keep_freed_memory` raises both thresholds once, before the worker's processes
start (prefork children inherit the allocator's settings): blocks up to
:data:`MMAP_THRESHOLD_BYTES` come from the heap and free memory up to
:data:`TRIM_THRESHOLD_BYTES` stays in it for the next study. The worker's peak memory is
unchanged; what changes is that it is not given back between studies (a worker runs the
same pipelines again and needs it again). Larger blocks are still mapped and unmapped.
Only glibc has these settings; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

log = logging.getLogger("carebridge.worker")

#: Blocks up to this size are served from the heap, not by mmap (glibc's M_MMAP_THRESHOLD).
MMAP_THRESHOLD_BYTES = 256 * 1024 * 1024
#: Free memory up to this much stays in the heap (glibc's M_TRIM_THRESHOLD).
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process and its forks.

    Returns True when both were set; False where the C library is not glibc (musl, macOS)
    or refused a value. Call it before the first large allocation that should benefit.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its C library's among them
        mallopt = libc.mallopt
        version = libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    version.restype = ctypes.c_char_p
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if done:
        log.debug(
            "glibc %s malloc keeps freed memory: mmap threshold %d MiB, trim threshold %d MiB",
            version().decode(),
            MMAP_THRESHOLD_BYTES >> 20,
            TRIM_THRESHOLD_BYTES >> 20,
        )
    return done
