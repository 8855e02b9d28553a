"""Routing, capacity and dispatch/combine semantics: hand-built cases and property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import RoutingConfig, combine, dispatch, route
from flexmoe.core.dispatch import combine_packed, dispatch_packed
from flexmoe.core.routing import assign_slots, choose_experts


def _logits_for(choices: list[list[int]], E: int) -> torch.Tensor:
    """Logits whose ranking per token is exactly `choices` (first choice highest)."""
    logits = torch.full((len(choices), E), -10.0)
    for t, ranked in enumerate(choices):
        for j, e in enumerate(ranked):
            logits[t, e] = 5.0 - j
    return logits


def test_first_choices_take_priority_over_second_choices():
    # 4 tokens, 2 experts, k=2, capacity 1.0 -> C = ceil(2 * 1 * 4 / 2) = 4; use cf=0.5 -> C = 2
    logits = _logits_for([[0, 1], [0, 1], [0, 1], [1, 0]], 2)
    plan = route(logits, RoutingConfig(num_experts=2, top_k=2, capacity_factor=0.5))
    assert plan.capacity == 2
    kept = plan.kept_TK.tolist()
    # expert 0: first choices of tokens 0, 1 keep slots 0, 1; token 2's first choice is dropped,
    # and token 3's second choice is dropped too. expert 1: token 3 first (slot 0), then token 0 second.
    assert kept == [[True, True], [True, False], [False, False], [True, False]]
    assert plan.locations_TK[3, 0] == 0 and plan.locations_TK[0, 1] == 1
    assert plan.kept_E.tolist() == [2, 2] and plan.demand_E.tolist() == [4, 4]


def test_batch_prioritized_routing_keeps_the_most_confident_tokens():
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])  # all prefer expert 0
    cfg = RoutingConfig(num_experts=2, top_k=1, capacity_factor=2 / 3)  # C = ceil(1 * 2/3 * 3 / 2) = 1
    plain = route(logits, cfg)
    assert plain.capacity == 1 and plain.kept_TK[:, 0].tolist() == [True, False, False]
    bpr = route(
        logits, RoutingConfig(num_experts=2, top_k=1, capacity_factor=2 / 3, batch_prioritized_routing=True)
    )
    assert bpr.kept_TK[:, 0].tolist() == [False, True, False]


def test_batch_prioritized_ties_keep_token_order():
    logits = torch.zeros(4, 2)
    logits[:, 0] = 1.0
    plan = route(
        logits, RoutingConfig(num_experts=2, top_k=1, capacity_factor=1.0, batch_prioritized_routing=True)
    )
    assert plan.capacity == 2 and plan.kept_TK[:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("cf,want", [(1.0, 3), (0.0, 5), (-1.0, 3), (-5.0, 5), (0.01, 1)])
def test_capacity_modes(cf, want):
    logits = _logits_for([[0]] * 5 + [[1]], 2)  # demand: expert 0 -> 5, expert 1 -> 1; T=6, k=1
    plan = route(logits, RoutingConfig(num_experts=2, top_k=1, capacity_factor=cf))
    assert plan.capacity == want
    assert plan.kept_E.tolist() == [min(5, want), 1]


def test_capacity_agreement_and_buffer_padding_do_not_change_kept_set():
    logits = torch.randn(40, 4)
    cfg = RoutingConfig(num_experts=4, top_k=2, capacity_factor=0.5)
    base = route(logits, cfg)
    padded = route(logits, cfg, capacity_multiple=8)
    assert padded.buffer_capacity % 8 == 0 and padded.buffer_capacity >= padded.capacity == base.capacity
    assert torch.equal(base.kept_TK, padded.kept_TK)
    # a group's capacity (larger than this process's) keeps a superset, in the same queue order
    choices = choose_experts(logits, cfg)
    assert choices.capacity(cfg.capacity_factor) == base.capacity
    agreed = assign_slots(choices, base.capacity + 3)
    assert agreed.capacity == base.capacity + 3
    assert bool((agreed.kept_TK | ~base.kept_TK).all()) and agreed.kept_E.sum() > base.kept_E.sum()
    assert torch.equal(agreed.locations_TK, base.locations_TK)


def test_normalized_weights_sum_to_one():
    plan = route(torch.randn(10, 6), RoutingConfig(num_experts=6, top_k=3))
    torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(10))
    unnorm = route(torch.randn(10, 6), RoutingConfig(num_experts=6, top_k=3, normalize_gate=False))
    assert (unnorm.weights_TK.sum(-1) < 1).all()


def test_no_one_hot_routing_tensors():
    plan = route(torch.randn(64, 16), RoutingConfig(num_experts=16, top_k=2))
    for name in ("token_N", "slot_N", "weight_N", "experts_TK", "locations_TK"):
        assert getattr(plan, name).dim() <= 2 and getattr(plan, name).numel() <= 64 * 2


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 40),
    E=st.integers(1, 9),
    k=st.integers(1, 4),
    cf=st.sampled_from([0.0, 0.3, 1.0, 2.5, -0.5, -2.0]),
    bpr=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_routing_properties(T, E, k, cf, bpr, seed):
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    plan = route(
        logits, RoutingConfig(num_experts=E, top_k=k, capacity_factor=cf, batch_prioritized_routing=bpr)
    )
    C = plan.capacity
    kept = plan.kept_TK
    assert (plan.locations_TK[kept] < C).all()
    assert (plan.kept_E <= C).all() and int(plan.kept_E.sum()) == int(kept.sum())
    if cf == 0:
        assert bool(kept.all()), "dropless drops nothing"
    if cf > 0:
        assert max(1, min(T, math.ceil(k * cf * T / E))) == C
    # each expert's kept slots are exactly 0 .. kept_E - 1 (no gaps, no duplicates)
    for e in range(E):
        locs = sorted(plan.locations_TK[kept & (plan.experts_TK == e)].tolist())
        assert locs == list(range(int(plan.kept_E[e])))
    # dispatch -> identity experts -> combine with unit scores returns each kept token exactly
    M = 3
    x = torch.randn(T, M, generator=gen, dtype=torch.float64)
    unit = plan.__class__(**{**plan.__dict__, "weight_N": torch.ones_like(plan.weight_N)})
    buffer = dispatch(x, unit)
    assert buffer.shape == (E, plan.buffer_capacity, M)
    y = combine(buffer, unit)
    times_kept = kept.sum(1, keepdim=True).to(x.dtype)
    torch.testing.assert_close(y, x * times_kept, rtol=0, atol=0)
    torch.testing.assert_close(combine_packed(dispatch_packed(x, unit), unit), y, rtol=0, atol=0)


def test_dispatch_combine_gradients_reach_x_and_scores():
    logits = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    for post in (True, False):
        plan = route(logits, RoutingConfig(num_experts=4, top_k=2, capacity_factor=0.75))
        y = combine(dispatch(x, plan, is_postscore=post) * 2.0, plan, is_postscore=post)
        gx, gl = torch.autograd.grad(y.pow(2).sum(), [x, logits])
        assert gx.abs().sum() > 0 and gl.abs().sum() > 0


def test_bad_routing_arguments():
    with pytest.raises(ValueError, match="top_k"):
        RoutingConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        RoutingConfig(num_experts=0)
    with pytest.raises(ValueError, match="logits"):
        route(torch.randn(3, 5), RoutingConfig(num_experts=4))
