"""The "flexmoe" experts backend inside transformers: tiny random models give the same logits and
every gradient as transformers' "eager" experts (float64, 1e-10; float32 close); weights are used
in place (views); experts the fused FFN does not compute (GPT-OSS's custom gate, other activations,
post-expert norms) take the generic path and equal eager too; under transformers' expert
parallelism the ids of other ranks' experts are skipped."""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.integrations import moe as hf_moe  # noqa: E402

import flexmoe.integrations.transformers as fx  # noqa: E402  (registers the backend)
from flexmoe.testing.hf_tiny import tiny_batch, tiny_model  # noqa: E402

MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"]


def _run(model, ids):
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("name", MODELS)
def test_flexmoe_backend_equals_eager_float64(name, monkeypatch):
    ids = tiny_batch(seed=1)
    eager = tiny_model(name, implementation="eager")
    ours = tiny_model(name, implementation="flexmoe")
    calls = []
    packed_moe = fx.backend.packed_moe
    monkeypatch.setattr(fx.backend, "packed_moe", lambda *a, **k: calls.append(1) or packed_moe(*a, **k))
    want_logits, want_grads = _run(eager, ids)
    assert not calls
    got_logits, got_grads = _run(ours, ids)
    assert len(calls) == len(fx.moe_experts_modules(ours))  # every MoE block ran through flexmoe
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    assert any("experts" in n for n in got_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=0, atol=1e-10, msg=n)


def test_flexmoe_backend_float32_close_to_eager():
    ids = tiny_batch(seed=2, batch=3, length=9)
    want_logits, want_grads = _run(tiny_model("qwen3_moe", dtype=torch.float32), ids)
    got_logits, got_grads = _run(tiny_model("qwen3_moe", dtype=torch.float32, implementation="flexmoe"), ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_backend_switches_at_run_time_and_uses_the_weights_in_place():
    model = tiny_model("mixtral")
    model.set_experts_implementation("flexmoe")
    experts = fx.moe_experts_modules(model)
    assert len(experts) == 2
    for module in experts.values():
        w = fx.expert_weights(module)
        assert w.activation == "swiglu"
        assert w.w1_GMX.data_ptr() == module.gate_up_proj.data_ptr()  # a view: nothing copied
        assert w.w2_GHM.data_ptr() == module.down_proj.data_ptr()
        assert w.w1_GMX.shape == (4, 16, 24) and w.w2_GHM.shape == (4, 12, 16)


def test_gpt_oss_custom_gate_equals_eager_float64(monkeypatch):
    """GPT-OSS: interleaved gate/up columns, clamps, (up + 1) * gate * sigmoid(alpha * gate), biases."""
    ids = tiny_batch(seed=3)
    # a small limit: the clamps bind on some entries of these small random weights
    eager = tiny_model("gpt_oss", implementation="eager", swiglu_limit=0.4)
    ours = tiny_model("gpt_oss", implementation="flexmoe", swiglu_limit=0.4)
    calls = []
    generic = fx.backend.generic_experts_forward
    monkeypatch.setattr(
        fx.backend, "generic_experts_forward", lambda *a, **k: calls.append(1) or generic(*a, **k)
    )
    want_logits, want_grads = _run(eager, ids)
    got_logits, got_grads = _run(ours, ids)
    assert len(calls) == 2
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=0, atol=1e-10, msg=n)
    with pytest.raises(ValueError, match="_apply_gate"):  # flexmoe's sharded layer cannot run it
        fx.shard_experts(ours)


# -- synthetic experts modules: biases, transposed weights, no gate, other activations ----------------
def _experts_class(*, has_gate: bool, has_bias: bool, transposed: bool, act: str):
    @hf_moe.use_experts_implementation(is_transposed=transposed, has_bias=has_bias, has_gate=has_gate)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            E, M, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
            X = 2 * I if has_gate else I
            gen = torch.Generator().manual_seed(5)

            def p(*shape):
                return torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3)

            self.num_experts = E
            up = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, up, p(E, M, X) if transposed else p(E, X, M))
            self.down_proj = p(E, I, M) if transposed else p(E, M, I)
            if has_bias:
                setattr(self, f"{up}_bias", p(E, X))
                self.down_proj_bias = p(E, M)
            self.act_fn = transformers.activations.ACT2FN[act]

        def forward(self, hidden_states, top_k_index, top_k_weights):  # transformers' own batched path
            return hf_moe.batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    return Experts


