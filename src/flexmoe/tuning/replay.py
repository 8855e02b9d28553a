"""A forward that activation checkpointing runs again replays what the layer decided the first time.

torch.utils.checkpoint (use_reentrant=False) runs a block's forward again inside the backward pass,
when the backward first needs one of the block's activations. That second run must compute exactly
what the first computed: the same plan and the same agreed capacity, or its activations would not
match and its collectives could differ between ranks. And it is not a step: the tuner must neither
count nor time it, and the expert load must not count its tokens twice.

So a forward whose activations may be recomputed (it runs under saved-tensor hooks, as checkpoint's
forward does) remembers its decision for as long as its graph lives, and a forward that runs inside
a backward pass (a recomputation) replays the oldest decision that no backward pass has reached yet:
forwards are recomputed in the order they ran, in a plain step, with gradient accumulation, a
pipeline's 1F1B schedule, or a layer called twice in one block. A graph backpropagated again
(retain_graph) replays its decision again.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field

import torch

from flexmoe.core.plans import Plan

__all__ = ["Decision", "Decisions", "in_backward", "may_be_recomputed"]


@dataclass(frozen=True)
class Decision:
    """What a forward decided before any token moved: its plan, where the plan came from, and the
    capacity every rank agreed on."""

    plan: Plan
    source: str
    capacity: int


def _pass_id() -> int:
    """The backward pass this code runs in (they are numbered); -1 outside one."""
    return torch._C._current_graph_task_id()


def in_backward() -> bool:
    """Whether this code runs inside a backward pass (where checkpointing recomputes forwards)."""
    return _pass_id() != -1


def may_be_recomputed() -> bool:
    """Whether the activations saved now go through saved-tensor hooks (checkpoint's among them)."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is None or top_hooks(False) is not None


@dataclass(eq=False)
class _Remembered:
    """One forward's decision, and the backward passes that reached its output or replayed it."""

    decision: Decision
    reached_in: set[int] = field(default_factory=set)
    replayed_in: set[int] = field(default_factory=set)

    def __call__(self, grad: torch.Tensor) -> None:  # the hook on the forward's output
        self.reached_in.add(_pass_id())

    def untouched_before(self, pass_id: int) -> bool:
        return not (self.reached_in | self.replayed_in) - {pass_id}


class Decisions:
    """The decisions of one layer's forwards whose graphs are alive, oldest first."""

    def __init__(self) -> None:
        # held weakly: the hook on each forward's output holds its entry, as long as the graph lives
        self._alive: collections.deque[weakref.ref] = collections.deque()

    def remember(self, decision: Decision, output: torch.Tensor) -> None:
        """Keep `decision` while the graph of `output` lives, when that graph could be recomputed."""
        if not (output.requires_grad and torch.is_grad_enabled() and may_be_recomputed()):
            return
        entry = _Remembered(decision)
        output.register_hook(entry)
        self._alive = collections.deque([*(r for r in self._alive if r() is not None), weakref.ref(entry)])

    def replayed(self) -> Decision | None:
        """In a recomputation, the decision of the forward it recomputes; else None."""
        if not in_backward():
            return None
        pass_id = _pass_id()
        candidates = [e for e in self._entries() if pass_id not in e.replayed_in]
        # first the forwards no backward pass has reached; then (retain_graph) those reached before
        entry = next((e for e in candidates if e.untouched_before(pass_id)), None)
        entry = entry or next(iter(candidates), None)
        if entry is None:
            return None  # a forward run from a backward hook, say: an ordinary forward
        entry.replayed_in.add(pass_id)
        return entry.decision

    def __len__(self) -> int:
        return len(self._entries())

    def _entries(self) -> list[_Remembered]:
        return [e for e in (ref() for ref in self._alive) if e is not None]

    def __reduce__(self):
        return (Decisions, ())  # a copy or a pickle of a layer has no graph in flight
