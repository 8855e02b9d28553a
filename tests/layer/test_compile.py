"""torch.compile of a block holding a MoELayer: equal to eager (outputs and gradients), the layer one
graph break, and no new graph once a few token counts have been seen."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flexmoe import MoELayer

M = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(M)
        self.inp = nn.Linear(M, M)
        self.moe = MoELayer(M, 32, 4, top_k=2, capacity_factor=0, shared_hidden_dim=16)
        self.out = nn.Linear(M, M)

    def forward(self, x):
        return x + self.out(self.moe(torch.nn.functional.gelu(self.inp(self.norm(x)))))


def _step(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.timeout(300)
def test_compiled_block_equals_eager_and_stops_compiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = Block()
    compiled = torch.compile(copy.deepcopy(eager))
    token_counts = [24, 40, 32, 56, 48, 24, 72]
    graphs = []
    for i, T in enumerate(token_counts):
        x = torch.randn(T, M, generator=torch.Generator().manual_seed(i))
        want_y, want_gx, want_grads = _step(eager, x)
        got_y, got_gx, got_grads = _step(compiled, x)
        torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_gx, want_gx, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == {f"_orig_mod.{n}" for n in want_grads}
        for name, g in want_grads.items():
            torch.testing.assert_close(got_grads[f"_orig_mod.{name}"], g, rtol=1e-5, atol=1e-6, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    # the first count compiles static graphs, the second dynamic ones; later counts reuse them
    assert graphs[1] == graphs[-1], graphs
    # the layer is the block's one graph break: dynamo skips it as a whole (runs it eagerly)
    breaks = [reason for reason in counters["graph_break"] if "MoELayer.forward" in reason]
    assert breaks and sum(counters["graph_break"].values()) == sum(counters["graph_break"][r] for r in breaks)