@pytest.mark.parametrize(
    "has_gate,has_bias,transposed,act",
    [
        (True, True, True, "silu"),
        (True, True, False, "silu"),
        (True, False, True, "swish"),
        (False, True, False, "gelu"),
        (False, False, True, "relu"),
        (False, True, True, "silu"),
    ],
)
def test_biases_transposed_weights_and_ungated_experts(has_gate, has_bias, transposed, act):
    config = types.SimpleNamespace(
        num_experts=5, hidden_size=6, moe_intermediate_size=7, _experts_implementation="eager"
    )
    module = _experts_class(has_gate=has_gate, has_bias=has_bias, transposed=transposed, act=act)(config)
    T, k = 11, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(5, generator=gen)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves = [x, wts, *module.parameters()]
    want = module(x, idx, wts)
    want_g = torch.autograd.grad(want.square().sum(), leaves)
    config._experts_implementation = "flexmoe"
    got = module(x, idx, wts)
    got_g = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "has_gate,act,match",
    [
        (True, "gelu", "SwiGLU"),
        (False, "gelu_new", "no exact flexmoe equivalent"),
        (False, "tanh", "SiLU, ReLU"),
    ],
)
def test_other_activations_take_the_generic_path(has_gate, act, match):
    """The backend runs them (equal to transformers' own batched path); flexmoe's sharded layer,
    which needs its fused FFN, refuses them with the reason."""
    config = types.SimpleNamespace(
        num_experts=3, hidden_size=4, moe_intermediate_size=5, _experts_implementation="eager"
    )
    module = _experts_class(has_gate=has_gate, has_bias=True, transposed=False, act=act)(config)
    _assert_flexmoe_equals_eager(module, config, T=9, k=2)
    with pytest.raises(ValueError, match=match):
        fx.backend.check_supported(module)


def _assert_flexmoe_equals_eager(module, config, *, T: int, k: int, index=None, weights=None):
    E, M = module.num_experts, config.hidden_size
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, M, generator=gen, dtype=torch.float64, requires_grad=True)
    if index is None:
        index = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if weights is None:
        weights = torch.rand(T, k, generator=gen, dtype=torch.float64, requires_grad=True)
    leaves = [x, weights, *module.parameters()]
    config._experts_implementation = "eager"
    want = module(x, index, weights)
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    config._experts_implementation = "flexmoe"
    got = module(x, index, weights)
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_any_custom_apply_gate_and_post_expert_norm_take_the_generic_path():
    """An experts class with its own `_apply_gate`, interleaved columns and a post-expert norm."""

    @hf_moe.use_experts_implementation(is_concatenated=False, has_post_expert_norm=True)
    class Odd(_experts_class(has_gate=True, has_bias=False, transposed=False, act="silu")):
        def __init__(self, config):
            super().__init__(config)
            self.post_expert_norm = torch.nn.LayerNorm(config.hidden_size, dtype=torch.float64)

        def _apply_gate(self, gate_up):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            return torch.tanh(gate).clamp(max=0.5) * up.square()

    config = types.SimpleNamespace(
        num_experts=4, hidden_size=6, moe_intermediate_size=5, _experts_implementation="eager"
    )
    _assert_flexmoe_equals_eager(Odd(config), config, T=13, k=3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_other_ranks_experts_are_skipped_under_transformers_expert_parallelism(fused):
    """transformers' "all_reduce" EP marks other ranks' experts with id E (weight 0)."""
    act = "silu" if fused else "tanh"
    config = types.SimpleNamespace(
        num_experts=3, hidden_size=4, moe_intermediate_size=5, _experts_implementation="eager"
    )
    module = _experts_class(has_gate=fused, has_bias=True, transposed=True, act=act)(config)
    module._is_expert_parallel = True
    T, k = 10, 2
    gen = torch.Generator().manual_seed(8)
    index = torch.randint(0, 5, (T, k), generator=gen).clamp(max=3)  # 3 = another rank's expert
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).masked_fill(index == 3, 0.0)
    _assert_flexmoe_equals_eager(module, config, T=T, k=k, index=index, weights=weights.requires_grad_())


@pytest.mark.parametrize("sizes", [(2, 0, 3), (3, 3, 3)], ids=["uneven-with-empty", "uniform-batched"])
def test_generic_grouped_gemm_gradients_arrive_in_the_parameters_layout(sizes):
    """The module's [E, O, K] weight read as [E, K, O]: its gradient reaches it contiguous, not
    transposed (which would make the accumulation and the optimizer read it strided)."""
    from flexmoe.integrations.transformers.generic_experts import grouped_linear

    stored = torch.randn(len(sizes), 5, 4, dtype=torch.float64, requires_grad=True)
    arrived = []
    stored.register_hook(lambda g: arrived.append(g.is_contiguous()))
    x = torch.randn(sum(sizes), 4, dtype=torch.float64)
    grouped_linear(x, stored.transpose(1, 2), None, sizes).square().sum().backward()
    assert arrived == [True]
    want = torch.stack([x[lo : lo + n].T @ (2 * x[lo : lo + n] @ stored[g].T) for g, lo, n in _runs(sizes)])
    torch.testing.assert_close(stored.grad, want.transpose(1, 2), rtol=0, atol=1e-10)


def _runs(sizes):
    start = 0
    for g, n in enumerate(sizes):
        yield g, start, n
        start += n
