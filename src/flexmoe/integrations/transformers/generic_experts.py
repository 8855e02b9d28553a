"""Experts that flexmoe's fused FFN does not compute: grouped GEMMs around the module's own code.

Legend: T tokens, N assignments grouped by expert (sizes[g] rows for expert g), G experts, M model
dim, X fc1 width, H expert hidden dim, K/O a GEMM's input/output width.

    hpre_NX = x_TM[token_N] @ w1[g] + b1[g]                  grouped GEMM (one autograd node)
    act_NH  = module._apply_gate(hpre_NX), or act_fn(hpre)   the module's own code, through autograd
    out_NM  = act_NH @ w2[g] + b2[g]                         grouped GEMM
    out_NM  = module.post_expert_norm(out_NM)                when the module has one
    y_TM    = sum over n of weight_N[n] * out_NM[n], at row token_N[n]

w1 keeps the module's own column order (GPT-OSS interleaves gate and up columns), so `_apply_gate`
sees exactly what transformers' own backends hand it.
"""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.integrations.transformers.module_weights import fc_weights
from flexmoe.ops.amp import amp_backward, amp_forward


def _groups(sizes: tuple[int, ...]):
    """(g, first row, end row) of every expert that has rows."""
    start = 0
    for g, n in enumerate(sizes):
        if n:
            yield g, start, start + n
        start += n


def _uniform(sizes: tuple[int, ...]) -> int | None:
    return sizes[0] if sizes and sizes[0] and all(n == sizes[0] for n in sizes) else None


class GroupedLinear(torch.autograd.Function):
    """out rows of expert g = x rows of g @ w_GKO[g] (+ b_GO[g]); experts of equal sizes take one
    batched GEMM, the others one GEMM each, written in place (no concatenation)."""

    @staticmethod
    @amp_forward(cast_inputs=True)  # out= GEMMs: run in the autocast dtype, autocast off
    def forward(ctx, x_NK, w_GKO, b_GO, sizes: tuple[int, ...]):
        ctx.save_for_backward(x_NK, w_GKO)
        ctx.sizes, ctx.has_bias = sizes, b_GO is not None
        n, G = _uniform(sizes), w_GKO.shape[0]
        if n is not None:
            x = x_NK.view(G, n, -1)
            out = torch.bmm(x, w_GKO) if b_GO is None else torch.baddbmm(b_GO.unsqueeze(1), x, w_GKO)
            return out.view(G * n, -1)
        out_NO = x_NK.new_empty(x_NK.shape[0], w_GKO.shape[2])
        for g, lo, hi in _groups(sizes):
            if b_GO is None:
                torch.mm(x_NK[lo:hi], w_GKO[g], out=out_NO[lo:hi])
            else:
                torch.addmm(b_GO[g], x_NK[lo:hi], w_GKO[g], out=out_NO[lo:hi])
        return out_NO

    @staticmethod
    @amp_backward
    def backward(ctx, grad_NO):
        x_NK, w_GKO = ctx.saved_tensors
        sizes, G = ctx.sizes, w_GKO.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_NO = grad_NO.contiguous()
        n = _uniform(sizes)
        if n is not None:
            go, x = grad_NO.view(G, n, -1), x_NK.view(G, n, -1)
            grad_x = torch.bmm(go, w_GKO.transpose(1, 2)).view(G * n, -1) if need_x else None
            # w is a transposed view of the module's parameter: its gradient keeps w's strides, so
            # that it reaches the parameter contiguous (ops.expert_ffn._weight_grad_like)
            grad_w = torch.bmm(x.transpose(1, 2), go, out=torch.empty_like(w_GKO)) if need_w else None
            grad_b = go.sum(1) if need_b and ctx.has_bias else None
            return grad_x, grad_w, grad_b, None
        # experts without rows get zero gradients; the others overwrite their slice
        grad_x = x_NK.new_empty(x_NK.shape) if need_x else None
        grad_w = torch.zeros_like(w_GKO) if need_w else None  # w's strides, as above
        grad_b = grad_NO.new_zeros(G, grad_NO.shape[1]) if need_b and ctx.has_bias else None
        for g, lo, hi in _groups(sizes):
            if need_x:
                torch.mm(grad_NO[lo:hi], w_GKO[g].t(), out=grad_x[lo:hi])
            if need_w:
                torch.mm(x_NK[lo:hi].t(), grad_NO[lo:hi], out=grad_w[g])
            if grad_b is not None:
                torch.sum(grad_NO[lo:hi], 0, out=grad_b[g])
        return grad_x, grad_w, grad_b, None


def grouped_linear(x_NK, w_GKO, b_GO, sizes: tuple[int, ...]) -> torch.Tensor:
    """Differentiable grouped GEMM; rows grouped by expert, `sizes[g]` rows for expert g."""
    if sum(sizes) != x_NK.shape[0] or len(sizes) != w_GKO.shape[0]:
        raise ValueError(f"sizes {sizes} must list {w_GKO.shape[0]} experts summing to {x_NK.shape[0]} rows")
    return GroupedLinear.apply(x_NK.contiguous(), w_GKO, b_GO, tuple(sizes))


def generic_experts_forward(
    module: nn.Module,
    x_TM: torch.Tensor,
    token_N: torch.Tensor,
    weight_N: torch.Tensor,
    sizes: tuple[int, ...],
) -> torch.Tensor:
    """y_TM of a transformers experts module for the assignments (token_N, weight_N), grouped by
    expert; every step differentiable (weights, tokens and routing weights)."""
    w1, b1, w2, b2 = fc_weights(module)
    x_NM = x_TM.to(w1.dtype).index_select(0, token_N)
    hpre_NX = grouped_linear(x_NM, w1, b1, sizes)
    act_NH = module._apply_gate(hpre_NX) if getattr(module, "has_gate", True) else module.act_fn(hpre_NX)
    out_NM = grouped_linear(act_NH, w2, b2, sizes)
    if getattr(module, "has_post_expert_norm", False):
        out_NM = module.post_expert_norm(out_NM)
    out_NM = out_NM * weight_N.to(out_NM.dtype).unsqueeze(1)
    y_TM = out_NM.new_zeros(x_TM.shape[0], out_NM.shape[1]).index_add(0, token_N, out_NM)
    return y_TM.to(x_TM.dtype)


__all__ = ["GroupedLinear", "generic_experts_forward", "grouped_linear"]
