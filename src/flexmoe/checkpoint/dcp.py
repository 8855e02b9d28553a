"""torch.distributed.checkpoint (DCP) for flexmoe's expert shards: an adapter around the standard
`get_model_state_dict` / `set_model_state_dict`, so an FSDP2 + flexmoe model saves with `dcp.save` and
loads with `dcp.load` at any world size.

DCP re-shards what it is given as DTensors: it stores each rank's box (offsets and sizes) of one
global tensor and reads back whichever boxes the loading ranks hold. A flexmoe expert shard is such a
box once the expert tensors take canonical global shapes that do not depend on the world size:

    fc1_weight [E, M, H]  ([E, M, 2, H] for swiglu: the gate and up halves)
    fc1_bias   [E, H]     ([E, 2, H] for swiglu)
    fc2_weight [E, H, M]
    fc2_bias   [E, M]

Rank i of a layer's layout holds experts first_expert .. first_expert + E_local - 1 along dim 0 and,
when s = W / E > 1 ranks share an expert, hidden slice i % s along H (along M for fc2_bias; section 1
of DESIGN): a DTensor on the mesh (W / s expert groups, s) with placements (Shard(0), Shard(sliced
dim)). Its local tensor is a view of the parameter, so `dcp.load` writes into the parameters.

    sd = expert_dtensors(model, get_model_state_dict(model))
    dcp.save(sd, checkpoint_id=path)
    # later, at any world size whose layouts are valid for the layers:
    sd = expert_dtensors(model, get_model_state_dict(model))
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, expert_shards(model, sd))

Model state only: flexmoe's own checkpoints (save_checkpoint) keep the optimizer state and re-slice
it too. Without torch.distributed the adapter gives the whole tensors in their canonical shapes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.checkpoint.model_state import expert_params, unwrap
from flexmoe.core.layout import ExpertLayout
from flexmoe.layer import MoELayer

__all__ = ["expert_dtensors", "expert_shards"]

# the dim each tensor's hidden (or, for fc2_bias, model) slice runs along, in the canonical shape
_SLICED_DIM = {"fc1_weight": -1, "fc1_bias": -1, "fc2_weight": 1, "fc2_bias": 1}


def expert_dtensors(model: nn.Module, state_dict: dict) -> dict:
    """`state_dict` (from get_model_state_dict(model)) with every expert shard replaced by its box of the
    canonical global tensor: a DTensor viewing the parameter (a plain tensor without
    torch.distributed)."""
    out = dict(state_dict)
    for key, (layout, group, param, name) in _expert_entries(model, state_dict).items():
        local = _canonical_view(param.detach(), layout, name)
        out[key] = local if group is None else _as_dtensor(local, layout, group, name)
    return out


def expert_shards(model: nn.Module, state_dict: dict) -> dict:
    """Inverse of expert_dtensors: the expert entries back in the parameters' own shapes, for
    set_model_state_dict."""
    out = dict(state_dict)
    for key, (_, _, param, _) in _expert_entries(model, state_dict).items():
        value = state_dict[key]
        local = value.to_local() if hasattr(value, "to_local") else value
        out[key] = local.reshape(param.shape)
    return out


def _expert_entries(model: nn.Module, state_dict: dict) -> dict[str, tuple]:
    """state_dict key -> (layout, process group or None, parameter, parameter name) of every expert
    parameter of the model's MoE layers."""
    entries = {}
    for layer_name, layer in unwrap(model).named_modules():
        if not isinstance(layer, MoELayer):
            continue
        group = None
        if dist.is_available() and dist.is_initialized():
            group = layer.group or dist.group.WORLD  # the layer's None means WORLD
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, param in expert_params(layer.experts).items():
            if prefix + name not in state_dict:
                missing = prefix + name
                raise ValueError(f"state_dict has no entry {missing!r}: pass get_model_state_dict(model)")
            entries[prefix + name] = (layer.layout, group, param, name)
    return entries


def _canonical_view(shard: torch.Tensor, layout: ExpertLayout, name: str) -> torch.Tensor:
    """A shard [E_local, ...] viewed in the canonical layout (swiglu's fc1 split into gate and up)."""
    if layout.activation == "swiglu" and name.startswith("fc1"):
        return shard.unflatten(-1, (2, shard.shape[-1] // 2))
    return shard


def _as_dtensor(local: torch.Tensor, layout: ExpertLayout, group, name: str):
    # imported here: DTensor takes a second to import, which users without DCP need not spend
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    s = layout.shards_per_expert
    ranks = torch.tensor(dist.get_process_group_ranks(group)).view(layout.world_size // s, s)
    # no process groups of its own: DCP moves nothing through the mesh, it only reads the boxes
    mesh = DeviceMesh(local.device.type, ranks, _init_backend=False)
    sliced = _SLICED_DIM[name] % local.dim()
    sizes = list(local.shape)
    sizes[0] = layout.num_experts
    sizes[sliced] *= s
    shape = torch.Size(sizes)
    stride = torch.empty(shape, device="meta").stride()  # the global tensor's, contiguous
    return DTensor.from_local(local, mesh, (Shard(0), Shard(sliced)), shape=shape, stride=stride)
