"""Wall-clock seconds a training step spends inside chosen blocks of a model, forward and backward.

A block's forward lasts from its forward pre-hook to its forward hook. Its backward lasts from the
moment its output's gradient is ready to the moment its input's gradient is: everything autograd runs
in between, the work of other modules' hooks included (FSDP2's gathers and reductions for the
block's parameters count as the block's). So the input must feed that block alone, as an MoE block's
normed hidden states do in a transformer layer; otherwise its gradient completes later and the
interval takes in other work. Meant for CPU runs and synchronised devices: it reads the host clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn


class BlockTimer:
    """Accumulates the seconds spent in `blocks` (forward and backward) until `reset()`."""

    def __init__(self, blocks: Iterable[nn.Module]):
        self.seconds = 0.0
        self._open: list[dict] = []  # calls between their pre-hook and their hook
        for block in blocks:
            block.register_forward_pre_hook(self._enter)
            block.register_forward_hook(self._leave)

    def reset(self) -> float:
        """The seconds so far, and start again from zero."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def _enter(self, block: nn.Module, args) -> None:
        call = {"start": time.perf_counter()}
        self._open.append(call)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.requires_grad:
            x.register_hook(lambda grad: self._close_backward(call))

    def _leave(self, block: nn.Module, args, out) -> None:
        call = self._open.pop()
        self.seconds += time.perf_counter() - call["start"]
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: call.__setitem__("backward_start", time.perf_counter()))

    def _close_backward(self, call: dict) -> None:
        if "backward_start" in call:
            self.seconds += time.perf_counter() - call.pop("backward_start")
