"""Collectives on 4 gloo ranks: 2DH == flat bit for bit, autograd of all-to-all and shard gathers,
block groups, and agreement checks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe.comm import ExpertGroups, agree_max, all_gather_shards, all_to_all, check_agreement
from flexmoe.testing.distributed import DistributedPool

SHAPES = [(4, 1), (4, 3, 5), (4, 2, 7, 3)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _buffer(shape, dtype, rank):
    g = torch.Generator().manual_seed(rank * 100 + len(shape))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def exchange_worker() -> list[dict]:
    rank = dist.get_rank()
    groups = ExpertGroups(None, shards_per_expert=4, local_world_size=2)
    out = []
    for shape in SHAPES:
        for dtype in DTYPES:
            x = _buffer(shape, dtype, rank)
            flat = groups.all_to_all_start(x, "flat").wait()
            two_dh = groups.all_to_all_start(x, "2dh").wait()
            out.append({"x": x, "flat": flat, "2dh": two_dh})
    return out


def autograd_worker() -> dict:
    rank = dist.get_rank()
    groups = ExpertGroups(None, shards_per_expert=4, local_world_size=2)
    x = _buffer((4, 3), torch.float64, rank).requires_grad_(True)
    weight = _buffer((4, 3), torch.float64, rank + 10)
    (all_to_all(x, groups, "2dh") * weight).sum().backward()
    shard = _buffer((2, 3), torch.float64, rank + 20).requires_grad_(True)
    pair = groups.block_group(2)
    gathered = all_gather_shards(shard, pair)
    (gathered * _buffer(gathered.shape, torch.float64, rank + 30)).sum().backward()
    return {
        "x_grad": x.grad,
        "weight": weight,
        "shard": shard.detach(),
        "gathered": gathered.detach(),
        "shard_grad": shard.grad,
        "members": [dist.get_process_group_ranks(groups.block_group(s)) for s in (2, 4)],
    }


def agreement_worker() -> dict:
    rank = dist.get_rank()
    result = {"max": agree_max([rank, 7 - rank]), "same": None, "differ": None}
    check_agreement({"a": 1, "b": 2})
    result["same"] = "ok"
    try:
        check_agreement({"a": 1, "b": 2 + (rank == 3)})
    except ValueError as err:
        result["differ"] = str(err)
    return result


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(4, timeout_s=120) as p:
        yield p


@pytest.mark.timeout(120)
def test_flat_is_a_transpose_and_2dh_equals_it_bit_for_bit(pool):
    results = pool.run(exchange_worker)
    for case in range(len(SHAPES) * len(DTYPES)):
        for i in range(4):
            got = results[i][case]
            assert torch.equal(got["flat"], got["2dh"])
            for j in range(4):  # block j of rank i's output is block i of rank j's input
                assert torch.equal(got["flat"][j], results[j][case]["x"][i])


@pytest.mark.timeout(120)
def test_all_to_all_and_all_gather_gradients(pool):
    results = pool.run(autograd_worker)
    for i, res in enumerate(results):
        # d/dx_i[j] of sum_k sum(out_k * w_k) where out_k[i] = x_i[k]  ->  w_j[i]
        want = torch.stack([results[j]["weight"][i] for j in range(4)])
        torch.testing.assert_close(res["x_grad"], want, rtol=0, atol=0)
        pair = [2 * (i // 2), 2 * (i // 2) + 1]
        assert res["members"] == [pair, [0, 1, 2, 3]]
        torch.testing.assert_close(res["gathered"], torch.stack([results[p]["shard"] for p in pair]))
        # the shard's gradient sums what both ranks of the pair computed for its copy
        slot = i % 2
        want = sum(_buffer((2, 2, 3), torch.float64, p + 30)[slot] for p in pair)
        torch.testing.assert_close(res["shard_grad"], want, rtol=0, atol=1e-12)


@pytest.mark.timeout(120)
def test_agreement(pool):
    for rank, res in enumerate(pool.run(agreement_worker)):
        assert res["max"] == [3, 7] and res["same"] == "ok"
        assert res["differ"] == "ranks disagree on b (min 2, max 3)", rank


def test_single_process_collectives_are_identities():
    groups = ExpertGroups(None)
    x = torch.randn(1, 3)
    assert groups.world_size == 1 and not groups.supports_2dh
    assert torch.equal(groups.all_to_all_start(x, "flat").wait(), x)
    assert torch.equal(all_gather_shards(x, None)[0], x)
    assert agree_max([4]) == [4]
    check_agreement({"a": 1})
    with pytest.raises(ValueError, match="W=1"):
        groups.all_to_all_start(torch.randn(2, 3), "flat")
