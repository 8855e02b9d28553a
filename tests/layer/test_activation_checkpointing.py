"""Activation checkpointing (torch.utils.checkpoint, use_reentrant=False) around blocks with MoE layers.

The recomputed forward gives the gradients of the plain one, replays the first run's plan and
capacity, and is no step: the tuner counts and times one step per training step, the expert load
counts the tokens once, and the ranks issue the same collectives (W = 2, the tuner exploring).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from flexmoe import MoELayer, TunerConfig
from flexmoe.testing.distributed import DistributedPool

M, H, E = 8, 16, 4
# the tuner explores two candidates and decides after two warm rounds: steps 1-6 explore
TUNER = TunerConfig(max_candidates=2, min_trials=2, max_trials=2, budget_horizon=10**6)


class Block(nn.Module):
    def __init__(self, seed: int, **settings):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(M, M, dtype=torch.float64)
        self.moe = MoELayer(M, H, E, top_k=2, seed=seed, dtype=torch.float64, **settings)

    def forward(self, x):
        return self.lin(x + self.moe(torch.tanh(self.lin(x))))


class Net(nn.Module):
    def __init__(self, checkpointed: bool, **settings):
        super().__init__()
        self.blocks = nn.ModuleList(Block(seed, **settings) for seed in (1, 2))
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def _loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x).square().mean() + sum(b.moe.aux_loss for b in net.blocks)


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


# -- one process -----------------------------------------------------------------------------------


def test_checkpointed_gradients_equal_plain_ones_and_the_load_counts_once():
    settings = {"shared_hidden_dim": 8, "expert_bias_update_rate": 0.1}
    plain, checkpointed = Net(False, **settings), Net(True, **settings)
    x = torch.randn(24, M, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for net, inp in zip((plain, checkpointed), xs, strict=True):
        _loss(net, inp).backward()
    want, got = _grads(plain), _grads(checkpointed)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=1e-12)
    for a, b in zip(plain.blocks, checkpointed.blocks, strict=True):
        assert torch.equal(a.moe.expert_load, b.moe.expert_load)  # not counted again by the recompute
        assert b.moe.expert_load.sum() == 24 * 2


def test_forwards_recomputed_later_replay_their_own_decisions():
    """Two forwards of different sizes (so different capacities) before their backwards, as a
    pipeline's 1F1B schedule or gradient accumulation runs them, the first graph still held after
    its backward: each recompute takes its own decision (a wrong one would change the recomputed
    shapes, which checkpoint refuses)."""
    net, twin = Net(True, capacity_factor=0), Net(False, capacity_factor=0)
    batches = [torch.randn(n, M, dtype=torch.float64) for n in (8, 40)]
    losses = [_loss(net, b) for b in batches]
    assert len(net.blocks[0].moe._decisions) == 2
    for loss in losses:
        loss.backward()
    for b in batches:
        _loss(twin, b).backward()
    want = _grads(twin)
    for name, got in _grads(net).items():
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-12, msg=name)
    del losses, loss
    # forgotten with their graphs (the first block's lives on in the last block's aux_loss)
    assert len(net.blocks[-1].moe._decisions) == 0


def test_a_retained_graph_backpropagated_twice_replays_its_decision_twice():
    net, twin = Net(True, capacity_factor=0), Net(False, capacity_factor=0)
    x = torch.randn(12, M, dtype=torch.float64)
    loss, twin_loss = _loss(net, x), _loss(twin, x)
    for _ in range(2):
        loss.backward(retain_graph=True)
        twin_loss.backward(retain_graph=True)
    want = _grads(twin)
    for name, got in _grads(net).items():
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-12, msg=name)
    assert net.blocks[0].moe.tuner is None or net.blocks[0].moe.tuner.steps <= 1


def test_decisions_live_only_as_long_as_their_graphs():
    layer = MoELayer(M, H, E, dtype=torch.float64)
    x = torch.randn(6, M, dtype=torch.float64)
    for _ in range(3):  # without checkpointing nothing is remembered
        layer(x).sum().backward()
    y = layer(x)
    assert len(layer._decisions) == 0
    y = checkpoint(layer, x, use_reentrant=False)
    assert len(layer._decisions) == 1
    with torch.no_grad():
        layer(x)
    assert len(layer._decisions) == 1
    twin = copy.deepcopy(layer)  # a copy has no graph in flight
    assert len(twin._decisions) == 0
    y.sum().backward()
    del y
    assert len(layer._decisions) == 0


# -- two ranks, the tuner exploring ----------------------------------------------------------------

COLLECTIVES = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single")


def _recording(collective, name: str, log: list):
    def run(*args, **kwargs):
        shape = tuple(args[1].shape)  # (out, in, ...): what this rank sends
        if kwargs.get("input_split_sizes") is not None:  # rows of any count: only the row width agrees
            shape = ("rows", *shape[1:])
        log.append((name, shape))
        return collective(*args, **kwargs)

    return run


def checkpointed_training_worker(steps: int) -> dict:
    rank = dist.get_rank()
    plain, net = Net(False, tuner=TUNER), Net(True, tuner=TUNER)
    layers = [b.moe for b in net.blocks]
    recorded = {id(m): [] for m in layers}
    plans_run = {id(m): [] for m in layers}  # every strategy the layer ran: forward, then recompute
    for m in layers:
        m.tuner.record = _tee(m.tuner.record, recorded[id(m)])
        m._strategy = _tee(m._strategy, plans_run[id(m)])
    issued, log, max_diff = 0, [], 0.0
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    try:
        for name, collective in originals.items():
            setattr(dist, name, _recording(collective, name, log))
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(12 + 4 * rank, M, generator=g, dtype=torch.float64)  # ranks differ
            for model in (plain, net):
                model.zero_grad()
                _loss(model, x).backward()
            issued += sum(m.tuner.last_trial is not None for m in layers)
            want = _grads(plain)
            for name, got in _grads(net).items():
                max_diff = max(max_diff, float((got - want[name]).abs().max()))
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
    return {
        "steps": [m.tuner.steps for m in layers],
        "explore_steps": [m.tuner.explore_steps for m in layers],
        "decided": [len(m.tuner.decisions) for m in layers],
        "issued": issued,
        "recorded": [s for m in layers for (_, s) in recorded[id(m)]],
        "plans_run": [[p.describe() for p in plans_run[id(m)]] for m in layers],
        "collectives": log,
        "max_diff": max_diff,
    }


def _tee(fn, calls: list):
    """`fn`, appending each call's first (or first two) arguments to `calls`."""

    def run(*args, **kwargs):
        calls.append(args[:2] if len(args) > 1 else args[0])
        return fn(*args, **kwargs)

    return run


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=120) as p:
        yield p


@pytest.mark.timeout(120)
def test_two_ranks_with_the_tuner_exploring(pool):
    steps = 8
    results = pool.run(checkpointed_training_worker, steps)
    for res in results:
        assert res["max_diff"] < 1e-10, res["max_diff"]  # gradients of the plain model
        assert res["steps"] == [steps, steps]  # one tuner step per training step, not two
        assert min(res["explore_steps"]) >= 4 and min(res["decided"]) >= 1, res
        # every trial the tuner asked for was timed once, through the step's backward
        assert len(res["recorded"]) == res["issued"] > 0
        assert all(s > 0 for s in res["recorded"])
        for plans in res["plans_run"]:  # each forward and its recompute ran the same plan
            assert len(plans) == 2 * steps and plans[0::2] == plans[1::2], plans
    # every rank issued the same collectives, in the same order, with the same shapes
    assert results[0]["collectives"] == results[1]["collectives"]
    assert results[0]["plans_run"] == results[1]["plans_run"]
