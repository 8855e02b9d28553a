"""Routers: token features -> expert logits, always computed in float32 (float64 for float64 input).

Legend: T tokens, M model dim, E experts, P cosine projection dim (256).
Gate parameters are replicated on every rank; they are drawn from the layer's shared seed so that
every rank (and a single process with the same seed) starts from identical values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flexmoe.core.init import uniform_init

COSINE_PROJECTION_DIM = 256
COSINE_MAX_LOG_SCALE = math.log(100.0)


def gate_dtype(x: torch.dtype) -> torch.dtype:
    return torch.float64 if x == torch.float64 else torch.float32


class LinearGate(nn.Module):
    """logits = x @ weight.T with weight [E, M]."""

    def __init__(self, model_dim: int, num_experts: int, *, generator: torch.Generator, device=None):
        super().__init__()
        init = uniform_init((num_experts, model_dim), fan_in=model_dim, generator=generator).float()
        self.weight = nn.Parameter(init.to(device))

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        dtype = gate_dtype(x_TM.dtype)
        return x_TM.to(dtype) @ self.weight.to(dtype).t()


class CosineGate(nn.Module):
    """logits = normalize(proj(x)) @ normalize(sim, dim=0) * exp(min(temperature, log 100))."""

    def __init__(self, model_dim: int, num_experts: int, *, generator: torch.Generator, device=None):
        super().__init__()
        P = COSINE_PROJECTION_DIM
        self.proj = nn.Linear(model_dim, P, device=device)
        with torch.no_grad():
            self.proj.weight.copy_(uniform_init((P, model_dim), fan_in=model_dim, generator=generator))
            self.proj.bias.copy_(uniform_init((P,), fan_in=model_dim, generator=generator))
        self.sim = nn.Parameter((torch.randn((P, num_experts), generator=generator) * 0.01).to(device))
        self.temperature = nn.Parameter(torch.tensor(math.log(1 / 0.5), device=device))

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        dtype = gate_dtype(x_TM.dtype)
        proj_TP = nn.functional.linear(x_TM.to(dtype), self.proj.weight.to(dtype), self.proj.bias.to(dtype))
        sim_PE = nn.functional.normalize(self.sim.to(dtype), dim=0)
        scale = torch.exp(torch.clamp(self.temperature.to(dtype), max=COSINE_MAX_LOG_SCALE))
        return nn.functional.normalize(proj_TP, dim=-1) @ sim_PE * scale


def build_gate(kind: str, model_dim: int, num_experts: int, *, generator: torch.Generator, device=None):
    if kind == "linear":
        return LinearGate(model_dim, num_experts, generator=generator, device=device)
    if kind == "cosine":
        return CosineGate(model_dim, num_experts, generator=generator, device=device)
    raise ValueError(f"gate must be one of ('linear', 'cosine'), got {kind!r}")
