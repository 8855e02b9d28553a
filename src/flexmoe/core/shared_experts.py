"""Shared experts: an always-on dense FFN beside the routed experts (DeepSeek-V2/V3, Qwen2-MoE).

Legend: T tokens, M model dim, H shared hidden dim, X fc1 width (H, or 2H for swiglu, gate half first).

Its parameters are replicated like the gate (drawn from the layer's shared seed, averaged by the
user's data parallelism), and it runs through the same grouped FFN as the routed experts (one group
of all T rows), so it keeps the hand-written backward. With `gated`, its output is scaled per token by
sigmoid(x @ gate_weight.T) as in Qwen2-MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.core.init import uniform_init
from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn


class SharedExperts(nn.Module):
    def __init__(
        self,
        model_dim: int,
        hidden_dim: int,
        *,
        activation: str,
        bias: bool,
        gated: bool,
        generator: torch.Generator,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.activation = activation
        M, H = model_dim, hidden_dim
        X = 2 * H if activation == "swiglu" else H
        dtype = dtype or torch.get_default_dtype()

        def param(shape, fan_in):
            value = uniform_init(shape, fan_in=fan_in, generator=generator)
            return nn.Parameter(value.to(dtype=dtype, device=device))

        self.fc1_weight = param((M, X), M)
        self.fc1_bias = param((X,), M) if bias else None
        self.fc2_weight = param((H, M), H)
        self.fc2_bias = param((M,), H) if bias else None
        self.gate_weight = param((1, M), M) if gated else None

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            # in the tokens' dtype: under autocast the layer hands over tokens already cast to it
            return None if t is None else t.unsqueeze(0).to(x_TM.dtype)

        w1, b1, w2, b2 = (one(t) for t in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias))
        w = ExpertWeights(w1, b1, w2, b2, self.activation)
        out_TM = grouped_expert_ffn(x_TM, w, (x_TM.shape[0],))
        if self.gate_weight is not None:
            out_TM = out_TM * torch.sigmoid(x_TM @ self.gate_weight.to(x_TM.dtype).t())
        return out_TM

    def extra_repr(self) -> str:
        return f"hidden={self.fc2_weight.shape[0]}, gated={self.gate_weight is not None}"
