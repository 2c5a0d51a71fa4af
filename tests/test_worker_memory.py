"""The worker keeps freed memory for its next study (glibc malloc's thresholds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import Carebridge

# A child interpreter allocates, touches and frees a 64 MiB buffer: how much of it is still
# resident after the free, and how many page faults four more rounds take. 64 MiB is above
# the 32 MiB that glibc's dynamic mmap threshold can reach, so by default every round maps
# fresh pages and unmaps them (transparent huge pages make the faults fewer, not none).
_ROUNDS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from worker.memory import keep_freed_memory
    assert keep_freed_memory()

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

def round_():
    buffer = np.empty(64 * 1024 * 1024, dtype=np.uint8)
    buffer[::4096] = 1
    del buffer

before = resident_mib()
round_()
kept = resident_mib() - before
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _rounds(mode: str) -> tuple[float, int]:
    result = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True
    )
    kept, faults = result.stdout.split()
    return float(kept), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_is_kept_and_reused_without_page_faults() -> None:
    kept, faults = _rounds("default")
    assert kept < 8 and faults > 100  # given back, and faulted in again each round
    kept, faults = _rounds("keep")
    assert kept > 60 and faults < 20  # kept, and reused


def test_the_worker_command_keeps_freed_memory(deployment: Carebridge) -> None:
    deployment.start_worker()
    log = deployment.log_paths["worker"].read_text(errors="replace")
    assert "malloc keeps freed memory: mmap threshold 256 MiB, trim threshold 1024 MiB" in log
