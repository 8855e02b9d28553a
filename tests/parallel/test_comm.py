"""flexmoe.parallel.comm on gloo ranks (W = 2 and 4) and on one process, and the DistributedPool test helper.

- flat all-to-all equals the reference transpose (block j of rank i's output is block i of rank j's
  input), and 2DH equals flat bit for bit, also with several exchanges in flight at once;
- gradients: all-to-all's is the all-to-all of the gradient; all_gather_shards' reduce-scatters;
- block groups, 2DH groups and their timeouts; agreement checks;
- a failing rank fails `pool.run` within the collective timeout, and the pool recovers.

Worker functions live at module level so spawned ranks can import them by name.
"""

from __future__ import annotations

import datetime
import gc
import os
import time

import pytest
import torch
import torch.distributed as dist

from flexmoe.parallel.agreement import agree_fields, int_field
from flexmoe.parallel.comm import (
    ExpertGroups,
    FinishedWork,
    _inherited_timeout,
    all_gather_shards,
    all_to_all,
)
from flexmoe.testing.distributed import DistributedPool, DistributedPoolError, free_port

TRAILING_SHAPES = [(), (1,), (3, 5), (2, 7, 3)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _seed(rank: int, case: int) -> int:
    return 1000 * case + rank


# -- worker functions (run on every rank) ----------------------------------------------------------


def exchange_worker(local_world_size: int | None) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    groups = ExpertGroups(None, shards_per_expert=1, local_world_size=local_world_size)
    algorithms = ["flat", "2dh"] if groups.supports_2dh else ["flat"]
    cases = []
    for case, (rest, dtype) in enumerate((r, d) for r in TRAILING_SHAPES for d in DTYPES):
        x = _random((W, *rest), dtype, _seed(rank, case))
        cases.append({"x": x, **{a: groups.all_to_all_start(x, a).wait() for a in algorithms}})
    error = None
    if not groups.supports_2dh:
        try:
            groups.all_to_all_start(cases[0]["x"], "2dh")
        except ValueError as err:
            error = str(err)
    return {"cases": cases, "2dh_error": error}


def pipelined_worker() -> dict:
    """Several chunks in flight at once on both algorithms, waited in a mixed order (as pipelining does)."""
    rank = dist.get_rank()
    groups = ExpertGroups(None, local_world_size=2)
    chunks = [_random((4, 3, 2 + i), torch.float32, _seed(rank, 50 + i)) for i in range(3)]
    flat = [groups.all_to_all_start(c, "flat") for c in chunks]
    two_dh = [groups.all_to_all_start(c, "2dh") for c in chunks]
    got_2dh = [h.wait() for h in reversed(two_dh)][::-1]
    got_flat = [h.wait() for h in flat]
    # a strided (non-contiguous) input is accepted and means the same blocks
    strided = chunks[0].transpose(1, 2).contiguous().transpose(1, 2)
    again = groups.all_to_all_start(strided, "2dh").wait()
    return {"chunks": chunks, "flat": got_flat, "2dh": got_2dh, "strided": again}


def all_to_all_grad_worker(algorithm: str) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    groups = ExpertGroups(None, local_world_size=2 if algorithm == "2dh" else None)
    x = _random((W, 3, 2), torch.float64, _seed(rank, 70)).requires_grad_(True)
    weight = _random((W, 3, 2), torch.float64, _seed(rank, 71))  # a different weight per element
    out = all_to_all(x, groups, algorithm)
    (out * weight).sum().backward()
    return {"x": x.detach(), "out": out.detach(), "weight": weight, "grad": x.grad}


def _finished_works_alive() -> int:
    gc.collect()
    return sum(isinstance(o, FinishedWork) for o in gc.get_objects())


def gather_worker(size: int) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    groups = ExpertGroups(None, shards_per_expert=W)
    shard = _random((2, 3), torch.float64, _seed(rank, 80)).requires_grad_(True)
    alive = _finished_works_alive()
    gathered = all_gather_shards(shard, groups.block_group(size))
    coeff = _random(tuple(gathered.shape), torch.float64, _seed(rank, 81))
    (gathered * coeff).sum().backward()
    out = {"shard": shard.detach(), "gathered": gathered.detach(), "coeff": coeff, "grad": shard.grad}
    del gathered  # the graph, and the collectives it kept, must go with it
    out["leaked"] = _finished_works_alive() - alive
    return out


def membership_worker() -> dict:
    groups = ExpertGroups(None, shards_per_expert=4, local_world_size=2)
    few = ExpertGroups(None, shards_per_expert=1, timeout=datetime.timedelta(seconds=12), local_world_size=2)

    def ranks(g):
        return None if g is None else dist.get_process_group_ranks(g)

    try:
        groups.block_group(3)
        bad_size = None
    except ValueError as err:
        bad_size = str(err)
    return {
        "rank": groups.rank,
        "world_size": groups.world_size,
        "sizes": groups.block_sizes,
        "blocks": {s: ranks(groups.block_group(s)) for s in groups.block_sizes},
        "few_sizes": few.block_sizes,
        "intra": ranks(groups.intra_node),
        "inter": ranks(groups.inter_node),
        "bad_size": bad_size,
        "inherited_timeout": _inherited_timeout(groups.block_group(2)),
        "explicit_timeout": _inherited_timeout(few.inter_node),
    }


def agreement_worker() -> dict:
    rank = dist.get_rank()
    same = [int_field("model_dim", 8), int_field("num_experts", 4)]
    result: dict = {"max": agree_fields(same, [rank, 10 - rank, 5], dist.group.WORLD)}
    result["max_default_group"] = agree_fields(same, [rank])
    for name, fields in {
        "one_key": [int_field("model_dim", 16 if rank == 1 else 8), int_field("num_experts", 4)],
        "two_keys": [int_field("model_dim", 8 + rank), int_field("top_k", 2 - (rank == 0))],
    }.items():
        try:
            agree_fields(fields, device="cpu")
            result[name] = None
        except ValueError as err:
            result[name] = str(err)
    return result


def raising_worker() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 gave up before the collective")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a partner that never comes


def sleeping_worker(seconds: float) -> int:
    if dist.get_rank() == 0:
        time.sleep(seconds)
    return dist.get_rank()


def dying_worker() -> None:
    if dist.get_rank() == 1:
        os._exit(3)  # like a segfault: no traceback, no reply
    dist.all_reduce(torch.ones(1))


def rank_worker() -> tuple[int, int]:
    t = torch.ones(1)
    dist.all_reduce(t)
    return dist.get_rank(), int(t.item())


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool4():
    with DistributedPool(4, collective_timeout_s=30.0, timeout_s=60.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool2():
    # a short collective timeout: the failure test below waits for it
    with DistributedPool(2, collective_timeout_s=5.0, timeout_s=60.0) as pool:
        yield pool


# -- all-to-all ------------------------------------------------------------------------------------


def _check_transpose(results: list, W: int, key: str) -> None:
    results = [r["cases"] for r in results]
    for case in range(len(results[0])):
        for i in range(W):
            got = results[i][case][key]
            assert got.shape == results[i][case]["x"].shape and got.dtype == results[i][case]["x"].dtype
            for j in range(W):  # block j of rank i's output is block i of rank j's input
                assert torch.equal(got[j], results[j][case]["x"][i]), (case, i, j)


@pytest.mark.timeout(90)
def test_flat_is_the_reference_transpose_and_2dh_equals_it_bit_for_bit(pool4):
    results = pool4.run(exchange_worker, 2)
    _check_transpose(results, 4, "flat")
    for per_rank in results:
        assert per_rank["2dh_error"] is None
        for case in per_rank["cases"]:
            assert case["2dh"].dtype == case["flat"].dtype
            assert torch.equal(case["2dh"].view(torch.uint8), case["flat"].view(torch.uint8))


@pytest.mark.timeout(90)
def test_flat_on_two_ranks_and_2dh_needs_a_valid_local_world_size(pool2):
    results = pool2.run(exchange_worker, 2)  # L == W: no 2DH, flat only
    assert all(set(case) == {"x", "flat"} for per_rank in results for case in per_rank["cases"])
    _check_transpose(results, 2, "flat")
    for per_rank in results:
        assert 'all_to_all="2dh" needs local_world_size' in per_rank["2dh_error"]
        assert "W=2" in per_rank["2dh_error"] and "got local_world_size=2" in per_rank["2dh_error"]


@pytest.mark.timeout(90)
def test_exchanges_in_flight_together_do_not_mix(pool4):
    results = pool4.run(pipelined_worker)
    for i, res in enumerate(results):
        for c in range(3):
            assert torch.equal(res["flat"][c], res["2dh"][c])
            want = torch.stack([results[j]["chunks"][c][i] for j in range(4)])
            assert torch.equal(res["flat"][c], want)
        assert torch.equal(res["strided"], res["flat"][0])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("algorithm", ["flat", "2dh"])
def test_all_to_all_gradient_is_the_transposed_exchange(pool4, algorithm):
    results = pool4.run(all_to_all_grad_worker, algorithm)
    for i, res in enumerate(results):
        # loss = sum_k sum(out_k * w_k) with out_k[i] = x_i[k], so d loss / d x_i[j] = w_j[i]
        want = torch.stack([results[j]["weight"][i] for j in range(4)])
        assert torch.equal(res["grad"], want)
        assert torch.equal(res["out"], torch.stack([results[j]["x"][i] for j in range(4)]))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [2, 4])
def test_all_gather_shards_forward_and_reduce_scatter_backward(pool4, size):
    results = pool4.run(gather_worker, size)
    for i, res in enumerate(results):
        block = range(size * (i // size), size * (i // size) + size)
        assert res["gathered"].shape == (size, 2, 3)
        assert torch.equal(res["gathered"], torch.stack([results[p]["shard"] for p in block]))
        # every rank of the block used shard i (slot i % size): its gradient sums their coefficients
        want = sum(results[p]["coeff"][i % size] for p in block)
        torch.testing.assert_close(res["grad"], want, rtol=0, atol=1e-12)
        assert res["leaked"] == 0


# -- groups and agreement --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_block_groups_2dh_groups_and_their_timeouts(pool4):
    for i, res in enumerate(pool4.run(membership_worker)):
        assert res["rank"] == i and res["world_size"] == 4
        assert res["sizes"] == (1, 2, 4) and res["few_sizes"] == (1, 4)
        pair = [2 * (i // 2), 2 * (i // 2) + 1]
        assert res["blocks"] == {1: None, 2: pair, 4: [0, 1, 2, 3]}
        assert res["intra"] == pair  # node i // 2 holds ranks 2n, 2n + 1
        assert res["inter"] == [i % 2, i % 2 + 2]  # same local rank on every node
        assert "block group size must be one of (1, 2, 4)" in res["bad_size"]
        assert res["inherited_timeout"] == datetime.timedelta(seconds=30)
        assert res["explicit_timeout"] == datetime.timedelta(seconds=12)


@pytest.mark.timeout(90)
def test_agreement_and_max(pool4):
    for rank, res in enumerate(pool4.run(agreement_worker)):
        assert res["max"] == [3, 10, 5] and res["max_default_group"] == [3]
        assert res["one_key"] == "ranks disagree on model_dim (rank 0: 8, rank 1: 16, rank 2: 8, rank 3: 8)"
        assert res["two_keys"] == (
            "ranks disagree on model_dim (rank 0: 8, rank 1: 9, rank 2: 10, rank 3: 11); "
            "top_k (rank 0: 1, rank 1: 2, rank 2: 2, rank 3: 2)"
        ), rank


# -- the pool itself -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_failing_rank_fails_the_run_in_bounded_time_and_the_pool_recovers(pool2):
    assert pool2.run(rank_worker) == [(0, 2), (1, 2)]
    start = time.monotonic()
    with pytest.raises(DistributedPoolError) as failure:
        pool2.run(raising_worker)
    elapsed = time.monotonic() - start
    text = str(failure.value)
    assert "failed on ranks [0, 1]" in text  # rank 0 timed out in the collective instead of hanging
    assert "--- rank 1 ---" in text and "rank 1 gave up before the collective" in text
    assert elapsed < 30, elapsed
    assert not pool2.running
    assert pool2.run(rank_worker) == [(0, 2), (1, 2)]  # a fresh group


@pytest.mark.timeout(90)
def test_a_run_past_its_timeout_raises_and_the_pool_recovers(pool2):
    pool2.run(rank_worker)
    pool2.timeout_s = 2.0
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"ranks \[0\] did not answer"):
            pool2.run(sleeping_worker, 30.0)
        assert time.monotonic() - start < 15
    finally:
        pool2.timeout_s = 60.0
    assert pool2.run(sleeping_worker, 0.0) == [0, 1]


@pytest.mark.timeout(90)
def test_a_rank_that_dies_fails_the_run_and_the_pool_recovers(pool2):
    with pytest.raises(DistributedPoolError, match=r"failed on ranks \[0, 1\]") as failure:
        pool2.run(dying_worker)
    assert "--- rank 1 ---\nthe worker exited (code 3) without answering" in str(failure.value)
    assert pool2.run(rank_worker) == [(0, 2), (1, 2)]


def test_pool_arguments_are_validated_and_free_port_is_bindable():
    with pytest.raises(ValueError, match="world_size"):
        DistributedPool(0)
    with pytest.raises(ValueError, match="timeout_s"):
        DistributedPool(2, timeout_s=0)
    with pytest.raises(ValueError, match="picklable"):
        DistributedPool(1).run(lambda: None)  # never starts a worker
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


# -- one process: no group, no collectives ---------------------------------------------------------


def test_single_process_behaviour():
    assert not dist.is_initialized()
    groups = ExpertGroups(None, local_world_size=2)
    assert (groups.group, groups.world_size, groups.rank) == (None, 1, 0)
    assert not groups.supports_2dh and groups.block_sizes == (1,) and groups.block_group(1) is None
    x = torch.randn(1, 3, 2)
    assert groups.all_to_all_start(x, "flat").wait() is x

    leaf = x.clone().requires_grad_(True)
    out = all_to_all(leaf, groups, "flat")
    out.sum().backward()
    assert torch.equal(out, x) and torch.equal(leaf.grad, torch.ones_like(x))

    shard = torch.randn(2, 3, requires_grad=True)
    gathered = all_gather_shards(shard, groups.block_group(1))
    assert gathered.shape == (1, 2, 3) and torch.equal(gathered[0], shard)
    (gathered * 3).sum().backward()
    assert torch.equal(shard.grad, torch.full((2, 3), 3.0))

    assert agree_fields([int_field("model_dim", 8)], [4, 2]) == [4, 2] and agree_fields([]) == []


def test_single_process_user_errors():
    groups = ExpertGroups(None)
    with pytest.raises(ValueError, match="all_to_all.*local_world_size"):
        groups.all_to_all_start(torch.randn(1, 3), "2dh")
    with pytest.raises(ValueError, match="all_to_all must be one of"):
        groups.all_to_all_start(torch.randn(1, 3), "auto")
    with pytest.raises(ValueError, match="W=1"):
        groups.all_to_all_start(torch.randn(2, 3), "flat")
    with pytest.raises(ValueError, match="W=1"):
        all_to_all(torch.randn(2, 3), groups)
    with pytest.raises(ValueError, match="shards_per_expert"):
        ExpertGroups(None, shards_per_expert=0)
    with pytest.raises(ValueError, match="shards_per_expert"):
        ExpertGroups(None, shards_per_expert=2)  # must divide W = 1
    with pytest.raises(ValueError, match="local_world_size"):
        ExpertGroups(None, local_world_size=0)
    with pytest.raises(ValueError, match="timeout"):
        ExpertGroups(None, timeout=5)
    with pytest.raises(ValueError, match="block group size"):
        groups.block_group(2)
