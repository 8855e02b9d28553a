"""Index runs from host-side sizes (ops.runs): values against a plain list, and no host sync (the
counter's view; tests/system/test_gpu.py checks the stream on CUDA, pageable copies included)."""

from __future__ import annotations

import pytest
import torch

from flexmoe.bench.host_syncs import count_host_syncs
from flexmoe.ops.expert_ffn import padded_slots
from flexmoe.ops.runs import concatenated_runs, expert_major, starts_of

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


def test_starts_of_consecutive_runs():
    assert starts_of([2, 0, 3, 1]) == [0, 2, 2, 5] and starts_of([]) == []


@pytest.mark.parametrize("received_WL", [[[2, 0, 1], [1, 3, 0]], [[4]], [[0, 0], [0, 0]], [[1, 2]]])
def test_expert_major_lists_each_experts_runs_sender_by_sender(received_WL):
    # the rows as they arrived, each labelled (sender, expert, its index in the run)
    arrived = [
        (w, l, j) for w, sender in enumerate(received_WL) for l, n in enumerate(sender) for j in range(n)
    ]
    want = sorted(range(len(arrived)), key=lambda i: (arrived[i][1], arrived[i][0], arrived[i][2]))
    assert expert_major(received_WL, CPU).tolist() == want


def test_padded_slots_put_each_group_at_the_start_of_its_padded_block():
    assert padded_slots((2, 0, 3), 3, "cpu").tolist() == [0, 1, 6, 7, 8]


def test_bad_runs_raise_value_errors():
    with pytest.raises(ValueError, match="lengths"):
        concatenated_runs([0, 1], [2], CPU)
    with pytest.raises(ValueError, match="lengths"):
        concatenated_runs([0], [-1], CPU)
