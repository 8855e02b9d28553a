"""Strategy objects: each executes one plan's dispatch -> experts -> combine on the same shards.

Legend: T tokens, M model dim, N kept assignments (slot order), E experts, L local experts,
W ranks, s ranks per expert, g = s / r ranks per hidden block, h = H / s hidden columns of a shard,
X fc1 width of a shard (h, or 2h for swiglu), Cb buffer capacity.

No strategy moves, copies or re-lays a parameter: plans that need more of an expert than the shard
all-gather it into temporaries whose backward reduce-scatters onto the shards (ZeRO-style).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from flexmoe.core.dispatch import combine_packed, dispatch_packed, dispatch_to_rows, pad_rows, unpad_rows
from flexmoe.core.experts import Experts
from flexmoe.core.plans import Plan
from flexmoe.core.routing import RoutingPlan
from flexmoe.ops.expert_ffn import ExpertWeights, packed_moe
from flexmoe.parallel.chunks import chunk_layout
from flexmoe.parallel.comm import ExpertGroups, all_gather_shards
from flexmoe.parallel.pipeline import pipelined_expert_exchange
from flexmoe.parallel.token_exchange import TokenExchangeStrategy


def run_packed(x_TM: torch.Tensor, routing: RoutingPlan, weights: ExpertWeights, *, is_postscore: bool):
    """All E experts on this rank's own tokens, touching only the kept rows (no padding); one autograd
    node that keeps only the pre-activations for backward (ops.expert_ffn.packed_moe)."""
    return packed_moe(
        x_TM,
        routing.token_N,
        routing.weight_N,
        weights,
        tuple(routing.kept_counts),
        is_postscore=is_postscore,
    )


def _join_hidden_blocks(t_gEKX: torch.Tensor, activation: str, *, fc1: bool) -> torch.Tensor:
    """[g, E', K, X] gathered shards (g consecutive ranks, hidden slices in order) -> [E' / ..., K, g * X]."""
    g, E_, K, X = t_gEKX.shape
    if fc1 and activation == "swiglu":  # keep all gate columns before all up columns
        return t_gEKX.view(g, E_, K, 2, X // 2).permute(1, 2, 3, 0, 4).reshape(E_, K, g * X)
    return t_gEKX.permute(1, 2, 0, 3).reshape(E_, K, g * X)


# A shard can be a transposed view of its parameter (transformers' [E, X, M] experts read as fc1
# [E, M, X]). It is flattened, gathered and handed on in its memory order, so that the gathered
# weights are views with the shard's strides and the reduce-scattered gradient reaches the
# parameter contiguous, as every plan's gradients do (ops.expert_ffn._weight_grad_like).


def _memory_order(t: torch.Tensor) -> list[int]:
    """t's dims from outermost to innermost in memory, when t.permute(them) is contiguous (a dense
    view such as a transpose); otherwise t's own order."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else list(range(t.dim()))


def _stacked_like(flat_gN: torch.Tensor, t: torch.Tensor, order: list[int], size: int) -> torch.Tensor:
    """[size, numel] flattened in `order` -> [size, *t.shape], each shard with t's strides."""
    stacked = flat_gN.view(size, *(t.shape[d] for d in order))
    if order == sorted(order):
        return stacked
    # a straight copy out of the gathered buffer (whose rows interleave all the parameters) before
    # the permutation, so that the joins after it are views: a copy after it would transpose, which
    # made r = 0 steps on transformers' experts 6% slower on CPU
    back = [order.index(d) + 1 for d in range(t.dim())]
    return stacked.contiguous().permute(0, *back)


def gather_weights(experts: Experts, group, size: int, dtype: torch.dtype | None = None) -> ExpertWeights:
    """All-gather the shards of `size` consecutive ranks in ONE collective (backward: one
    reduce-scatter). With size == s the result is whole experts; with size == W, all E experts.
    `dtype`: the dtype gathered in (low precision under autocast: half the bytes); the gradients are
    reduce-scattered in the parameters' dtype."""
    L = experts.layout
    params = [
        p
        for p in (experts.fc1_weight, experts.fc1_bias, experts.fc2_weight, experts.fc2_bias)
        if p is not None
    ]
    orders = [_memory_order(p) for p in params]
    flat = torch.cat([p.permute(order).reshape(-1) for p, order in zip(params, orders, strict=True)])
    gathered = all_gather_shards(flat, group, dtype=dtype)  # [size, numel]
    pieces = iter(
        _stacked_like(piece, p, order, size)
        for piece, p, order in zip(
            gathered.split([p.numel() for p in params], dim=1), params, orders, strict=True
        )
    )
    w1 = next(pieces)
    b1 = next(pieces) if experts.has_bias else None
    w2 = next(pieces)
    b2 = next(pieces) if experts.has_bias else None
    s = L.shards_per_expert
    blocks = min(size, s)  # hidden slices joined per expert; the rest of `size` are whole experts
    experts_out = size // blocks * L.local_experts

    def per_expert(t: torch.Tensor) -> torch.Tensor:  # [size, L, ...] -> [experts_out, blocks, ...]
        return t.reshape(experts_out, blocks, *t.shape[2:]).transpose(0, 1)

    act = L.activation
    w1 = _join_hidden_blocks(per_expert(w1), act, fc1=True)
    w2 = per_expert(w2).permute(1, 0, 2, 3).reshape(experts_out, blocks * w2.shape[2], w2.shape[3])
    if b1 is not None:
        b1 = _join_hidden_blocks(per_expert(b1).unsqueeze(2), act, fc1=True).squeeze(1)
        b2 = per_expert(b2).permute(1, 0, 2).reshape(experts_out, -1)
    return ExpertWeights(w1, b1, w2, b2, experts.activation)  # the experts' own (code, for a host's)


