"""flexmoe's Experts interface read from a transformers experts module's own parameters.

Legend: L local experts, M model dim, X fc1 width, H expert hidden dim.

A flexmoe MoELayer runs its plans on `layer.experts` (fc1_weight [L, M, X], fc1_bias, fc2_weight
[L, H, M], fc2_bias, local_weights()). Under transformers' expert parallelism the experts module
already holds whole experts per rank, laid out as flexmoe's E >= W layout (rank i: experts
i * L .. (i + 1) * L - 1), so the layer can run on them as they are: HostExperts hands the layer
views of whatever the module's parameters are at call time (inside transformers' EP forward, the
local tensors of its DTensors), and the gradients land on the module's parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.core.layout import ExpertLayout
from flexmoe.integrations.transformers.backend import module_activation
from flexmoe.integrations.transformers.module_weights import fc_weights
from flexmoe.ops.expert_ffn import Activation, ExpertWeights


class HostExperts(nn.Module):
    """core.experts.Experts' interface over `host`'s parameters; owns no parameter of its own."""

    def __init__(self, host: nn.Module, layout: ExpertLayout):
        super().__init__()
        if layout.shards_per_expert != 1:
            raise ValueError(
                f"HostExperts needs whole experts per rank (E >= W), got E={layout.num_experts}, "
                f"W={layout.world_size}"
            )
        self.layout = layout
        self._host = (host,)  # a tuple hides it from nn.Module: the host owns and saves its parameters
        self.has_bias = bool(getattr(host, "has_bias", False))
        # the module's own: a fused activation, or its code (a custom gate such as GPT-OSS's); found
        # once, not on every access of a weight
        self._activation = module_activation(host)

    @property
    def activation(self) -> Activation:
        return self._activation

    def _weights(self) -> ExpertWeights:
        return ExpertWeights(*fc_weights(self._host[0]), self._activation)

    @property
    def fc1_weight(self) -> torch.Tensor:
        return self._weights().w1_GMX

    @property
    def fc1_bias(self) -> torch.Tensor | None:
        return self._weights().b1_GX

    @property
    def fc2_weight(self) -> torch.Tensor:
        return self._weights().w2_GHM

    @property
    def fc2_bias(self) -> torch.Tensor | None:
        return self._weights().b2_GM

    def local_weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        """The module's experts as they are, cast to `dtype` when given (differentiably)."""
        w = self._weights()
        if dtype is None:
            return w
        params = (w.w1_GMX, w.b1_GX, w.w2_GHM, w.b2_GM)
        return ExpertWeights(*(None if p is None else p.to(dtype) for p in params), w.activation)

    def extra_repr(self) -> str:
        return f"host={type(self._host[0]).__name__}, local={self.layout.local_experts}"


__all__ = ["HostExperts"]
