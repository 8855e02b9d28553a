"""The expert FFN over rows grouped by expert, with a hand-written backward.

Legend: R rows (grouped by expert), G experts (groups), M model dim, H hidden dim,
X fc1 width (H, or 2H for swiglu with the gate half first).

    hpre_RX = x_RM @ w1_GMX[g] + b1_GX[g]   (per group g)
    act_RH  = activation(hpre_RX)
    out_RM  = act_RH @ w2_GHM[g] + b2_GM[g]

One autograd node for the whole FFN: the GEMMs write straight into preallocated outputs (no
concatenation), the activation runs once over all rows, and the pipelined all-to-all (pipeline.py)
reuses `ffn_forward` / `ffn_backward` chunk by chunk. Groups of equal size take one batched GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def activation_forward(kind: str, hpre_RX: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return F.gelu(hpre_RX)
    if kind == "relu":
        return F.relu(hpre_RX)
    if kind == "silu":
        return F.silu(hpre_RX)
    if kind == "swiglu":
        gate_RH, up_RH = hpre_RX.chunk(2, dim=-1)
        return F.silu(gate_RH) * up_RH
    raise ValueError(f"activation must be one of ('gelu', 'relu', 'silu', 'swiglu'), got {kind!r}")


def activation_backward(kind: str, grad_RH: torch.Tensor, hpre_RX: torch.Tensor, act_RH: torch.Tensor):
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(grad_RH, hpre_RX)
    if kind == "relu":
        return torch.ops.aten.threshold_backward(grad_RH, act_RH, 0)
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad_RH, hpre_RX)
    gate_RH, up_RH = hpre_RX.chunk(2, dim=-1)
    grad_gate = torch.ops.aten.silu_backward(grad_RH * up_RH, gate_RH)
    return torch.cat([grad_gate, grad_RH * F.silu(gate_RH)], dim=-1)


@dataclass(frozen=True)
class ExpertWeights:
    """One plan's view of the expert weights (local shards, or gathered blocks)."""

    w1_GMX: torch.Tensor
    b1_GX: torch.Tensor | None
    w2_GHM: torch.Tensor
    b2_GM: torch.Tensor | None
    activation: str

    @property
    def num_groups(self) -> int:
        return self.w1_GMX.shape[0]


def _uniform_size(sizes: tuple[int, ...], rows: int) -> int | None:
    if sizes and sizes[0] > 0 and all(n == sizes[0] for n in sizes) and sizes[0] * len(sizes) == rows:
        return sizes[0]
    return None


def _bounds(sizes: tuple[int, ...]):
    start = 0
    for g, n in enumerate(sizes):
        yield g, start, start + n
        start += n


def ffn_forward(x_RM: torch.Tensor, w: ExpertWeights, sizes: tuple[int, ...]):
    """Returns (out_RM, hpre_RX, act_RH); rows of group g are x_RM[start_g : start_g + sizes[g]]."""
    R, G = x_RM.shape[0], w.num_groups
    n = _uniform_size(sizes, R)
    if n is not None:  # one batched GEMM per layer of the FFN
        x_GnM = x_RM.view(G, n, -1)
        hpre = (
            torch.bmm(x_GnM, w.w1_GMX)
            if w.b1_GX is None
            else torch.baddbmm(w.b1_GX.unsqueeze(1), x_GnM, w.w1_GMX)
        )
        act = activation_forward(w.activation, hpre)
        out = (
            torch.bmm(act, w.w2_GHM)
            if w.b2_GM is None
            else torch.baddbmm(w.b2_GM.unsqueeze(1), act, w.w2_GHM)
        )
        return out.view(R, -1), hpre.view(R, -1), act.view(R, -1)
    hpre = _grouped_linear(x_RM, w.w1_GMX, w.b1_GX, sizes)
    act = activation_forward(w.activation, hpre)
    return _grouped_linear(act, w.w2_GHM, w.b2_GM, sizes), hpre, act


def _grouped_linear(x_RK: torch.Tensor, w_GKN: torch.Tensor, b_GN: torch.Tensor | None, sizes):
    """Per group g: rows @ w[g] (+ b[g]), written straight into one [R, N] output."""
    out = x_RK.new_empty(x_RK.shape[0], w_GKN.shape[2])
    for g, lo, hi in _bounds(sizes):
        if hi == lo:
            continue
        if b_GN is None:
            torch.mm(x_RK[lo:hi], w_GKN[g], out=out[lo:hi])
        else:
            torch.addmm(b_GN[g], x_RK[lo:hi], w_GKN[g], out=out[lo:hi])
    return out


