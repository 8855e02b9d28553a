"""The grouped expert FFN op against a row-by-row float64 reference, in every code path."""

from __future__ import annotations

import pytest
import torch

from flexmoe.ops import expert_ffn
from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn
from flexmoe.testing.reference import activation as reference_activation

M, H = 6, 10


def _weights(G: int, kind: str, *, bias: bool, seed: int = 0, hidden: int = H) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = 2 * hidden if kind == "swiglu" else hidden
    shapes = [(G, M, X), (G, X), (G, hidden, M), (G, M)]
    ts = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    if not bias:
        ts[1] = ts[3] = None
    return [t.requires_grad_() if t is not None else None for t in ts]


def _reference(x_RM, params, sizes, kind):
    w1, b1, w2, b2 = params
    rows, start = [], 0
    for g, n in enumerate(sizes):
        for r in range(start, start + n):
            h = x_RM[r] @ w1[g] + (b1[g] if b1 is not None else 0)
            rows.append(reference_activation(kind, h) @ w2[g] + (b2[g] if b2 is not None else 0))
        start += n
    return torch.stack(rows) if rows else x_RM @ x_RM.new_zeros(M, M)  # empty, but in the graph


def _grads(fn, x, params, grad_out):
    leaves = [x, *(p for p in params if p is not None)]
    return [fn(), *torch.autograd.grad(fn(), leaves, grad_out, allow_unused=True)]


