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


# -- capacity --------------------------------------------------------------------------------------
def test_capacity_never_exceeds_the_token_count():
    layer = MoELayer(M, H, E, top_k=2, capacity_factor=1e6, seed=0, parallelism=1, tuner=False)
    x = torch.randn(64, M)
    y = layer(x)
    assert layer.last_plan.capacity == 64  # not ceil(2 * 1e6 * 64 / 4) = 32,000,000
    dropless = MoELayer(M, H, E, top_k=2, capacity_factor=0.0, seed=0, parallelism=1, tuner=False)
    torch.testing.assert_close(y, dropless(x))  # nothing is dropped either way


# -- constructor arguments -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(gate_noise=float("nan")), "gate_noise"),
        (dict(gate_noise=-1.0), "gate_noise"),
        (dict(router_z_loss=float("nan")), "router_z_loss"),
        (dict(router_z_loss=float("inf")), "router_z_loss"),
        (dict(normalize_gate="no"), "normalize_gate must be True or False"),
        (dict(batch_prioritized_routing=1), "batch_prioritized_routing must be True or False"),
        (dict(is_postscore=None), "is_postscore must be True or False"),
        (dict(bias="yes"), "bias must be True or False"),
        (dict(capacity_factor="1.0"), "capacity_factor must be a finite number"),
        (dict(capacity_factor=True), "capacity_factor must be a finite number"),
        (dict(eval_capacity_factor=float("nan")), "eval_capacity_factor must be a finite number"),
        (dict(eval_capacity_factor="0"), "eval_capacity_factor must be a finite number"),
        (dict(dtype=torch.int32), "dtype must be None or one of"),
        (dict(top_k=1.0), "top_k must be a positive integer"),
        (dict(gate=["linear"]), "gate must be one of"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(seed="1"), "seed must be None or an int"),
        (dict(tuner="yes"), "tuner must be True, False or"),
        (dict(parallelism=1.5), "parallelism must be 'adaptive' or an int"),
        (dict(pipeline_degree=0), "pipeline_degree must be a positive integer"),
        (dict(all_to_all="ring"), "all_to_all must be one of"),
        (dict(all_to_all="dedup", pipeline_degree=2), "all_to_all='dedup' is not pipelined"),
        (dict(local_world_size=0), "local_world_size must be a positive integer"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        MoELayer(M, H, E, **kwargs)


def test_routing_config_checks_its_fields_too():
    from flexmoe.core.config import RoutingConfig

    with pytest.raises(ValueError, match="gate_noise"):
        RoutingConfig(num_experts=4, gate_noise=float("nan"))
    with pytest.raises(ValueError, match="normalize_gate"):
        RoutingConfig(num_experts=4, normalize_gate="no")


# -- the functional API ----------------------------------------------------------------------------
def test_dispatch_and_combine_check_shapes_against_the_plan():
    from flexmoe.core.config import RoutingConfig
    from flexmoe.core.dispatch import combine, dispatch
    from flexmoe.core.routing import route

    plan = route(torch.randn(10, E), RoutingConfig(num_experts=E, top_k=2, capacity_factor=1.0))
    x = torch.randn(10, M)
    buffer = dispatch(x, plan)
    assert buffer.shape == (E, plan.buffer_capacity, M)
    assert combine(buffer, plan).shape == (10, M)
    for bad in (torch.randn(12, M), torch.randn(8, M), torch.randn(10)):
        with pytest.raises(ValueError, match=rf"T=10 tokens, got shape \({bad.shape[0]}"):
            dispatch(bad, plan)
    wrong_capacity = torch.randn(E, plan.buffer_capacity + 1, M)
    with pytest.raises(ValueError, match=rf"\[{E}, {plan.buffer_capacity}, M\].*got shape \({E}, "):
        combine(wrong_capacity, plan)
    with pytest.raises(ValueError, match="combine: expert_out must be"):
        combine(torch.randn(E + 1, plan.buffer_capacity, M), plan)


# -- what last_plan records ------------------------------------------------------------------------
def test_a_forced_plan_on_one_process_is_recorded_as_asked():
    from flexmoe import Plan

    layer = MoELayer(M, H, E, seed=0)
    x = torch.randn(6, M)
    y = layer(x, plan=Plan(r=0, d=4))
    record = layer.last_plan
    assert (record.r, record.d, record.all_to_all, record.source) == (0, 4, "flat", "forced")
    torch.testing.assert_close(y, layer(x, plan=Plan(r=1, d=1)))  # the same local computation
