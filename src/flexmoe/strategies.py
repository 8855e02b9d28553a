"""Strategy objects: each executes one plan's dispatch -> experts -> combine on the same shards.

Legend: T tokens, M model dim, N kept assignments (slot order), E experts.
"""

from __future__ import annotations

import torch

from flexmoe.dispatch import combine_packed, dispatch_packed
from flexmoe.experts import Experts
from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn
from flexmoe.routing import RoutingPlan


def run_packed(x_TM: torch.Tensor, routing: RoutingPlan, weights: ExpertWeights, *, is_postscore: bool):
    """All E experts on this rank's own tokens, touching only the kept rows (no padding)."""
    rows_NM = dispatch_packed(x_TM, routing, is_postscore=is_postscore)
    out_NM = grouped_expert_ffn(rows_NM, weights, tuple(routing.kept_counts))
    return combine_packed(out_NM, routing, is_postscore=is_postscore)


class LocalStrategy:
    """One process holds every expert: no communication at all."""

    capacity_multiple = 1

    def __init__(self, experts: Experts):
        assert experts.layout.world_size == 1
        self.experts = experts

    def __call__(self, x_TM: torch.Tensor, routing: RoutingPlan, *, is_postscore: bool) -> torch.Tensor:
        return run_packed(x_TM, routing, self.experts.local_weights(), is_postscore=is_postscore)
