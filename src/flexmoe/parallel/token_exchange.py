"""r = 1 with each token sent once to each rank that holds any of its experts (all_to_all "dedup").

Legend: T tokens of this rank, M model dim, W ranks, L local experts (whole experts, E >= W),
N kept assignments (grouped by expert, so by destination rank), S token rows sent (one per token and
destination rank), R token rows received, Q assignments received.

The per-assignment exchange ("flat", "2dh") sends a token once per chosen expert: with top-k routing
over few ranks most copies go to the same rank (k = 8 over W = 2: about 4 copies of every token to
the other rank). Here a rank receives each token once, with the token's assignments to its experts
(row, gate weight), runs its experts on them and sums a token's weighted outputs before sending one
row back, so both directions carry rows per (token, rank) instead of per (token, expert):

    x_TM --rows S--> x_RM --assignments Q, grouped by local expert--> grouped FFN, weighted, summed
         per received token (ops.expert_ffn.packed_moe) --> y_RM --rows back--> y_TM (index_add)

One exchange of counts (per destination: tokens, and assignments per local expert) lets every rank
size its buffers; reading them is the strategy's one host sync. Not pipelined (d = 1); whole experts
only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import record_function

from flexmoe.core.experts import Experts
from flexmoe.core.plans import Plan
from flexmoe.core.routing import RoutingPlan
from flexmoe.ops.expert_ffn import ExpertWeights, packed_moe
from flexmoe.ops.runs import expert_major, host_ints_to, starts_of
from flexmoe.parallel.comm import ExpertGroups, all_to_all_rows


class TokenExchangeStrategy:
    """Plan(r=1, d=1, all_to_all="dedup") on whole experts (E >= W)."""

    capacity_multiple = 1

    def __init__(self, experts: Experts, groups: ExpertGroups, plan: Plan):
        layout = experts.layout
        assert plan.r == 1 and plan.d == 1 and layout.shards_per_expert == 1, plan
        self.experts, self.groups, self.plan = experts, groups, plan

    def weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        return self.experts.local_weights(dtype)

    def __call__(
        self,
        x_TM: torch.Tensor,
        routing: RoutingPlan,
        *,
        is_postscore: bool,
        dtype: torch.dtype | None = None,
        beside: Callable[[], Any] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """(the routed experts' output, beside()); `beside` runs after the exchange."""
        layout, groups = self.experts.layout, self.groups
        W, L, T = layout.world_size, layout.local_experts, x_TM.shape[0]
        device = x_TM.device
        with record_function("flexmoe.dispatch"):
            expert_N = routing.slot_N // routing.buffer_capacity
            rank_N = expert_N // L
            sent_WT = torch.zeros(W, T, dtype=torch.bool, device=device)
            sent_WT[rank_N, routing.token_N] = True
            row_WT = sent_WT.cumsum(1) - 1  # a sent token's row within its destination's block
            counts_WK = torch.cat([sent_WT.sum(1, keepdim=True), routing.kept_E.to(device).view(W, L)], 1)
            recv_WK = groups.all_to_all_start(counts_WK, "flat").wait()
            # per rank j: [tokens, assignments to each of the L local experts], sent to j / received from j
            sent_to, received_from = torch.stack([counts_WK, recv_WK]).tolist()
        with record_function("flexmoe.exchange"):
            sent, received = [c[0] for c in sent_to], [c[0] for c in received_from]
            assignments_out = [sum(c[1:]) for c in sent_to]
            assignments_in = [sum(c[1:]) for c in received_from]
            token_S = torch.nonzero_static(sent_WT.view(-1), size=sum(sent)).squeeze(1) % max(T, 1)
            compute = x_TM.to(dtype or x_TM.dtype)
            x_RM = all_to_all_rows(compute.index_select(0, token_S), groups, sent, received)
            # per assignment its token's row in the block sent to that rank and its gate weight, in
            # one message: float64 holds both exactly (rows < 2^53), and the weight's gradient returns
            row_N, weight_N = row_WT[rank_N, routing.token_N], routing.weight_N
            meta_N2 = torch.stack([row_N.to(torch.float64), weight_N.to(torch.float64)], 1)
            meta_Q2 = all_to_all_rows(meta_N2, groups, assignments_out, assignments_in)
            row_Q, weight_Q = meta_Q2[:, 0].long(), meta_Q2[:, 1].to(weight_N.dtype)
        with record_function("flexmoe.experts"):
            # received assignments come per source rank, each grouped by local expert: regroup them by
            # local expert (then source rank), their rows offset into the received token rows
            order_Q = expert_major([c[1:] for c in received_from], device)
            token_start_W, assignments_W = host_ints_to([starts_of(received), assignments_in], device)
            base_Q = torch.repeat_interleave(token_start_W, assignments_W, output_size=sum(assignments_in))
            y_RM = packed_moe(
                x_RM,
                (row_Q + base_Q).index_select(0, order_Q),
                weight_Q.index_select(0, order_Q),
                self.weights(compute.dtype),
                tuple(sum(c[1 + e] for c in received_from) for e in range(L)),
                is_postscore=is_postscore,
            )
        with record_function("flexmoe.combine"):
            y_SM = all_to_all_rows(y_RM, groups, received, sent)
            y_TM = y_SM.new_zeros(T, y_SM.shape[1]).index_add(0, token_S, y_SM)
        return y_TM, None if beside is None else beside()
