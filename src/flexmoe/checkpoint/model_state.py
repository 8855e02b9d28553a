"""What a checkpoint takes from a model and its optimizer: the Experts modules and their shards, the
replicated state_dict entries, parameter names for the optimizer state, and plain-value checks."""

from __future__ import annotations

import io

import torch
from torch import nn

from flexmoe.core.experts import EXPERT_PARAM_NAMES, Experts
from flexmoe.core.layout import ExpertLayout


def unwrap(model: nn.Module) -> nn.Module:
    """A DDP-style wrapper keeps the model in `.module`; names are saved without its prefix."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def key_prefix(module_name: str) -> str:
    return f"{module_name}." if module_name else ""


def expert_params(module: Experts) -> dict[str, nn.Parameter]:
    return {n: p for n in EXPERT_PARAM_NAMES if (p := getattr(module, n, None)) is not None}


def expert_state_keys(experts: dict[str, Experts]) -> set[str]:
    """state_dict keys owned by Experts modules (sharded, so never saved as replicated)."""
    return {key_prefix(name) + key for name, m in experts.items() for key in m.state_dict(keep_vars=True)}


def layout_info(layout: ExpertLayout) -> dict:
    info = layout.metadata()
    info.pop("shards_per_expert")  # derived; kept in the module entry for readers of meta.pt
    return info


def layout_from(info: dict, rank: int = 0) -> ExpertLayout:
    return ExpertLayout(
        num_experts=info["num_experts"],
        model_dim=info["model_dim"],
        hidden_dim=info["hidden_dim"],
        world_size=info["world_size"],
        rank=rank,
        activation=info["activation"],
    )


def full_shapes(layout: ExpertLayout, bias: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the unsharded [E, ...] expert tensors."""
    E, M, H = layout.num_experts, layout.model_dim, layout.hidden_dim
    X = 2 * H if layout.activation == "swiglu" else H
    shapes = {"fc1_weight": (E, M, X), "fc1_bias": (E, X), "fc2_weight": (E, H, M), "fc2_bias": (E, M)}
    return {k: v for k, v in shapes.items() if bias or not k.endswith("bias")}


def compact(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage; save a view as its own tensor."""
    t = t.detach()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def copy_state(state: dict) -> dict:
    return {k: compact(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_group_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        group_names = []
        for i, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(
                    f"optimizer param group {g}, parameter {i} (shape {tuple(p.shape)}) is not a "
                    "parameter of the model"
                )
            group_names.append(names[id(p)])
        groups.append(group_names)
    return groups


def tuner_states(model: nn.Module) -> dict[str, dict]:
    """Every run-time tuner's decided buckets, by module name: replicated state (the decisions are
    agreed across ranks), so a resumed run does not explore what it already measured."""
    return {
        name: m.tuner.state_dict()
        for name, m in model.named_modules()
        if getattr(m, "tuner", None) is not None
    }


def load_tuner_states(model: nn.Module, states: dict[str, dict]) -> None:
    """The tuners take their saved buckets when the world size and ranks match (else they explore)."""
    for name, m in model.named_modules():
        if getattr(m, "tuner", None) is not None and name in states:
            m.tuner.load_state_dict(states[name])


def check_weights_only(obj, what: str) -> None:
    """Fail at save time, not at load time, on objects torch.load(weights_only=True) refuses."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{what} must hold only tensors and plain Python values (dict, list, tuple, str, int, "
            f"float, bool, None) so that it loads with weights_only=True: {exc}"
        ) from None
