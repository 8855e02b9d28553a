"""The pipelined exchange on one process (the all-to-all is the identity at W = 1), in both chunk
layouts: the experts multiply only the rows that hold a token, in every chunk, and the result and
gradients equal the grouped FFN on those rows. Where the rows of the layouts go, at any W. The
multi-process plans are checked against one process in test_distributed_layer.py."""

from __future__ import annotations

import pytest
import torch

from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn
from flexmoe.parallel.chunks import (
    FilledRows,
    PackedChunks,
    PackedRoute,
    PaddedChunks,
    split_runs,
)
from flexmoe.parallel.comm import ExpertGroups
from flexmoe.parallel.pipeline import pipelined_expert_exchange
from flexmoe.testing.counting import record_multiplied_rows

M, H = 6, 10


def _weights(L: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(0)

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    return ExpertWeights(param(L, M, H), param(L, H), param(L, H, M), param(L, M), "gelu")


def test_filled_rows_follow_the_counts():
    filled_WL = [[2, 0], [3, 1]]  # W = 2 senders, L = 2 experts, c = 3 rows per block
    rows = FilledRows.from_counts(filled_WL, 3, H, "cpu")  # padding to 5 rows each would not pay
    # the received chunk [W, L, c]: sender 0's rows of experts 0 and 1, then sender 1's; expert 0 gets
    # rows 0-1 of sender 0 and 0-2 of sender 1, expert 1 row 0 of sender 1 (received row (w * 2 + l) * 3)
    assert rows.sizes == (5, 1)
    assert rows.source.tolist() == [0, 1, 6, 7, 8, 9]
    recv = torch.arange(12.0).view(2, 2, 3, 1)
    assert rows.gather(recv).view(-1).tolist() == [0, 1, 6, 7, 8, 9]
    back = rows.scatter(rows.gather(recv), (2, 2, 3))
    assert back.shape == (2, 2, 3, 1)
    assert back.view(-1).tolist() == [0, 1, 0, 0, 0, 0, 6, 7, 8, 9, 0, 0]
    full = FilledRows.from_counts([[3, 3], [3, 3]], 3, H, "cpu")
    assert full.source is None and full.sizes == (6, 6)
    assert full.gather(recv).view(-1).tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]
    assert torch.equal(full.scatter(full.gather(recv), (2, 2, 3)), recv)


def test_nearly_equal_experts_are_padded_with_their_own_empty_rows():
    filled_WL = [[3, 3, 2], [3, 2, 3]]  # 6, 5, 5 rows: 2 padding rows make them equal
    rows = FilledRows.from_counts(filled_WL, 4, H, "cpu")  # c = 4: received row (w * 3 + l) * 4 + j
    assert rows.sizes == (6, 6, 6)
    # expert 1 takes its first empty row (row 3 of sender 0: received row 7), expert 2 likewise (row 2
    # of sender 0: 10), each after its filled rows
    assert rows.source.tolist() == [0, 1, 2, 12, 13, 14, 4, 5, 6, 16, 17, 7, 8, 9, 20, 21, 22, 10]
    # padded to every row of the chunk (c = 3): nothing to pack
    full = FilledRows.from_counts(filled_WL, 3, H, "cpu")
    assert full.source is None and full.sizes == (6, 6, 6)
    uneven = FilledRows.from_counts([[3, 1, 2], [3, 2, 3]], 3, H, "cpu")  # 4 padding rows of 14
    assert uneven.sizes == (6, 3, 5) and uneven.source.numel() == 14


