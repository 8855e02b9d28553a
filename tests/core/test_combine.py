"""combine and combine_packed against a plain per-token loop, on one process, in float64.

The gate weights are distinct and none is 1, so a weight that is dropped, applied twice or given to
the wrong assignment changes the values or the gradients (w.r.t. the expert outputs and the weights).
The layer's one-process plan never calls combine (it runs the fused packed_moe), so without these
tests only the multi-process plans would notice.
"""

from __future__ import annotations

import pytest
import torch

from flexmoe import combine, routing_from_topk
from flexmoe.core.dispatch import combine_packed

T, E, K, M = 9, 3, 2, 4
CAPACITY_FACTOR = 0.75  # C = ceil(2 * 0.75 * 9 / 3) = 5 of the 6 assignments per expert: some drop
CAPACITY_MULTIPLE = 4  # Cb = 8: unused slots the combine must never read


def _routing():
    """k distinct experts per token and weights in [0.5, 2.5) (distinct, not 1), as a leaf."""
    gen = torch.Generator().manual_seed(3)
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = (0.5 + 2 * torch.rand(T, K, generator=gen, dtype=torch.float64)).requires_grad_()
    plan = routing_from_topk(
        experts, weights, E, capacity_factor=CAPACITY_FACTOR, capacity_multiple=CAPACITY_MULTIPLE
    )
    return plan, experts, weights


def _combine_by_token(out_ECM, experts_TK, weights_TK, capacity: int, *, postscore: bool):
    """y_t = sum over t's kept choices j of w_tj * out[e_tj, slot_tj] (postscore) or out[e_tj, slot_tj];
    slots are handed out in priority order (choice j, then token t), the first C of an expert kept."""
    used = [0] * E
    rows = [torch.zeros(M, dtype=out_ECM.dtype) for _ in range(T)]
    for j in range(K):
        for t in range(T):
            e = int(experts_TK[t, j])
            slot = used[e]
            used[e] += 1
            if slot < capacity:
                rows[t] = rows[t] + (weights_TK[t, j] * out_ECM[e, slot] if postscore else out_ECM[e, slot])
    return torch.stack(rows), used


@pytest.mark.parametrize("postscore", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_combine_matches_a_per_token_loop_with_gradients(postscore, packed):
    plan, experts, weights = _routing()
    assert plan.capacity == 5 and plan.buffer_capacity == 8
    gen = torch.Generator().manual_seed(4)
    out_ECM = torch.randn(E, plan.buffer_capacity, M, generator=gen, dtype=torch.float64).requires_grad_()
    want, demand = _combine_by_token(out_ECM, experts, weights, plan.capacity, postscore=postscore)
    assert max(demand) > plan.capacity  # the capacity drops some assignments
    if packed:  # the kept rows of every expert, in slot order, as the local expert GEMMs produce them
        kept = [min(n, plan.capacity) for n in demand]
        out_NM = torch.cat([out_ECM[e, : kept[e]] for e in range(E)])
        y = combine_packed(out_NM, plan, is_postscore=postscore)
    else:
        y = combine(out_ECM, plan, is_postscore=postscore)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-14)

    probe = torch.randn(T, M, generator=gen, dtype=torch.float64)
    got_out, got_w = torch.autograd.grad((y * probe).sum(), [out_ECM, weights], allow_unused=True)
    want_out, want_w = torch.autograd.grad((want * probe).sum(), [out_ECM, weights], allow_unused=True)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-14)
    assert torch.all(got_out[:, plan.capacity :] == 0)  # unused and dropped slots get no gradient
    if postscore:
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-14)
        assert torch.all(got_w[~plan.kept_TK] == 0) and torch.all(got_w[plan.kept_TK] != 0)
    else:  # prescore: the weights scaled the expert inputs at dispatch; combine only sums
        assert got_w is None and want_w is None
