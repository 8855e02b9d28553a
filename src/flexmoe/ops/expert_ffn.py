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

from flexmoe.amp import amp_backward, amp_forward


def activation_forward(kind: str, hpre_RX: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """activation(hpre), written into `out` when given (no temporary)."""
    if kind == "gelu":
        return F.gelu(hpre_RX) if out is None else torch.ops.aten.gelu.out(hpre_RX, out=out)
    if kind == "relu":
        return F.relu(hpre_RX) if out is None else torch.clamp_min(hpre_RX, 0, out=out)
    if kind == "silu":
        return F.silu(hpre_RX) if out is None else torch.ops.aten.silu.out(hpre_RX, out=out)
    if kind == "swiglu":
        gate_RH, up_RH = hpre_RX.chunk(2, dim=-1)
        return torch.mul(F.silu(gate_RH), up_RH, out=out)
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


# Rows of hidden activations handled per element-wise pass: ~4 MiB in fp32 stays in the last-level
# cache between the GEMM that writes it and the activation that reads it, yet is large enough that
# the element-wise calls stay few and well parallelised when experts are small.
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class _Block:
    """Consecutive non-empty groups whose rows lo:hi take one element-wise pass."""

    lo: int
    hi: int
    groups: tuple[tuple[int, int, int], ...]  # (g, lo, hi), rows absolute


def _blocks(sizes: tuple[int, ...], width: int):
    groups: list[tuple[int, int, int]] = []
    for g, lo, hi in _bounds(sizes):
        if hi > lo:
            groups.append((g, lo, hi))
        if groups and (hi - groups[0][1]) * width >= _BLOCK_ELEMENTS:
            yield _Block(groups[0][1], hi, tuple(groups))
            groups = []
    if groups:
        yield _Block(groups[0][1], groups[-1][2], tuple(groups))


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
    # block by block, so that the activation reads the GEMM's output while it is still in cache
    hpre = x_RM.new_empty(R, w.w1_GMX.shape[2])
    act = x_RM.new_empty(R, w.w2_GHM.shape[1])
    out = x_RM.new_empty(R, w.w2_GHM.shape[2])
    for block in _blocks(sizes, hpre.shape[1]):
        for g, lo, hi in block.groups:
            _linear_into(hpre[lo:hi], x_RM[lo:hi], w.w1_GMX[g], None if w.b1_GX is None else w.b1_GX[g])
        rows = slice(block.lo, block.hi)
        activation_forward(w.activation, hpre[rows], out=act[rows])
        for g, lo, hi in block.groups:
            _linear_into(out[lo:hi], act[lo:hi], w.w2_GHM[g], None if w.b2_GM is None else w.b2_GM[g])
    return out, hpre, act


def _linear_into(out_RN: torch.Tensor, x_RK: torch.Tensor, w_KN: torch.Tensor, b_N: torch.Tensor | None):
    if b_N is None:
        torch.mm(x_RK, w_KN, out=out_RN)
    else:
        torch.addmm(b_N, x_RK, w_KN, out=out_RN)


def _zeros_where_empty(t_G: torch.Tensor | None, sizes: tuple[int, ...]) -> torch.Tensor | None:
    """An uninitialised gradient buffer: groups with rows overwrite their slice, empty groups get zeros."""
    if t_G is None:
        return None
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

    if need_weight_grads:
        grads.w1_GMX, grads.w2_GHM = _zeros_where_empty(w.w1_GMX, sizes), _zeros_where_empty(w.w2_GHM, sizes)
        grads.b1_GX, grads.b2_GM = _zeros_where_empty(w.b1_GX, sizes), _zeros_where_empty(w.b2_GM, sizes)
    if need_input_grad:
        grads.x_RM = x_RM.new_empty(x_RM.shape)
    # block by block: the hidden-size gradients of a block stay in cache between their uses
    for block in _blocks(sizes, hpre_RX.shape[1]):
        rows = slice(block.lo, block.hi)
        grad_act = act_RH.new_empty(block.hi - block.lo, act_RH.shape[1])
        for g, lo, hi in block.groups:
            torch.mm(grad_out_RM[lo:hi], w.w2_GHM[g].t(), out=grad_act[lo - block.lo : hi - block.lo])
        grad_h = activation_backward(w.activation, grad_act, hpre_RX[rows], act_RH[rows])
        for g, lo, hi in block.groups:
            go, gh = grad_out_RM[lo:hi], grad_h[lo - block.lo : hi - block.lo]
            if need_weight_grads:
                torch.mm(act_RH[lo:hi].t(), go, out=grads.w2_GHM[g])
                torch.mm(x_RM[lo:hi].t(), gh, out=grads.w1_GMX[g])
                if grads.b2_GM is not None:
                    torch.sum(go, 0, out=grads.b2_GM[g])
                if grads.b1_GX is not None:
                    torch.sum(gh, 0, out=grads.b1_GX[g])
            if need_input_grad:
                torch.mm(gh, w.w1_GMX[g].t(), out=grads.x_RM[lo:hi])
    return grads


class GroupedExpertFFN(torch.autograd.Function):
    """Autograd wrapper: the whole grouped FFN is one node with the hand-written backward."""

    @staticmethod
    @amp_forward(cast_inputs=True)  # out= GEMMs: run in the autocast dtype, autocast off
    def forward(ctx, x_RM, w1_GMX, b1_GX, w2_GHM, b2_GM, sizes: tuple[int, ...], activation: str):
        w = ExpertWeights(w1_GMX, b1_GX, w2_GHM, b2_GM, activation)
        out, hpre, act = ffn_forward(x_RM, w, sizes)
        ctx.save_for_backward(x_RM, hpre, act, w1_GMX, b1_GX, w2_GHM, b2_GM)
        ctx.sizes, ctx.activation = sizes, activation
        return out

    @staticmethod
    @amp_backward
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
