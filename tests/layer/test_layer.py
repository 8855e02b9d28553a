"""MoELayer on one process against the per-token reference and the einsum baseline (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from flexmoe import MoELayer, Plan
from flexmoe.baselines import GShardMoELayer
from flexmoe.testing.reference import cosine_logits, linear_logits, reference_moe

M, H, E, T = 6, 10, 8, 21

CASES = list(
    itertools.product(
        [1, 2, 4],  # k
        [1.0, 0.5, 0.0, -1.5],  # capacity factor
        [False, True],  # batch-prioritized routing
        [True, False],  # postscore
    )
)
GATE_ACT = list(itertools.product(["linear", "cosine"], ["gelu", "relu", "silu", "swiglu"]))


def _make(k, cf, bpr, post, gate, act, *, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(
        M,
        H,
        E,
        top_k=k,
        capacity_factor=cf,
        batch_prioritized_routing=bpr,
        is_postscore=post,
        gate=gate,
        activation=act,
        seed=seed,
        dtype=torch.float64,
    )
    if gate == "cosine":
        with torch.no_grad():  # float64 gate parameters so the comparison holds to 1e-10
            layer.gate.double()
    else:
        layer.gate.double()
    return layer


def _reference_logits(layer, x):
    g = layer.gate
    if layer.config.gate == "linear":
        return linear_logits(x, g.weight)
    return cosine_logits(x, g.proj.weight, g.proj.bias, g.sim, g.temperature)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("k,cf,bpr,post", CASES)
def test_matches_per_token_loop(k, cf, bpr, post):
    index = CASES.index((k, cf, bpr, post))
    gate, act = GATE_ACT[index % len(GATE_ACT)]
    layer = _make(k, cf, bpr, post, gate, act, seed=index)
    x = torch.randn(3, 7, M, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 7, M, dtype=torch.float64)
    params = [p for p in layer.parameters()]

    y = layer(x)
    got = _grads((y * probe).sum(), [x, *params])

    full = {n: getattr(layer.experts, n) for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}
    x_TM = x.reshape(-1, M)
    y_ref, kept, C = reference_moe(
        x_TM, _reference_logits(layer, x_TM), full, k=k, cf=cf, bpr=bpr, postscore=post, act=act
    )
    want = _grads((y_ref.view_as(x) * probe).sum(), [x, *params])

    assert layer.last_plan.capacity == C
    assert int(layer.last_routing.kept_E.sum()) == len(kept)
    torch.testing.assert_close(y, y_ref.view_as(x), rtol=0, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("gate,act", GATE_ACT)
def test_matches_einsum_baseline(gate, act):
    layer = _make(2, 1.0, True, True, gate, act, seed=5)
    base = GShardMoELayer(
        M,
        H,
        E,
        top_k=2,
        capacity_factor=1.0,
        batch_prioritized_routing=True,
        gate=gate,
        activation=act,
        seed=5,
        dtype=torch.float64,
    )
    base.gate.double()
    base.load_state_dict(layer.state_dict())
    x = torch.randn(T, M, dtype=torch.float64, requires_grad=True)
    y1, y2 = layer(x), base(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.aux_loss, base.aux_loss, rtol=0, atol=1e-12)
    g1 = _grads(y1.square().sum() + layer.aux_loss, [x, *layer.parameters()])
    g2 = _grads(y2.square().sum() + base.aux_loss, [x, *base.parameters()])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("aux", ["gshard", "importance_load"])
def test_training_noise_matches_baseline_and_is_off_in_eval(aux):
    kwargs = dict(top_k=1, capacity_factor=1.25, gate_noise=1.0, aux_loss=aux, batch_prioritized_routing=True)
    layer = MoELayer(M, H, E, seed=2, dtype=torch.float64, **kwargs).double()
    base = GShardMoELayer(M, H, E, seed=2, dtype=torch.float64, **kwargs).double()
    base.load_state_dict(layer.state_dict())
    x = torch.randn(64, M, dtype=torch.float64)
    torch.manual_seed(11)
    y1 = layer(x)
    torch.manual_seed(11)
    y2 = base(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.aux_loss, base.aux_loss, rtol=0, atol=1e-12)
    assert layer.aux_loss.requires_grad
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)  # no noise in eval


def test_gshard_aux_loss_formula():
    layer = MoELayer(M, H, E, top_k=2, seed=1, dtype=torch.float64).double()
    x = torch.randn(T, M, dtype=torch.float64)
    layer(x)
    scores = torch.softmax(x @ layer.gate.weight.t(), -1)
    top1 = scores.argmax(-1)
    want = E * sum(scores[:, e].mean() * (top1 == e).double().mean() for e in range(E))
    torch.testing.assert_close(layer.aux_loss, want, rtol=0, atol=1e-12)


def test_importance_load_aux_loss_in_eval_uses_hard_load():
    layer = (
        MoELayer(M, H, E, top_k=2, aux_loss="importance_load", seed=1, dtype=torch.float64).double().eval()
    )
    x = torch.randn(T, M, dtype=torch.float64)
    layer(x)
    scores = torch.softmax(x @ layer.gate.weight.t(), -1)
    imp = scores.sum(0)
    load = torch.bincount(scores.topk(2, -1).indices.reshape(-1), minlength=E).double()

    def cv2(v):
        return v.var() / (v.mean() ** 2 + 1e-10)

    torch.testing.assert_close(layer.aux_loss, (cv2(imp) + cv2(load)) / 2, rtol=0, atol=1e-12)


def test_router_z_loss_adds_squared_logsumexp():
    x = torch.randn(T, M, dtype=torch.float64)
    plain = MoELayer(M, H, E, seed=4, dtype=torch.float64).double()
    with_z = MoELayer(M, H, E, seed=4, router_z_loss=0.1, dtype=torch.float64).double()
    plain(x)
    with_z(x)
    z = torch.logsumexp(x @ plain.gate.weight.t(), -1).pow(2).mean()
    torch.testing.assert_close(with_z.aux_loss, plain.aux_loss + 0.1 * z, rtol=0, atol=1e-12)


def test_leading_shapes_dtypes_and_empty_input():
    layer = MoELayer(M, H, E, top_k=2, seed=0)
    for shape in [(5, M), (2, 3, M), (1, 1, 1, M)]:
        y = layer(torch.randn(shape))
        assert y.shape == shape and y.dtype == torch.float32
    yb = layer(torch.randn(4, M, dtype=torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and yb.shape == (4, M)
    empty = torch.randn(0, M, requires_grad=True)
    y0 = layer(empty)
    assert y0.shape == (0, M)
    y0.sum().backward()
    assert empty.grad.shape == (0, M)
    assert layer.aux_loss.item() == 0.0


def test_bfloat16_layer_is_close_to_float32():
    torch.manual_seed(0)
    x = torch.randn(32, M)
    l32 = MoELayer(M, H, E, top_k=2, capacity_factor=0, seed=3)
    l16 = MoELayer(M, H, E, top_k=2, capacity_factor=0, seed=3, dtype=torch.bfloat16)
    y16 = l16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), l32(x), rtol=0.05, atol=0.05)


def test_last_plan_reports_local_fixed_and_forced_plans():
    for tuner in (True, False):  # one process: the tuner never runs, whatever it is set to
        layer = MoELayer(M, H, E, seed=0, tuner=tuner)
        layer(torch.randn(4, M))
        assert layer.last_plan.source == "local"
        assert layer.last_plan.plan == Plan(r=1, d=1, all_to_all="flat")
        assert tuner is False or (layer.tuner.table() == [] and layer.tuner.summary()["steps"] == 0)
    layer(torch.randn(4, M), plan=Plan(r=0))
    assert layer.last_plan.source == "forced"
    fixed = MoELayer(M, H, E, parallelism=1, pipeline_degree=1, all_to_all="flat", seed=0)
    fixed(torch.randn(4, M))
    assert fixed.last_plan.source == "fixed"


def test_same_seed_same_parameters_and_expert_marker():
    a, b = MoELayer(M, H, E, seed=9), MoELayer(M, H, E, seed=9)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert all(getattr(p, "flexmoe_expert", False) for p in a.experts.parameters())
    assert not any(getattr(p, "flexmoe_expert", False) for p in a.gate.parameters())
    assert a.experts.fc1_weight.shape == (E, M, H) and a.experts.fc2_bias.shape == (E, M)
    assert a.gate.weight.shape == (E, M)


def test_no_bias_layer():
    layer = MoELayer(M, H, E, bias=False, seed=0)
    assert layer.experts.fc1_bias is None and layer.experts.fc2_bias is None
    layer(torch.randn(5, M)).sum().backward()
    assert layer.experts.fc1_weight.grad is not None


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(gate="softmax"), "gate"),
        (dict(activation="tanh"), "activation"),
        (dict(aux_loss="switch"), "aux_loss"),
        (dict(parallelism=3), "parallelism"),
        (dict(pipeline_degree=0), "pipeline_degree"),
        (dict(all_to_all="ring"), "all_to_all"),
        (dict(gate_noise=-1.0), "gate_noise"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoELayer(M, H, E, **kwargs)


@pytest.mark.parametrize(
    "dims,name", [((0, H, E), "model_dim"), ((M, -1, E), "hidden_dim"), ((M, H, 0), "num_experts")]
)
def test_non_positive_sizes(dims, name):
    with pytest.raises(ValueError, match=name):
        MoELayer(*dims)


def test_bad_inputs():
    layer = MoELayer(M, H, E, seed=0)
    with pytest.raises(ValueError, match="model_dim"):
        layer(torch.randn(3, M + 1))
    with pytest.raises(ValueError, match="floating point"):
        layer(torch.ones(3, M, dtype=torch.long))
    with pytest.raises(ValueError, match="plan.r"):
        layer(torch.randn(3, M), plan=Plan(r=2))
    with pytest.raises(ValueError, match="d must"):
        Plan(d=0)
