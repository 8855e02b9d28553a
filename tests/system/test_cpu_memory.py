"""The host-allocator settings are applied exactly where glibc provides them."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from flexmoe.bench import host_memory
from flexmoe.cpu_memory import release_freed_memory, retain_freed_memory


def test_applies_on_glibc_and_tensors_still_work():
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is expected
    big = torch.ones(4096, 4096)  # 64 MiB: above glibc's largest mmap threshold
    assert big.sum().item() == 4096 * 4096
    del big
    assert torch.zeros(4096, 4096).abs().sum().item() == 0  # reused memory comes back zeroed


def test_release_hands_the_retained_memory_back():
    if not (retain_freed_memory() and host_memory.available()):
        pytest.skip("needs glibc and Linux's /proc")
    blocks = [torch.ones(1024, 1024) for _ in range(64)]  # 256 MiB, kept on the heap once freed
    del blocks
    with host_memory.peak_growth() as growth:
        assert release_freed_memory()
    assert growth["end_bytes"] < -128 * 2**20
