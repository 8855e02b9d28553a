"""SwinV2-MoE: SwinV2 whose chosen blocks use a mixture-of-experts MLP (flexmoe.MoELayer).

The MoE recipe follows Swin-MoE (Hwang et al., "Tutel: Adaptive Mixture-of-Experts at Scale", 2022;
configs in github.com/microsoft/Swin-Transformer, configs/swinmoe/*.yaml): the MLP of every other block
of the last two stages is an MoE layer, top-1 routing, capacity factor 1.25, gate noise 1.0,
batch-prioritized routing, the importance + load balancing loss weighted 0.01, optional cosine router.
Swin-MoE itself is built on Swin V1 blocks; here the blocks are SwinV2's.

`moe_implementation="einsum"` builds the one-hot einsum formulation (flexmoe.baselines.GShardMoELayer)
with the same arguments, for side-by-side comparison.

Legend: B batch, L tokens per image, C channels (= model dim M of the MoE layer), E experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from flexmoe import MoEConfig, MoELayer
from flexmoe.models.swinv2 import Mlp, SwinV2, SwinV2Config

MOE_IMPLEMENTATIONS = ("flexmoe", "einsum")
# Swin-MoE's recipe: the MoE layers' settings unless the config gives its own `moe`
SWIN_MOE_RECIPE = dict(
    num_experts=8,
    top_k=1,
    capacity_factor=1.25,
    gate_noise=1.0,
    normalize_gate=False,  # Swin-MoE's NORMALIZE_GATE; only matters for top_k > 1
    batch_prioritized_routing=True,
    aux_loss="importance_load",
)


@dataclass(frozen=True, kw_only=True)
class SwinV2MoEConfig(SwinV2Config):
    """SwinV2Config plus where the MoE layers go and how they are built.

    `moe` holds every MoE layer setting (flexmoe.MoEConfig, declared there once); each MoE block's
    layer takes it with its own model_dim (the stage's width) and hidden_dim (mlp_ratio x width).
    None: Swin-MoE's recipe (SWIN_MOE_RECIPE). `with_moe_settings` changes single fields of it."""

    moe: MoEConfig | None = None
    # one tuple of block indices per stage; None = every odd block of the last two stages (Swin-MoE).
    # A stage entry (-1,) means no MoE block in that stage, as in the Swin-MoE configs.
    moe_blocks: tuple[tuple[int, ...], ...] | None = None
    aux_loss_weight: float = 0.01
    moe_dropout: float = 0.0  # dropout on the MoE layer's output (Swin-MoE MOE_DROP)
    moe_implementation: str = "flexmoe"  # "flexmoe" | "einsum"
    group: object = field(default=None, compare=False, repr=False)  # torch.distributed process group
    seed: int | None = None  # MoE layer i uses seed + i; None: drawn from torch's RNG

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.moe is None:
            width = self.embed_dim
            recipe = MoEConfig(model_dim=width, hidden_dim=int(width * self.mlp_ratio), **SWIN_MOE_RECIPE)
            object.__setattr__(self, "moe", recipe)
        elif not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be a flexmoe.MoEConfig or None, got {type(self.moe).__name__}")
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation must be one of {MOE_IMPLEMENTATIONS}, got {self.moe_implementation!r}"
            )
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if not 0.0 <= self.moe_dropout < 1.0:
            raise ValueError(f"moe_dropout must be in [0, 1), got {self.moe_dropout}")
        if self.moe_blocks is not None:
            object.__setattr__(self, "moe_blocks", self._checked_moe_blocks())

    def with_moe_settings(self, **settings) -> SwinV2MoEConfig:
        """This config with MoE layer fields changed (MoEConfig's names: num_experts, gate, ...)."""
        return dataclasses.replace(self, moe=dataclasses.replace(self.moe, **settings))

    def layer_config(self, dim: int, hidden_dim: int) -> MoEConfig:
        """The MoE layer settings of a block of width `dim`."""
        return dataclasses.replace(self.moe, model_dim=dim, hidden_dim=hidden_dim)

    def _checked_moe_blocks(self) -> tuple[tuple[int, ...], ...]:
        try:
            blocks = tuple(tuple(int(i) for i in stage) for stage in self.moe_blocks)
        except TypeError:
            raise ValueError(
                f"moe_blocks must be one sequence of block indices per stage, got {self.moe_blocks!r}"
            ) from None
        if len(blocks) != self.num_stages:
            raise ValueError(
                f"moe_blocks must have one entry per stage ({self.num_stages}), got {len(blocks)}"
            )
        for s, stage in enumerate(blocks):
            if stage == (-1,):
                continue
            bad = [i for i in stage if not 0 <= i < self.depths[s]]
            if bad:
                raise ValueError(f"moe_blocks[{s}] has block indices {bad} outside [0, {self.depths[s]})")
        return blocks

    def moe_block_set(self) -> frozenset[tuple[int, int]]:
        """(stage_index, block_index) of every MoE block."""
        if self.moe_blocks is None:
            stages = range(max(0, self.num_stages - 2), self.num_stages)
            return frozenset((s, i) for s in stages for i in range(1, self.depths[s], 2))
        return frozenset((s, i) for s, stage in enumerate(self.moe_blocks) for i in stage if i >= 0)


