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

from dataclasses import dataclass, field

import torch
from torch import nn

from flexmoe.models.swinv2 import Mlp, SwinV2, SwinV2Config

MOE_IMPLEMENTATIONS = ("flexmoe", "einsum")
GATES = ("linear", "cosine")
AUX_LOSSES = ("gshard", "importance_load")


@dataclass(frozen=True, kw_only=True)
class SwinV2MoEConfig(SwinV2Config):
    """SwinV2Config plus where the MoE layers go and how they route (Swin-MoE defaults)."""

    num_experts: int = 8
    # one tuple of block indices per stage; None = every odd block of the last two stages (Swin-MoE).
    # A stage entry (-1,) means no MoE block in that stage, as in the Swin-MoE configs.
    moe_blocks: tuple[tuple[int, ...], ...] | None = None
    top_k: int = 1
    capacity_factor: float = 1.25  # > 0 fixed, 0 dropless, < 0 dynamic with upper bound (DESIGN section 2)
    eval_capacity_factor: float | None = None  # None: same as capacity_factor; 0: dropless at inference
    gate: str = "linear"  # "linear" | "cosine"
    gate_noise: float = 1.0
    normalize_gate: bool = False  # Swin-MoE's NORMALIZE_GATE; only matters for top_k > 1
    batch_prioritized_routing: bool = True
    is_postscore: bool = True
    aux_loss: str = "importance_load"  # "gshard" | "importance_load"
    aux_loss_weight: float = 0.01
    router_z_loss: float = 0.0
    moe_activation: str = "gelu"
    moe_bias: bool = True
    moe_dropout: float = 0.0  # dropout on the MoE layer's output (Swin-MoE MOE_DROP)
    moe_implementation: str = "flexmoe"  # "flexmoe" | "einsum"
    # passed through to MoELayer
    group: object = field(default=None, compare=False, repr=False)  # torch.distributed process group
    parallelism: int | str = "adaptive"
    pipeline_degree: int | str = "adaptive"
    all_to_all: str = "auto"
    seed: int | None = None  # MoE layer i uses seed + i; None: drawn from torch's RNG

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.num_experts, bool)
            or not isinstance(self.num_experts, int)
            or self.num_experts < 1
        ):
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not 1 <= self.top_k <= self.num_experts
        ):
            raise ValueError(
                f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}"
            )
        for name, value, accepted in (
            ("gate", self.gate, GATES),
            ("aux_loss", self.aux_loss, AUX_LOSSES),
            ("moe_implementation", self.moe_implementation, MOE_IMPLEMENTATIONS),
        ):
            if value not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
        if self.gate_noise < 0:
            raise ValueError(f"gate_noise must be >= 0, got {self.gate_noise}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if not 0.0 <= self.moe_dropout < 1.0:
            raise ValueError(f"moe_dropout must be in [0, 1), got {self.moe_dropout}")
        if self.moe_blocks is not None:
            object.__setattr__(self, "moe_blocks", self._checked_moe_blocks())

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


def _moe_class(implementation: str) -> type[nn.Module]:
    if implementation == "einsum":
        try:
            from flexmoe.baselines import GShardMoELayer
        except ImportError as err:
            raise ImportError(
                f"moe_implementation='einsum' needs flexmoe.baselines.GShardMoELayer: {err}"
            ) from err
        return GShardMoELayer
    from flexmoe import MoELayer

    return MoELayer


def build_moe_layer(config: SwinV2MoEConfig, dim: int, hidden_dim: int, index: int) -> nn.Module:
    """The MoE layer of the index-th MoE block, with the config's routing and parallel settings."""
    if config.seed is not None:
        seed = config.seed + index
    elif config.moe_implementation == "einsum":  # the baseline needs an int seed: draw it like MoELayer does
        seed = int(torch.randint(0, 2**62, (1,)))
    else:
        seed = None
    return _moe_class(config.moe_implementation)(
        dim,
        hidden_dim,
        config.num_experts,
        top_k=config.top_k,
        capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
        gate=config.gate,
        gate_noise=config.gate_noise,
        normalize_gate=config.normalize_gate,
        batch_prioritized_routing=config.batch_prioritized_routing,
        is_postscore=config.is_postscore,
        aux_loss=config.aux_loss,
        router_z_loss=config.router_z_loss,
        activation=config.moe_activation,
        bias=config.moe_bias,
        group=config.group,
        parallelism=config.parallelism,
        pipeline_degree=config.pipeline_degree,
        all_to_all=config.all_to_all,
        seed=seed,
    )


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
