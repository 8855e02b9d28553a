"""What a layer step keeps for backward: only what backward needs, in its smallest form.

The fused local op (packed_moe) and the index-based dispatch/combine are checked for exact gradients
(gradcheck, float64), then the bytes autograd saves in one layer step are held to a bound computed
from the shapes: the pre-activations of the kept rows, plus a few words per token and assignment.
"""

from __future__ import annotations

import pytest
import torch

from flexmoe import MoELayer, Plan
from flexmoe.bench.memory import working_memory
from flexmoe.core.config import RoutingConfig
from flexmoe.core.dispatch import combine, combine_packed, dispatch, dispatch_packed
from flexmoe.core.routing import route
from flexmoe.ops import expert_ffn
from flexmoe.ops.expert_ffn import ExpertWeights, packed_moe
from flexmoe.parallel.comm import ExpertGroups
from flexmoe.parallel.strategies import ExpertParallelStrategy
from flexmoe.testing.counting import record_multiplied_rows

M, H = 3, 4


def _params(G: int, kind: str, bias: bool, gen: torch.Generator):
    X = 2 * H if kind == "swiglu" else H
    shapes = [(G, M, X), (G, X), (G, H, M), (G, M)]
    ts = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    return ts if bias else [ts[0], None, ts[2], None]


@pytest.mark.parametrize("post", [True, False])
@pytest.mark.parametrize("kind,bias", [("gelu", True), ("swiglu", False), ("relu", True)])
@pytest.mark.parametrize("sizes", [(3, 0, 2), (2, 2, 2)], ids=["uneven", "uniform"])
@pytest.mark.parametrize("block_elements", [1, 1 << 20], ids=["block-per-group", "one-block"])
@pytest.mark.parametrize("max_padding", [0.0, 10.0], ids=["ragged", "padded"])
def test_packed_moe_gradients_are_exact(post, kind, bias, sizes, block_elements, max_padding, monkeypatch):
    monkeypatch.setattr(expert_ffn, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(expert_ffn, "_MAX_PADDING", max_padding)
    monkeypatch.setattr(expert_ffn, "_PAD_GROUPS_UNDER", 1 << 20)
    gen = torch.Generator().manual_seed(len(sizes) + int(post))
    T, N = 4, sum(sizes)
    x = torch.randn(T, M, generator=gen, dtype=torch.float64, requires_grad=True)
    token = torch.randint(0, T, (N,), generator=gen)
    weight = torch.rand(N, generator=gen, dtype=torch.float64, requires_grad=True)
    params = _params(len(sizes), kind, bias, gen)

    def fn(x, weight, *ps):
        it = iter(ps)
        w = [next(it) if p is not None else None for p in params]
        return packed_moe(x, token, weight, ExpertWeights(*w, kind), sizes, is_postscore=post)

    inputs = (x, weight, *(p for p in params if p is not None))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("post", [True, False])
@pytest.mark.parametrize("sizes", [(3, 0, 2), (4, 3, 4), (1, 5)])
def test_padding_nearly_equal_groups_changes_nothing(post, sizes, monkeypatch):
    """Padded slots read a zero row and write to a dropped one: outputs and every gradient are those
    of the unpadded op (prescore with biases is where a leak would show: f(0) != 0)."""
    gen = torch.Generator().manual_seed(sum(sizes))
    T, N = 5, sum(sizes)
    x = torch.randn(T, M, generator=gen, dtype=torch.float64, requires_grad=True)
    token = torch.randint(0, T, (N,), generator=gen)
    weight = torch.rand(N, generator=gen, dtype=torch.float64, requires_grad=True)
    params = _params(len(sizes), "gelu", True, gen)
    grad_y = torch.randn(T, M, generator=gen, dtype=torch.float64)
    results = []
    monkeypatch.setattr(expert_ffn, "_PAD_GROUPS_UNDER", 1 << 20)
    for max_padding in (0.0, 10.0):
        monkeypatch.setattr(expert_ffn, "_MAX_PADDING", max_padding)
        y = packed_moe(x, token, weight, ExpertWeights(*params, "gelu"), sizes, is_postscore=post)
        results.append((y, *torch.autograd.grad(y, (x, weight, *params), grad_y)))
    for ragged, padded in zip(*results, strict=True):
        torch.testing.assert_close(padded, ragged, rtol=1e-12, atol=1e-12)


def test_packed_moe_without_input_or_score_gradients():
    gen = torch.Generator().manual_seed(0)
    params = _params(2, "gelu", True, gen)
    x = torch.randn(3, M, dtype=torch.float64)
    weight = torch.rand(4, dtype=torch.float64)
    y = packed_moe(x, torch.tensor([0, 2, 1, 2]), weight, ExpertWeights(*params, "gelu"), (1, 3))
    y.square().sum().backward()
    assert x.grad is None and all(p.grad is not None for p in params)


@pytest.mark.parametrize("post", [True, False])
def test_dispatch_pad_unpad_and_combine_gradients_are_exact(post):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, M, generator=gen, dtype=torch.float64, requires_grad=True)
    config = RoutingConfig(num_experts=3, top_k=2, capacity_factor=0.0)

    def fn(x, logits):
        plan = route(logits, config)
        rows = dispatch_packed(x, plan, is_postscore=post)
        packed = combine_packed(rows.sin(), plan, is_postscore=post)
        padded = combine(dispatch(x, plan, is_postscore=post).cos(), plan, is_postscore=post)
        return packed + padded

    assert torch.autograd.gradcheck(fn, (x, logits), eps=1e-6, atol=1e-7)