@pytest.mark.parametrize("kind", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "sizes",
    [(3, 0, 5, 1), (4, 4, 4), (0, 0, 2), (7,), (0, 0)],
    ids=["uneven-with-empty", "uniform-batched", "leading-empty", "one-group", "no-rows"],
)
@pytest.mark.parametrize(
    "block_elements", [1, 3 * H, 1 << 20], ids=["block-per-group", "small-blocks", "one-block"]
)
def test_matches_row_by_row_reference(kind, bias, sizes, block_elements, monkeypatch):
    monkeypatch.setattr(expert_ffn, "_BLOCK_ELEMENTS", block_elements)
    G, R = len(sizes), sum(sizes)
    params = _weights(G, kind, bias=bias)
    x = torch.randn(R, M, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(R, M, dtype=torch.float64)
    ours = _grads(lambda: grouped_expert_ffn(x, ExpertWeights(*params, kind), sizes), x, params, grad_out)
    ref = _grads(lambda: _reference(x, params, sizes, kind), x, params, grad_out)
    for got, want in zip(ours, ref, strict=True):
        want = torch.zeros_like(got) if want is None else want  # a group without rows gets zero gradient
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_weight_only_backward_skips_the_input_gradient():
    sizes = (3, 4)
    params = _weights(2, "gelu", bias=True)
    x = torch.randn(7, M, dtype=torch.float64)  # no grad wanted for x
    out = grouped_expert_ffn(x, ExpertWeights(*params, "gelu"), sizes)
    out.sum().backward()
    assert x.grad is None and all(p.grad is not None for p in params)


def test_sizes_must_cover_the_rows():
    params = _weights(2, "gelu", bias=True)
    with pytest.raises(ValueError, match="sizes"):
        grouped_expert_ffn(torch.zeros(5, M, dtype=torch.float64), ExpertWeights(*params, "gelu"), (2, 2))


@pytest.mark.parametrize("op", ["grouped-ffn", "packed-moe"])
@pytest.mark.parametrize("sizes", [(3, 0, 5, 1), (4, 4, 4, 4)], ids=["uneven-with-empty", "uniform-batched"])
def test_weight_gradients_arrive_in_the_parameters_layout(op, sizes):
    """Weights that are transposed views of their parameters (transformers' [E, X, M] experts read
    as fc1 [E, M, X]) get gradients that reach the parameters contiguous: a transposed gradient
    would make the accumulation, FSDP's copy-in and the optimizer read it strided."""
    G, R = len(sizes), sum(sizes)
    w1, _, w2, _ = _weights(G, "swiglu", bias=False)
    stored = [p.detach().transpose(1, 2).contiguous().requires_grad_() for p in (w1, w2)]
    arrived = []
    for p in stored:
        p.register_hook(lambda g: arrived.append(g.is_contiguous()))
    w = ExpertWeights(stored[0].transpose(1, 2), None, stored[1].transpose(1, 2), None, "swiglu")
    x = torch.randn(R, M, dtype=torch.float64)
    if op == "grouped-ffn":
        y = grouped_expert_ffn(x, w, sizes)
    else:
        y = expert_ffn.packed_moe(x, torch.arange(R), torch.ones(R, dtype=torch.float64), w, sizes)
    y.square().sum().backward()
    assert arrived == [True, True]


def _packed_reference(x_TM, token_N, weight_N, params, sizes, kind, *, postscore: bool):
    """y_t = sum over assignments n of token t of s_n * f_g(x_t) (postscore) or f_g(s_n * x_t)."""
    w1, b1, w2, b2 = params
    y = [torch.zeros(M, dtype=x_TM.dtype) for _ in range(x_TM.shape[0])]
    n = 0
    for g, count in enumerate(sizes):
        for _ in range(count):
            t, s = int(token_N[n]), weight_N[n]
            x = x_TM[t] if postscore else s * x_TM[t]
            h = x @ w1[g] + (b1[g] if b1 is not None else 0)
            out = reference_activation(kind, h) @ w2[g] + (b2[g] if b2 is not None else 0)
            y[t] = y[t] + (s * out if postscore else out)
            n += 1
    return torch.stack(y)


@pytest.mark.parametrize("kind", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("postscore", [True, False])
@pytest.mark.parametrize("pad", [False, True], ids=["grouped", "padded-to-equal-groups"])
@pytest.mark.parametrize("block_elements", [1, 1 << 20], ids=["block-per-group", "one-block"])
@pytest.mark.parametrize("hidden", [H, M - 2], ids=["wider-than-M", "narrower-than-M"])
def test_packed_moe_matches_a_per_assignment_loop(
    kind, bias, postscore, pad, block_elements, hidden, monkeypatch
):
    """The fused gather -> FFN -> gate scaling -> combine, values and every gradient (the gate weights'
    included), whether groups are padded to one batched GEMM per block or not, and whether the gate
    weight scales the expert output or (narrower, postscore, no output bias) the activation."""
    monkeypatch.setattr(expert_ffn, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(expert_ffn, "pays_to_pad", lambda *args: pad)
    T, sizes = 7, (4, 3, 0, 4)
    gen = torch.Generator().manual_seed(1)
    params = _weights(len(sizes), kind, bias=bias, seed=2, hidden=hidden)
    x = torch.randn(T, M, generator=gen, dtype=torch.float64, requires_grad=True)
    token_N = torch.randint(0, T, (sum(sizes),), generator=gen)
    weight_N = (0.5 + torch.rand(sum(sizes), generator=gen, dtype=torch.float64)).requires_grad_()
    probe = torch.randn(T, M, generator=gen, dtype=torch.float64)
    leaves = [x, weight_N, *(p for p in params if p is not None)]

    def ours():
        w = ExpertWeights(*params, kind)
        return expert_ffn.packed_moe(x, token_N, weight_N, w, sizes, is_postscore=postscore)

    got = ours()
    want = _packed_reference(x, token_N, weight_N, params, sizes, kind, postscore=postscore)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got_grads = torch.autograd.grad((got * probe).sum(), leaves)
    want_grads = torch.autograd.grad((want * probe).sum(), leaves, allow_unused=True)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=0, atol=1e-10)


def _clamped_interleaved_gate(h_RX: torch.Tensor) -> torch.Tensor:
    """GPT-OSS-like: gate and up columns interleaved, both clamped, (up + 1) * gate * sigmoid(1.7 gate)."""
    gate, up = h_RX[..., ::2].clamp(max=0.7), h_RX[..., 1::2].clamp(-0.7, 0.7)
    return (up + 1) * gate * torch.sigmoid(1.7 * gate)


@pytest.mark.parametrize("fused", [False, True], ids=["grouped-ffn", "packed-moe"])
@pytest.mark.parametrize("sizes", [(3, 0, 5, 1), (4, 4, 4)], ids=["uneven-with-empty", "uniform-batched"])
def test_custom_activation_matches_row_by_row_reference(fused, sizes, monkeypatch):
    """Code as the activation (a model's own gate) between the grouped GEMMs, differentiated through
    autograd: values and gradients equal a row-by-row float64 reference, clamps binding."""
    monkeypatch.setattr(expert_ffn, "_BLOCK_ELEMENTS", 3 * H)  # several blocks
    custom = expert_ffn.CustomActivation("clamped", _clamped_interleaved_gate)
    params = _weights(len(sizes), "swiglu", bias=True, seed=3)  # fc1 2H wide, as a gated expert's
    R, gen = sum(sizes), torch.Generator().manual_seed(5)
    x = torch.randn(R, M, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(R, M, generator=gen, dtype=torch.float64)
    weight_N = torch.ones(R, dtype=torch.float64)
    token_N = torch.arange(R)  # one assignment per row: packed_moe's output is the FFN's
    w = ExpertWeights(*params, custom)
    got = expert_ffn.packed_moe(x, token_N, weight_N, w, sizes) if fused else grouped_expert_ffn(x, w, sizes)
    w1, b1, w2, b2 = params
    rows, g_of = [], [g for g, n in enumerate(sizes) for _ in range(n)]
    for r, g in enumerate(g_of):
        rows.append(_clamped_interleaved_gate(x[r] @ w1[g] + b1[g]) @ w2[g] + b2[g])
    want = torch.stack(rows)
    assert bool(((x @ w1[0] + b1[0]).abs() > 0.7).any())  # the clamps bind somewhere
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    leaves = [x, *params]
    got_grads = torch.autograd.grad((got * probe).sum(), leaves)
    want_grads = torch.autograd.grad((want * probe).sum(), leaves, allow_unused=True)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=0, atol=1e-10)
