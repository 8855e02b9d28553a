"""Data-parallel training on W ranks equals one process trained on the union of the batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoELayer, Plan
from flexmoe.parallel.data_parallel import (
    clip_grad_norm,
    expert_parameter_names,
    fully_shard_model,
    unwrap,
    wrap_data_parallel,
)
from flexmoe.testing.distributed import DistributedPool

M, H, E, STEPS, BATCH = 8, 16, 4, 4, 6


class TinyMoENet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(M, M).double()
        self.moe = MoELayer(M, H, E, top_k=2, capacity_factor=0, seed=1, dtype=torch.float64).double()
        self.out = nn.Linear(M, 3).double()

    def forward(self, x, plan=None):
        h = self.inp(x)
        return self.out(h + self.moe(h, plan=plan))


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, M, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model, batches, plan, clip):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x, plan=plan) if plan else model(x), y)
        opt.zero_grad()
        loss.backward()
        clip_grad_norm(model, clip)
        opt.step()


def train_worker(via_ddp: bool, clip: float) -> dict:
    """via_ddp: the DDP wrapper with the layer's adaptive plans; else a forced r = 0 plan through the
    bare model, with the replicated gradients averaged by hand (DDP hooks only run in its forward)."""
    rank, W = dist.get_rank(), dist.get_world_size()
    model = wrap_data_parallel(TinyMoENet())
    inner = unwrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(STEPS):
        x, y = _batch(step, rank)
        logits = model(x) if via_ddp else inner(x, plan=Plan(r=0))
        opt.zero_grad()
        nn.functional.cross_entropy(logits, y).backward()
        if not via_ddp:
            for p in inner.parameters():
                if not getattr(p, "flexmoe_expert", False):
                    dist.all_reduce(p.grad)
                    p.grad /= W
        clip_grad_norm(model, clip)
        opt.step()
    return {n: p.detach() for n, p in inner.named_parameters()} | {"ignored": expert_parameter_names(inner)}


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, timeout_s=120) as p:
        yield p


@pytest.mark.timeout(120)
@pytest.mark.parametrize("via_ddp,clip", [(True, 0.0), (True, 0.5), (False, 0.5)])
def test_ddp_training_matches_one_process_on_the_union(pool, via_ddp, clip):
    results = pool.run(train_worker, via_ddp, clip)
    W = len(results)
    reference = TinyMoENet()
    union = []
    for step in range(STEPS):
        xs, ys = zip(*(_batch(step, rank) for rank in range(W)), strict=True)
        union.append((torch.cat(xs), torch.cat(ys)))
    _train(reference, union, None, clip)
    full = {n: p.detach() for n, p in reference.named_parameters()}
    layout = reference.moe.layout
    for rank, res in enumerate(results):
        assert sorted(res["ignored"]) == sorted(
            f"moe.experts.{n}" for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
        )
        shards = layout.__class__(num_experts=E, model_dim=M, hidden_dim=H, world_size=W, rank=rank).shard(
            {n.split(".")[-1]: p for n, p in full.items() if n.startswith("moe.experts.")}
        )
        for name, value in res.items():
            if name == "ignored":
                continue
            want = shards[name.split(".")[-1]] if name.startswith("moe.experts.") else full[name]
            torch.testing.assert_close(value, want, rtol=0, atol=1e-9, msg=name)


def test_single_process_wrap_is_identity():
    net = TinyMoENet()
    assert wrap_data_parallel(net) is net
    assert fully_shard_model(net) is net


# -- FSDP2 -----------------------------------------------------------------------------------------


class SharedMoENet(nn.Module):
    """A MoE layer with shared experts and an expert bias between two dense layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(M, M, dtype=torch.float64)
        self.moe = MoELayer(
            M,
            H,
            E,
            top_k=2,
            capacity_factor=0,
            seed=1,
            dtype=torch.float64,
            shared_hidden_dim=H,
            expert_bias_update_rate=0.05,
        )
        self.out = nn.Linear(M, 3, dtype=torch.float64)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def _optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.2)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _fsdp_step(model, opt, x, y, clip: float) -> float:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    norm = clip_grad_norm(model, clip)
    opt.step()
    model.moe.update_expert_bias()
    return norm


def fsdp_worker(optimizer: str, clip: float) -> dict:
    rank = dist.get_rank()
    model = fully_shard_model(SharedMoENet())
    sharded = {n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"}
    opt = _optimizer(optimizer, model.parameters())
    norms = [_fsdp_step(model, opt, *_batch(step, rank), clip) for step in range(STEPS)]
    full = {n: p.full_tensor() if n in sharded else p.detach() for n, p in model.named_parameters()}
    return full | {"norms": norms, "sharded": sorted(sharded), "expert_bias": model.moe.expert_bias}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer,clip", [("sgd", 0.5), ("adamw", 0.0)])
def test_fsdp2_training_matches_one_process_on_the_union(pool, optimizer, clip):
    results = pool.run(fsdp_worker, optimizer, clip)
    W = len(results)
    reference = SharedMoENet()
    opt = _optimizer(optimizer, reference.parameters())
    norms = []
    for step in range(STEPS):
        xs, ys = zip(*(_batch(step, rank) for rank in range(W)), strict=True)
        norms.append(_fsdp_step(reference, opt, torch.cat(xs), torch.cat(ys), clip))
    full = {n: p.detach() for n, p in reference.named_parameters()}
    layout = reference.moe.layout
    # SGD moves by the gradient: float64 rounding stays ~1e-16 (and a missed 1 / W would show). AdamW
    # is blind to the gradient's scale, and where a gradient is far below eps its step grows the
    # rounding of the summation order by lr / eps (5e6): ~1e-8 in the gate.
    atol = 1e-9 if optimizer == "sgd" else 1e-6
    for rank, res in enumerate(results):
        # every dense parameter is sharded (the gate and shared experts too); the experts are not
        assert res["sharded"] == sorted(n for n in full if not n.startswith("moe.experts."))
        torch.testing.assert_close(res["norms"], norms, rtol=1e-9, atol=0)
        torch.testing.assert_close(res["expert_bias"], reference.moe.expert_bias, rtol=0, atol=0)
        shards = layout.__class__(num_experts=E, model_dim=M, hidden_dim=H, world_size=W, rank=rank).shard(
            {n.split(".")[-1]: p for n, p in full.items() if n.startswith("moe.experts.")}
        )
        for name, want in full.items():
            if name.startswith("moe.experts."):
                want = shards[name.split(".")[-1]]
            torch.testing.assert_close(res[name], want, rtol=0, atol=atol, msg=name)
