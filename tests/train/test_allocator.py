"""The allocator setting for CPU training is applied once, where the C library is glibc."""

from __future__ import annotations

import platform

from criteriapo.train.allocator import keep_freed_memory


def test_malloc_is_tuned_on_glibc_and_left_alone_elsewhere():
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc  # once per process; the second call changes nothing
