"""The dedup exchange's index work on one process (a group of one): the strategy equals running every
expert on the rank's own tokens, outputs and gradients, in float64; on CUDA too when there is one.
The multi-rank behaviour is in test_distributed_layer.py."""

from __future__ import annotations

import pytest
import torch

from flexmoe import MoELayer, Plan
from flexmoe.core.routing import route
from flexmoe.parallel.comm import ExpertGroups
from flexmoe.parallel.strategies import LocalStrategy
from flexmoe.parallel.token_exchange import TokenExchangeStrategy

M, H, E = 8, 12, 6

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k, capacity_factor, is_postscore, tokens",
    [(3, 0.0, True, 17), (2, 0.5, True, 17), (3, 0.0, False, 9), (2, 0.0, True, 0)],
)
def test_dedup_equals_every_expert_on_the_own_tokens(device, k, capacity_factor, is_postscore, tokens):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layer = MoELayer(
        M, H, E, top_k=k, capacity_factor=capacity_factor, activation="swiglu", seed=3, dtype=torch.float64
    ).to(device)
    groups = ExpertGroups(None)
    strategies = {
        "dedup": TokenExchangeStrategy(layer.experts, groups, Plan(r=1, all_to_all="dedup")),
        "local": LocalStrategy(layer.experts, groups),
    }
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, M, generator=gen, dtype=torch.float64).to(device)
    probe = torch.randn(tokens, M, generator=gen, dtype=torch.float64).to(device)
    results = {}
    for name, strategy in strategies.items():
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        routing = route(layer.gate(xr), layer.config.routing(training=True), training=True)
        y, _ = strategy(xr, routing, is_postscore=is_postscore)
        (y * probe).sum().backward()
        grads = [xr.grad, layer.gate.weight.grad, *(p.grad for p in layer.experts.parameters())]
        results[name] = (y.detach(), grads)
    (y_dedup, g_dedup), (y_local, g_local) = results["dedup"], results["local"]
    torch.testing.assert_close(y_dedup, y_local, rtol=0, atol=1e-12)
    for got, want in zip(g_dedup, g_local, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
