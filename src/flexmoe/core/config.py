"""Typed, validated configuration of one MoE layer (DESIGN section 1)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from flexmoe.core.layout import ACTIVATIONS

GATES = ("linear", "cosine")
AUX_LOSSES = ("gshard", "importance_load")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ALL_TO_ALL_ALGORITHMS = ("flat", "2dh", "dedup")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def one_of(default: object, choices: tuple) -> object:
    """A config field whose value is one of `choices`: validated by its dataclass, and agreed across
    ranks by its index (flexmoe.parallel.agreement.config_fields)."""
    return field(default=default, metadata={"choices": choices})


def _choice(name: str, value: object, accepted: tuple) -> None:
    # compared as strings (or None) only: True == 1 and the like must not pass
    ok = (value is None and None in accepted) or (isinstance(value, str) and value in accepted)
    if not ok:
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")


def _validate_modern_routing(c) -> None:
    """Score function, routed scaling and group-limited top-k (shared by both configs)."""
    _choice("score_function", c.score_function, SCORE_FUNCTIONS)
    check_finite_number("routed_scaling_factor", c.routed_scaling_factor)
    if c.routed_scaling_factor <= 0:
        raise ValueError(f"routed_scaling_factor must be a finite number > 0, got {c.routed_scaling_factor}")
    check_positive_int("num_groups", c.num_groups)
    if c.num_experts % c.num_groups:
        raise ValueError(f"num_groups={c.num_groups} must divide num_experts={c.num_experts}")
    if c.top_k_groups is not None:
        check_positive_int("top_k_groups", c.top_k_groups)
        if c.top_k_groups > c.num_groups:
            raise ValueError(f"top_k_groups={c.top_k_groups} must not exceed num_groups={c.num_groups}")
        eligible = c.top_k_groups * (c.num_experts // c.num_groups)
        if c.top_k > eligible:
            raise ValueError(
                f"top_k={c.top_k} must not exceed the {eligible} experts in top_k_groups={c.top_k_groups}"
            )


def _flag(name: str, value: object) -> None:
    # a string such as "no" would otherwise count as true
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_finite_number(name: str, value: object, *, at_least: float | None = None) -> None:
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
    score_function: str = "softmax"  # "sigmoid": independent scores per expert (DeepSeek-V3)
    routed_scaling_factor: float = 1.0  # multiplies the (renormalised) top-k weights
    num_groups: int = 1  # group-limited routing: experts split into num_groups equal groups ...
    top_k_groups: int | None = None  # ... and only the top_k_groups best groups are eligible (None: all)

    def __post_init__(self) -> None:
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must not exceed num_experts={self.num_experts}")
        check_finite_number("capacity_factor", self.capacity_factor)
        check_finite_number("gate_noise", self.gate_noise, at_least=0)
        check_finite_number("router_z_loss", self.router_z_loss, at_least=0)
        _flag("normalize_gate", self.normalize_gate)
        _flag("batch_prioritized_routing", self.batch_prioritized_routing)
        _validate_modern_routing(self)
        _choice("aux_loss", self.aux_loss, AUX_LOSSES)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Every setting of one MoE layer, declared once: `MoELayer(...)` keyword arguments, model configs
    and the cross-rank agreement all derive from these fields."""

    model_dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    capacity_factor: float = 1.0  # > 0 fixed, 0 dropless, < 0 dynamic with upper bound |cf|
    eval_capacity_factor: float | None = None  # None: same as capacity_factor
    gate: str | None = one_of("linear", (None, *GATES))  # None: no router; routing given to every forward
    gate_noise: float = 0.0
    normalize_gate: bool = True
    batch_prioritized_routing: bool = False
    is_postscore: bool = True
    aux_loss: str = one_of("gshard", AUX_LOSSES)
    router_z_loss: float = 0.0
    activation: str = one_of("gelu", ACTIVATIONS)
    bias: bool = True
    parallelism: int | str = "adaptive"  # or a fixed degree r >= 0
    pipeline_degree: int | str = "adaptive"  # or a fixed depth d >= 1
    all_to_all: str = one_of("auto", ("auto", *ALL_TO_ALL_ALGORITHMS))
    local_world_size: int | None = None  # ranks per node for 2DH; None: torchrun's LOCAL_WORLD_SIZE
    score_function: str = one_of("softmax", SCORE_FUNCTIONS)  # "sigmoid": DeepSeek-V3
    routed_scaling_factor: float = 1.0  # multiplies the (renormalised) top-k weights
    num_groups: int = 1  # group-limited routing: experts split into num_groups equal groups ...
    top_k_groups: int | None = None  # ... and only the top_k_groups best groups are eligible (None: all)
    # aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection only,
    # moved by this rate towards balance at every `update_expert_bias()`; 0 = off
    expert_bias_update_rate: float = 0.0
    shared_hidden_dim: int = 0  # hidden size of an always-on shared expert beside the routed ones; 0 = none
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x @ w) (Qwen2-MoE)

    @classmethod
    def from_arguments(cls, dims: tuple, settings: dict) -> MoEConfig:
        """The config of `MoELayer(model_dim, hidden_dim, num_experts, **settings)`: up to three
        positional dims, every other field by keyword (ValueError naming an unknown or repeated one)."""
        names = ("model_dim", "hidden_dim", "num_experts")
        if len(dims) > len(names):
            raise ValueError(
                f"at most {len(names)} positional arguments ({', '.join(names)}), got {len(dims)}"
            )
        repeated = sorted(set(names[: len(dims)]) & set(settings))
        if repeated:
            raise ValueError(f"{', '.join(repeated)} given both by position and by keyword")
        accepted = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - accepted)
        if unknown:
            raise ValueError(f"unknown MoE setting(s) {unknown}; accepted: {', '.join(sorted(accepted))}")
        missing = [n for n in names[len(dims) :] if n not in settings]
        if missing:
            raise ValueError(f"missing MoE setting(s) {missing}")
        return cls(**dict(zip(names, dims, strict=False)), **settings)

    def __post_init__(self) -> None:
        check_positive_int("model_dim", self.model_dim)
        check_positive_int("hidden_dim", self.hidden_dim)
        check_positive_int("num_experts", self.num_experts)
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                _choice(f.name, getattr(self, f.name), f.metadata["choices"])
        _flag("is_postscore", self.is_postscore)
        _flag("bias", self.bias)
        if self.parallelism != "adaptive" and (
            isinstance(self.parallelism, bool)
            or not isinstance(self.parallelism, int)
            or self.parallelism < 0
        ):
            raise ValueError(f"parallelism must be 'adaptive' or an int r >= 0, got {self.parallelism!r}")
        if self.pipeline_degree != "adaptive":
            check_positive_int("pipeline_degree", self.pipeline_degree)
        if self.all_to_all == "dedup" and self.pipeline_degree not in ("adaptive", 1):
            raise ValueError(
                f"all_to_all='dedup' is not pipelined: pipeline_degree must be 'adaptive' or 1, "
                f"got {self.pipeline_degree!r}"
            )
        if self.local_world_size is not None:
            check_positive_int("local_world_size", self.local_world_size)
        check_finite_number("expert_bias_update_rate", self.expert_bias_update_rate, at_least=0)
        _flag("shared_expert_gate", self.shared_expert_gate)
        if (
            isinstance(self.shared_hidden_dim, bool)
            or not isinstance(self.shared_hidden_dim, int)
            or self.shared_hidden_dim < 0
        ):
            raise ValueError(f"shared_hidden_dim must be an integer >= 0, got {self.shared_hidden_dim!r}")
        if self.expert_bias_update_rate > 0 and self.gate is None:
            raise ValueError("expert_bias_update_rate > 0 needs the layer's own gate (got gate=None)")
        if self.shared_expert_gate and self.shared_hidden_dim == 0:
            raise ValueError("shared_expert_gate=True needs a shared expert (shared_hidden_dim > 0)")
        self.routing()  # validates the routing fields
        if self.eval_capacity_factor is not None:
            check_finite_number("eval_capacity_factor", self.eval_capacity_factor)

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
            score_function=self.score_function,
            routed_scaling_factor=self.routed_scaling_factor,
            num_groups=self.num_groups,
            top_k_groups=self.top_k_groups,
        )
