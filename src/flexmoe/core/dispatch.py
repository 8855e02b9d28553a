"""Index-based dispatch and combine (no one-hot tensor anywhere; O(N * M) work, differentiable).

Legend: T tokens, M model dim, E experts, Cb buffer capacity, N kept assignments in slot order.

Two forms of the same data movement:
- packed: the N kept rows, grouped by expert (group sizes `plan.kept_E`): what the expert GEMMs read
  on one process, so empty capacity slots are never multiplied;
- padded: the [E, Cb, M] buffer of DESIGN section 1, what the all-to-all sends.
"""

from __future__ import annotations

import torch

from flexmoe.core.routing import RoutingPlan
from flexmoe.ops.amp import amp_backward, amp_forward


class _GatherRows(torch.autograd.Function):
    """rows_n = s_n * x_TM[t_n] (pre-score dispatch). Keeps x_TM, which the caller holds anyway, not the
    rows: multiplying by the scores out of autograd's sight avoids saving an [N, M] copy."""

    @staticmethod
    @amp_forward(cast_inputs=False)  # moves and scales rows in their own dtype
    def forward(ctx, x_TM: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TM, token_N, weight_N)
        return x_TM.index_select(0, token_N).mul_(weight_N.to(x_TM.dtype).unsqueeze(1))

    @staticmethod
    @amp_backward
    def backward(ctx, grad_NM: torch.Tensor):
        x_TM, token_N, weight_N = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.linalg.vecdot(grad_NM, x_TM.index_select(0, token_N), dim=1)
        if ctx.needs_input_grad[0]:
            scaled = grad_NM * weight_N.to(grad_NM.dtype).unsqueeze(1)
            grad_x = x_TM.new_zeros(x_TM.shape).index_add_(0, token_N, scaled.to(x_TM.dtype))
        return grad_x, None, grad_w


class _CombineRows(torch.autograd.Function):
    """y_TM[t_n] += s_n * rows_n (s None: 1). Keeps the rows only when the scores need a gradient,
    and never the scaled copy (autograd's index_add would save its whole [N, M] source)."""

    @staticmethod
    @amp_forward(cast_inputs=False)  # moves and scales rows in their own dtype
    def forward(ctx, rows_NM, token_N, weight_N, num_tokens: int) -> torch.Tensor:
        scaled = rows_NM if weight_N is None else rows_NM * weight_N.to(rows_NM.dtype).unsqueeze(1)
        keep_rows = weight_N is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(rows_NM if keep_rows else None, token_N, weight_N)
        return rows_NM.new_zeros(num_tokens, rows_NM.shape[1]).index_add_(0, token_N, scaled)

    @staticmethod
    @amp_backward
    def backward(ctx, grad_TM: torch.Tensor):
        rows_NM, token_N, weight_N = ctx.saved_tensors
        grad_NM = grad_TM.index_select(0, token_N)
        grad_w = torch.linalg.vecdot(grad_NM, rows_NM, dim=1) if rows_NM is not None else None
        if weight_N is not None:
            grad_NM.mul_(weight_N.to(grad_NM.dtype).unsqueeze(1))
        return grad_NM if ctx.needs_input_grad[0] else None, None, grad_w, None


def dispatch_packed(x_TM: torch.Tensor, plan: RoutingPlan, *, is_postscore: bool = True) -> torch.Tensor:
    """[T, M] -> [N, M]: the kept assignments' token rows, grouped by expert."""
    if is_postscore:
        return x_TM.index_select(0, plan.token_N)  # autograd keeps only the index
    return _GatherRows.apply(x_TM, plan.token_N, plan.weight_N)


def combine_packed(out_NM: torch.Tensor, plan: RoutingPlan, *, is_postscore: bool = True) -> torch.Tensor:
    """[N, M] -> [T, M]: y_t = sum of its kept assignments' outputs (weighted when postscore)."""
    return _CombineRows.apply(out_NM, plan.token_N, plan.weight_N if is_postscore else None, plan.num_tokens)


class _PadRows(torch.autograd.Function):
    """rows -> zero-initialised buffer rows `slot_N` (autograd's index_copy would save the rows)."""

    @staticmethod
    @amp_forward(cast_inputs=False)  # moves rows in their own dtype
    def forward(ctx, rows_NM: torch.Tensor, slot_N: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(slot_N)
        N, M = rows_NM.shape
        # distinct rows: with as many rows as the buffer every row is written, none needs zeros
        buffer = rows_NM.new_empty(num_rows, M) if num_rows == N else rows_NM.new_zeros(num_rows, M)
        return buffer.index_copy_(0, slot_N, rows_NM)

    @staticmethod
    @amp_backward
    def backward(ctx, grad_SM: torch.Tensor):
        (slot_N,) = ctx.saved_tensors
        return grad_SM.index_select(0, slot_N), None, None


class _GatherTokensIntoRows(torch.autograd.Function):
    """buffer_S = x_TM[source_S], with zero rows where source_S = T (no token): one gather from x with a
    zero row appended, instead of gathering the kept rows and then scattering them into a zero-filled
    buffer. Backward adds every row's gradient to its token (the rows without one go to the extra row)."""

    @staticmethod
    @amp_forward(cast_inputs=False)  # moves rows in their own dtype
    def forward(ctx, x_TM: torch.Tensor, source_S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(source_S)
        ctx.num_tokens = x_TM.shape[0]
        x_with_zero = torch.cat([x_TM, x_TM.new_zeros(1, x_TM.shape[1])])
        return x_with_zero.index_select(0, source_S)

    @staticmethod
    @amp_backward
    def backward(ctx, grad_SM: torch.Tensor):
        (source_S,) = ctx.saved_tensors
        grad = grad_SM.new_zeros(ctx.num_tokens + 1, grad_SM.shape[1]).index_add_(0, source_S, grad_SM)
        return grad[: ctx.num_tokens], None


def dispatch_to_rows(x_TM: torch.Tensor, token_N: torch.Tensor, row_N: torch.Tensor, num_rows: int):
    """[T, M] -> [num_rows, M]: token token_N[n]'s row at row row_N[n] (rows distinct), zeros elsewhere
    (post-score dispatch into any buffer layout)."""
    if num_rows == token_N.shape[0]:  # every row holds a token: a plain gather, no zero row needed
        source_S = torch.empty_like(token_N).index_copy_(0, row_N, token_N)
        return x_TM.index_select(0, source_S)  # autograd keeps only the index
    source_S = torch.full((num_rows,), x_TM.shape[0], dtype=token_N.dtype, device=token_N.device)
    return _GatherTokensIntoRows.apply(x_TM, source_S.index_copy_(0, row_N, token_N))


def pad_rows(rows_NM: torch.Tensor, row_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[N, M] -> [num_rows, M]: row n at row_N[n], zeros elsewhere (any buffer layout)."""
    return _PadRows.apply(rows_NM, row_N, num_rows)


def unpad_rows(buffer_SM: torch.Tensor, row_N: torch.Tensor) -> torch.Tensor:
    """[S, M] -> [N, M]: the rows at row_N."""
    return buffer_SM.index_select(0, row_N)


def pad(rows_NM: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[N, M] (slot order) -> [E, Cb, M] with zero rows in the unused slots."""
    E, Cb, M = plan.num_experts, plan.buffer_capacity, rows_NM.shape[1]
    return pad_rows(rows_NM, plan.slot_N, E * Cb).view(E, Cb, M)


def unpad(buffer_ECM: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[E, Cb, M] -> [N, M]: the rows of the kept slots."""
    return unpad_rows(buffer_ECM.reshape(-1, buffer_ECM.shape[-1]), plan.slot_N)


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
