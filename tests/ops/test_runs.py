"""Index runs from host-side sizes (ops.runs): values against a plain list, and no host sync (the
counter's view; tests/system/test_gpu.py checks the stream on CUDA, pageable copies included)."""

from __future__ import annotations

import pytest
import torch

from flexmoe.bench.host_syncs import count_host_syncs
from flexmoe.ops.expert_ffn import padded_slots
from flexmoe.ops.runs import concatenated_runs

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("starts", "lengths"),
    [([5, 0, 9], [2, 3, 0]), ([0, 4, 8], [4, 4, 4]), ([7], [0]), ([], []), ([3, 3], [2, 1])],
)
def test_concatenated_runs_are_the_runs_one_after_another(starts, lengths):
    want = [s + j for s, n in zip(starts, lengths, strict=True) for j in range(n)]
    with count_host_syncs() as syncs:
        got = concatenated_runs(starts, lengths, CPU)
    assert got.dtype == torch.int64 and got.tolist() == want
    assert sum(syncs.values()) == 0


def test_padded_slots_put_each_group_at_the_start_of_its_padded_block():
    assert padded_slots((2, 0, 3), 3, "cpu").tolist() == [0, 1, 6, 7, 8]


def test_bad_runs_raise_value_errors():
    with pytest.raises(ValueError, match="lengths"):
        concatenated_runs([0, 1], [2], CPU)
    with pytest.raises(ValueError, match="lengths"):
        concatenated_runs([0], [-1], CPU)
