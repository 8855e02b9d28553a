"""dispatch_to_rows (the expert-parallel plans' post-score dispatch: one gather into the send buffer)
against a plain per-assignment loop, in float64, values and gradients."""

from __future__ import annotations

import pytest
import torch

from flexmoe.core.dispatch import dispatch_to_rows


@pytest.mark.parametrize("rows", [20, 7], ids=["some rows empty", "every row filled"])
def test_dispatch_to_rows_matches_a_per_assignment_loop_with_gradients(rows):
    gen = torch.Generator().manual_seed(5)
    T, M = 7, 3
    x = torch.randn(T, M, generator=gen, dtype=torch.float64, requires_grad=True)
    token_N = torch.tensor([0, 3, 3, 6, 2, 0, 5])  # a token may fill several rows; token 1 and 4 none
    row_N = torch.randperm(rows, generator=gen)[: token_N.numel()]  # any layout: distinct rows
    coeff = torch.randn(rows, M, generator=gen, dtype=torch.float64)

    got = dispatch_to_rows(x, token_N, row_N, rows)
    (grad_got,) = torch.autograd.grad((got * coeff).sum(), x)

    want = [torch.zeros(M, dtype=torch.float64) for _ in range(rows)]
    for t, r in zip(token_N.tolist(), row_N.tolist(), strict=True):
        want[r] = x[t]
    want = torch.stack(want)
    (grad_want,) = torch.autograd.grad((want * coeff).sum(), x)
    assert torch.equal(got, want)  # rows without a token are zeros
    torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-14)
    assert torch.all(grad_got[[1, 4]] == 0)
