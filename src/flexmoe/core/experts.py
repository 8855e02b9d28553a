"""Expert parameters in the identical sharded layout (DESIGN section 1), and their FFN.

Legend: E experts, E_local experts on this rank, M model dim, H hidden dim, X fc1 width of a shard
(H_shard, or 2 * H_shard for swiglu), R rows grouped by expert.

Every expert is drawn from its own generator, seeded by (layer seed, expert id), and then sliced:
so the union of all ranks' shards equals what one process creates from the same seed, at any W, and
no rank ever materialises more than one whole expert.
"""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.core.init import uniform_init
from flexmoe.core.layout import ExpertLayout
from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn

EXPERT_PARAM_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def mark_expert(param: nn.Parameter) -> nn.Parameter:
    """Expert shards are not replicated: data-parallel wrappers must leave them out of all-reduce."""
    param.flexmoe_expert = True
    return param


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "flexmoe_expert", False)


def init_full_expert(expert: int, *, seed: int, model_dim: int, hidden_dim: int, activation: str):
    """One whole expert's parameters, like nn.Linear's default init (uniform +-1/sqrt(fan_in))."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + expert) % (2**63))
    width = 2 * hidden_dim if activation == "swiglu" else hidden_dim

    return {
        "fc1_weight": uniform_init((model_dim, width), fan_in=model_dim, generator=generator),
        "fc1_bias": uniform_init((width,), fan_in=model_dim, generator=generator),
        "fc2_weight": uniform_init((hidden_dim, model_dim), fan_in=hidden_dim, generator=generator),
        "fc2_bias": uniform_init((model_dim,), fan_in=hidden_dim, generator=generator),
    }


class Experts(nn.Module):
    """This rank's 1/W of all expert parameters; the same tensors serve every plan."""

    def __init__(
        self,
        layout: ExpertLayout,
        *,
        seed: int | None = None,
        shard: dict[str, torch.Tensor] | None = None,
        bias: bool = True,
        dtype=None,
        device=None,
    ):
        """Drawn from `seed`, or copied from `shard` (this rank's part, as layout.shard cuts it)."""
        super().__init__()
        if (seed is None) == (shard is None):
            raise ValueError("Experts takes exactly one of seed= (draw) and shard= (copy)")
        self.layout = layout
        self.has_bias = bias
        given = shard is not None
        if not given:
            parts = [
                layout.shard_expert(
                    init_full_expert(
                        e,
                        seed=seed,
                        model_dim=layout.model_dim,
                        hidden_dim=layout.hidden_dim,
                        activation=layout.activation,
                    )
                )
                for e in layout.local_expert_ids
            ]
            shard = {name: torch.stack([p[name] for p in parts]) for name in EXPERT_PARAM_NAMES}
        dtype = dtype or torch.get_default_dtype()
        for name in EXPERT_PARAM_NAMES:
            if not bias and name.endswith("bias"):
                self.register_parameter(name, None)
                continue
            # a given shard is copied: it may view a larger tensor that its owner means to free
            value = shard[name].to(dtype=dtype, device=device, copy=given)
            setattr(self, name, mark_expert(nn.Parameter(value)))

    @property
    def activation(self) -> str:
        return self.layout.activation

    def local_weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        """The shards as they are (whole experts when E >= W), cast to `dtype` when given (the cast
        is differentiable: gradients come back in the parameters' dtype)."""
        params = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        if dtype is not None:
            params = tuple(None if p is None else p.to(dtype) for p in params)
        return ExpertWeights(*params, self.activation)

    def forward(self, x_RM: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """Rows grouped by local expert (group sizes `sizes`) -> expert outputs, same layout."""
        return grouped_expert_ffn(x_RM, self.local_weights(), sizes)

    def extra_repr(self) -> str:
        L = self.layout
        return f"experts={L.num_experts}, local={L.local_experts}, shards_per_expert={L.shards_per_expert}"