# -- saved bytes of one layer step ------------------------------------------------------------------

MB, HB, E, T, K = 64, 96, 4, 256, 2


def _saved_bytes(layer: MoELayer, x: torch.Tensor, run) -> int:
    """Bytes of the distinct storages autograd saves in `run()`, besides the parameters and x."""
    alive = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in alive:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def _routing_bound(N: int) -> int:
    # gate and routing keep a few 8-byte words per (token, expert), per (token, choice), per token, and
    # per kept assignment (probabilities, indices, gate weights)
    return 8 * (T * E + 2 * T * K + T + 4 * N)


def _expert_params(layer: MoELayer) -> int:
    return sum(p.numel() for p in layer.experts.parameters())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_local_step_saves_only_pre_activations(autocast):
    layer = MoELayer(MB, HB, E, top_k=K, capacity_factor=1.0, seed=0)
    x = torch.randn(T, MB, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved = _saved_bytes(layer, x, lambda: layer(x))
    N = int(layer.last_routing.kept_E.sum())
    R = int(N * (1 + expert_ffn._MAX_PADDING))  # the kept rows, nearly equal groups padded to the largest
    b = 2 if autocast else 4
    bound = R * HB * b + _routing_bound(R)  # hpre of the kept rows
    if autocast:  # the bf16 copies of the tokens and of the expert weights, as autocast's nn.Linear keeps
        bound += T * MB * b + _expert_params(layer) * b
    assert saved <= bound, (saved, bound)
    # keeping the token rows [N, M] besides would not fit: the bound is tight enough to catch it
    assert saved + N * MB * b > bound


def test_expert_parallel_step_saves_rows_and_pre_activations_only(monkeypatch):
    """The r >= 1 path (pipelined exchange, here on one process): the received rows and hpre per chunk
    (padding rows included: at most 1/8 more than the kept ones), and the returned rows the combine
    needs for the gate weights' gradient."""
    layer = MoELayer(MB, HB, E, top_k=K, capacity_factor=1.0, seed=0)
    strategy = ExpertParallelStrategy(layer.experts, ExpertGroups(None), Plan(r=1, d=2))
    x = torch.randn(T, MB, requires_grad=True)
    multiplied = record_multiplied_rows(monkeypatch)

    def run():
        config = layer.config.routing(training=True)
        routing = route(layer.gate(x), config, training=True, capacity_multiple=strategy.capacity_multiple)
        run.N = int(routing.kept_E.sum())
        multiplied.clear()
        return strategy(x, routing, is_postscore=True)[0]

    saved = _saved_bytes(layer, x, run)
    rows = sum(multiplied)
    assert run.N <= rows <= run.N * 9 / 8
    bound = rows * (MB + HB) * 4 + run.N * MB * 4 + _routing_bound(run.N)
    assert saved <= bound, (saved, bound)


def test_inference_keeps_no_pre_activations(monkeypatch):
    """Under no_grad the pre-activations live one block (here: one expert) at a time."""
    monkeypatch.setattr(expert_ffn, "_BLOCK_ELEMENTS", 1)
    layer = MoELayer(MB, 4 * HB, 2 * E, top_k=K, capacity_factor=1.0, seed=0)
    x = torch.randn(4 * T, MB)
    want = layer(x)
    N = int(layer.last_routing.kept_E.sum())
    with torch.no_grad():
        got = layer(x)
        peak = working_memory(lambda: layer(x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert peak < N * 4 * HB * 4, (peak, N * 4 * HB * 4)  # less than hpre of all kept rows alone
