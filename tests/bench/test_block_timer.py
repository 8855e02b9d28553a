"""BlockTimer counts a block's forward and backward and nothing else, on a clock the test drives."""

from __future__ import annotations

import torch
from torch import nn

from flexmoe.bench import block_timer
from flexmoe.bench.block_timer import BlockTimer


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _AdvanceInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clock, seconds):
        ctx.clock, ctx.seconds = clock, seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.now += ctx.seconds
        return grad, None, None


class _Work(nn.Module):
    """Advances the clock by `forward_s` in its forward and by `backward_s` in its backward."""

    def __init__(self, clock: _Clock, forward_s: float, backward_s: float):
        super().__init__()
        self.clock, self.forward_s, self.backward_s = clock, forward_s, backward_s

    def forward(self, x):
        self.clock.now += self.forward_s
        return _AdvanceInBackward.apply(x, self.clock, self.backward_s)


def test_a_block_is_timed_forward_and_backward_and_the_rest_is_not(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(block_timer.time, "perf_counter", clock)
    block = nn.Sequential(_Work(clock, 100, 1_000))
    model = nn.Sequential(_Work(clock, 1, 10), block, _Work(clock, 10_000, 100_000))
    timer = BlockTimer([block])
    x = torch.ones(3, requires_grad=True)
    model(x).sum().backward()
    assert timer.reset() == 1_100
    assert timer.seconds == 0
    with torch.no_grad():  # no backward to come: the forward alone
        model(x)
    assert timer.reset() == 100


def test_every_call_of_a_block_in_a_step_counts(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(block_timer.time, "perf_counter", clock)
    block = _Work(clock, 100, 1_000)
    between = _Work(clock, 1, 10)
    timer = BlockTimer([block])
    x = torch.ones(3, requires_grad=True)
    block(between(block(x))).sum().backward()
    assert timer.reset() == 2_200
