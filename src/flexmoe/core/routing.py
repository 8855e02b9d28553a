"""Routing: gate logits -> which expert slot every token assignment takes (DESIGN section 2).

Legend: T tokens, E experts, k choices per token, P = k * T assignments in priority order,
N kept assignments (in slot order, i.e. grouped by expert), C capacity, Cb buffer capacity (C padded).

Priority order is (choice j, then token position); with batch-prioritized routing the token position
is replaced by the token's rank in descending top-1 score. An assignment keeps a slot if fewer than C
earlier assignments went to the same expert. Locations come from one stable sort by expert id, so the
cost is O(P log P) and no [T, E] or [T, E, C] mask is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexmoe.core.config import RoutingConfig, check_finite_number, check_positive_int


@dataclass(frozen=True)
class RoutingPlan:
    """Where every token goes; produced by `route`, consumed by dispatch/combine and the plans."""

    num_tokens: int
    num_experts: int
    top_k: int
    capacity: int  # C: the bound that decides drops
    buffer_capacity: int  # Cb >= C: rows per expert in the dispatched [E, Cb, M] buffer
    experts_TK: torch.Tensor  # chosen expert of each assignment
    locations_TK: torch.Tensor  # slot within the expert (>= capacity means dropped)
    weights_TK: torch.Tensor  # gate weights (differentiable), float32/float64
    demand_E: torch.Tensor  # assignments per expert before capacity
    kept_E: torch.Tensor  # assignments per expert after capacity (the expert GEMM rows)
    token_N: torch.Tensor  # token of every kept assignment, grouped by expert, in slot order
    slot_N: torch.Tensor  # expert * Cb + location of every kept assignment
    weight_N: torch.Tensor  # gate weight of every kept assignment (differentiable)
    aux_loss: torch.Tensor  # scalar, differentiable

    @property
    def kept_TK(self) -> torch.Tensor:
        return self.locations_TK < self.capacity

    @property
    def kept_counts(self) -> list[int]:
        return self.kept_E.tolist()


def capacity_for(
    capacity_factor: float, *, top_k: int, num_tokens: int, num_experts: int, max_demand: int
) -> int:
    """Capacity per (rank, expert) before group agreement; at least 1 so buffers are never empty.

    Never more than T: top-k experts are distinct, so no expert receives more than T assignments and
    a larger C would only allocate empty slots (cf=1e6 would otherwise ask for millions of rows).
    """
    if capacity_factor > 0:
        return max(1, min(num_tokens, math.ceil(top_k * capacity_factor * num_tokens / num_experts)))
    if capacity_factor == 0:
        return max(1, max_demand)
    bound = math.ceil(top_k * -capacity_factor * num_tokens / num_experts)
    return max(1, min(max_demand, bound))


def _cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    if v_E.numel() < 2:
        return v_E.sum() * 0
    return v_E.var() / (v_E.mean() ** 2 + 1e-10)


def balancing_loss(
    config: RoutingConfig,
    clean_TE: torch.Tensor,
    noisy_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    noise_std: float,
) -> torch.Tensor:
    T, E = scores_TE.shape
    if T == 0 or E == 1:
        loss = scores_TE.sum() * 0
    elif config.aux_loss == "gshard":
        top1_share_E = torch.bincount(experts_TK[:, 0], minlength=E).to(scores_TE.dtype) / T
        loss = E * torch.sum(scores_TE.mean(0) * top1_share_E)
    else:  # importance_load (Swin-MoE): balance both the summed scores and the noisy-top-k load
        importance_E = scores_TE.sum(0)
        if noise_std > 0:
            # P(expert e stays in the top k under fresh noise): Normal CDF of the clean logit's margin
            # over the k-th largest noisy logit of the token.
            threshold_T1 = noisy_TE.topk(config.top_k, dim=-1).values[:, -1:]
            normal = torch.distributions.Normal(0.0, noise_std)
            load_E = normal.cdf(clean_TE - threshold_T1).sum(0)
        else:  # no noise (eval): the hard load, which carries no gradient
            load_E = torch.bincount(experts_TK.reshape(-1), minlength=E).to(scores_TE.dtype)
        loss = (_cv_squared(importance_E) + _cv_squared(load_E)) / 2
    if config.router_z_loss > 0 and T > 0:
        loss = loss + config.router_z_loss * torch.logsumexp(noisy_TE, dim=-1).pow(2).mean()
    return loss


@dataclass(frozen=True)
class ExpertChoices:
    """The router's decision before capacity: each token's top-k experts and weights, and each
    assignment's place in its expert's queue. The capacity is decided after this (by the group, in a
    layer), then `assign_slots` keeps the first C of every queue."""

    num_experts: int
    experts_TK: torch.Tensor  # chosen expert of each assignment
    weights_TK: torch.Tensor  # gate weights (differentiable)
    order_T: torch.Tensor  # token priority (token position, or batch-prioritized rank)
    experts_P: torch.Tensor  # expert of each assignment in priority order (all first choices, ...)
    by_expert_P: torch.Tensor  # the assignments stably sorted by expert
    location_P: torch.Tensor  # place in its expert's queue
    demand_E: torch.Tensor  # assignments per expert before capacity
    aux_loss: torch.Tensor  # scalar, differentiable

    def capacity(self, capacity_factor: float) -> int:
        """This process's capacity per expert for `capacity_factor` (DESIGN section 2), before any
        agreement across ranks. One host synchronisation when it depends on the demand (cf <= 0)."""
        T, k = self.experts_TK.shape
        max_demand = int(self.demand_E.max()) if T > 0 and capacity_factor <= 0 else 0
        return capacity_for(
            capacity_factor, top_k=k, num_tokens=T, num_experts=self.num_experts, max_demand=max_demand
        )


def choose_experts(
    logits_TE: torch.Tensor,
    config: RoutingConfig,
    *,
    training: bool = False,
    selection_bias_E: torch.Tensor | None = None,
) -> ExpertChoices:
    """Top-k experts, weights and queue places of T tokens given their clean gate logits [T, E].

    `selection_bias_E` (aux-loss-free balancing) is added to the scores to choose experts only."""
    if logits_TE.dim() != 2 or logits_TE.shape[1] != config.num_experts:
        raise ValueError(f"logits must be [T, {config.num_experts}], got {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    k = config.top_k
    noise_std = config.gate_noise / E if training else 0.0
    noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std if noise_std > 0 else logits_TE
    if config.score_function == "sigmoid":
        scores_TE = torch.sigmoid(noisy_TE)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)  # what the balancing losses see
    else:
        scores_TE = probs_TE = torch.softmax(noisy_TE, dim=-1)
    top_TK, experts_TK = _select(scores_TE, config, selection_bias_E)
    renormalize = config.normalize_gate and k > 1
    weights_TK = top_TK / top_TK.sum(-1, keepdim=True) if renormalize else top_TK
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor

    order_T = None
    if config.batch_prioritized_routing:
        order_T = torch.argsort(-top_TK[:, 0].detach(), stable=True)
    return _queue(
        experts_TK,
        weights_TK,
        num_experts=E,
        order_T=order_T,
        aux_loss=balancing_loss(config, logits_TE, noisy_TE, probs_TE, experts_TK, noise_std),
    )


def route(
    logits_TE: torch.Tensor,
    config: RoutingConfig,
    *,
    training: bool = False,
    capacity_multiple: int = 1,
    selection_bias_E: torch.Tensor | None = None,
) -> RoutingPlan:
    """Route T tokens given their clean gate logits [T, E], with this process's capacity.

    `capacity_multiple` pads the buffer capacity (never the drop bound) for chunked pipelines and
    sharded experts. A layer on several ranks runs the two halves itself (`choose_experts`, then
    `assign_slots` with the group's capacity)."""
    choices = choose_experts(logits_TE, config, training=training, selection_bias_E=selection_bias_E)
    return assign_slots(
        choices, choices.capacity(config.capacity_factor), capacity_multiple=capacity_multiple
    )


def _select(
    scores_TE: torch.Tensor, config: RoutingConfig, bias_E: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token (descending) and their scores. The bias and the group limit change
    which experts are chosen, never the chosen scores (those stay differentiable)."""
    k, G = config.top_k, config.num_groups
    limited = config.top_k_groups is not None and config.top_k_groups < G
    if bias_E is None and not limited:
        return scores_TE.topk(k, dim=-1)
    choice_TE = scores_TE.detach()
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.to(choice_TE.dtype)
    if limited:
        # a group's score is the sum of its two best (biased) scores; keep the top_k_groups groups
        T, E = choice_TE.shape
        per_group = E // G
        grouped_TGS = choice_TE.view(T, G, per_group)
        group_TG = grouped_TGS.topk(min(2, per_group), dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(config.top_k_groups, dim=-1).indices, True)
        choice_TE = grouped_TGS.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
    experts_TK = choice_TE.topk(k, dim=-1).indices
    return scores_TE.gather(1, experts_TK), experts_TK


def _queue(
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    num_experts: int,
    order_T: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
) -> ExpertChoices:
    """Queue places for given choices (expert ids [T, k], weights [T, k]); `order_T` is the token
    priority (None: token position). Shared by the layer's router and routing given from outside."""
    T, k = experts_TK.shape
    device = experts_TK.device
    if order_T is None:
        order_T = torch.arange(T, device=device)
    experts_P = experts_TK[order_T].t().reshape(-1)  # j-major: all first choices, then second ...
    demand_E = torch.bincount(experts_P, minlength=num_experts)
    by_expert_P = torch.argsort(experts_P, stable=True)
    starts_E = torch.cumsum(demand_E, 0) - demand_E
    location_P = torch.empty_like(experts_P)
    location_P[by_expert_P] = torch.arange(k * T, device=device) - starts_E[experts_P[by_expert_P]]
    return ExpertChoices(
        num_experts=num_experts,
        experts_TK=experts_TK,
        weights_TK=weights_TK,
        order_T=order_T,
        experts_P=experts_P,
        by_expert_P=by_expert_P,
        location_P=location_P,
        demand_E=demand_E,
        aux_loss=weights_TK.sum() * 0 if aux_loss is None else aux_loss,
    )


def assign_slots(choices: ExpertChoices, capacity: int, *, capacity_multiple: int = 1) -> RoutingPlan:
    """Keep the first `capacity` assignments of every expert's queue: the slots of the kept ones."""
    check_positive_int("capacity", capacity)
    check_positive_int("capacity_multiple", capacity_multiple)
    c = choices
    T, k = c.experts_TK.shape
    C = capacity
    Cb = -(-C // capacity_multiple) * capacity_multiple
    kept_sorted = c.by_expert_P[c.location_P[c.by_expert_P] < C]  # kept positions, in slot order
    token_N = c.order_T[kept_sorted % T] if T > 0 else kept_sorted
    choice_N = kept_sorted // max(T, 1)
    slot_N = c.experts_P[kept_sorted] * Cb + c.location_P[kept_sorted]
    locations_TK = torch.empty_like(c.experts_TK)
    locations_TK[c.order_T] = c.location_P.view(k, T).t()
    return RoutingPlan(
        num_tokens=T,
        num_experts=c.num_experts,
        top_k=k,
        capacity=C,
        buffer_capacity=Cb,
        experts_TK=c.experts_TK,
        locations_TK=locations_TK,
        weights_TK=c.weights_TK,
        demand_E=c.demand_E,
        kept_E=torch.clamp(c.demand_E, max=C),
        token_N=token_N,
        slot_N=slot_N,
        weight_N=c.weights_TK[token_N, choice_N],
        aux_loss=c.aux_loss,
    )


def choices_from_topk(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> ExpertChoices:
    """Routing computed by any router (expert ids [T, k], weights [T, k]) as queue places; priority
    is (choice j, token position) as in `route`. The weights stay differentiable (the router's
    gradient flows through them); the aux loss is zero (the outside router owns its balancing)."""
    check_positive_int("num_experts", num_experts)
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be a [T, k] tensor, got {_shape_of(top_k_index)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index must hold integer expert ids, got dtype {top_k_index.dtype}")
    if not isinstance(top_k_weights, torch.Tensor) or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(
            f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, "
            f"got {_shape_of(top_k_weights)}"
        )
    if not top_k_weights.is_floating_point():
        raise ValueError(f"top_k_weights must be floating point, got dtype {top_k_weights.dtype}")
    if top_k_index.shape[1] == 0:
        raise ValueError("top_k_index must hold at least one choice per token (k >= 1)")
    experts_TK = top_k_index.long()
    if experts_TK.numel() and (int(experts_TK.min()) < 0 or int(experts_TK.max()) >= num_experts):
        raise ValueError(
            f"top_k_index must hold expert ids in [0, {num_experts}), got "
            f"[{int(experts_TK.min())}, {int(experts_TK.max())}]"
        )
    return _queue(experts_TK, top_k_weights, num_experts=num_experts)


def routing_from_topk(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    *,
    capacity_factor: float = 0.0,
    capacity_multiple: int = 1,
) -> RoutingPlan:
    """Routing computed by any router (expert ids [T, k], weights [T, k]) -> a RoutingPlan with this
    process's capacity; dropless by default (capacity_factor 0). See `choices_from_topk`."""
    check_finite_number("capacity_factor", capacity_factor)
    choices = choices_from_topk(top_k_index, top_k_weights, num_experts)
    return assign_slots(choices, choices.capacity(capacity_factor), capacity_multiple=capacity_multiple)


def _shape_of(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