def _empty_like_zero_unused(t_G: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    out = torch.empty_like(t_G)
    for g, n in enumerate(sizes):
        if n == 0:
            out[g].zero_()
    return out


@dataclass
class FFNGrads:
    x_RM: torch.Tensor | None
    w1_GMX: torch.Tensor | None
    b1_GX: torch.Tensor | None
    w2_GHM: torch.Tensor | None
    b2_GM: torch.Tensor | None


def ffn_backward(
    grad_out_RM: torch.Tensor,
    x_RM: torch.Tensor,
    hpre_RX: torch.Tensor,
    act_RH: torch.Tensor,
    w: ExpertWeights,
    sizes: tuple[int, ...],
    *,
    need_input_grad: bool = True,
    need_weight_grads: bool = True,
) -> FFNGrads:
    R, G = x_RM.shape[0], w.num_groups
    n = _uniform_size(sizes, R)
    grads = FFNGrads(None, None, None, None, None)
    if n is not None:
        go_GnM = grad_out_RM.reshape(G, n, -1)
        act_GnH, x_GnM = act_RH.view(G, n, -1), x_RM.view(G, n, -1)
        grad_act = torch.bmm(go_GnM, w.w2_GHM.transpose(1, 2))
        grad_h = activation_backward(w.activation, grad_act, hpre_RX.view(G, n, -1), act_GnH)
        if need_weight_grads:
            grads.w2_GHM = torch.bmm(act_GnH.transpose(1, 2), go_GnM)
            grads.w1_GMX = torch.bmm(x_GnM.transpose(1, 2), grad_h)
            grads.b2_GM = go_GnM.sum(1) if w.b2_GM is not None else None
            grads.b1_GX = grad_h.sum(1) if w.b1_GX is not None else None
        if need_input_grad:
            grads.x_RM = torch.bmm(grad_h, w.w1_GMX.transpose(1, 2)).view(R, -1)
        return grads

    grad_act = act_RH.new_empty(act_RH.shape)
    if need_weight_grads:  # every group with rows overwrites its slice; only empty groups need zeros
        grads.w2_GHM = _empty_like_zero_unused(w.w2_GHM, sizes)
        grads.b2_GM = _empty_like_zero_unused(w.b2_GM, sizes) if w.b2_GM is not None else None
    for g, lo, hi in _bounds(sizes):
        if hi > lo:
            go = grad_out_RM[lo:hi]
            torch.mm(go, w.w2_GHM[g].t(), out=grad_act[lo:hi])
            if need_weight_grads:
                torch.mm(act_RH[lo:hi].t(), go, out=grads.w2_GHM[g])
                if grads.b2_GM is not None:
                    torch.sum(go, 0, out=grads.b2_GM[g])
    grad_h = activation_backward(w.activation, grad_act, hpre_RX, act_RH)
    if need_weight_grads:
        grads.w1_GMX = _empty_like_zero_unused(w.w1_GMX, sizes)
        grads.b1_GX = _empty_like_zero_unused(w.b1_GX, sizes) if w.b1_GX is not None else None
    if need_input_grad:
        grads.x_RM = x_RM.new_empty(x_RM.shape)
    for g, lo, hi in _bounds(sizes):
        if hi > lo:
            gh = grad_h[lo:hi]
            if need_weight_grads:
                torch.mm(x_RM[lo:hi].t(), gh, out=grads.w1_GMX[g])
                if grads.b1_GX is not None:
                    torch.sum(gh, 0, out=grads.b1_GX[g])
            if need_input_grad:
                torch.mm(gh, w.w1_GMX[g].t(), out=grads.x_RM[lo:hi])
    return grads


class GroupedExpertFFN(torch.autograd.Function):
    """Autograd wrapper: the whole grouped FFN is one node with the hand-written backward."""

    @staticmethod
    def forward(ctx, x_RM, w1_GMX, b1_GX, w2_GHM, b2_GM, sizes: tuple[int, ...], activation: str):
        w = ExpertWeights(w1_GMX, b1_GX, w2_GHM, b2_GM, activation)
        out, hpre, act = ffn_forward(x_RM, w, sizes)
        ctx.save_for_backward(x_RM, hpre, act, w1_GMX, b1_GX, w2_GHM, b2_GM)
        ctx.sizes, ctx.activation = sizes, activation
        return out

    @staticmethod
    def backward(ctx, grad_out_RM):
        x_RM, hpre, act, w1, b1, w2, b2 = ctx.saved_tensors
        w = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        needs = ctx.needs_input_grad
        grads = ffn_backward(
            grad_out_RM.contiguous(),
            x_RM,
            hpre,
            act,
            w,
            ctx.sizes,
            need_input_grad=needs[0],
            need_weight_grads=any(needs[1:5]),
        )
        return grads.x_RM, grads.w1_GMX, grads.b1_GX, grads.w2_GHM, grads.b2_GM, None, None


def grouped_expert_ffn(x_RM: torch.Tensor, w: ExpertWeights, sizes: tuple[int, ...]) -> torch.Tensor:
    """Differentiable grouped FFN; `sizes` are the row counts of each expert, in order."""
    if sum(sizes) != x_RM.shape[0] or len(sizes) != w.num_groups:
        raise ValueError(f"sizes {sizes} must list {w.num_groups} groups summing to {x_RM.shape[0]} rows")
    return GroupedExpertFFN.apply(
        x_RM.contiguous(), w.w1_GMX, w.b1_GX, w.w2_GHM, w.b2_GM, sizes, w.activation
    )
