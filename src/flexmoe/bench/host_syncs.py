"""Counting host synchronisations: the calls that need a tensor's value on the host (`.item()`,
`int(t)`, `.tolist()`) or a shape that depends on values (`nonzero`, `repeat_interleave` without
`output_size`). On a GPU each one stalls the launch queue until the device catches up; on the CPU
they are free, so they are counted, not timed."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result (a Python number, or an output shape) depends on tensor values
_SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")


class _SyncingOps(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        kwargs = kwargs or {}
        if name in _SYNCING_OPS:
            self.counts[name.removeprefix("aten.")] += 1
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            # its output's length is the sum of the repeats: read on the host unless output_size is given
            self.counts["repeat_interleave"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """`with count_host_syncs() as counts:` counts, by kind, the host synchronisations of the code
    inside (`.tolist()` does not pass through the dispatcher, so it is counted by a wrapper)."""
    counts: Counter = Counter()
    original = torch.Tensor.tolist

    def tolist(self):
        counts["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with _SyncingOps(counts):
            yield counts
    finally:
        torch.Tensor.tolist = original
