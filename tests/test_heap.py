"""sdk/heap.py: glibc's malloc thresholds, set through the real C library and seen in the process's RSS."""

import platform
import subprocess
import sys

import pytest

# 200 blocks of 1 MB touched then freed, in a fresh interpreter: the resident MB before and after the frees.
_PROBE = """
import ctypes, sys
from edgepack.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
blocks = [libc.malloc(1 << 20) for _ in range(200)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
before = resident_mb()
for b in reversed(blocks):
    libc.free(b)
print(before, resident_mb())
"""


def _resident(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    before, after = map(float, out.split())
    return before, after


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_heap_stays_for_reuse_only_when_asked() -> None:
    before, after = _resident("default")
    assert after < before - 150  # glibc's default hands the freed top of the heap back to the OS
    before, after = _resident("keep")
    assert after > before - 50  # kept: the next allocations reuse it without faulting it in again
