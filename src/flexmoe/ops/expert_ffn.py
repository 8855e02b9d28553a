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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexmoe.ops.amp import amp_backward, amp_forward
from flexmoe.ops.runs import concatenated_runs


@dataclass(frozen=True)
class CustomActivation:
    """An activation given as code, e.g. a model's own gating (GPT-OSS's clamped, interleaved
    SwiGLU): `fn(hpre_RX) -> act_RH`, without parameters of its own, row by row (an output row depends
    on its input row alone: the FFN cuts rows into blocks and chunks). Its backward runs through
    autograd, from hpre; the GEMMs around it stay flexmoe's grouped ones."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]


Activation = str | CustomActivation  # a fused activation's name, or code


def activation_forward(kind: Activation, hpre_RX: torch.Tensor) -> torch.Tensor:
    """activation(hpre)."""
    if isinstance(kind, CustomActivation):
        return kind.fn(hpre_RX)
    if kind == "gelu":
        return F.gelu(hpre_RX)
    if kind == "relu":
        return F.relu(hpre_RX)
    if kind == "silu":
        return F.silu(hpre_RX)
    if kind == "swiglu":
        gate_RH, up_RH = hpre_RX.chunk(2, dim=-1)
        return F.silu(gate_RH).mul_(up_RH)
    raise ValueError(f"activation must be one of ('gelu', 'relu', 'silu', 'swiglu'), got {kind!r}")


def activation_backward(
    kind: Activation,
    grad_RH: torch.Tensor,
    hpre_RX: torch.Tensor,
    act_RH: torch.Tensor,
    *,
    silu_gate_RH: torch.Tensor | None = None,
):
    """d activation / d hpre; for swiglu, silu(gate) when the caller has it (activation_from_kept)."""
    if isinstance(kind, CustomActivation):  # its graph, built again from hpre
        with torch.enable_grad():
            h_RX = hpre_RX.detach().requires_grad_()
            return torch.autograd.grad(kind.fn(h_RX), h_RX, grad_RH)[0]
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(grad_RH, hpre_RX)
    if kind == "relu":
        return torch.ops.aten.threshold_backward(grad_RH, act_RH, 0)
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad_RH, hpre_RX)
    # swiglu: both halves written into one [R, 2H] output (no concatenation); the up half holds
    # grad * up first, the gate half's input, then its own gradient (20-30% faster than with cat)
    gate_RH, up_RH = hpre_RX.chunk(2, dim=-1)
    H = gate_RH.shape[-1]
    grad_RX = hpre_RX.new_empty(hpre_RX.shape)
    torch.mul(grad_RH, up_RH, out=grad_RX[..., H:])
    torch.ops.aten.silu_backward.grad_input(grad_RX[..., H:], gate_RH, grad_input=grad_RX[..., :H])
    torch.mul(grad_RH, F.silu(gate_RH) if silu_gate_RH is None else silu_gate_RH, out=grad_RX[..., H:])
    return grad_RX


# What forward keeps for backward is "hpre", the pre-activation, from which backward recomputes the
# activation. ReLU's backward needs only its output (the mask act > 0) and relu(relu(h)) = relu(h),
# so for ReLU forward activates hpre in place: the kept tensor is the activation itself, one [R, H]
# tensor and one pass fewer in forward, and nothing to recompute in backward.


def activate_kept(kind: Activation, hpre_RX: torch.Tensor) -> torch.Tensor:
    """The activation in forward; for ReLU written over hpre_RX, which forward then keeps."""
    return hpre_RX.clamp_min_(0) if kind == "relu" else activation_forward(kind, hpre_RX)


def activation_from_kept(kind: Activation, kept_RX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the activation, silu(gate) for swiglu, else None) in backward, from what forward kept
    (activate_kept); activation_backward takes silu(gate) instead of computing it a second time."""
    if kind == "swiglu":
        gate_RH, up_RH = kept_RX.chunk(2, dim=-1)
        silu_gate_RH = F.silu(gate_RH)
        return silu_gate_RH * up_RH, silu_gate_RH
    return (kept_RX if kind == "relu" else activation_forward(kind, kept_RX)), None