def swinv2_moe_config(**fields) -> SwinV2MoEConfig:
    """A SwinV2MoEConfig from model fields and MoE layer fields (MoEConfig's names: num_experts, gate,
    ...) in one call, as `create_model` overrides and `flexmoe train --model-overrides` give them."""
    model_fields = {f.name for f in dataclasses.fields(SwinV2MoEConfig)}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)} - {"model_dim", "hidden_dim"}
    unknown = sorted(set(fields) - model_fields - moe_fields)
    if unknown:
        accepted = ", ".join(sorted(model_fields | moe_fields))
        raise ValueError(f"SwinV2-MoE has no config field(s) {unknown}; fields: {accepted}")
    config = SwinV2MoEConfig(**{k: v for k, v in fields.items() if k in model_fields})
    moe_settings = {k: v for k, v in fields.items() if k in moe_fields}
    return config.with_moe_settings(**moe_settings) if moe_settings else config


def _moe_class(implementation: str) -> type[nn.Module]:
    if implementation == "einsum":
        from flexmoe.baselines import GShardMoELayer

        return GShardMoELayer
    return MoELayer


def build_moe_layer(config: SwinV2MoEConfig, dim: int, hidden_dim: int, index: int) -> nn.Module:
    """The MoE layer of the index-th MoE block, with the config's MoE settings and process group."""
    if config.seed is not None:
        seed = config.seed + index
    elif config.moe_implementation == "einsum":  # the baseline needs an int seed: draw it like MoELayer does
        seed = int(torch.randint(0, 2**62, (1,)))
    else:
        seed = None
    layer_config = config.layer_config(dim, hidden_dim)
    return _moe_class(config.moe_implementation)(config=layer_config, group=config.group, seed=seed)


class MoEMlp(nn.Module):
    """An MoE layer in an MLP slot: [B, L, C] -> [B, L, C], dropout on the output. The layer is `self.moe`."""

    def __init__(self, moe: nn.Module, *, dropout: float = 0.0):
        super().__init__()
        self.moe = moe
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.moe(x_BLC))


class SwinV2MoE(SwinV2):
    """SwinV2 with MoE MLPs in `config.moe_block_set()`; `aux_loss` = aux_loss_weight * sum of the layers'."""

    def __init__(self, config: SwinV2MoEConfig):
        chosen = config.moe_block_set()
        order = {sb: i for i, sb in enumerate(sorted(chosen))}

        def mlp_factory(stage: int, block: int, dim: int, hidden_dim: int) -> nn.Module:
            if (stage, block) not in chosen:
                return Mlp(dim, hidden_dim, drop=config.proj_drop, init_std=config.init_std)
            layer = build_moe_layer(config, dim, hidden_dim, order[(stage, block)])
            return MoEMlp(layer, dropout=config.moe_dropout)

        super().__init__(config, mlp_factory=mlp_factory)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE layers in block order."""
        return [blk.mlp.moe for blk in self.blocks() if isinstance(blk.mlp, MoEMlp)]

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.config.aux_loss_weight * super().aux_loss
