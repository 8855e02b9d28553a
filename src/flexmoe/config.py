"""Typed, validated configuration of one MoE layer (DESIGN section 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexmoe.layout import ACTIVATIONS

GATES = ("linear", "cosine")
AUX_LOSSES = ("gshard", "importance_load")
ALL_TO_ALL_ALGORITHMS = ("flat", "2dh")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")


def _flag(name: str, value: object) -> None:
    # a string such as "no" would otherwise count as true
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _number(name: str, value: object, *, at_least: float | None = None) -> None:
    """A finite int or float (not a bool, not a string), optionally >= `at_least`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (at_least is not None and value < at_least):
        bound = "" if at_least is None else f" >= {at_least:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_dtype(dtype: object) -> None:
    """The parameter dtype of a layer: None (torch's default) or a floating point dtype."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be None or one of {FLOAT_DTYPES}, got {dtype!r}")


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """Everything `route` needs: gate output -> top-k assignments, capacity, aux loss."""

    num_experts: int
    top_k: int = 2
    capacity_factor: float = 1.0  # > 0 fixed, 0 dropless, < 0 dynamic with upper bound |cf|
    gate_noise: float = 0.0
    normalize_gate: bool = True
    batch_prioritized_routing: bool = False
    aux_loss: str = "gshard"
    router_z_loss: float = 0.0

    def __post_init__(self) -> None:
        _positive_int("num_experts", self.num_experts)
        _positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must not exceed num_experts={self.num_experts}")
        _number("capacity_factor", self.capacity_factor)
        _number("gate_noise", self.gate_noise, at_least=0)
        _number("router_z_loss", self.router_z_loss, at_least=0)
        _flag("normalize_gate", self.normalize_gate)
        _flag("batch_prioritized_routing", self.batch_prioritized_routing)
        _choice("aux_loss", self.aux_loss, AUX_LOSSES)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The full layer configuration; `MoELayer(...)` builds one from its arguments."""

    model_dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    capacity_factor: float = 1.0
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    gate: str = "linear"
    gate_noise: float = 0.0
    normalize_gate: bool = True
    batch_prioritized_routing: bool = False
    is_postscore: bool = True
    aux_loss: str = "gshard"
    router_z_loss: float = 0.0
    activation: str = "gelu"
    bias: bool = True
    parallelism: int | str = "adaptive"
    pipeline_degree: int | str = "adaptive"
    all_to_all: str = "auto"
    local_world_size: int | None = None

    def __post_init__(self) -> None:
        _positive_int("model_dim", self.model_dim)
        _positive_int("hidden_dim", self.hidden_dim)
        _positive_int("num_experts", self.num_experts)
        _choice("gate", self.gate, GATES)
        _choice("activation", self.activation, ACTIVATIONS)
        _flag("is_postscore", self.is_postscore)
        _flag("bias", self.bias)
        if self.parallelism != "adaptive" and (
            isinstance(self.parallelism, bool)
            or not isinstance(self.parallelism, int)
            or self.parallelism < 0
        ):
            raise ValueError(f"parallelism must be 'adaptive' or an int r >= 0, got {self.parallelism!r}")
        if self.pipeline_degree != "adaptive":
            _positive_int("pipeline_degree", self.pipeline_degree)
        _choice("all_to_all", self.all_to_all, ("auto", *ALL_TO_ALL_ALGORITHMS))
        if self.local_world_size is not None:
            _positive_int("local_world_size", self.local_world_size)
        self.routing()  # validates the routing fields
        if self.eval_capacity_factor is not None:
            _number("eval_capacity_factor", self.eval_capacity_factor)

    def routing(self, *, training: bool = True) -> RoutingConfig:
        cf = self.capacity_factor
        if not training and self.eval_capacity_factor is not None:
            cf = self.eval_capacity_factor
        return RoutingConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=cf,
            gate_noise=self.gate_noise,
            normalize_gate=self.normalize_gate,
            batch_prioritized_routing=self.batch_prioritized_routing,
            aux_loss=self.aux_loss,
            router_z_loss=self.router_z_loss,
        )
