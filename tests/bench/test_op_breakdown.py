"""The operator-kind breakdown: each kind where it belongs, einsum's bmm kept apart from the GEMMs."""

from __future__ import annotations

import torch

from flexmoe.bench.op_breakdown import op_breakdown

EINSUM = "einsum (one-hot dispatch/combine)"


def _cut(step):
    step()  # warm
    return op_breakdown(step, steps=2)


def test_gemm_and_activation_in_both_phases():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    cut = _cut(lambda: torch.relu(x @ w).square().sum().backward())
    for key in ("forward: gemm", "forward: activation", "backward: gemm", "backward: activation"):
        assert cut.get(key, 0) > 0, (key, cut)
    assert EINSUM not in " ".join(cut) and cut["total"] > 0


def test_einsum_and_its_bmm_are_not_gemms():
    onehot = torch.randn(4, 8, 32)
    h = torch.randn(32, 64, requires_grad=True)
    cut = _cut(lambda: torch.einsum("ect,tm->ecm", onehot, h).square().sum().backward())
    assert cut.get(f"forward: {EINSUM}", 0) > 0 and cut.get(f"backward: {EINSUM}", 0) > 0, cut
    assert not any(k.endswith(": gemm") for k in cut), cut
