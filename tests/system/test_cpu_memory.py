"""The host-allocator settings are applied exactly where glibc provides them."""

from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

from flexmoe.cpu_memory import release_freed_memory, retain_freed_memory


def test_applies_on_glibc_and_tensors_still_work():
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is expected
    big = torch.ones(4096, 4096)  # 64 MiB: above glibc's largest mmap threshold
    assert big.sum().item() == 4096 * 4096
    del big
    assert torch.zeros(4096, 4096).abs().sum().item() == 0  # reused memory comes back zeroed


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_release_hands_the_retained_memory_back():
    if not retain_freed_memory():
        pytest.skip("glibc on Linux only")
    blocks = [torch.ones(1024, 1024) for _ in range(64)]  # 256 MiB, kept on the heap once freed
    del blocks
    retained = _resident_mib()
    assert release_freed_memory()
    assert _resident_mib() < retained - 128
