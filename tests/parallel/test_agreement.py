"""Ranks that disagree fail with a ValueError on every rank, never with a crash or a hang.

The agreement check is one fixed-size all-reduce (flexmoe.parallel.agreement): at construction over
every layer setting, at every step over the plan, the mode and a fingerprint of the settings. Two gloo
ranks, one pool for the module; each case checks that both ranks raise and name every rank's value,
and that the group still works afterwards (a mismatched collective would have broken it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoEConfig, MoELayer, Plan
from flexmoe.parallel.agreement import Field, agree_fields, choice_field, float_field, int_field
from flexmoe.testing.distributed import DistributedPool

M, H, E = 8, 16, 4


@pytest.fixture(scope="module")
def pool2():
    with DistributedPool(2, collective_timeout_s=20.0, timeout_s=90.0) as pool:
        yield pool


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _healthy() -> int:
    t = torch.ones(1)
    dist.all_reduce(t)
    return int(t.item())


def construction_worker(field: str, values: tuple, extra: dict) -> tuple[str | None, int]:
    kwargs = dict(top_k=2, seed=3, **extra)
    kwargs[field] = values[dist.get_rank()]
    shape = {k: kwargs.pop(k) for k in ("model_dim", "hidden_dim", "num_experts") if k in kwargs}
    args = (shape.get("model_dim", M), shape.get("hidden_dim", H), shape.get("num_experts", E))
    return _error(lambda: MoELayer(*args, **kwargs)), _healthy()


def forward_worker(case: str) -> tuple[str | None, int, object]:
    rank = dist.get_rank()
    layer = MoELayer(M, H, E, seed=3, tuner=case == "forced_vs_adaptive")
    x = torch.randn(6, M, generator=torch.Generator().manual_seed(rank))
    if case == "forced_vs_adaptive":
        call = lambda: layer(x, plan=Plan(r=1) if rank == 0 else None)  # noqa: E731
    elif case == "forced_r":
        call = lambda: layer(x, plan=Plan(r=rank))  # noqa: E731
    elif case == "training":
        layer.train(rank == 0)
        call = lambda: layer(x)  # noqa: E731
    elif case == "dtype":
        if rank == 1:
            layer.double()
        call = lambda: layer(x)  # noqa: E731
    elif case == "autocast":  # the collectives would carry bf16 on one rank and fp32 on the other

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rank == 0):
                return layer(x)
    else:
        raise AssertionError(case)
    message = _error(call)
    layer.train().float()
    # the same layer works afterwards on every rank: the check left the group intact
    after = tuple(layer(x, plan=Plan(r=1)).shape)
    return message, _healthy(), after


def agree_worker() -> dict:
    rank = dist.get_rank()
    same = [int_field("a", 3), float_field("cf", 1.25), choice_field("act", "gelu", ("gelu", "relu"))]
    out = {"max": agree_fields(same, [10 + rank, 5 - rank])}
    cf, p = (1.25, None) if rank else (2.0, 1)
    differ = [int_field("a", 3), float_field("cf", cf), int_field("p", p)]
    out["error"] = _error(lambda: agree_fields(differ, [rank], what="test"))
    # the codes at int64's ends agree (its minimum is -0.0's bits), and 0.0 differs from -0.0
    ends = [Field("low", -(2**63)), Field("high", 2**63 - 1), float_field("zero", -0.0)]
    out["ends"] = agree_fields(ends, [rank])
    out["signed_zero"] = _error(lambda: agree_fields([float_field("z", 0.0 if rank else -0.0)], what="zero"))
    return out


# Two valid values of every MoEConfig field (and the extra settings that make the second valid): the
# test below checks that this table names every field of the dataclass, so a new setting cannot be
# left out of the cross-rank check unnoticed.
DIFFERING = {
    "model_dim": ((8, 16), {}),
    "hidden_dim": ((16, 32), {}),
    "num_experts": ((2, 4), {}),
    "top_k": ((1, 2), {}),
    "capacity_factor": ((1.0, 2.0), {}),
    "eval_capacity_factor": ((None, 0.0), {}),
    "gate": (("linear", "cosine"), {}),
    "gate_noise": ((0.0, 1.0), {}),
    "normalize_gate": ((True, False), {}),
    "batch_prioritized_routing": ((False, True), {}),
    "is_postscore": ((True, False), {}),
    "aux_loss": (("gshard", "importance_load"), {}),
    "router_z_loss": ((0.0, 1e-3), {}),
    "activation": (("gelu", "swiglu"), {}),
    "bias": ((True, False), {}),
    "parallelism": (("adaptive", 1), {}),
    "pipeline_degree": (("adaptive", 2), {}),
    "all_to_all": (("auto", "flat"), {}),
    "local_world_size": ((1, 2), {}),
    "score_function": (("softmax", "sigmoid"), {}),
    "routed_scaling_factor": ((1.0, 2.5), {}),
    "num_groups": ((1, 2), {}),
    "top_k_groups": ((None, 1), {}),
    "expert_bias_update_rate": ((0.0, 1e-3), {}),
    "shared_hidden_dim": ((0, 8), {}),
    "shared_expert_gate": ((False, True), {"shared_hidden_dim": 8}),
}


def test_the_differing_values_cover_every_config_field():
    assert set(DIFFERING) == {f.name for f in dataclasses.fields(MoEConfig)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "field, values, extra, expected",
    [
        *(
            (name, values, extra, f"{name} (rank 0: {values[0]!r}, rank 1: {values[1]!r})")
            for name, (values, extra) in DIFFERING.items()
        ),
        ("dtype", (torch.float32, torch.float64), {}, "dtype (rank 0: torch.float32, rank 1: torch.float64)"),
        ("tuner", (True, False), {}, "tuner and cluster settings (fingerprint) (rank 0: 0x"),
    ],
)
def test_layers_built_differently_raise_on_every_rank(pool2, field, values, extra, expected):
    results = pool2.run(construction_worker, field, values, extra)
    for message, healthy in results:
        assert message is not None and "MoELayer construction: ranks disagree on" in message
        assert expected in message, message
        assert healthy == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case, expected",
    [
        ("forced_vs_adaptive", "plan.r (rank 0: 1, rank 1: adaptive)"),
        ("forced_r", "plan.r (rank 0: 0, rank 1: 1)"),
        ("training", "training (rank 0: True, rank 1: False)"),
        ("dtype", "compute dtype (rank 0: torch.float32, rank 1: torch.float64)"),
        ("autocast", "compute dtype (rank 0: torch.bfloat16, rank 1: torch.float32)"),
    ],
)
def test_steps_that_differ_raise_on_every_rank(pool2, case, expected):
    results = pool2.run(forward_worker, case)
    for message, healthy, after in results:
        assert message is not None and "MoELayer forward: ranks disagree on" in message
        assert expected in message, message
        assert healthy == 2 and after == (6, M)


@pytest.mark.timeout(60)
def test_agree_takes_maxima_and_names_every_rank(pool2):
    r0, r1 = pool2.run(agree_worker)
    assert r0["max"] == r1["max"] == [11, 5]
    assert r0["error"] == r1["error"]
    expected = "test: ranks disagree on cf (rank 0: 2.0, rank 1: 1.25); p (rank 0: 1, rank 1: None)"
    assert r0["error"] == expected
    assert r0["ends"] == r1["ends"] == [1]
    assert r0["signed_zero"] == r1["signed_zero"] == "zero: ranks disagree on z (rank 0: -0.0, rank 1: 0.0)"


def test_single_process_has_nothing_to_agree():
    assert agree_fields([int_field("a", 1)], [7]) == [7]


# -- copies of a distributed layer -----------------------------------------------------------------
def copy_worker() -> dict:
    import copy
    import pickle

    layer = MoELayer(M, H, E, seed=5, dtype=torch.float64)
    x = torch.randn(6, M, dtype=torch.float64, generator=torch.Generator().manual_seed(dist.get_rank()))
    (layer(x, plan=Plan(r=1)).sum() + layer.aux_loss).backward()
    twin = copy.deepcopy(layer)  # shares the process groups, copies the shards
    layer.eval(), twin.eval()
    with torch.no_grad():
        same = torch.equal(layer(x, plan=Plan(r=1)), twin(x, plan=Plan(r=1)))
    try:
        pickle.dumps(layer)
        refused = None
    except TypeError as err:
        refused = str(err)
    return {"same": same, "shared": twin.groups.group is layer.groups.group, "refused": refused}


@pytest.mark.timeout(60)
def test_a_distributed_layer_deep_copies_and_refuses_pickle_clearly(pool2):
    for res in pool2.run(copy_worker):
        assert res["same"] and res["shared"]
        assert "cannot be pickled" in res["refused"] and "save_checkpoint" in res["refused"]


# -- settings that cannot run ----------------------------------------------------------------------
def fixed_2dh_worker(local_world_size: int | None) -> str | None:
    return _error(lambda: MoELayer(M, H, E, all_to_all="2dh", local_world_size=local_world_size))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("local_world_size", [None, 2])
def test_a_fixed_2dh_that_cannot_run_is_refused_at_construction(pool2, local_world_size):
    for message in pool2.run(fixed_2dh_worker, local_world_size):
        assert message is not None and "all_to_all='2dh' needs local_world_size" in message
