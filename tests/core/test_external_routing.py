"""Routing given from outside (any router's top-k ids and weights): routing_from_topk and
MoELayer(x, top_k_index=..., top_k_weights=...) against a per-token loop, on one process and on
2 gloo ranks under every plan (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan, routing_from_topk
from flexmoe.core.layout import ExpertLayout, divisors
from flexmoe.testing.distributed import DistributedPool
from flexmoe.testing.reference import reference_moe_from_choices

M, H = 6, 10
EXPERT_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _choices(T: int, E: int, k: int, seed: int):
    """k distinct experts per token (random order) and positive weights that need not sum to 1."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else None
    if experts is None:
        experts = torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1
    return experts, weights


def _layer(E, k, cf, act, *, bias=True, post=True, seed=0) -> MoELayer:
    return MoELayer(
        M,
        H,
        E,
        top_k=k,
        capacity_factor=cf,
        gate=None,
        activation=act,
        bias=bias,
        is_postscore=post,
        seed=seed,
        dtype=torch.float64,
    )


@pytest.mark.parametrize("cf", [0.0, 1.0, 0.5, -0.75])
@pytest.mark.parametrize(
    "k,act,bias,post", [(1, "gelu", True, True), (2, "swiglu", False, True), (3, "relu", True, False)]
)
def test_layer_with_outside_routing_matches_per_token_loop(cf, k, act, bias, post):
    E, T = 5, 13
    layer = _layer(E, k, cf, act, bias=bias, post=post, seed=k)
    x = torch.randn(T, M, dtype=torch.float64, requires_grad=True)
    experts, weights = _choices(T, E, k, seed=7 * k)
    weights.requires_grad_(True)
    y = layer(x, top_k_index=experts, top_k_weights=weights)
    params = {n: getattr(layer.experts, n) for n in EXPERT_NAMES}
    want, C = reference_moe_from_choices(x, experts, weights, params, cf=cf, postscore=post, act=act)
    assert layer.last_plan.capacity == C
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    probe = torch.randn_like(y)
    leaves = [x, weights] + [p for p in params.values() if p is not None]
    got_g = torch.autograd.grad((y * probe).sum(), leaves)
    want_g = torch.autograd.grad((want * probe).sum(), leaves)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert float(layer.aux_loss.detach()) == 0.0


def test_dropless_by_default_and_capacity_priority():
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    weights = torch.rand(4, 2)
    plan = routing_from_topk(experts, weights, 3)
    assert plan.capacity == 4 and bool(plan.kept_TK.all())
    assert plan.demand_E.tolist() == [4, 3, 1]
    capped = routing_from_topk(experts, weights, 3, capacity_factor=0.5)  # C = ceil(2 * .5 * 4 / 3) = 2
    # first choices first: expert 0 keeps tokens 0, 1 (token 2's first choice is dropped); expert 1
    # keeps token 3's first choice, then token 0's second (token 1's second is dropped)
    assert capped.capacity == 2
    assert capped.kept_TK.tolist() == [[True, True], [True, False], [False, True], [True, False]]
    padded = routing_from_topk(experts, weights, 3, capacity_multiple=4)
    assert padded.buffer_capacity == 4 and torch.equal(padded.kept_TK, plan.kept_TK)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3), 4), "top_k_index must be a \\[T, k\\]"),
        ((torch.zeros(3, 2), torch.zeros(3, 2), 4), "integer expert ids"),
        ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 1), 4), "top_k_weights must have"),
        ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 4), "floating point"),
        ((torch.full((3, 2), 4), torch.zeros(3, 2), 4), "expert ids in \\[0, 4\\)"),
        ((torch.full((3, 2), -1), torch.zeros(3, 2), 4), "expert ids in \\[0, 4\\)"),
        ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), 0), "num_experts"),
    ],
)
def test_routing_from_topk_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        routing_from_topk(*args)