@dataclass(frozen=True)
class ExpertWeights:
    """One plan's view of the expert weights (local shards, or gathered blocks)."""

    w1_GMX: torch.Tensor
    b1_GX: torch.Tensor | None
    w2_GHM: torch.Tensor
    b2_GM: torch.Tensor | None
    activation: Activation

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
    """Returns (out_RM, hpre_RX); rows of group g are x_RM[start_g : start_g + sizes[g]].

    The activation is a temporary: backward recomputes it from hpre (one element-wise pass, ~1% of
    the GEMMs' time) instead of keeping a second [R, H] tensor alive until then; for ReLU the kept
    hpre is the activation itself (activate_kept).
    """
    R, G = x_RM.shape[0], w.num_groups
    n = _uniform_size(sizes, R)
    if n is not None:  # one batched GEMM per layer of the FFN
        x_GnM = x_RM.view(G, n, -1)
        hpre = (
            torch.bmm(x_GnM, w.w1_GMX)
            if w.b1_GX is None
            else torch.baddbmm(w.b1_GX.unsqueeze(1), x_GnM, w.w1_GMX)
        )
        act = activate_kept(w.activation, hpre)
        out = (
            torch.bmm(act, w.w2_GHM)
            if w.b2_GM is None
            else torch.baddbmm(w.b2_GM.unsqueeze(1), act, w.w2_GHM)
        )
        return out.view(R, -1), hpre.view(R, -1)
    # block by block, so that the activation reads the GEMM's output while it is still in cache
    hpre = x_RM.new_empty(R, w.w1_GMX.shape[2])
    out = x_RM.new_empty(R, w.w2_GHM.shape[2])
    for block in _blocks(sizes, hpre.shape[1]):
        rows = slice(block.lo, block.hi)
        _block_linear(hpre[rows], x_RM[rows], block, w.w1_GMX, w.b1_GX)
        act = activate_kept(w.activation, hpre[rows])
        _block_linear(out[rows], act, block, w.w2_GHM, w.b2_GM)
    return out, hpre


def _consecutive_equal(block: _Block) -> tuple[int, int, int] | None:
    """(first group, groups, rows each) when the block's groups are consecutive and equally sized."""
    gs = block.groups
    n = gs[0][2] - gs[0][1]
    if len(gs) > 1 and gs[-1][0] - gs[0][0] == len(gs) - 1 and all(hi - lo == n for _, lo, hi in gs):
        return gs[0][0], len(gs), n
    return None


def _block_linear(out_BN: torch.Tensor, in_BK: torch.Tensor, block: _Block, w_GKN, b_GN) -> None:
    """out rows of group g = in rows @ w_GKN[g] (+ b_GN[g]); rows relative to block.lo. Equal
    consecutive groups take one batched GEMM."""
    batched = _consecutive_equal(block)
    if batched is not None:
        g0, G, n = batched
        o, i, wt = out_BN.view(G, n, -1), in_BK.view(G, n, -1), w_GKN[g0 : g0 + G]
        if b_GN is None:
            torch.bmm(i, wt, out=o)
        else:
            torch.baddbmm(b_GN[g0 : g0 + G].unsqueeze(1), i, wt, out=o)
        return
    for g, lo, hi in block.groups:
        rows = slice(lo - block.lo, hi - block.lo)
        _linear_into(out_BN[rows], in_BK[rows], w_GKN[g], None if b_GN is None else b_GN[g])


def _block_weight_grads(grad_w_GKN, grad_b_GN, a_BK: torch.Tensor, g_BN: torch.Tensor, block: _Block) -> None:
    """grad_w[g] = a_g^T @ g_g and grad_b[g] = sum of g_g's rows, for the block's groups."""
    batched = _consecutive_equal(block)
    if batched is not None:
        g0, G, n = batched
        a, gr = a_BK.view(G, n, -1), g_BN.view(G, n, -1)
        torch.bmm(a.transpose(1, 2), gr, out=grad_w_GKN[g0 : g0 + G])
        if grad_b_GN is not None:
            torch.sum(gr, 1, out=grad_b_GN[g0 : g0 + G])
        return
    for g, lo, hi in block.groups:
        rows = slice(lo - block.lo, hi - block.lo)
        torch.mm(a_BK[rows].t(), g_BN[rows], out=grad_w_GKN[g])
        if grad_b_GN is not None:
            torch.sum(g_BN[rows], 0, out=grad_b_GN[g])


