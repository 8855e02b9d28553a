"""A transformers experts module's parameters as flexmoe's fc1 / fc2 (views, no copies).

Legend: E experts, M model dim, I expert hidden dim, X fc1 width (2I gated, I otherwise).

transformers holds `gate_up_proj [E, X, M]` (or, without a gate, `up_proj`) and `down_proj [E, M, I]`;
with `is_transposed` the last two dims are swapped. flexmoe wants fc1 [E, M, X] and fc2 [E, I, M]:
transposed views, so the gradients land on the module's own parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def is_transposed(module: nn.Module) -> bool:
    # transformers 5.23 names it is_transposed; earlier 5.x releases experts_are_transposed
    return bool(getattr(module, "is_transposed", getattr(module, "experts_are_transposed", False)))


MaybeTensor = torch.Tensor | None


def fc_weights(module: nn.Module) -> tuple[torch.Tensor, MaybeTensor, torch.Tensor, MaybeTensor]:
    """(fc1 [E, M, X], fc1 bias [E, X] or None, fc2 [E, I, M], fc2 bias [E, M] or None), the
    module's column order kept (gate rows first, or interleaved where the module interleaves)."""
    gated = getattr(module, "has_gate", True)
    up = module.gate_up_proj if gated else module.up_proj
    transposed = is_transposed(module)
    w1 = up if transposed else up.transpose(1, 2)
    w2 = module.down_proj if transposed else module.down_proj.transpose(1, 2)
    b1 = b2 = None
    if getattr(module, "has_bias", False):
        b1 = module.gate_up_proj_bias if gated else module.up_proj_bias
        b2 = module.down_proj_bias
    return w1, b1, w2, b2


__all__ = ["fc_weights", "is_transposed"]
