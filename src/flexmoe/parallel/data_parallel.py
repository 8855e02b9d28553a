"""Data-parallel training around MoE layers: DDP for the replicated parameters only.

Expert shards are not replicated: their gradient already is the gradient of the SUM of all ranks'
losses (DESIGN section 3). Training on W ranks should match one process trained on the union of the
batches with a mean loss, so the replicated parameters are averaged by DDP as usual and the expert
shards' gradients are scaled by 1 / W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flexmoe.core.experts import is_expert_param

__all__ = ["clip_grad_norm", "expert_parameter_names", "unwrap", "wrap_data_parallel"]


def expert_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if is_expert_param(p)]


def _scale_expert_grads(model: nn.Module, factor: float) -> list:
    handles = []
    for p in model.parameters():
        if is_expert_param(p) and p.requires_grad:
            handles.append(p.register_hook(lambda g, f=factor: g * f))
    return handles


def wrap_data_parallel(model: nn.Module, *, group=None, **ddp_kwargs) -> nn.Module:
    """DDP over `group` (None = WORLD) leaving expert parameters out of the gradient all-reduce.

    Returns the model unchanged on a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    model._flexmoe_grad_scale_hooks = _scale_expert_grads(model, 1.0 / world_size)
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, process_group=group, device_ids=device_ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def clip_grad_norm(model: nn.Module, max_norm: float, *, group=None) -> float:
    """Clip by the norm of the WHOLE model's gradient: the replicated parameters (identical on every rank
    after DDP) counted once, plus every rank's expert shards. Every rank gets the same factor, so the
    replicated parameters stay identical across ranks."""
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is not None:
            (expert if is_expert_param(p) else dense).append(p.grad)
    device = next(model.parameters()).device

    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            total += g.detach().double().pow(2).sum()
        return total

    expert_sq = squares(expert)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(expert_sq, group=group)
    norm = float((squares(dense) + expert_sq).sqrt())
    if max_norm > 0 and norm > max_norm:
        for g in dense + expert:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
