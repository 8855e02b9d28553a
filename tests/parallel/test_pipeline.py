"""The pipelined exchange on one process (the all-to-all is the identity at W = 1): the experts multiply
only the rows that hold a token, in every chunk, and the result and gradients equal the grouped FFN
on those rows, with zeros in the rows nobody filled. The multi-process plans are checked against one
process in test_distributed_layer.py."""

from __future__ import annotations

import pytest
import torch

from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn
from flexmoe.parallel.comm import ExpertGroups
from flexmoe.parallel.pipeline import FilledRows, chunk_major_rows, pipelined_expert_exchange
from flexmoe.testing.counting import record_multiplied_rows

M, H = 6, 10


def _weights(L: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(0)

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    return ExpertWeights(param(L, M, H), param(L, H), param(L, H, M), param(L, M), "gelu")


def test_filled_rows_follow_the_counts():
    filled_WL = torch.tensor([[2, 0], [3, 1]])  # W = 2 senders, L = 2 experts, c = 3 rows per block
    rows = FilledRows.from_counts(filled_WL, 3, H)  # padding to 5 rows each would not pay
    # flexible layout [L, W, c]: expert 0 gets rows 0-1 of sender 0 and 0-2 of sender 1, expert 1 row 0
    # of sender 1
    assert rows.sizes == (5, 1)
    assert rows.index.tolist() == [0, 1, 3, 4, 5, 9]
    # the received chunk [W, L, c]: sender 0's rows of experts 0 and 1, then sender 1's
    recv = torch.arange(12.0).view(2, 2, 3, 1)
    # flexible row f = l * 6 + w * 3 + j is received row (w * 2 + l) * 3 + j
    assert rows.gather(recv).view(-1).tolist() == [0, 1, 6, 7, 8, 9]
    back = rows.scatter(rows.gather(recv), (2, 2, 3))
    assert back.shape == (2, 2, 3, 1)
    assert back.view(-1).tolist() == [0, 1, 0, 0, 0, 0, 6, 7, 8, 9, 0, 0]
    full = FilledRows.from_counts(torch.full((2, 2), 3), 3, H)
    assert full.index is None and full.sizes == (6, 6)
    assert full.gather(recv).view(-1).tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]
    assert torch.equal(full.scatter(full.gather(recv), (2, 2, 3)), recv)


def test_nearly_equal_experts_are_padded_with_their_own_empty_rows():
    filled_WL = torch.tensor([[3, 3, 2], [3, 2, 3]])  # 6, 5, 5 rows: 2 padding rows make them equal
    rows = FilledRows.from_counts(filled_WL, 4, H)  # c = 4: rows 0-7 expert 0, 8-15 expert 1, ...
    assert rows.sizes == (6, 6, 6)
    # expert 1 takes its first empty row (row 3 of sender 0: flexible row 11), expert 2 likewise (18)
    assert rows.index.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16, 17, 18, 20, 21, 22]
    # padded to every row of the chunk (c = 3): nothing to pack
    full = FilledRows.from_counts(filled_WL, 3, H)
    assert full.index is None and full.sizes == (6, 6, 6)
    uneven = FilledRows.from_counts(torch.tensor([[3, 1, 2], [3, 2, 3]]), 3, H)  # 4 padding rows of 14
    assert uneven.sizes == (6, 3, 5) and uneven.index.numel() == 14


def _chunk_major(t: torch.Tensor, d: int, *, back: bool = False) -> torch.Tensor:
    """[W, L, Cp, M] <-> the pipeline's chunk-major [d, W, L, c, M]."""
    if back:
        d, W, L, c, M = t.shape
        return t.permute(1, 2, 0, 3, 4).reshape(W, L, d * c, M)
    W, L, Cp, M = t.shape
    return t.view(W, L, d, Cp // d, M).permute(2, 0, 1, 3, 4)


def test_chunk_major_rows_place_every_slot_in_its_chunk():
    W, L, Cp, d = 2, 3, 8, 4
    slots_WLC = torch.arange(W * L * Cp).view(W, L, Cp)
    rows = chunk_major_rows(slots_WLC.reshape(-1), blocks=W * L, block_rows=Cp, d=d)
    placed = torch.empty(W * L * Cp, dtype=torch.long).index_copy_(0, rows, slots_WLC.reshape(-1))
    assert torch.equal(placed.view(d, W, L, Cp // d), _chunk_major(slots_WLC.unsqueeze(-1), d).squeeze(-1))


@pytest.mark.parametrize(
    "kept_list",
    [[5, 0, 8], [8, 7, 8]],  # ragged; nearly equal (padded to 8 rows each with one empty row)
)
@pytest.mark.parametrize("d", [1, 2, 4])
def test_only_filled_rows_are_multiplied_and_results_match(d, kept_list, monkeypatch):
    L, Cp = 3, 8
    kept = torch.tensor(kept_list)  # per local expert; a prefix of its Cp rows
    padded = len(set(kept_list)) == 2
    filled_LC = torch.arange(Cp) < kept.unsqueeze(1)
    send = torch.randn(1, L, Cp, M, dtype=torch.float64) * filled_LC.unsqueeze(-1)
    send.requires_grad_()
    w = _weights(L)
    rows_multiplied = record_multiplied_rows(monkeypatch)
    filled_1Ld = filled_LC.view(1, L, d, Cp // d).sum(-1)
    ret_dLcM, _ = pipelined_expert_exchange(
        _chunk_major(send, d), filled_1Ld, w, ExpertGroups(None), algorithm="flat"
    )
    ret = _chunk_major(ret_dLcM, d, back=True)
    assert len(rows_multiplied) == d
    # never more than 1/8 more rows than the filled ones; with d = 4 the last chunk's (2, 1, 2) rows
    # would need 20% padding, so nothing is padded there
    padded = padded and d < 4
    if padded:
        assert int(kept.sum()) < sum(rows_multiplied) <= int(kept.sum()) * 9 / 8
    else:
        assert sum(rows_multiplied) == int(kept.sum())

    # reference: the grouped FFN on exactly the filled rows
    mask = filled_LC.reshape(-1)
    want_rows = grouped_expert_ffn(send.view(-1, M)[mask], w, tuple(kept.tolist()))
    got = ret.view(-1, M)
    torch.testing.assert_close(got[mask], want_rows, rtol=1e-12, atol=1e-12)
    assert padded or torch.all(got[~mask] == 0)  # padding outputs land in rows nobody reads

    grad = torch.randn_like(ret) * filled_LC.unsqueeze(-1)
    params = [w.w1_GMX, w.b1_GX, w.w2_GHM, w.b2_GM]
    got_grads = torch.autograd.grad(ret, [send, *params], grad)
    want_grads = torch.autograd.grad(want_rows, [send, *params], grad.view(-1, M)[mask])
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)


def test_all_to_all_into_a_wrong_out_buffer_is_refused():
    groups, x = ExpertGroups(None), torch.randn(1, 4, 3)
    assert torch.equal(groups.all_to_all_start(x, "flat", out=torch.empty(1, 4, 3)).wait(), x)
    for out in (torch.empty(1, 4, 2), torch.empty(1, 3, 4).transpose(1, 2)):  # shape; not contiguous
        with pytest.raises(ValueError, match="out must be contiguous"):
            groups.all_to_all_start(x, "flat", out=out)
