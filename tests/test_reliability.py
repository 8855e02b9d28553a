"""Single-process reliability: modules that copy and pickle, validated constructor arguments, shape
checks in the functional API, capacity bounded by the token count, and settings that cannot run
refused at construction."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from flexmoe import MoELayer

M, H, E = 8, 16, 4


def _trained_layer(**kwargs) -> MoELayer:
    layer = MoELayer(M, H, E, seed=0, dtype=torch.float64, **kwargs)
    x = torch.randn(12, M, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    return layer


def _outputs(layer: nn.Module, seed: int = 1) -> torch.Tensor:
    layer.eval()
    with torch.no_grad():
        return layer(torch.randn(9, M, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))


# -- copies and pickles ----------------------------------------------------------------------------
def test_deepcopy_after_a_training_step_gives_an_equal_independent_layer():
    layer = _trained_layer()
    assert layer.aux_loss.requires_grad  # the graph is still attached: the case that used to fail
    twin = copy.deepcopy(layer)
    assert not twin.aux_loss.requires_grad and twin.last_routing is None
    assert torch.equal(_outputs(twin), _outputs(layer))
    assert twin.experts.fc1_weight.data_ptr() != layer.experts.fc1_weight.data_ptr()
    with torch.no_grad():
        twin.experts.fc1_weight.add_(1.0)
    assert not torch.equal(_outputs(twin), _outputs(layer))
    twin.train()
    twin(torch.randn(3, M, dtype=torch.float64)).sum().backward()  # the copy trains on its own


def test_averaged_model_of_a_model_with_moe_layers():
    model = nn.Sequential(nn.Linear(M, M, dtype=torch.float64), _trained_layer())
    ema = AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)
    with torch.no_grad():
        model[1].experts.fc2_weight.mul_(2)
    ema.update_parameters(model)
    assert torch.allclose(ema.module[1].experts.fc2_weight, model[1].experts.fc2_weight * (0.1 + 0.9 * 0.5))


@pytest.mark.parametrize("tuner", [True, False])
def test_torch_save_and_pickle_round_trips_give_the_same_outputs(tuner):
    layer = _trained_layer(tuner=tuner)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_outputs(loaded), _outputs(layer))
    assert torch.equal(_outputs(pickle.loads(pickle.dumps(layer))), _outputs(layer))


def test_last_routing_does_not_hold_the_graph():
    layer = MoELayer(M, H, E, seed=0)
    layer(torch.randn(5, M, requires_grad=True))
    routing = layer.last_routing
    assert not routing.weights_TK.requires_grad and not routing.weight_N.requires_grad
    assert not routing.aux_loss.requires_grad
    assert layer.aux_loss.requires_grad  # the loss the user adds still carries its gradient