def test_padded_chunks_hold_run_i_of_every_block_at_its_start():
    W, L, Cp, d = 2, 2, 6, 2
    filled_B = torch.tensor([3, 0, 6, 1])
    layout = PaddedChunks(filled_B, world_size=W, capacity=Cp, d=d, algorithm="flat")
    slot_N = (torch.arange(Cp) < filled_B.unsqueeze(1)).reshape(-1).nonzero().squeeze(1)
    placed = torch.full((layout.num_rows,), -1).index_copy_(0, layout.rows(slot_N), slot_N)
    # [d, B, c = 3]: chunk 0 holds block 0's row 0, block 2's rows 0-2; chunk 1 the rest of each
    want = [
        [[0, -1, -1], [-1] * 3, [12, 13, 14], [-1] * 3],
        [[1, 2, -1], [-1] * 3, [15, 16, 17], [18, -1, -1]],
    ]
    assert placed.view(d, W * L, 3).tolist() == want
    assert layout.counts.tolist() == [[[1, 2], [0, 0]], [[3, 3], [0, 1]]]  # [W, L, d]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize(
    "kept_list",
    [[5, 0, 8], [8, 7, 8]],  # ragged; nearly equal (padded to 8 rows each with one empty row)
)
@pytest.mark.parametrize("d", [1, 2, 4])
def test_only_filled_rows_are_multiplied_and_results_match(d, kept_list, packed, monkeypatch):
    L, Cp = 3, 8
    kept = torch.tensor(kept_list)  # per local expert; a prefix of its Cp rows
    filled_LC = torch.arange(Cp) < kept.unsqueeze(1)
    x_NM = torch.randn(int(kept.sum()), M, dtype=torch.float64, requires_grad=True)
    w = _weights(L)
    rows_multiplied = record_multiplied_rows(monkeypatch)
    if packed:
        layout = PackedChunks(kept, world_size=1, capacity=Cp, d=d)
    else:
        layout = PaddedChunks(kept, world_size=1, capacity=Cp, d=d, algorithm="flat")
    row_N = layout.rows(filled_LC.reshape(-1).nonzero().squeeze(1))
    send = x_NM.new_zeros(layout.num_rows, M).index_copy(0, row_N, x_NM)
    ret, _ = pipelined_expert_exchange(send, layout, w, ExpertGroups(None))
    got = ret.index_select(0, row_N)
    assert len(rows_multiplied) == d
    # never more than 1/8 more rows than the filled ones: [8, 7, 8] pads to 8 rows each at d = 1 (in
    # chunks, only where a chunk's groups are nearly equal); [5, 0, 8] never pads
    n = int(kept.sum())
    assert n <= sum(rows_multiplied) <= n * 9 / 8
    if d == 1:
        assert (sum(rows_multiplied) > n) == (kept_list == [8, 7, 8])
    if packed:
        assert layout.num_rows == int(kept.sum())  # only the rows that hold a token travel
    else:
        assert layout.num_rows == L * Cp
        if sum(rows_multiplied) == int(kept.sum()):  # else padding outputs land in rows nobody reads
            assert torch.all(ret[~_placed(row_N, ret)] == 0)

    # reference: the grouped FFN on exactly the filled rows
    want = grouped_expert_ffn(x_NM, w, tuple(kept.tolist()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    grad = torch.randn_like(got)
    params = [w.w1_GMX, w.b1_GX, w.w2_GHM, w.b2_GM]
    got_grads = torch.autograd.grad(got, [x_NM, *params], grad)
    want_grads = torch.autograd.grad(want, [x_NM, *params], grad)
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)


def _placed(row_N: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    return torch.zeros(buffer.shape[0], dtype=torch.bool).index_fill_(0, row_N, True)


def test_split_runs_cut_each_count_into_d_nearly_equal_runs():
    runs = split_runs(torch.tensor([5, 0, 8, 1]), 3)
    assert runs.tolist() == [[1, 0, 2, 0], [2, 0, 3, 0], [2, 0, 3, 1]]


def test_packed_chunks_hold_run_i_of_every_block_in_block_order():
    W, Cp, d = 2, 6, 2
    filled_B = torch.tensor([3, 0, 6, 1])  # blocks (w, l) rank-major, L = 2
    layout = PackedChunks(filled_B, world_size=W, capacity=Cp, d=d)
    slot_N = (torch.arange(Cp) < filled_B.unsqueeze(1)).reshape(-1).nonzero().squeeze(1)
    row_N = layout.rows(slot_N)
    assert sorted(row_N.tolist()) == list(range(10))  # a permutation of the 10 rows that hold a token
    # chunk 0: block 0's first row, block 2's first 3, block 3's none; chunk 1: the rest, block by block
    placed = torch.empty(10, dtype=torch.long).index_copy_(0, row_N, slot_N)
    assert placed.tolist() == [0, 12, 13, 14, 1, 2, 15, 16, 17, 18]
    assert layout.send_rows == [[1, 3], [2, 4]]  # chunk i's rows for rank w
    assert [c.shape[0] for c in layout.chunks(torch.zeros(10, 1))] == [4, 6]


def test_packed_route_groups_the_received_rows_by_expert_and_puts_them_back():
    received_WL = [[2, 0, 1], [1, 3, 0]]  # rows from sender w for local expert l
    route = PackedRoute(
        received_WL, [0, 0], hidden_width=10**9, device=torch.device("cpu")
    )  # groups too large to pad
    assert route.recv_rows == [3, 4] and route.sizes == (3, 3, 1)
    recv = torch.arange(7.0).unsqueeze(1)  # sender 0: e0 e0 e2; sender 1: e0 e1 e1 e1
    rows = route.gather(recv)
    assert rows.view(-1).tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert torch.equal(route.scatter(rows), recv)
    # nearly equal small groups: padded to 3 rows each with the zero row after the received ones
    padded = PackedRoute([[2, 1, 1], [1, 2, 1]], [0, 0], hidden_width=4, device=torch.device("cpu"))
    assert padded.padded and padded.sizes == (3, 3, 3)
    recv = torch.cat([torch.arange(1.0, 9.0), torch.zeros(1)]).unsqueeze(1)  # 8 rows and the zero row
    rows = padded.gather(recv)
    assert rows.view(-1).tolist() == [1, 2, 5, 3, 6, 7, 4, 8, 0]
    assert torch.equal(padded.scatter(rows), recv[:8])


def test_all_to_all_into_a_wrong_out_buffer_is_refused():
    groups, x = ExpertGroups(None), torch.randn(1, 4, 3)
    assert torch.equal(groups.all_to_all_start(x, "flat", out=torch.empty(1, 4, 3)).wait(), x)
    for out in (torch.empty(1, 4, 2), torch.empty(1, 3, 4).transpose(1, 2)):  # shape; not contiguous
        with pytest.raises(ValueError, match="out must be contiguous"):
            groups.all_to_all_start(x, "flat", out=out)


def test_all_to_all_of_rows_checks_its_counts_and_out_buffer():
    groups, x = ExpertGroups(None), torch.randn(5, 3)
    assert torch.equal(groups.all_to_all_rows_start(x, [5], [5]).wait(), x)
    with pytest.raises(ValueError, match="W=1 counts"):
        groups.all_to_all_rows_start(x, [2, 3], [5])
    with pytest.raises(ValueError, match="send_rows must sum to x's 5 rows"):
        groups.all_to_all_rows_start(x, [4], [4])
    with pytest.raises(ValueError, match="out must be contiguous"):
        groups.all_to_all_rows_start(x, [5], [5], out=torch.empty(4, 3))
