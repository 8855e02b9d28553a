"""Modern routers and shared experts in MoELayer against a per-token reference (float64): sigmoid
scores, renormalisation on/off, routed scaling, aux-loss-free selection bias and its update rule,
group-limited top-k, shared experts with and without a sigmoid gate; on one process and 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoEConfig, MoELayer, Plan, RoutingConfig, route
from flexmoe.testing.distributed import DistributedPool
from flexmoe.testing.reference import reference_choices, reference_moe_from_choices, reference_shared_expert

M, H, E = 6, 8, 8
EXPERT_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
SHARED_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gate_weight")


def _layer(opts: dict, *, seed=0, **extra) -> MoELayer:
    layer = MoELayer(M, H, E, seed=seed, dtype=torch.float64, **{**opts, **extra})
    return layer.double()


def _reference(layer: MoELayer, x: torch.Tensor, bias=None) -> torch.Tensor:
    c = layer.config
    logits = x @ layer.gate.weight.t()
    experts, weights = reference_choices(
        logits,
        k=c.top_k,
        score=c.score_function,
        normalize=c.normalize_gate,
        scale=c.routed_scaling_factor,
        bias=bias,
        groups=c.num_groups,
        top_groups=c.top_k_groups,
    )
    params = {n: getattr(layer.experts, n) for n in EXPERT_NAMES}
    y, _ = reference_moe_from_choices(
        x, experts, weights, params, cf=c.capacity_factor, postscore=c.is_postscore, act=c.activation
    )
    if layer.shared_experts is not None:
        s = layer.shared_experts
        y = y + reference_shared_expert(
            x, s.fc1_weight, s.fc1_bias, s.fc2_weight, s.fc2_bias, s.gate_weight, act=c.activation
        )
    return y


OPTIONS = [
    dict(top_k=2, score_function="sigmoid"),
    dict(top_k=3, score_function="sigmoid", normalize_gate=False, routed_scaling_factor=2.5),
    dict(top_k=2, score_function="softmax", routed_scaling_factor=0.5, capacity_factor=0.5),
    dict(top_k=2, score_function="sigmoid", num_groups=4, top_k_groups=2, routed_scaling_factor=2.0),
    dict(top_k=1, score_function="softmax", num_groups=2, top_k_groups=1, activation="swiglu", bias=False),
    dict(top_k=2, score_function="sigmoid", expert_bias_update_rate=0.01, num_groups=2, top_k_groups=1),
    dict(top_k=2, shared_hidden_dim=5, activation="swiglu", bias=False),
    dict(top_k=2, shared_hidden_dim=7, shared_expert_gate=True, score_function="sigmoid"),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_router_options_match_per_token_reference(opts):
    opts = {"capacity_factor": 0.0, **opts}
    layer = _layer(opts, seed=3)
    bias = None
    if opts.get("expert_bias_update_rate"):
        with torch.no_grad():  # a bias large enough to change choices
            layer.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
        bias = layer.expert_bias.clone()
    x = torch.randn(17, M, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    want = _reference(layer, x, bias)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    probe = torch.randn_like(y)
    leaves = [x, layer.gate.weight] + [p for p in layer.parameters() if p is not layer.gate.weight]
    got = torch.autograd.grad((y * probe).sum(), leaves, allow_unused=True)
    ref = torch.autograd.grad((want * probe).sum(), leaves, allow_unused=True)
    for g, w in zip(got, ref, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_selection_bias_changes_choices_not_weights():
    layer = _layer(dict(top_k=1, score_function="sigmoid", expert_bias_update_rate=0.1, capacity_factor=0.0))
    x = torch.randn(9, M, dtype=torch.float64)
    with torch.no_grad():
        layer.expert_bias[3] = 10.0
    layer(x)
    r = layer.last_routing
    assert r.experts_TK[:, 0].tolist() == [3] * 9
    want = torch.sigmoid(x @ layer.gate.weight.t())[:, 3]
    torch.testing.assert_close(r.weights_TK[:, 0], want, rtol=0, atol=1e-14)


def test_group_limited_routing_prefers_the_best_group_not_the_best_expert():
    # groups {0,1} and {2,3}; expert 0 is the best single expert, but group {2,3} has the larger top-2 sum
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0]], dtype=torch.float64)
    config = RoutingConfig(
        num_experts=4, top_k=2, score_function="sigmoid", num_groups=2, top_k_groups=1, capacity_factor=0
    )
    assert sorted(route(logits, config).experts_TK[0].tolist()) == [2, 3]
    ungrouped = RoutingConfig(num_experts=4, top_k=2, score_function="sigmoid", capacity_factor=0)
    assert route(logits, ungrouped).experts_TK[0, 0] == 0


def test_aux_free_bias_update_rule():
    rate = 0.05
    layer = _layer(dict(top_k=2, expert_bias_update_rate=rate, capacity_factor=0.0))
    assert "expert_bias" in layer.state_dict() and "expert_load" not in layer.state_dict()
    loads = torch.zeros(E)
    for step in range(3):
        layer.train()
        layer(torch.randn(11 + step, M, dtype=torch.float64))
        loads += torch.bincount(layer.last_routing.experts_TK.reshape(-1), minlength=E).float()
    layer.eval()
    layer(torch.randn(5, M, dtype=torch.float64))  # eval forwards do not count
    loads = loads.to(layer.expert_load.dtype)  # .double() converted the buffers too
    torch.testing.assert_close(layer.expert_load, loads)
    used = layer.update_expert_bias()
    torch.testing.assert_close(used, loads)
    torch.testing.assert_close(layer.expert_bias, rate * torch.sign(loads.mean() - loads))
    assert float(layer.expert_load.abs().sum()) == 0
    assert bool((layer.expert_bias[loads > loads.mean()] < 0).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(score_function="tanh"), "score_function"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(num_groups=3), "num_groups=3 must divide"),
        (dict(num_groups=4, top_k_groups=5), "top_k_groups=5 must not exceed"),
        (dict(num_groups=4, top_k_groups=1, top_k=3), "top_k=3 must not exceed the 2 experts"),
        (dict(expert_bias_update_rate=-1.0), "expert_bias_update_rate"),
        (dict(shared_hidden_dim=-2), "shared_hidden_dim"),
        (dict(shared_expert_gate=True), "shared_expert_gate=True needs"),
        (dict(expert_bias_update_rate=0.1, gate=None), "needs the layer's own gate"),
    ],
)
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(model_dim=M, hidden_dim=H, num_experts=E, **kwargs)


def test_update_without_rate_is_an_error():
    with pytest.raises(ValueError, match="expert_bias_update_rate > 0"):
        _layer(dict(top_k=2)).update_expert_bias()


# -- 2 gloo ranks ------------------------------------------------------------------------------------
DIST_OPTS = dict(
    top_k=2,
    capacity_factor=0.0,
    score_function="sigmoid",
    num_groups=4,
    top_k_groups=2,
    routed_scaling_factor=1.5,
    expert_bias_update_rate=0.02,
    shared_hidden_dim=5,
    shared_expert_gate=True,
    activation="swiglu",
)
PLANS = [Plan(r=0), Plan(r=1, d=1), Plan(r=1, d=2)]


def _rank_batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(7 + 3 * rank, M, generator=gen, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


def modern_worker() -> dict:
    rank = dist.get_rank()
    layer = _layer(DIST_OPTS, seed=11)
    out = {"y": [], "grads": [], "bias": []}
    for step, plan in enumerate(PLANS):
        x, probe = _rank_batch(step, rank)
        y = layer(x, plan=plan)
        (y * probe).sum().backward()
        out["y"].append(y.detach())
        out["grads"].append({n: p.grad.clone() for n, p in layer.named_parameters()})
        layer.zero_grad()
        layer.update_expert_bias()
        out["bias"].append(layer.expert_bias.clone())
    return out


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=180.0) as p:
        yield p


@pytest.mark.timeout(240)
def test_modern_layer_on_two_ranks_matches_one_process(pool):
    per_rank = pool.run(modern_worker)
    ref = _layer(DIST_OPTS, seed=11)
    for step in range(len(PLANS)):
        for rank in range(2):
            x, probe = _rank_batch(step, rank)
            y = ref(x)
            torch.testing.assert_close(per_rank[rank]["y"][step], y.detach(), rtol=0, atol=1e-9)
            (y * probe).sum().backward()
            for n, p in ref.named_parameters():
                if n.startswith("experts."):
                    continue
                # replicated parameters: each rank's own gradient
                torch.testing.assert_close(per_rank[rank]["grads"][step][n], p.grad, rtol=0, atol=1e-9, msg=n)
                p.grad = None
        # expert shards: the gradient of the sum of both ranks' losses (E >= W: whole experts)
        for rank in range(2):
            for n in EXPERT_NAMES:
                full = getattr(ref.experts, n).grad
                if full is None:
                    continue
                want = full[rank * (E // 2) : (rank + 1) * (E // 2)]
                torch.testing.assert_close(
                    per_rank[rank]["grads"][step][f"experts.{n}"], want, atol=1e-9, rtol=0
                )
        # the bias after the update uses the load of BOTH ranks' tokens, and is identical on both ranks
        ref.update_expert_bias()
        ref.zero_grad()
        for rank in range(2):
            torch.testing.assert_close(per_rank[rank]["bias"][step], ref.expert_bias, rtol=0, atol=0)


def test_sigmoid_grouped_biased_routing_matches_transformers_deepseek_v3_router():
    """The same choices and weights as transformers' DeepSeek-V3 router (read for facts only)."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=M,
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    hf = DeepseekV3TopkRouter(cfg).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, M, generator=gen, dtype=torch.float64))
        hf.e_score_correction_bias.copy_(torch.randn(16, generator=gen, dtype=torch.float64) * 0.2)
    x = torch.randn(31, M, generator=gen, dtype=torch.float64)
    _, hf_weights, hf_experts = hf(x)
    config = RoutingConfig(
        num_experts=16,
        top_k=3,
        capacity_factor=0,
        score_function="sigmoid",
        num_groups=4,
        top_k_groups=2,
        routed_scaling_factor=2.5,
    )
    # transformers computes the router in float32; compare choices exactly and weights to fp32 precision
    logits = (x.float() @ hf.weight.float().t()).double()
    plan = route(logits, config, selection_bias_E=hf.e_score_correction_bias)

    def pairs(experts, weights):
        return {
            (t, int(e)): float(w)
            for t in range(31)
            for e, w in zip(experts[t], weights[t].detach(), strict=True)
        }

    ours, theirs = pairs(plan.experts_TK, plan.weights_TK), pairs(hf_experts, hf_weights)
    assert ours.keys() == theirs.keys()
    for key, w in theirs.items():
        assert abs(ours[key] - w) < 1e-5, key
