"""Data-parallel training around MoE layers: DDP or FSDP2 for the replicated parameters only.

Expert shards are not replicated: their gradient already is the gradient of the SUM of all ranks'
losses (DESIGN section 3). Training on W ranks should match one process trained on the union of the
batches with a mean loss, so the replicated parameters are averaged by DDP (or reduce-scattered by
FSDP2) as usual and the expert shards' gradients are scaled by 1 / W.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flexmoe.core.experts import is_expert_param

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "clip_grad_norm",
    "dtensor_type",
    "expert_parameter_names",
    "fully_shard_model",
    "unwrap",
    "wrap_data_parallel",
]


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


def fully_shard_model(model: nn.Module, *, mesh: DeviceMesh | None = None, **fsdp_kwargs) -> nn.Module:
    """FSDP2 (torch.distributed.fsdp.fully_shard) for the replicated parameters, in place: each largest
    submodule without expert parameters becomes an FSDP unit, then the root, with the expert shards
    in `ignored_params` (they are sharded already, and their gradients are complete without a
    reduction); those gradients are scaled by 1 / W as under wrap_data_parallel.

    `mesh`: a 1-D DeviceMesh over the MoE layers' group (None: every rank, on the parameters' device
    type); `fsdp_kwargs` go to every fully_shard call. Returns the model; unchanged on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    # imported here: loading FSDP takes a second and a half that DDP users need not spend
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    if mesh.size() == 1:
        return model
    experts = {p for p in model.parameters() if is_expert_param(p)}
    ignored = experts | set(fsdp_kwargs.pop("ignored_params", ()))
    for unit in _dense_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=ignored & set(unit.parameters()), **fsdp_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    model._flexmoe_grad_scale_hooks = _scale_expert_grads(model, 1.0 / mesh.size())
    return model


def _dense_units(module: nn.Module):
    """The largest submodules (below `module`) that hold parameters but no expert parameter."""
    for child in module.children():
        params = list(child.parameters())
        if any(is_expert_param(p) for p in params):
            yield from _dense_units(child)
        elif params:
            yield child


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def clip_grad_norm(model: nn.Module, max_norm: float, *, group=None) -> float:
    """Clip by the norm of the WHOLE model's gradient: the replicated parameters (identical on every rank
    after DDP) counted once, plus every rank's expert shards and every rank's part of a DTensor
    gradient (FSDP2's shards). Every rank gets the same factor, so the replicated parameters stay
    identical across ranks. `group`: the ranks the shards are spread over (None: WORLD)."""
    grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
    device = next(model.parameters()).device
    once = torch.zeros((), dtype=torch.float64, device=device)  # replicated: the same on every rank
    spread = torch.zeros((), dtype=torch.float64, device=device)  # each rank holds its own part
    dtensor = dtensor_type()
    for p, g in grads:
        if dtensor is not None and isinstance(g, dtensor):
            spread += _local_squares(g)
        elif is_expert_param(p):
            spread += _squares(g)
        else:
            once += _squares(g)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(spread, group=group)
    norm = float((once + spread).sqrt())
    if max_norm > 0 and norm > max_norm:
        for _, g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def _squares(g: torch.Tensor) -> torch.Tensor:
    return g.detach().double().pow(2).sum()


def dtensor_type():
    """DTensor, when torch.distributed.tensor is loaded (no DTensor exists before; importing it to
    tell would cost DDP users a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _local_squares(g) -> torch.Tensor:
    """This rank's share of a DTensor's sum of squares: its local part, divided by the ranks that
    hold a copy of it (Replicate mesh dimensions), so that the sum over the mesh counts it once."""
    from torch.distributed.tensor import Replicate

    copies = 1
    for size, placement in zip(g.device_mesh.shape, g.placements, strict=True):
        if isinstance(placement, Replicate):
            copies *= size
    return _squares(g.to_local()) / copies
