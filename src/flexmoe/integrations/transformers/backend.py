"""The "flexmoe" experts backend for transformers' ExpertsInterface.

Legend: T tokens, k choices per token, N kept assignments (grouped by expert), E experts (this
rank's, under transformers' expert parallelism).

Experts whose math flexmoe's fused FFN computes (SwiGLU with the gate half first, or SiLU / ReLU /
erf GELU without a gate; optional biases) run through it on views of the module's own parameters
(module_weights). The others (a custom `_apply_gate` such as GPT-OSS's clamped, interleaved SwiGLU,
another activation, a post-expert norm) take the generic path (generic_experts): the same grouped
GEMMs, the module's own element-wise code through autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations as hf_activations
from transformers.integrations import moe as hf_moe

from flexmoe.core.routing import routing_from_topk
from flexmoe.integrations.transformers.generic_experts import generic_experts_forward
from flexmoe.integrations.transformers.module_weights import fc_weights
from flexmoe.ops.expert_ffn import Activation, CustomActivation, ExpertWeights, packed_moe

BACKEND_NAME = "flexmoe"

# the gating transformers applies unless a model overrides `_apply_gate`: act_fn(gate half) * up half
_DEFAULT_APPLY_GATE = getattr(hf_moe, "_default_apply_gate", None)


def _activation_kind(act_fn: object) -> str | None:
    """flexmoe's name for a transformers activation module, or None when flexmoe has no exact match."""
    if isinstance(act_fn, nn.SiLU | hf_activations.SiLUActivation):
        return "silu"
    if isinstance(act_fn, nn.ReLU):
        return "relu"
    if isinstance(act_fn, nn.GELU) and act_fn.approximate == "none":
        return "gelu"
    if type(act_fn) is hf_activations.GELUActivation:  # erf GELU (F.gelu or its Python twin)
        return "gelu"
    return None


def unfused_reason(module: nn.Module) -> str | None:
    """Why flexmoe's fused FFN cannot run this experts module's math exactly; None when it can."""
    name = type(module).__name__
    act_name = type(getattr(module, "act_fn", None)).__name__
    if getattr(module, "has_post_expert_norm", False):
        return f"{name} applies a norm after each expert"
    act = _activation_kind(getattr(module, "act_fn", None))
    if not getattr(module, "has_gate", True):
        if act is None:
            return (
                f"{name}: activation {act_name} has no exact flexmoe equivalent (supported: SiLU, ReLU, "
                "erf GELU)"
            )
        return None
    custom_gate = getattr(type(module), "_apply_gate", None)
    if _DEFAULT_APPLY_GATE is None or custom_gate is not _DEFAULT_APPLY_GATE:
        return f"{name} defines its own _apply_gate (e.g. GPT-OSS's clamped, interleaved SwiGLU)"
    if not getattr(module, "is_concatenated", True):
        return f"{name} interleaves its gate and up columns"
    if act != "silu":
        return f"{name}: gated experts with activation {act_name} (flexmoe's fused FFN runs SwiGLU: SiLU)"
    return None


def check_supported(module: nn.Module) -> str:
    """flexmoe's fused activation for this experts module, or a ValueError saying why there is none
    (what flexmoe's sharded layer and its plans need; the backend itself runs every module)."""
    reason = unfused_reason(module)
    if reason is not None:
        raise ValueError(
            f"{reason}: flexmoe's sharded experts run only what its fused FFN computes (SwiGLU, or "
            "SiLU/ReLU/erf GELU without a gate); experts_implementation='flexmoe' runs this module "
            "unsharded, or under transformers' own ep_implementation='all_to_all'"
        )
    return _fused_activation(module)


def _fused_activation(module: nn.Module) -> str:
    """flexmoe's fused activation for a module it computes exactly (unfused_reason None)."""
    return "swiglu" if getattr(module, "has_gate", True) else _activation_kind(module.act_fn)


def module_activation(module: nn.Module) -> Activation:
    """What runs between the experts' two GEMMs: flexmoe's fused activation when it computes the
    module's exactly, else the module's own code (`_apply_gate`, or `act_fn` without a gate)."""
    reason = unfused_reason(module)
    if reason is None:
        return _fused_activation(module)
    if getattr(module, "has_post_expert_norm", False):  # a norm with parameters after fc2, not between
        raise ValueError(f"{reason}: flexmoe's FFN runs code only between the two GEMMs")
    gated = getattr(module, "has_gate", True)
    return CustomActivation(type(module).__name__, module._apply_gate if gated else module.act_fn)


def layout_activation(module: nn.Module) -> str:
    """The activation that gives flexmoe's expert layout the module's fc1 width: "swiglu" for 2I
    columns (whatever their order; the module's code reads them), its own for I."""
    activation = module_activation(module)
    if isinstance(activation, str):
        return activation
    return "swiglu" if getattr(module, "has_gate", True) else "gelu"


def expert_weights(module: nn.Module) -> ExpertWeights:
    """The module's expert parameters as flexmoe's fc1 [E, M, X], fc2 [E, I, M] (views, no copies)."""
    return ExpertWeights(*fc_weights(module), module_activation(module))


def local_routing(module: nn.Module, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """(token_N, weight_N, sizes) of the assignments to this module's E experts, grouped by expert.

    Under transformers' expert parallelism an id >= E marks a choice of another rank's expert (its
    "all_reduce" EP sends them with weight 0): those are routed to one extra expert, whose rows come
    last in expert order and are dropped, so they cost no GEMM."""
    E = module.num_experts
    extra = int(bool(getattr(module, "_is_expert_parallel", False)))
    if extra:
        top_k_index = top_k_index.clamp(max=E)
    routing = routing_from_topk(top_k_index, top_k_weights, E + extra)
    sizes = tuple(routing.kept_counts[:E])
    N = sum(sizes)
    return routing.token_N[:N], routing.weight_N[:N], sizes


def flexmoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts signature: hidden_states [T, M], top_k_index/top_k_weights [T, k] -> [T, M]."""
    layer = getattr(self, "flexmoe_layer", None)
    if layer is not None:  # shard_experts moved the experts into a flexmoe MoELayer
        return layer(hidden_states, top_k_index=top_k_index, top_k_weights=top_k_weights)
    token_N, weight_N, sizes = local_routing(self, top_k_index, top_k_weights)
    if unfused_reason(self) is not None:
        return generic_experts_forward(self, hidden_states, token_N, weight_N, sizes)
    w = expert_weights(self)
    y_TM = packed_moe(hidden_states.to(w.w1_GMX.dtype), token_N, weight_N, w, sizes, is_postscore=True)
    return y_TM.to(hidden_states.dtype)


def register() -> None:
    """Register (again) the "flexmoe" backend; importing flexmoe.integrations.transformers does it."""
    hf_moe.ExpertsInterface.register(BACKEND_NAME, flexmoe_experts_forward)


__all__ = [
    "BACKEND_NAME",
    "check_supported",
    "expert_weights",
    "flexmoe_experts_forward",
    "layout_activation",
    "local_routing",
    "module_activation",
    "register",
    "unfused_reason",
]
