"""2DH equals flat bit for bit when the number of nodes N differs from the ranks per node L.

The other 2DH tests run at W = 4, L = 2, where N = L: a layout that swaps the (node, local rank)
order of the blocks reads the same there. Here W = 6 with L = 2 (N = 3) and L = 3 (N = 2), and
W = 8 with L = 2 (N = 4): the exchange itself and its gradient, and every expert-parallel plan
(r >= 1) of layers with whole experts, several local experts and experts split across ranks,
forward and backward (the output and every gradient equal to the flat plan's).

W = 6 and 8 ranks on a small machine start slowly: one pool per W, and one worker call per pool.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan
from flexmoe.core.layout import divisors
from flexmoe.parallel.comm import ExpertGroups, all_to_all
from flexmoe.testing.distributed import DistributedPool

M = H = 24  # divisible by every s = W / E below (hidden and fc2 bias shards)
LOCAL_WORLD_SIZES = {6: (2, 3), 8: (2,)}
# whole experts (s = 1), two local experts, and experts split over s > 1 ranks (every r dividing s)
NUM_EXPERTS = {6: (1, 3, 6, 12), 8: (1, 2, 16)}


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def two_dh_worker() -> dict:
    """Per local world size: the exchange of a buffer and its gradient, and every r >= 1 plan's output
    and gradients, by both algorithms (flat and 2dh), on this rank."""
    rank, W = dist.get_rank(), dist.get_world_size()
    out: dict = {"exchange": {}, "layer": {}}
    for L in LOCAL_WORLD_SIZES[W]:
        groups = ExpertGroups(None, local_world_size=L)
        assert groups.supports_2dh
        x = _random((W, 3, 5), seed=100 * L + rank)
        weight = _random((W, 3, 5), seed=100 * L + rank + 50)  # a different weight per element
        exchange = {"x": x}
        for algorithm in ("flat", "2dh"):
            leaf = x.clone().requires_grad_(True)
            y = all_to_all(leaf, groups, algorithm)
            (grad,) = torch.autograd.grad((y * weight).sum(), leaf)
            exchange[algorithm] = (y.detach(), grad)
        out["exchange"][L] = exchange

        for E in NUM_EXPERTS[W]:
            layer = MoELayer(
                M,
                H,
                E,
                top_k=min(2, E),
                capacity_factor=1.0,
                activation="swiglu" if E % 2 else "gelu",
                seed=E,
                dtype=torch.float64,
                local_world_size=L,
                tuner=False,
            )
            names = [n for n, _ in layer.named_parameters()]
            x = _random((10 + rank, M), seed=1000 * E + rank)  # uneven token counts
            probe = _random(tuple(x.shape), seed=1000 * E + rank + 500)
            for r in divisors(layer.layout.shards_per_expert):
                for d in (1, 2):
                    for algorithm in ("flat", "2dh"):
                        leaf = x.clone().requires_grad_(True)
                        y = layer(leaf, plan=Plan(r=r, d=d, all_to_all=algorithm))
                        grads = torch.autograd.grad((y * probe).sum(), [leaf, *layer.parameters()])
                        got = {"y": y.detach(), "x": grads[0], **dict(zip(names, grads[1:], strict=True))}
                        out["layer"][(L, E, r, d, algorithm)] = got
    return out


@pytest.fixture(scope="module", params=sorted(LOCAL_WORLD_SIZES))
def pool(request):
    # starting 6 or 8 ranks on 2 busy cores takes a while: generous run and collective timeouts
    with DistributedPool(request.param, collective_timeout_s=60.0, timeout_s=300.0) as p:
        yield p


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_bytes = [t.reshape(-1).view(torch.uint8) for t in (a, b)]  # -0.0 != 0.0, NaN == NaN
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*as_bytes)


@pytest.mark.timeout(420)
def test_2dh_equals_flat_bit_for_bit_when_nodes_differ_from_ranks_per_node(pool):
    W = pool.world_size
    results = pool.run(two_dh_worker)
    for L in LOCAL_WORLD_SIZES[W]:
        for i, res in enumerate(results):
            ex = res["exchange"][L]
            # flat is the reference transpose: block j of rank i's output is block i of rank j's input
            want = torch.stack([results[j]["exchange"][L]["x"][i] for j in range(W)])
            assert torch.equal(ex["flat"][0], want), (L, i)
            for flat, two_dh in zip(ex["flat"], ex["2dh"], strict=True):
                assert _same_bits(flat, two_dh), (W, L, i)

    keys = [key[:4] for key in results[0]["layer"] if key[4] == "2dh"]
    # every r dividing W appears (E = 1: s = W), at both d, for every L
    assert {(L, r) for L, _, r, _ in keys} == {(L, r) for L in LOCAL_WORLD_SIZES[W] for r in divisors(W)}
    for i, res in enumerate(results):
        for key in keys:
            flat, two_dh = res["layer"][(*key, "flat")], res["layer"][(*key, "2dh")]
            assert flat.keys() == two_dh.keys()
            for name in flat:
                assert _same_bits(flat[name], two_dh[name]), f"rank {i}, (L, E, r, d) = {key}: {name}"
