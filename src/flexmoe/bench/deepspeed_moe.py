"""DeepSpeed-MoE (deepspeed.moe.layer.MoE) as a benchmark anchor, when deepspeed is installed.

Configured to compute what flexmoe's layer computes as closely as its options allow: top-k softmax
gate, the capacity factor, tokens dropped past capacity, no random token selection (use_rts=False), no
gate noise, no second-expert sampling, min_capacity 0; experts are Linear -> ReLU (or GELU) -> Linear
with biases, expert parallel over the whole group (ep_size = W). One difference stays: which assignments
DeepSpeed keeps past capacity (its "probs" drop policy keeps the highest-scoring ones; flexmoe keeps
them in (choice, token) order); the work per step is the same [E, C, M] exchange either way.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.distributed as dist
from torch import nn


def available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu}


class _Expert(nn.Module):
    def __init__(self, model_dim: int, hidden_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(model_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, model_dim)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class DeepSpeedMoE(nn.Module):
    """y, aux = layer(x_TM): DeepSpeed's MoE layer on the initialised process group (gloo or NCCL)."""

    def __init__(
        self,
        *,
        model_dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float,
        activation: str = "relu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        super().__init__()
        import deepspeed
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)  # its per-layer group messages would flood the benchmark's table
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # attaches to the existing group
        self.moe = MoE(
            model_dim,
            _Expert(model_dim, hidden_dim, activation),
            num_experts=num_experts,
            ep_size=dist.get_world_size(),
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor,
            min_capacity=0,
            use_rts=False,
            noisy_gate_policy=None,
            drop_tokens=True,
            top2_2nd_expert_sampling=False,
        )
        self.moe.set_deepspeed_parallelism()  # what deepspeed.initialize would do: create its EP groups

    def forward(self, x_TM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, aux, _ = self.moe(x_TM.unsqueeze(0))
        return y.squeeze(0), aux