class LocalStrategy:
    """Every expert on every rank's own tokens: one process, or r = 0 after an all-gather."""

    capacity_multiple = 1

    def __init__(self, experts: Experts, groups: ExpertGroups):
        self.experts, self.groups = experts, groups

    def weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        if self.groups.world_size == 1:
            return self.experts.local_weights(dtype)
        return gather_weights(self.experts, self.groups.group, self.groups.world_size, dtype)

    def __call__(
        self,
        x_TM: torch.Tensor,
        routing: RoutingPlan,
        *,
        is_postscore: bool,
        dtype: torch.dtype | None = None,
        beside: Callable[[], Any] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """(the routed experts' output, beside()). `dtype`: the expert compute dtype (x_TM's dtype when
        None; the layer passes autocast's). `beside`: other work (the shared experts); here, with no
        exchange to overlap, it simply runs after the experts."""
        with record_function("flexmoe.gather_weights"):
            weights = self.weights(dtype or x_TM.dtype)
        with record_function("flexmoe.experts"):
            y_TM = run_packed(x_TM, routing, weights, is_postscore=is_postscore)
        return y_TM, None if beside is None else beside()


class ExpertParallelStrategy:
    """r >= 1: tokens go to the experts by all-to-all (pipelined in d chunks). When E < W the s ranks
    of an expert form r groups of g = s / r; each group all-gathers its hidden slices (H / r per rank)
    and splits the tokens among its g ranks; the r partial results are summed at the sender."""

    def __init__(self, experts: Experts, groups: ExpertGroups, plan: Plan):
        layout = experts.layout
        s = layout.shards_per_expert
        assert plan.r >= 1 and s % plan.r == 0, plan
        self.experts, self.groups, self.plan = experts, groups, plan
        self.ranks_per_block = s // plan.r  # g
        self.block_index = layout.shard_index // self.ranks_per_block  # q: which H / r block
        self.capacity_multiple = self.ranks_per_block * plan.d

    def weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        g, L = self.ranks_per_block, self.experts.layout
        if L.shards_per_expert == 1:
            return self.experts.local_weights(dtype)
        w = gather_weights(self.experts, self.groups.block_group(g), g, dtype)
        if w.b2_GM is None or self.plan.r == 1:
            return w
        # the g ranks of block q hold the fc2 bias columns of block q: each block adds its own columns,
        # so the r partial sums add the whole bias exactly once
        M, q = L.model_dim, self.block_index
        width = w.b2_GM.shape[1]
        b2 = F.pad(w.b2_GM, (q * width, M - (q + 1) * width))
        return ExpertWeights(w.w1_GMX, w.b1_GX, w.w2_GHM, b2, w.activation)

    def __call__(
        self,
        x_TM: torch.Tensor,
        routing: RoutingPlan,
        *,
        is_postscore: bool,
        dtype: torch.dtype | None = None,
        beside: Callable[[], Any] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """(the routed experts' output, beside()); `beside` runs while the tokens are in flight, and its
        backward while their gradients are (pipeline.pipelined_expert_exchange)."""
        layout, r, d = self.experts.layout, self.plan.r, self.plan.d
        W, L, M = layout.world_size, layout.local_experts, layout.model_dim
        E, Cb = layout.num_experts, routing.buffer_capacity
        # the [E, r * Cb] buffer seen as W * L blocks of Cp rows: with E < W an expert's rows span ranks
        Cp = E * r * Cb // (W * L)
        with record_function("flexmoe.dispatch"):
            slot_N = routing.slot_N // Cb * (r * Cb) + routing.slot_N % Cb  # row of [E, r * Cb]
            filled_EC = torch.arange(Cb, device=x_TM.device) < routing.kept_E.to(x_TM.device).unsqueeze(1)
            if r > 1:  # every block of hidden columns sees every token: r copies, at positions q * Cb + j
                slot_N = (slot_N + torch.arange(r, device=x_TM.device).unsqueeze(1) * Cb).view(-1)
                filled_EC = filled_EC.repeat(1, r)
            rows_layout = chunk_layout(
                filled_EC.view(W * L, Cp).sum(-1),
                world_size=W,
                capacity=Cp,
                d=d,
                algorithm=self.plan.all_to_all,
            )
            row_N = rows_layout.rows(slot_N)
            if is_postscore:  # one gather of the token rows into the send buffer
                send_SM = dispatch_to_rows(x_TM, routing.token_N.repeat(r), row_N, rows_layout.num_rows)
            else:  # the rows scaled by their gate weights first
                scaled_NM = dispatch_packed(x_TM, routing, is_postscore=False)
                send_SM = pad_rows(scaled_NM.repeat(r, 1), row_N, rows_layout.num_rows)
        with record_function("flexmoe.gather_weights"):
            weights = self.weights(dtype or x_TM.dtype)
        with record_function("flexmoe.exchange"):  # all-to-alls and the experts, pipelined
            ret_SM, side = pipelined_expert_exchange(
                send_SM, rows_layout, weights, self.groups, beside=beside
            )
        with record_function("flexmoe.combine"):
            out_NM = unpad_rows(ret_SM, row_N)
            if r > 1:  # the r blocks' partial sums
                out_NM = out_NM.view(r, -1, M).sum(0)
            return combine_packed(out_NM, routing, is_postscore=is_postscore), side


def build_strategy(plan: Plan, experts: Experts, groups: ExpertGroups):
    if groups.world_size == 1 or plan.r == 0:
        return LocalStrategy(experts, groups)
    if plan.all_to_all == "dedup":
        return TokenExchangeStrategy(experts, groups, plan)
    return ExpertParallelStrategy(experts, groups, plan)
