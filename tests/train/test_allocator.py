"""The allocator setting for CPU training is applied once, where the C library is glibc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from criteriapo.train.allocator import keep_freed_memory


def test_malloc_is_tuned_on_glibc_and_left_alone_elsewhere():
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc  # once per process; the second call changes nothing


REUSE = """
import resource, torch
from criteriapo.train.allocator import keep_freed_memory

def faults():  # page faults of writing a new 64 MiB tensor (freed again at once)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

untuned = [faults() for _ in range(3)]
keep_freed_memory()
tuned = [faults() for _ in range(30)]
print(min(untuned), sum(tuned[-10:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_a_freed_large_block_is_reused_without_page_faults():
    """A block above glibc's largest mmap threshold (32 MiB) is mapped afresh on every allocation
    unless malloc is told otherwise: 16,384 pages faulted in each time. Tuned, the heap takes a few
    rounds to hold free blocks the aligned request fits in (up to about ten here), then reuses them."""
    done = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True)
    untuned, tuned = map(int, done.stdout.split())
    assert untuned > 10_000, untuned  # the untuned allocator maps it afresh each time: the test can tell
    assert tuned < 100, tuned
