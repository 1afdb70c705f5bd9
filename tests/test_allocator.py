"""dbnetpp.allocator: glibc keeps freed memory, so big buffers are not page-faulted in again."""

import subprocess
import sys

import pytest

from dbnetpp import allocator

needs_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt needs Linux with glibc")

# Faults counted in a fresh interpreter, so this test process's malloc settings do not matter.
# A small forward-like workload allocates and frees 16-32 MiB activations in a fixed order;
# with glibc's defaults each of them is a fresh mmap whose 4 KiB pages all fault again on every
# pass, with the memory kept the later passes reuse mapped pages (no faults at all).
PROBE = r"""
import resource, torch
import torch.nn.functional as F
from dbnetpp import allocator

def faults_per_pass(passes=10):
    x = torch.randn(1, 16, 512, 512)
    w = torch.randn(16, 16, 3, 3) * 0.1
    counts = []
    with torch.no_grad():
        for _ in range(passes):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            y = x
            for _ in range(4):
                y = F.relu(F.conv2d(y, w, padding=1)) + y
            torch.cat([y, x], 1).sum()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = faults_per_pass()
assert allocator.keep_freed_memory() and allocator.keep_freed_memory()  # idempotent
kept = faults_per_pass()
assert allocator.restore_default() and not allocator.is_keeping_freed_memory()
print(sum(default[-4:]), sum(kept[-4:]))  # the last 4 passes, after 6 to warm up
"""


@needs_glibc
def test_keep_freed_memory_avoids_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    default, kept = map(int, out.stdout.split())
    assert default > 20_000, f"expected fresh mmaps to fault (4 passes of ~16k pages at least), got {default}"
    # kept: 0 in almost every run; allow one 16 MiB buffer (4096 pages) of heap fragmentation
    assert kept <= 4096 < default // 4, f"expected the kept heap to be reused: {kept} faults against {default}"


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setitem(allocator._state, "keeping", False)
    assert allocator.keep_freed_memory() is False
    assert allocator.restore_default() is False
    assert allocator.is_keeping_freed_memory() is False
