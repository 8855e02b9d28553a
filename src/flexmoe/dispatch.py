"""Index-based dispatch and combine (no one-hot tensor anywhere; O(N * M) work, differentiable).

Legend: T tokens, M model dim, E experts, Cb buffer capacity, N kept assignments in slot order.

Two forms of the same data movement:
- packed: the N kept rows, grouped by expert (group sizes `plan.kept_E`): what the expert GEMMs read
  on one process, so empty capacity slots are never multiplied;
- padded: the [E, Cb, M] buffer of DESIGN section 1, what the all-to-all sends.
"""

from __future__ import annotations

import torch

from flexmoe.routing import RoutingPlan


def _scaled(rows_NM: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return rows_NM * plan.weight_N.to(rows_NM.dtype).unsqueeze(1)


def dispatch_packed(x_TM: torch.Tensor, plan: RoutingPlan, *, is_postscore: bool = True) -> torch.Tensor:
    """[T, M] -> [N, M]: the kept assignments' token rows, grouped by expert."""
    rows_NM = x_TM.index_select(0, plan.token_N)
    return rows_NM if is_postscore else _scaled(rows_NM, plan)


def combine_packed(out_NM: torch.Tensor, plan: RoutingPlan, *, is_postscore: bool = True) -> torch.Tensor:
    """[N, M] -> [T, M]: y_t = sum of its kept assignments' outputs (weighted when postscore)."""
    rows_NM = _scaled(out_NM, plan) if is_postscore else out_NM
    y_TM = out_NM.new_zeros(plan.num_tokens, out_NM.shape[1])
    return y_TM.index_add(0, plan.token_N, rows_NM)


def pad(rows_NM: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[N, M] (slot order) -> [E, Cb, M] with zero rows in the unused slots."""
    E, Cb, M = plan.num_experts, plan.buffer_capacity, rows_NM.shape[1]
    buffer = rows_NM.new_zeros(E * Cb, M).index_copy(0, plan.slot_N, rows_NM)
    return buffer.view(E, Cb, M)


def unpad(buffer_ECM: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[E, Cb, M] -> [N, M]: the rows of the kept slots."""
    return buffer_ECM.reshape(-1, buffer_ECM.shape[-1]).index_select(0, plan.slot_N)


def dispatch(x_TM: torch.Tensor, plan: RoutingPlan, *, is_postscore: bool = True) -> torch.Tensor:
    """[T, M] -> [E, Cb, M] (public functional API)."""
    # the index arithmetic would silently skip extra tokens, or fail with a bare IndexError
    if x_TM.dim() != 2 or x_TM.shape[0] != plan.num_tokens:
        raise ValueError(
            f"dispatch: x must be [T, M] with the plan's T={plan.num_tokens} tokens, "
            f"got shape {tuple(x_TM.shape)}"
        )
    return pad(dispatch_packed(x_TM, plan, is_postscore=is_postscore), plan)


def combine(expert_out_ECM: torch.Tensor, plan: RoutingPlan, *, is_postscore: bool = True) -> torch.Tensor:
    """[E, Cb, M] -> [T, M] (public functional API); unused slots are never read."""
    expected = (plan.num_experts, plan.buffer_capacity)
    if expert_out_ECM.dim() != 3 or tuple(expert_out_ECM.shape[:2]) != expected:
        raise ValueError(
            f"combine: expert_out must be [E, Cb, M] = [{expected[0]}, {expected[1]}, M] for this plan "
            f"(E experts, buffer capacity Cb), got shape {tuple(expert_out_ECM.shape)}"
        )
    return combine_packed(unpad(expert_out_ECM, plan), plan, is_postscore=is_postscore)
