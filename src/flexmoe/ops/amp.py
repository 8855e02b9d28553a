"""Mixed precision: how flexmoe behaves under `torch.autocast` (DESIGN section 11).

The contract, on any device type autocast supports (CPU, CUDA, ...):
- the gate, routing and aux losses run in float32 (DESIGN section 2), with autocast disabled;
- the expert GEMMs, the all-to-all and the r = 0 weight all-gather run in the autocast dtype: the
  layer casts the tokens and the expert weights explicitly, at its boundary, then runs its plan with
  autocast disabled, so what runs is exactly an explicitly cast low-precision computation;
- float32 master parameters get float32 gradients (the casts' backward casts them up; sharded
  gradients are reduce-scattered in the master dtype, so summing W ranks' shares loses no bits);
- the layer returns the autocast dtype, as nn.Linear does under autocast.

flexmoe's hand-written autograd Functions declare their autocast behaviour with `amp_forward` /
`amp_backward`: torch.amp.custom_fwd / custom_bwd, with the device type taken from the Function's
tensor arguments (custom_fwd needs one, and the same Function serves CPU and CUDA tensors).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

__all__ = ["amp_backward", "amp_forward", "autocast_disabled", "autocast_dtype", "expert_autocast_dtype"]


def _supported(device_type: str) -> bool:
    try:  # e.g. "meta" tensors have no autocast
        torch.get_autocast_dtype(device_type)
    except RuntimeError:
        return False
    return True


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs eligible ops in on `device_type`, or None when it is off there."""
    if not _supported(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def expert_autocast_dtype(param_dtype: torch.dtype, device_type: str) -> torch.dtype | None:
    """The autocast dtype the experts run in, or None where autocast is off or does not apply
    (float64 parameters stay float64, as autocast leaves float64 ops alone)."""
    return None if param_dtype == torch.float64 else autocast_dtype(device_type)


@contextlib.contextmanager
def autocast_disabled(device_type: str) -> Iterator[None]:
    """Run the block with autocast off on `device_type` (a no-op where it is off already)."""
    if autocast_dtype(device_type) is None:
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    raise AssertionError("an autograd Function needs a tensor argument")


def amp_forward(*, cast_inputs: bool) -> Callable:
    """Declare a Function.forward's autocast behaviour (device type from its first tensor argument).

    cast_inputs=True: under autocast, floating-point tensor inputs (not float64) are cast to the
    autocast dtype and forward runs with autocast off: for Functions that do their own math with
    out= kernels, which autocast cannot retype. False: forward runs in the caller's autocast state:
    for Functions that only move data (collectives), whose outputs keep their inputs' dtype.
    """

    def decorate(forward: Callable) -> Callable:
        @functools.wraps(forward)
        def run(ctx, *args):
            device_type = _device_type(args)
            if not _supported(device_type):
                ctx.amp_device_type = None
                return forward(ctx, *args)
            ctx.amp_device_type = device_type
            low = autocast_dtype(device_type) if cast_inputs else None
            return torch.amp.custom_fwd(forward, device_type=device_type, cast_inputs=low)(ctx, *args)

        return run

    return decorate


def amp_backward(backward: Callable) -> Callable:
    """Run a Function.backward in the autocast state its forward ran in (torch.amp.custom_bwd)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if ctx.amp_device_type is None:
            return backward(ctx, *grads)
        return torch.amp.custom_bwd(backward, device_type=ctx.amp_device_type)(ctx, *grads)

    return run
