"""Time one step of a layer for the tuner: its forward, plus its backward up to the LAST gradient the
layer produces, whichever that is: the input's gradient, or a parameter's once accumulated. The
parameter gradients can come last: r = 0 reduce-scatters the expert gradients after the input
gradient is known, and a plan is only as fast as all of its work. The time between the forward's end
and the backward's start (other layers' work) is not counted."""

from __future__ import annotations

import torch


class TrialTimer:
    def __init__(self, tuner, trial, *, forward_s: float, x: torch.Tensor, y: torch.Tensor, params):
        self.tuner, self.trial, self.clock = tuner, trial, tuner.clock
        self.forward_s = forward_s
        self.backward_start: float | None = None
        self.done = False
        self.handles = [y.register_hook(self._backward_started)]
        events = [x] if x.requires_grad else []
        self.pending = len(events) + len(params)
        for t in events:
            self.handles.append(t.register_hook(self._event))
        for p in params:
            self.handles.append(p.register_post_accumulate_grad_hook(self._event))

    def _backward_started(self, grad):
        self.backward_start = self.clock()

    def _event(self, _):
        # hooks are removed later (cancel), not here: removing one while autograd runs the hooks is unsafe
        if self.done or self.backward_start is None:
            return
        self.pending -= 1
        if self.pending == 0:
            self.done = True
            self.tuner.record(self.trial, self.forward_s + self.clock() - self.backward_start)

    def cancel(self) -> None:
        """Drop the hooks; a step whose backward never ran (or not yet) records nothing."""
        self.done = True
        for h in self.handles:
            h.remove()
        self.handles = []


def time_step(
    tuner, trial, *, forward_s: float, x: torch.Tensor, y: torch.Tensor, params
) -> TrialTimer | None:
    """Record the forward time now when no backward will run; else leave a timer on the graph."""
    params = [p for p in params if p.requires_grad]
    if not (y.requires_grad and torch.is_grad_enabled()) or not (x.requires_grad or params):
        tuner.record(trial, forward_s)
        return None
    return TrialTimer(tuner, trial, forward_s=forward_s, x=x, y=y, params=params)
