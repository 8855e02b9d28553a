"""Seeded parameter initialisation shared by the gate and the experts (identical on every rank)."""

from __future__ import annotations

import math

import torch


def uniform_init(shape: tuple[int, ...], *, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear's default, drawn in float64 from `generator`."""
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
