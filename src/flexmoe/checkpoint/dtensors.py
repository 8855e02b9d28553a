"""FSDP2's parameters (DTensors) in flexmoe checkpoints: saved whole, loaded as this rank's part.

A checkpoint keeps the replicated state as whole tensors, so it loads at any world size and with or
without FSDP2. Saving gathers each DTensor (a collective: every rank calls `gathered` with the same
model and optimizer); loading hands each rank its part of the whole tensor, cut as the model's
DTensor is cut (no communication). Models without DTensors pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.parallel.data_parallel import dtensor_type


def gathered(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Whole copies of the model's DTensor state_dict entries and of the optimizer state of its
    DTensor parameters: ({state_dict key: tensor}, {parameter name: {state key: tensor}})."""
    dtensor = dtensor_type()
    if dtensor is None:
        return {}, {}
    entries = {k: v.full_tensor() for k, v in model.state_dict().items() if isinstance(v, dtensor)}
    optim = {}
    if optimizer is not None:
        for name, p in model.named_parameters():  # one order on every rank: the collectives match
            state = optimizer.state.get(p) or {}
            whole = {k: v.full_tensor() for k, v in state.items() if isinstance(v, dtensor)}
            if whole:
                optim[name] = {**state, **whole}
    return entries, optim


def like(value, current):
    """`value` (a whole tensor read from a checkpoint) as `current` holds it: this rank's part, a
    DTensor placed as `current` is, when `current` is a DTensor; else `value` itself."""
    dtensor = dtensor_type()
    if dtensor is None or not isinstance(current, dtensor) or not isinstance(value, torch.Tensor):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=current.device, dtype=current.dtype)
    # every rank read the same whole tensor, so each cuts its own part (src_data_rank=None: no send)
    return distribute_tensor(value, current.device_mesh, current.placements, src_data_rank=None)


def distributed_like_model(model: nn.Module, state: dict) -> dict:
    """A whole-tensor model state dict with each DTensor entry of the model cut as the model's is."""
    current = model.state_dict()
    return {k: like(v, current.get(k)) for k, v in state.items()}


def distributed_optimizer_state(optimizer, state: dict) -> dict:
    """An optimizer state dict (by parameter index, as `optimizer.load_state_dict` takes it) with
    every tensor shaped like its DTensor parameter cut as the parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {
        index: {
            k: like(v, params[index]) if getattr(v, "shape", None) == params[index].shape else v
            for k, v in entry.items()
        }
        for index, entry in state["state"].items()
    }
    return out
