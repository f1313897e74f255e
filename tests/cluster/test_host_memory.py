"""retain_freed_buffers: freed chunk-sized buffers are reused instead of faulted in again (glibc only).

mallopt's settings are process-wide, so each case runs in a fresh interpreter; the page faults come from
getrusage there, the reference being the same loop without the call."""
import platform
import subprocess
import sys

import pytest

from partita.cluster.host_memory import retain_freed_buffers

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt thresholds are glibc's")

# A receiver's pattern: a window of 4 MiB buffers alive at once, all freed, again and again.
_LOOP = """
import resource, sys
from partita.cluster.host_memory import retain_freed_buffers
if sys.argv[1] == "retain":
    assert retain_freed_buffers(4 << 20)
source = bytes(range(256)) * (4 << 12)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(20):
    window = [bytearray(source) for _ in range(6)]
    assert all(w[-1] == 255 for w in window)
    del window
print((faults() - before) / 120)
"""


def _faults_per_buffer(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout)


@glibc
def test_freed_buffers_are_reused_instead_of_faulted_in():
    pages = (4 << 20) // 4096
    default, retained = _faults_per_buffer("default"), _faults_per_buffer("retain")
    # glibc's own thresholds fault (nearly) every page of every buffer in; kept buffers only the first window's
    assert default > 0.5 * pages, default
    assert retained < 0.1 * pages, retained


_RISE = """
from partita.cluster import host_memory
assert host_memory.retain_freed_buffers(1 << 20)
assert host_memory.retain_freed_buffers(1 << 10)  # smaller than what is in force: nothing lowered, still in force
assert host_memory._retained == 2 << 20
assert host_memory.retain_freed_buffers(1 << 40)  # beyond glibc's cap: capped at 32 MiB, not refused
assert host_memory._retained == 32 << 20
"""


@glibc
def test_settings_only_rise_and_report_success():
    subprocess.run([sys.executable, "-c", _RISE], capture_output=True, text=True, timeout=60, check=True)


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="largest_bytes"):
        retain_freed_buffers(0)
