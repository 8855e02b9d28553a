"""The host-sync counter (bench/host_syncs.py) counts what would stall a GPU's launch queue."""

from __future__ import annotations

import torch

from flexmoe.bench.host_syncs import count_host_syncs


def test_the_counter_sees_value_reads_and_value_dependent_shapes():
    t = torch.tensor([1, 0, 2])
    with count_host_syncs() as counts:
        t.sum().item()
        t.tolist()
        t.nonzero()
        torch.repeat_interleave(t, t)  # its length is sum(t), read on the host
        torch.repeat_interleave(t, t, output_size=3)  # given: nothing to read
        t * 2 + 1
    assert counts == {"_local_scalar_dense": 1, "tolist": 1, "nonzero": 1, "repeat_interleave": 1}