def _block_bias_dot(g_BN: torch.Tensor, b_GN: torch.Tensor, block: _Block) -> torch.Tensor:
    """<row of g, b[the row's group]> for every row of the block (one batched GEMM where it can)."""
    batched = _consecutive_equal(block)
    if batched is not None:
        g0, G, n = batched
        return torch.bmm(g_BN.view(G, n, -1), b_GN[g0 : g0 + G].unsqueeze(2)).view(-1)
    out = g_BN.new_empty(g_BN.shape[0])
    for g, lo, hi in block.groups:
        torch.mv(g_BN[lo - block.lo : hi - block.lo], b_GN[g], out=out[lo - block.lo : hi - block.lo])
    return out


def _linear_into(out_RN: torch.Tensor, x_RK: torch.Tensor, w_KN: torch.Tensor, b_N: torch.Tensor | None):
    if b_N is None:
        torch.mm(x_RK, w_KN, out=out_RN)
    else:
        torch.addmm(b_N, x_RK, w_KN, out=out_RN)


def _weight_grad_like(w_GKN: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer for w's gradient with w's strides. A weight can be a transposed view
    of its parameter (transformers' experts: [E, X, M] read as fc1 [E, M, X]); its gradient then
    reaches the parameter contiguous, where a contiguous [G, K, N] one would arrive transposed and
    make every later pass over it (accumulation, FSDP's copy-in, the optimizer) strided: ~9x
    slower for an fp32 [32, 512, 512] add on one core. The GEMMs write into either at the same speed."""
    return torch.empty_like(w_GKN)  # preserve_format keeps a dense view's strides


def _zeros_where_empty(t_G: torch.Tensor | None, sizes: tuple[int, ...]) -> torch.Tensor | None:
    """An uninitialised gradient buffer: groups with rows overwrite their slice, empty groups get zeros."""
    if t_G is None:
        return None
    out = _weight_grad_like(t_G)
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
        hpre_GnX, x_GnM = hpre_RX.view(G, n, -1), x_RM.view(G, n, -1)
        act_GnH, silu_gate = activation_from_kept(w.activation, hpre_GnX)  # forward kept only hpre
        grad_act = torch.bmm(go_GnM, w.w2_GHM.transpose(1, 2))
        grad_h = activation_backward(w.activation, grad_act, hpre_GnX, act_GnH, silu_gate_RH=silu_gate)
        if need_weight_grads:  # laid out as the weights are (see _weight_grad_like)
            grads.w2_GHM = torch.bmm(act_GnH.transpose(1, 2), go_GnM, out=_weight_grad_like(w.w2_GHM))
            grads.w1_GMX = torch.bmm(x_GnM.transpose(1, 2), grad_h, out=_weight_grad_like(w.w1_GMX))
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
        act, silu_gate = activation_from_kept(w.activation, hpre_RX[rows])  # forward kept only hpre
        grad_act = act.new_empty(act.shape)
        _block_linear(grad_act, grad_out_RM[rows], block, w.w2_GHM.transpose(1, 2), None)
        grad_h = activation_backward(w.activation, grad_act, hpre_RX[rows], act, silu_gate_RH=silu_gate)
        if need_weight_grads:
            _block_weight_grads(grads.w2_GHM, grads.b2_GM, act, grad_out_RM[rows], block)
            _block_weight_grads(grads.w1_GMX, grads.b1_GX, x_RM[rows], grad_h, block)
        if need_input_grad:
            _block_linear(grads.x_RM[rows], grad_h, block, w.w1_GMX.transpose(1, 2), None)
    return grads


class GroupedExpertFFN(torch.autograd.Function):
    """Autograd wrapper: the whole grouped FFN is one node with the hand-written backward."""

    @staticmethod
    @amp_forward(cast_inputs=True)  # out= GEMMs: run in the autocast dtype, autocast off
    def forward(ctx, x_RM, w1_GMX, b1_GX, w2_GHM, b2_GM, sizes: tuple[int, ...], activation: Activation):
        w = ExpertWeights(w1_GMX, b1_GX, w2_GHM, b2_GM, activation)
        out, hpre = ffn_forward(x_RM, w, sizes)
        ctx.save_for_backward(x_RM, hpre, w1_GMX, b1_GX, w2_GHM, b2_GM)
        ctx.sizes, ctx.activation = sizes, activation
        return out

    @staticmethod
    @amp_backward
    def backward(ctx, grad_out_RM):
        x_RM, hpre, w1, b1, w2, b2 = ctx.saved_tensors
        w = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        needs = ctx.needs_input_grad
        grads = ffn_backward(
            grad_out_RM.contiguous(),
            x_RM,
            hpre,
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


# -- the whole local MoE step in one node --------------------------------------------------------------
#
# Legend: T tokens, N kept assignments (grouped by expert, `sizes` rows each), B rows of one block.
#
#     y_TM[t_n] += s_n * f_g(n)(x_TM[t_n])      (postscore)
#     y_TM[t_n] +=       f_g(n)(s_n * x_TM[t_n]) (prescore)
#
# Gathering the token rows, the grouped FFN, the gate scaling and the combine run block by block, so
# the only [N, *] tensor that lives from forward to backward is the pre-activation hpre_NX: the token
# rows are gathered again from x_TM (which the caller holds anyway), the activation is recomputed,
# and the gate weights' gradient is taken without the expert outputs:
#     d s_n = <gy_n, out_n> = <gy_n @ w2^T, act_n> + <gy_n, b2>,   gy_n = grad_y[t_n]
# since gy_n @ w2^T is the unscaled gradient of the activation, which backward computes anyway.


def _rowdot(a_BK: torch.Tensor, b_BK: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a_BK, b_BK, dim=1)


def _gather_rows(x_TM: torch.Tensor, token_B: torch.Tensor, scale_B: torch.Tensor | None) -> torch.Tensor:
    rows = x_TM.index_select(0, token_B)
    return rows if scale_B is None else rows.mul_(scale_B.unsqueeze(1))


def _moe_forward(x_TM, token_N, scale_N, w: ExpertWeights, sizes, *, is_postscore: bool, keep_hpre: bool):
    """(y_TM, hpre_NX); without a backward to come (keep_hpre False) hpre lives one block at a time."""
    y_TM = x_TM.new_zeros(x_TM.shape[0], w.w2_GHM.shape[2])
    X = w.w1_GMX.shape[2]
    hpre_NX = x_TM.new_empty(token_N.shape[0], X) if keep_hpre else None
    # s * (act @ w2) = (s * act) @ w2: the gate weight scales whichever of the two is narrower
    scale_act = is_postscore and _scales_activation(w)
    for block in _blocks(sizes, X):
        rows = slice(block.lo, block.hi)
        x_B = _gather_rows(x_TM, token_N[rows], None if is_postscore else scale_N[rows])
        hpre_B = hpre_NX[rows] if keep_hpre else x_B.new_empty(block.hi - block.lo, X)
        _block_linear(hpre_B, x_B, block, w.w1_GMX, w.b1_GX)
        act_B = activate_kept(w.activation, hpre_B)
        if scale_act:
            act_B.mul_(scale_N[rows].unsqueeze(1))
        out_B = x_B.new_empty(act_B.shape[0], y_TM.shape[1])
        _block_linear(out_B, act_B, block, w.w2_GHM, w.b2_GM)
        if is_postscore and not scale_act:
            out_B.mul_(scale_N[rows].unsqueeze(1))
        y_TM.index_add_(0, token_N[rows], out_B)
    return y_TM, hpre_NX


def _scales_activation(w: ExpertWeights) -> bool:
    """Whether the gate weight scales the activation rather than the expert output (postscore): where
    the activation is narrower (H < M), no output bias would need scaling too, and the activation is a
    tensor of its own that may be scaled in place (not ReLU's, the kept hpre itself, nor a custom
    one's, possibly a view of hpre)."""
    H, M = w.w2_GHM.shape[1:]
    return w.b2_GM is None and w.activation in ("gelu", "silu", "swiglu") and H < M


def _with_zero_row(t_TM: torch.Tensor) -> torch.Tensor:
    """t with one more row of zeros (row T): the row the padding slots read from and write to."""
    return torch.cat([t_TM, t_TM.new_zeros(1, t_TM.shape[1])])


class PackedMoE(torch.autograd.Function):
    """Gather -> grouped FFN -> gate scaling -> combine as one node that keeps only hpre (see above).

    padded: some slots are padding: their token index is T (one past the last token), a zero row
    appended to x and to the output gradient, and their outputs land in an extra row that is dropped.
    """

    @staticmethod
    @amp_forward(cast_inputs=True)  # out= GEMMs: run in the autocast dtype, autocast off
    def forward(
        ctx,
        x_TM,
        token_N,
        weight_N,
        w1,
        b1,
        w2,
        b2,
        sizes,
        activation: Activation,
        is_postscore: bool,
        keep_hpre: bool,
        padded: bool,
    ):
        w = ExpertWeights(w1, b1, w2, b2, activation)
        y_TM, hpre_NX = _moe_forward(
            _with_zero_row(x_TM) if padded else x_TM,
            token_N,
            weight_N.to(x_TM.dtype),
            w,
            sizes,
            is_postscore=is_postscore,
            keep_hpre=keep_hpre,
        )
        ctx.save_for_backward(x_TM, token_N, weight_N, hpre_NX, w1, b1, w2, b2)
        ctx.sizes, ctx.activation, ctx.is_postscore, ctx.padded = sizes, activation, is_postscore, padded
        return y_TM[: x_TM.shape[0]] if padded else y_TM

    @staticmethod
    @amp_backward
    def backward(ctx, grad_y_TM):
        x_TM, token_N, weight_N, hpre_NX, w1, b1, w2, b2 = ctx.saved_tensors
        w = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        sizes, post = ctx.sizes, ctx.is_postscore
        need_x, _, need_s = ctx.needs_input_grad[:3]
        need_w = any(ctx.needs_input_grad[3:7])
        grad_y_TM = grad_y_TM.contiguous().to(x_TM.dtype)
        T = x_TM.shape[0]
        if ctx.padded:  # re-padded here rather than kept from forward (one [T, M] copy each)
            x_TM, grad_y_TM = _with_zero_row(x_TM), _with_zero_row(grad_y_TM)
        scale_N = weight_N.to(x_TM.dtype)
        grad_x = torch.zeros_like(x_TM) if need_x else None
        grad_s = weight_N.new_zeros(weight_N.shape) if need_s else None
        gw1, gw2 = (_zeros_where_empty(w1, sizes), _zeros_where_empty(w2, sizes)) if need_w else (None, None)
        gb1, gb2 = (_zeros_where_empty(b1, sizes), _zeros_where_empty(b2, sizes)) if need_w else (None, None)
        scale_act = post and _scales_activation(w)
        for block in _blocks(sizes, hpre_NX.shape[1]):
            rows = slice(block.lo, block.hi)
            s_B1 = scale_N[rows].unsqueeze(1)
            gy_B = grad_y_TM.index_select(0, token_N[rows])  # gradient of the block's (scaled) outputs
            hpre_B = hpre_NX[rows]
            act_B, silu_gate_B = activation_from_kept(w.activation, hpre_B)
            grad_act = act_B.new_empty(act_B.shape)
            _block_linear(grad_act, gy_B, block, w.w2_GHM.transpose(1, 2), None)  # gy @ w2^T
            if post:
                if need_s:  # <gy, out> without out: <gy @ w2^T, act> + <gy, b2>
                    ds = _rowdot(grad_act, act_B)
                    if b2 is not None:
                        ds += _block_bias_dot(gy_B, b2, block)
                    grad_s[rows] = ds
                grad_act.mul_(s_B1)
            grad_h = activation_backward(w.activation, grad_act, hpre_B, act_B, silu_gate_RH=silu_gate_B)
            del grad_act, silu_gate_B
            if post and need_w:
                # w2's gradient (s * act)^T @ gy = act^T @ (s * gy): scale the narrower of the two
                if scale_act:
                    act_B.mul_(s_B1)
                else:
                    gy_B.mul_(s_B1)  # now the gradient of the unscaled expert outputs
            if need_w:
                _block_weight_grads(gw2, gb2, act_B, gy_B, block)
                x_B = _gather_rows(x_TM, token_N[rows], None if post else scale_N[rows])
                _block_weight_grads(gw1, gb1, x_B, grad_h, block)
                del x_B
            if need_x or (need_s and not post):
                gx_B = act_B.new_empty(block.hi - block.lo, x_TM.shape[1])
                _block_linear(gx_B, grad_h, block, w.w1_GMX.transpose(1, 2), None)
                if not post:  # the FFN's input was s * x: d s = <gx, x>, and x gets s * gx
                    if need_s:
                        grad_s[rows] = _rowdot(gx_B, x_TM.index_select(0, token_N[rows]))
                    gx_B.mul_(s_B1)
                if need_x:
                    grad_x.index_add_(0, token_N[rows], gx_B)
        if grad_x is not None and ctx.padded:
            grad_x = grad_x[:T]
        return grad_x, None, grad_s, gw1, gb1, gw2, gb2, None, None, None, None, None


def packed_moe(
    x_TM: torch.Tensor,
    token_N: torch.Tensor,
    weight_N: torch.Tensor,
    w: ExpertWeights,
    sizes: tuple[int, ...],
    *,
    is_postscore: bool = True,
) -> torch.Tensor:
    """Differentiable y_TM = the sum over kept assignments n of the gate-weighted expert outputs of
    token token_N[n]; assignments grouped by expert, sizes[g] of them for expert g (see above).

    Small, nearly equal groups are padded to the largest (see pays_to_pad), so that each block's GEMMs
    run as one batched GEMM."""
    if sum(sizes) != token_N.shape[0] or len(sizes) != w.num_groups:
        raise ValueError(f"sizes {sizes} must list {w.num_groups} groups summing to {token_N.shape[0]} rows")
    tensors = (x_TM, weight_N, w.w1_GMX, w.b1_GX, w.w2_GHM, w.b2_GM)
    # without a backward to come (inference) no [N, X] tensor outlives its block
    keep_hpre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    n = max(sizes, default=0)
    P = len(sizes) * n  # rows once every group is padded to n
    padded = pays_to_pad(P - token_N.shape[0], token_N.shape[0], n * w.w1_GMX.shape[2])
    if padded:
        slot_N = padded_slots(sizes, n, token_N.device)
        token_N = token_N.new_full((P,), x_TM.shape[0]).index_copy_(0, slot_N, token_N)
        weight_N = weight_N.new_zeros(P).index_copy(0, slot_N, weight_N)
        sizes = (n,) * len(sizes)
    return PackedMoE.apply(
        x_TM.contiguous(),
        token_N,
        weight_N,
        w.w1_GMX,
        w.b1_GX,
        w.w2_GHM,
        w.b2_GM,
        sizes,
        w.activation,
        is_postscore,
        keep_hpre,
        padded,
    )


# Padding the groups to the largest trades wasted GEMM rows for one batched GEMM per block instead of
# one GEMM (and one set of element-wise calls) per expert. That pays where several groups share a
# block. The op's fwd+bwd in bf16 on 2 cores: 32 or 64 experts of 250-500 rows (a group's hidden rows
# 0.25-0.5M elements) ran 4-8% faster with 3.5-13% padding; groups of 2M elements (8 experts of
# ~1,000 rows x 2,048) ran 3-7% slower with 4-8% padding, as each block holds one group either way.
_MAX_PADDING = 1 / 8
_PAD_GROUPS_UNDER = _BLOCK_ELEMENTS // 2  # elements of a group's hidden rows (n * X)


def pays_to_pad(padding_rows: int, rows: int, group_hidden: int) -> bool:
    """Whether to pad: `padding_rows` more than the `rows` kept, groups of `group_hidden` elements."""
    return 0 < padding_rows <= _MAX_PADDING * rows and group_hidden <= _PAD_GROUPS_UNDER


def padded_slots(sizes: tuple[int, ...], n: int, device: torch.device | str) -> torch.Tensor:
    """Where each of the sum(sizes) rows (grouped by expert) goes when every group is padded to n."""
    return concatenated_runs([g * n for g in range(len(sizes))], sizes, torch.device(device))