def test_layer_rejects_inconsistent_outside_routing():
    layer = _layer(4, 2, 0.0, "gelu")
    x = torch.randn(5, M, dtype=torch.float64)
    experts, weights = _choices(5, 4, 2, seed=1)
    with pytest.raises(ValueError, match="no gate"):
        layer(x)
    with pytest.raises(ValueError, match="given together"):
        layer(x, top_k_index=experts)
    with pytest.raises(ValueError, match="T=5"):
        layer(x, top_k_index=experts[:4], top_k_weights=weights[:4])
    # a layer with its own gate may still be routed from outside
    gated = MoELayer(M, H, 4, capacity_factor=0.0, seed=0, dtype=torch.float64).double()
    y = gated(x, top_k_index=experts, top_k_weights=weights)
    params = {n: getattr(gated.experts, n) for n in EXPERT_NAMES}
    torch.testing.assert_close(
        y, reference_moe_from_choices(x, experts, weights, params)[0], rtol=0, atol=1e-12
    )


# -- 2 gloo ranks, every plan -----------------------------------------------------------------------
def _cases() -> list[dict]:
    cases = []
    for E in (1, 2, 4):
        s = max(1, 2 // E)
        plans = [Plan(r=0)] + [Plan(r=r, d=d) for r in divisors(s) for d in (1, 2)]
        for i, plan in enumerate(plans):
            for cf in (0.0, 0.5):
                cases.append(
                    dict(E=E, k=min(2, E), plan=plan, cf=cf, act=("swiglu", "gelu")[i % 2], seed=10 * E + i)
                )
    cases.append(dict(E=2, k=2, plan=None, cf=0.0, act="silu", seed=99))  # the tuner's choice
    return cases


def _rank_inputs(case: dict, rank: int):
    # capacity is agreed across ranks (their max): with a capacity bound, equal token counts keep the
    # one-process reference comparable; dropless runs use uneven counts
    T = 9 + 4 * rank if case["cf"] == 0 else 11
    gen = torch.Generator().manual_seed(case["seed"] * 13 + rank)
    x = torch.randn(T, M, generator=gen, dtype=torch.float64)
    probe = torch.randn(T, M, generator=gen, dtype=torch.float64)
    experts, weights = _choices(T, case["E"], case["k"], seed=case["seed"] * 17 + rank)
    return x, probe, experts, weights


def outside_routing_worker(cases: list[dict]) -> list[dict]:
    rank = dist.get_rank()
    out = []
    for case in cases:
        layer = _layer(case["E"], case["k"], case["cf"], case["act"], seed=case["seed"])
        x, probe, experts, weights = _rank_inputs(case, rank)
        x.requires_grad_(True)
        weights.requires_grad_(True)
        y = layer(x, case["plan"], top_k_index=experts, top_k_weights=weights)
        (y * probe).sum().backward()
        out.append(
            {
                "y": y.detach(),
                "x_grad": x.grad,
                "w_grad": weights.grad,
                **{n: getattr(layer.experts, n).grad for n in EXPERT_NAMES},
            }
        )
    return out


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=240.0) as p:
        yield p


@pytest.mark.timeout(300)
def test_outside_routing_every_plan_matches_one_process(pool):
    cases = _cases()
    per_rank = pool.run(outside_routing_worker, cases)
    for i, case in enumerate(cases):
        ref = _layer(case["E"], case["k"], case["cf"], case["act"], seed=case["seed"])
        for rank in range(2):
            x, probe, experts, weights = _rank_inputs(case, rank)
            x.requires_grad_(True)
            weights.requires_grad_(True)
            y = ref(x, top_k_index=experts, top_k_weights=weights)
            (y * probe).sum().backward()  # expert grads accumulate: the sum of both ranks' losses
            got = per_rank[rank][i]
            where = f"case {case} rank {rank}"
            torch.testing.assert_close(got["y"], y.detach(), rtol=0, atol=1e-9, msg=where)
            torch.testing.assert_close(got["x_grad"], x.grad, rtol=0, atol=1e-9, msg=where)
            torch.testing.assert_close(got["w_grad"], weights.grad, rtol=0, atol=1e-9, msg=where)
        full = {n: getattr(ref.experts, n).grad for n in EXPERT_NAMES}
        for rank in range(2):
            layout = ExpertLayout(
                num_experts=case["E"],
                model_dim=M,
                hidden_dim=H,
                world_size=2,
                rank=rank,
                activation=case["act"],
            )
            want = layout.shard(full)
            for n in EXPERT_NAMES:
                torch.testing.assert_close(
                    per_rank[rank][i][n], want[n], rtol=0, atol=1e-9, msg=f"{n} {case}"
                )
