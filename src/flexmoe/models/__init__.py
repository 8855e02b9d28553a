"""Models built on flexmoe, and a registry of named sizes.

    model = create_model("swinv2_moe_tiny", num_experts=8)   # any config field can be overridden
    list_models()                                             # the accepted names

Shapes of the Swin-MoE sizes come from the Swin-MoE configs (github.com/microsoft/Swin-Transformer,
configs/swinmoe/swin_moe_{small,base}_patch4_window12_192_32expert_32gpu_22k.yaml): ImageNet-22K at 192 px,
patch 4, window 12, depths (2, 2, 18, 2), S: embed 96 / heads (3, 6, 12, 24) / drop path 0.2,
B: embed 128 / heads (4, 8, 16, 32) / drop path 0.3; MoE in blocks 1, 3, ..., 17 of stage 3 and block 1
of stage 4, 32 experts (1 per GPU on 32 GPUs), top-1, capacity factor 1.25, MoE dropout 0.1, aux loss
weight 0.01, init std 0.005. One difference: those configs drop the experts' fc2 bias
(MLP_FC2_BIAS: False); MoELayer's `bias` switches both biases, and these sizes keep them.
SwinV2-T is SwinV2's swinv2_tiny_patch4_window8_256 (SwinV2 paper, table 1 / its configs).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from flexmoe.models.swinv2 import Mlp, SwinV2, SwinV2Block, SwinV2Config, WindowAttention
from flexmoe.models.swinv2_moe import MoEMlp, SwinV2MoE, SwinV2MoEConfig, build_moe_layer, swinv2_moe_config

# The MNIST-sized pair: 28x28 greyscale, patch 2 -> token grids 14, 7, 4, 2 (window 7, clamped at 4 and 2).
_TINY = dict(
    img_size=28,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=32,
    depths=(2, 2, 2, 2),
    num_heads=(2, 4, 8, 16),
    window_size=7,
    mlp_ratio=2.0,
    drop_path_rate=0.1,
)
_TINY_MOE = dict(_TINY, num_experts=8)
_SWIN_MOE_COMMON = dict(
    img_size=192,
    patch_size=4,
    in_chans=3,
    num_classes=21841,
    depths=(2, 2, 18, 2),
    window_size=12,
    init_std=0.005,
    num_experts=32,
    moe_blocks=((-1,), (-1,), (1, 3, 5, 7, 9, 11, 13, 15, 17), (1,)),
    moe_dropout=0.1,
)

_REGISTRY: dict[str, tuple[type[SwinV2Config], dict]] = {
    "swinv2_moe_tiny": (SwinV2MoEConfig, _TINY_MOE),
    "swinv2_moe_tiny_einsum": (SwinV2MoEConfig, dict(_TINY_MOE, moe_implementation="einsum")),
    "swinv2_tiny": (SwinV2Config, _TINY),  # the dense twin of swinv2_moe_tiny
    "swinv2_moe_small": (
        SwinV2MoEConfig,
        dict(_SWIN_MOE_COMMON, embed_dim=96, num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    ),
    "swinv2_moe_base": (
        SwinV2MoEConfig,
        dict(_SWIN_MOE_COMMON, embed_dim=128, num_heads=(4, 8, 16, 32), drop_path_rate=0.3),
    ),
    "swinv2_t_256": (
        SwinV2Config,
        dict(
            img_size=256,
            patch_size=4,
            embed_dim=96,
            depths=(2, 2, 6, 2),
            num_heads=(3, 6, 12, 24),
            window_size=8,
            drop_path_rate=0.2,
        ),
    ),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides) -> SwinV2Config:
    """The registered configuration of `name`, with fields overridden (validated). SwinV2-MoE models
    take MoE layer fields too (MoEConfig's names: num_experts, gate, ...)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; accepted names: {', '.join(list_models())}")
    cls, base = _REGISTRY[name]
    if cls is SwinV2MoEConfig:
        return swinv2_moe_config(**{**base, **overrides})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no config field(s) {unknown}; fields: {', '.join(sorted(fields))}")
    return cls(**{**base, **overrides})


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override config fields."""
    config = model_config(name, **overrides)
    return SwinV2MoE(config) if isinstance(config, SwinV2MoEConfig) else SwinV2(config)


__all__ = [
    "Mlp",
    "MoEMlp",
    "SwinV2",
    "SwinV2Block",
    "SwinV2Config",
    "SwinV2MoE",
    "SwinV2MoEConfig",
    "WindowAttention",
    "build_moe_layer",
    "create_model",
    "list_models",
    "model_config",
    "swinv2_moe_config",
]
