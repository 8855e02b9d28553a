"""The "flexmoe" experts backend for transformers' ExpertsInterface.

Legend: T tokens, k choices per token, E experts, M model dim, I expert hidden dim, X fc1 width
(2I gated, I otherwise).

A transformers experts module (decorated with `use_experts_implementation`) holds
`gate_up_proj [E, 2I, M]` (gate rows first) or, without a gate, `up_proj [E, I, M]`, and
`down_proj [E, M, I]`; with `is_transposed` the last two dims are swapped ([E, M, 2I], [E, I, M]);
optional biases `gate_up_proj_bias [E, 2I]` / `up_proj_bias`, `down_proj_bias [E, M]`. flexmoe's
grouped FFN wants fc1 [E, M, X] (gate half first) and fc2 [E, I, M]: both are transposed VIEWS of
the module's parameters, so nothing is copied and the gradients land on the module's parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations as hf_activations
from transformers.integrations import moe as hf_moe

from flexmoe.core.routing import routing_from_topk
from flexmoe.ops.expert_ffn import ExpertWeights
from flexmoe.parallel.strategies import run_packed

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


def is_transposed(module: nn.Module) -> bool:
    # transformers 5.23 names it is_transposed; earlier 5.x releases experts_are_transposed
    return bool(getattr(module, "is_transposed", getattr(module, "experts_are_transposed", False)))


def check_supported(module: nn.Module) -> str:
    """flexmoe's activation for this experts module, or a ValueError saying what it cannot run."""
    name = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"{name}: experts with a post-expert norm are not supported by the flexmoe backend")
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(
            f"{name}: transformers' own expert parallelism is active; use flexmoe's shard_experts(model) "
            "instead of transformers' expert-parallel plan with the flexmoe backend"
        )
    act = _activation_kind(getattr(module, "act_fn", None))
    if not getattr(module, "has_gate", True):
        if act is None:
            raise ValueError(
                f"{name}: activation {type(getattr(module, 'act_fn', None)).__name__} has no exact flexmoe "
                "equivalent (supported: SiLU, ReLU, erf GELU)"
            )
        return act
    custom_gate = getattr(type(module), "_apply_gate", None)
    if _DEFAULT_APPLY_GATE is None or custom_gate is not _DEFAULT_APPLY_GATE:
        raise ValueError(
            f"{name} defines its own _apply_gate (e.g. GPT-OSS's clamped, interleaved SwiGLU); the flexmoe "
            "backend runs only the default gating act_fn(gate) * up with SiLU; use another "
            "experts_implementation for this model"
        )
    if act != "silu":
        raise ValueError(
            f"{name}: gated experts with activation {type(getattr(module, 'act_fn', None)).__name__} are not "
            "supported; the flexmoe backend runs SwiGLU (act_fn SiLU) gated experts"
        )
    return "swiglu"


def expert_weights(module: nn.Module) -> ExpertWeights:
    """The module's expert parameters as flexmoe's fc1 [E, M, X], fc2 [E, I, M] (views, no copies)."""
    activation = check_supported(module)
    gated = getattr(module, "has_gate", True)
    up = module.gate_up_proj if gated else module.up_proj
    transposed = is_transposed(module)
    w1 = up if transposed else up.transpose(1, 2)
    w2 = module.down_proj if transposed else module.down_proj.transpose(1, 2)
    b1 = b2 = None
    if getattr(module, "has_bias", False):
        b1 = module.gate_up_proj_bias if gated else module.up_proj_bias
        b2 = module.down_proj_bias
    return ExpertWeights(w1, b1, w2, b2, activation)


def flexmoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts signature: hidden_states [T, M], top_k_index/top_k_weights [T, k] -> [T, M]."""
    layer = getattr(self, "flexmoe_layer", None)
    if layer is not None:  # shard_experts moved the experts into a flexmoe MoELayer
        return layer(hidden_states, top_k_index=top_k_index, top_k_weights=top_k_weights)
    w = expert_weights(self)
    num_experts = w.w1_GMX.shape[0]
    routing = routing_from_topk(top_k_index, top_k_weights, num_experts)
    y_TM = run_packed(hidden_states.to(w.w1_GMX.dtype), routing, w, is_postscore=True)
    return y_TM.to(hidden_states.dtype)


def register() -> None:
    """Register (again) the "flexmoe" backend; importing flexmoe.integrations.transformers does it."""
    hf_moe.ExpertsInterface.register(BACKEND_NAME, flexmoe_experts_forward)


__all__ = ["BACKEND_NAME", "check_supported", "expert_weights", "flexmoe_experts_forward", "register"]
