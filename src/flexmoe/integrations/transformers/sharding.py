"""Move a transformers model's experts into flexmoe's sharded layout and back.

Legend: E experts, M model dim, I expert hidden dim, X fc1 width (2I gated), W ranks.

`shard_experts(model)` replaces every experts module's full parameters by a flexmoe MoELayer
without a gate (routing comes from the model's own router, dropless) that holds 1/W of them
(whole experts when E >= W, hidden slices when E < W) and runs flexmoe's plans with the adaptive
runtime. The router, shared experts, attention and everything else stay as they are. Expert shards
are marked like every flexmoe expert parameter, so `flexmoe.parallel.data_parallel.wrap_data_parallel`
leaves them out of DDP's all-reduce; their gradient is that of the sum of all ranks' losses.
`unshard_experts(model)` all-gathers the shards back into the module's own parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flexmoe.core.experts import Experts
from flexmoe.core.layout import ExpertLayout
from flexmoe.integrations.transformers.backend import BACKEND_NAME, check_supported, expert_weights
from flexmoe.integrations.transformers.module_weights import is_transposed
from flexmoe.layer import MoELayer
from flexmoe.parallel.comm import all_gather_shards

_RESTORE_ATTR = "_flexmoe_previous_experts_implementation"


def moe_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every experts module that transformers dispatches through its ExpertsInterface."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "has_gate") and hasattr(m, "_is_expert_parallel") and hasattr(m, "config")
    }


def _hf_names(module: nn.Module) -> tuple[str, str, str | None, str | None]:
    up = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    if getattr(module, "has_bias", False):
        return up, "down_proj", f"{up}_bias", "down_proj_bias"
    return up, "down_proj", None, None


def _set_implementation(model: nn.Module, name: str) -> None:
    if not hasattr(model, "set_experts_implementation"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model.set_experts_implementation(name)


def _cut_from(full: dict[str, torch.Tensor], **experts_options) -> Callable[[ExpertLayout], Experts]:
    """MoELayer's build_experts: this rank's shard of a module's full expert tensors (nothing drawn)."""
    return lambda layout: Experts(layout, shard=layout.shard(full), **experts_options)


@torch.no_grad()
def shard_experts(model: nn.Module, *, group=None, **layer_options) -> nn.Module:
    """Shard every MoE block's experts over `group` (None: WORLD) into flexmoe's layout, in place.

    `layer_options` go to each MoELayer (e.g. parallelism=1, pipeline_degree=2, tuner=False,
    capacity_factor); routing, gate and activation come from the model."""
    modules = moe_experts_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no transformers experts module to shard")
    for key in ("gate", "activation", "bias", "group", "dtype", "device", "build_experts"):
        if key in layer_options:
            raise ValueError(f"shard_experts sets {key!r} from the model; do not pass it")
    layer_options.setdefault("capacity_factor", 0.0)  # the model's router expects every choice served
    for name, module in modules.items():
        if getattr(module, "flexmoe_layer", None) is not None:
            raise ValueError(f"{name}: experts are sharded already (call unshard_experts first)")
        if getattr(module, "_is_expert_parallel", False):
            raise ValueError(
                f"{name}: transformers' expert parallelism holds these experts already; use "
                "DistributedConfig(ep_implementation='flexmoe') instead of shard_experts, or load "
                "without ep_size"
            )
        activation = check_supported(module)
        w = expert_weights(module)
        E, M, _ = w.w1_GMX.shape
        top_k = getattr(module.config, "num_experts_per_tok", None) or 1
        full = {
            "fc1_weight": w.w1_GMX,
            "fc2_weight": w.w2_GHM,
            # layout.shard slices all four; a model without biases gets zeros that are never used
            "fc1_bias": w.b1_GX if w.b1_GX is not None else w.w1_GMX.new_zeros(E, w.w1_GMX.shape[2]),
            "fc2_bias": w.b2_GM if w.b2_GM is not None else w.w1_GMX.new_zeros(E, M),
        }
        bias, dtype, device = w.b1_GX is not None, w.w1_GMX.dtype, w.w1_GMX.device
        layer = MoELayer(
            M,
            w.w2_GHM.shape[1],
            E,
            top_k=min(top_k, E),
            gate=None,
            activation=activation,
            bias=bias,
            group=group,
            dtype=dtype,
            device=device,
            build_experts=_cut_from(full, bias=bias, dtype=dtype, device=device),
            **layer_options,
        )
        for param in layer.experts.parameters(recurse=False):
            param.requires_grad_(w.w1_GMX.requires_grad)
        for hf_name in _hf_names(module):
            if hf_name is not None:
                delattr(module, hf_name)  # the full tensors go: each rank keeps its 1/W in the layer
        module.flexmoe_layer = layer
    if not hasattr(model, _RESTORE_ATTR):
        setattr(model, _RESTORE_ATTR, model.config._experts_implementation)
    _set_implementation(model, BACKEND_NAME)
    return model


def _gather_shards(layer: MoELayer) -> list[dict[str, torch.Tensor]]:
    """Every rank's shard of the four expert tensors, in rank order (zeros for absent biases)."""
    experts = layer.experts
    local = {}
    for key in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        p = getattr(experts, key)
        if p is None:  # bias-free: zeros of the shard's shape keep layout.unshard uniform
            ref = experts.fc1_weight if key == "fc1_bias" else experts.fc2_weight
            p = ref.new_zeros(ref.shape[0], ref.shape[-1])
        local[key] = p.detach().contiguous()
    # one all-gather of the four flattened together, as the plans gather weights (strategies)
    sizes = [t.numel() for t in local.values()]
    rows_W = all_gather_shards(torch.cat([t.reshape(-1) for t in local.values()]), layer.groups.group)
    return [
        {key: part.view_as(t) for (key, t), part in zip(local.items(), row.split(sizes), strict=True)}
        for row in rows_W
    ]


@torch.no_grad()
def unshard_experts(model: nn.Module) -> nn.Module:
    """The inverse of shard_experts (a collective: every rank calls it): full transformers
    parameters back on every rank, the previous experts implementation restored."""
    modules = {n: m for n, m in moe_experts_modules(model).items() if getattr(m, "flexmoe_layer", None)}
    if not modules:
        raise ValueError(f"{type(model).__name__} has no sharded experts (call shard_experts first)")
    for module in modules.values():
        layer: MoELayer = module.flexmoe_layer
        full = ExpertLayout.unshard(layer.layout, _gather_shards(layer))
        transposed = is_transposed(module)
        up_name, down_name, up_bias_name, down_bias_name = _hf_names(module)
        requires_grad = layer.experts.fc1_weight.requires_grad
        values = {
            up_name: full["fc1_weight"] if transposed else full["fc1_weight"].transpose(1, 2),
            down_name: full["fc2_weight"] if transposed else full["fc2_weight"].transpose(1, 2),
        }
        if up_bias_name is not None:
            values[up_bias_name], values[down_bias_name] = full["fc1_bias"], full["fc2_bias"]
        del module.flexmoe_layer
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value.contiguous(), requires_grad=requires_grad))
    _set_implementation(model, getattr(model, _RESTORE_ATTR))
    delattr(model, _RESTORE_ATTR)
    return model
