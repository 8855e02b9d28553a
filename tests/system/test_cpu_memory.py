"""The host-allocator setting is applied exactly where glibc provides it."""

from __future__ import annotations

import platform
import sys

import torch

from flexmoe.cpu_memory import retain_freed_memory


def test_applies_on_glibc_and_tensors_still_work():
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert retain_freed_memory() is expected
    big = torch.ones(4096, 4096)  # 64 MiB: above glibc's largest mmap threshold
    assert big.sum().item() == 4096 * 4096
    del big
    assert torch.zeros(4096, 4096).abs().sum().item() == 0  # reused memory comes back zeroed
