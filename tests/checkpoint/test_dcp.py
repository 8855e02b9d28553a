"""torch.distributed.checkpoint through flexmoe.checkpoint.dcp: an FSDP2 + flexmoe model trained on 2
ranks saves with dcp.save and loads at 1 and 4 ranks (other expert layouts, an expert split between
two ranks at 4) with the outputs it had."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from flexmoe import MoELayer
from flexmoe.checkpoint.dcp import expert_dtensors, expert_shards
from flexmoe.parallel.data_parallel import fully_shard_model
from flexmoe.testing.distributed import DistributedPool

M, H, TOKENS = 8, 16, 24


class TwoMoENet(nn.Module):
    """gelu experts with biases (E=4), then swiglu experts without (E=2: split in two at W=4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        f64 = torch.float64
        self.inp = nn.Linear(M, M, dtype=f64)
        self.moe1 = MoELayer(M, H, 4, top_k=2, capacity_factor=0, seed=1, dtype=f64)
        swiglu = dict(activation="swiglu", bias=False)
        self.moe2 = MoELayer(M, H, 2, top_k=1, capacity_factor=0, seed=2, dtype=f64, **swiglu)
        self.out = nn.Linear(M, 3, dtype=f64)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        return self.out(h + self.moe2(h))


def _tokens(rank: int, world: int) -> torch.Tensor:
    x = torch.randn(TOKENS, M, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return x.chunk(world)[rank]


def _model() -> nn.Module:
    model = TwoMoENet()
    return fully_shard_model(model) if dist.is_initialized() else model


def save_worker(path: str) -> torch.Tensor:
    """Two SGD steps on per-rank batches (the weights leave their seeded start), save, and return
    this rank's outputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        x = torch.randn(6, M, generator=torch.Generator().manual_seed(10 * step + rank), dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    dcp.save(expert_dtensors(model, get_model_state_dict(model)), checkpoint_id=path)
    with torch.no_grad():
        return model(_tokens(rank, world))


def load_worker(path: str) -> torch.Tensor:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model = _model()
    with torch.no_grad():
        before = model(_tokens(rank, world))
    state = expert_dtensors(model, get_model_state_dict(model))
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, expert_shards(model, state))
    with torch.no_grad():
        after = model(_tokens(rank, world))
    assert not torch.allclose(before, after)  # the load changed the model
    return after


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The checkpoint directory and the outputs of all tokens at W=2."""
    path = str(tmp_path_factory.mktemp("dcp") / "step2")
    with DistributedPool(2, timeout_s=120) as pool:
        outputs = pool.run(save_worker, path)
    return path, torch.cat(outputs)


@pytest.mark.timeout(120)
def test_loads_on_one_process(saved):
    path, want = saved
    torch.testing.assert_close(load_worker(path), want, rtol=0, atol=1e-12)


@pytest.mark.timeout(120)
def test_loads_on_four_ranks(saved):
    path, want = saved
    with DistributedPool(4, timeout_s=120) as pool:
        outputs = pool.run(load_worker, path)
    torch.testing.assert_close(torch.cat(outputs), want, rtol=0, atol=1e-12)


def test_expert_entries_are_boxes_of_the_canonical_tensors():
    model = TwoMoENet()
    state = expert_dtensors(model, get_model_state_dict(model))
    assert state["moe1.experts.fc1_weight"].shape == (4, M, H)
    assert state["moe2.experts.fc1_weight"].shape == (2, M, 2, H)  # gate and up halves
    assert state["moe1.experts.fc2_bias"].shape == (4, M)
    back = expert_shards(model, state)
    for name, p in model.named_parameters():
        assert back[name].shape == p.shape


def test_a_state_dict_without_the_experts_is_refused():
    model = TwoMoENet()
    state = {k: v for k, v in get_model_state_dict(model).items() if "moe2.experts" not in k}
    with pytest.raises(ValueError, match="moe2.experts.fc1_weight"):
        expert_dtensors(model, state)
