"""Mixed precision: MoELayer under torch.autocast (DESIGN section 11), one process and 2 gloo ranks.

The contract: gate, routing and aux loss in fp32; expert GEMMs, all-to-all and r = 0 weight gathers
in the autocast dtype; fp32 parameters get fp32 gradients; the layer returns the autocast dtype.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

import flexmoe.parallel.comm as comm
from flexmoe import MoELayer, Plan
from flexmoe.app.train import TrainConfig, parse_args, train
from flexmoe.ops.expert_ffn import ExpertWeights, grouped_expert_ffn
from flexmoe.testing.distributed import DistributedPool
from flexmoe.tuning.cost_model import PRESETS, CostModel, LayerShape

M, H, E, T = 24, 40, 4, 96
LOW = torch.bfloat16


def _layer(**kwargs) -> MoELayer:
    return MoELayer(M, H, E, top_k=2, capacity_factor=1.0, seed=5, **kwargs)


def _x(tokens: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, M, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def _step(layer: MoELayer, x: torch.Tensor, *, autocast: bool, plan: Plan | None = None):
    """Forward under autocast (or not), backward outside it; returns y, aux, x.grad, param grads."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    ctx = torch.autocast("cpu", dtype=LOW) if autocast else contextlib.nullcontext()
    with ctx:
        y = layer(x, plan=plan)
        aux = layer.aux_loss
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    ((y.float() * probe).sum() + aux).backward()
    return y, aux, x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_autocast_output_aux_and_gradient_dtypes():
    layer = _layer()
    x = _x()
    y, aux, x_grad, grads = _step(layer, x, autocast=True)
    assert y.dtype == LOW and y.shape == x.shape  # like nn.Linear under autocast
    assert aux.dtype == torch.float32
    assert layer.last_routing.weights_TK.dtype == torch.float32
    assert x_grad.dtype == torch.float32
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32, name
    # without autocast nothing changes: fp32 in, fp32 out
    assert layer(x).dtype == torch.float32


def test_autocast_gate_and_routing_stay_fp32_and_route_identically():
    layer = _layer(gate="cosine")
    x = _x()
    layer(x)
    plain = layer.last_routing
    with torch.autocast("cpu", dtype=LOW):
        layer(x)
    mixed = layer.last_routing
    # the same fp32 gate math: the same choices and weights, bit for bit
    assert torch.equal(plain.experts_TK, mixed.experts_TK)
    assert torch.equal(plain.weights_TK, mixed.weights_TK)
    assert torch.equal(plain.aux_loss, mixed.aux_loss)


def test_autocast_saves_expert_activations_in_low_precision():
    layer = _layer()
    x = _x()
    saved: list[torch.Tensor] = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=LOW):
        layer(x)
    expert = [t for t in saved if t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == H]
    gate = [t for t in saved if t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == E]
    assert expert and all(t.dtype == LOW for t in expert), [t.dtype for t in expert]
    assert gate and all(t.dtype == torch.float32 for t in gate), [t.dtype for t in gate]


def test_autocast_equals_an_explicitly_cast_bf16_layer():
    """The same bf16 tokens and weights give the same result: autocast is exactly that computation."""
    mixed, explicit = _layer(), _layer(dtype=LOW)  # same seed: the bf16 layer holds the rounded weights
    x = _x()
    y_a, aux_a, xg_a, g_a = _step(mixed, x, autocast=True)
    y_e, aux_e, xg_e, g_e = _step(explicit, x, autocast=False)
    assert y_e.dtype == torch.float32  # a bf16 layer returns x's dtype
    torch.testing.assert_close(y_a.float(), y_e, rtol=0, atol=0)
    torch.testing.assert_close(aux_a, aux_e, rtol=0, atol=0)
    torch.testing.assert_close(xg_a, xg_e, rtol=0, atol=0)
    for name, g in g_a.items():
        torch.testing.assert_close(g, g_e[name].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_autocast_is_close_to_fp32(activation):
    layer = _layer(activation=activation)
    x = _x(256)
    y32, _, xg32, g32 = _step(layer, x, autocast=False)
    y32, xg32, g32 = y32.detach().clone(), xg32.clone(), {n: g.clone() for n, g in g32.items()}
    y16, _, xg16, g16 = _step(layer, x, autocast=True)
    assert _rel(y16, y32) <= 1e-2
    assert _rel(xg16, xg32) <= 2e-2
    for name, g in g16.items():
        assert _rel(g, g32[name]) <= 2e-2, name


def test_bf16_layer_under_autocast_and_fp64_layer_untouched():
    layer16 = _layer(dtype=LOW)
    with torch.autocast("cpu", dtype=LOW):
        y = layer16(_x())
    assert y.dtype == LOW
    y.float().sum().backward()
    assert layer16.experts.fc1_weight.grad.dtype == LOW
    layer64 = _layer(dtype=torch.float64)
    x64 = _x().double()
    with torch.autocast("cpu", dtype=LOW):
        y64 = layer64(x64)
    assert y64.dtype == torch.float64  # autocast leaves float64 alone
    torch.testing.assert_close(y64, layer64(x64), rtol=0, atol=0)


def test_grouped_ffn_declares_its_autocast_behaviour():
    """Called directly under autocast, the FFN runs in the autocast dtype; a backward run inside an
    autocast region still runs in the forward's precision (custom_bwd)."""
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(2, M, H, generator=gen, requires_grad=True), None]
    w += [torch.randn(2, H, M, generator=gen, requires_grad=True), None]
    weights = ExpertWeights(w[0], None, w[2], None, "gelu")
    x = torch.randn(10, M, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=LOW):
        out = grouped_expert_ffn(x, weights, (4, 6))
    assert out.dtype == LOW
    out.float().sum().backward()
    assert x.grad.dtype == w[0].grad.dtype == w[2].grad.dtype == torch.float32
    # fp32 forward, backward inside autocast: the same fp32 gradients as outside
    x.grad = None
    out = grouped_expert_ffn(x, weights, (4, 6))
    (want,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    with torch.autocast("cpu", dtype=LOW):
        (got,) = torch.autograd.grad(out.sum(), x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- two gloo ranks -----------------------------------------------------------------------------------

DIST_CASES = [  # (E, plan): E = 2 is plain EP at r = 1; E = 1 shares one expert: r = 2 gathers hidden slices
    (2, Plan(r=0)),
    (2, Plan(r=1, d=1)),
    (2, Plan(r=1, d=2)),
    (1, Plan(r=0)),
    (1, Plan(r=1, d=2)),
    (1, Plan(r=2, d=1)),
    (2, Plan(r=1, all_to_all="dedup")),
]


def _dist_layer(num_experts: int) -> MoELayer:
    return MoELayer(M, H, num_experts, top_k=min(2, num_experts), capacity_factor=1.0, seed=9)


def _dist_inputs(rank: int):
    gen = torch.Generator().manual_seed(40 + rank)
    return torch.randn(32, M, generator=gen), torch.randn(32, M, generator=gen)


@contextlib.contextmanager
def _spy(log: list):
    """Record the dtype of every floating-point payload of the layer's collectives."""
    originals = (dist.all_to_all_single, comm.all_gather_flat, comm._reduce_scatter_flat)
    reducing = []  # gloo's reduce-scatter runs as an all-to-all: its payload is logged as the scatter's

    def a2a(out, x, *args, **kwargs):
        if x.is_floating_point() and not reducing:
            # rows of M are tokens; narrower ones what "dedup" sends beside them (assignments' rows
            # and gate weights) and their gradients
            log.append(("all_to_all" if x.dim() > 1 and x.shape[1] == M else "assignments", x.dtype))
        return originals[0](out, x, *args, **kwargs)

    def gather(out, x, group, **kwargs):
        log.append(("all_gather", x.dtype))
        return originals[1](out, x, group, **kwargs)

    def scatter(out, x, group, **kwargs):
        log.append(("reduce_scatter", x.dtype))
        reducing.append(True)
        try:
            return originals[2](out, x, group, **kwargs)
        finally:
            reducing.pop()

    dist.all_to_all_single, comm.all_gather_flat, comm._reduce_scatter_flat = a2a, gather, scatter
    try:
        yield
    finally:
        dist.all_to_all_single, comm.all_gather_flat, comm._reduce_scatter_flat = originals


def autocast_worker() -> list[dict]:
    rank = dist.get_rank()
    results = []
    for num_experts, plan in DIST_CASES:
        layer = _dist_layer(num_experts)
        x, probe = _dist_inputs(rank)
        x.requires_grad_(True)
        log: list = []
        with _spy(log):
            with torch.autocast("cpu", dtype=LOW):
                y = layer(x, plan=plan)
            ((y.float() * probe).sum() + layer.aux_loss).backward()  # outside autocast, as usual
        results.append(
            {
                "y": y.detach(),
                "x_grad": x.grad,
                "log": log,
                **{n: p.grad for n, p in layer.experts.named_parameters()},
            }
        )
    return results


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=180.0) as p:
        yield p


@pytest.mark.timeout(240)
def test_two_ranks_move_bf16_and_match_one_process(pool):
    per_rank = pool.run(autocast_worker)
    for i, (num_experts, plan) in enumerate(DIST_CASES):
        where = f"E={num_experts} {plan}"
        # one process, same seed, each rank's tokens; expert grads of the sum of both ranks' losses
        ref = _dist_layer(num_experts)
        for rank in range(2):
            x, probe = _dist_inputs(rank)
            x.requires_grad_(True)
            with torch.autocast("cpu", dtype=LOW):
                y = ref(x)
            ((y.float() * probe).sum() + ref.aux_loss).backward()
            got = per_rank[rank][i]
            assert got["y"].dtype == LOW, where
            # bf16 GEMMs over different row sets may round differently: bf16-level tolerance
            assert _rel(got["y"], y) <= 1e-2, (where, _rel(got["y"], y))
            assert _rel(got["x_grad"], x.grad) <= 2e-2, (where, _rel(got["x_grad"], x.grad))
            kinds = {kind: {dt for k, dt in got["log"] if k == kind} for kind in ("all_to_all", "all_gather")}
            if plan.r == 0:
                assert kinds["all_gather"] == {LOW} and not kinds["all_to_all"], (where, got["log"])
            else:
                assert kinds["all_to_all"] == {LOW}, (where, got["log"])
                if num_experts == 1 and plan.r == 1:  # both ranks' hidden slices gathered in bf16
                    assert kinds["all_gather"] == {LOW}, (where, got["log"])
            # the gate weights travel exactly (float64 carries the fp32 weights and the row indices)
            beside = {dt for k, dt in got["log"] if k == "assignments"}
            assert beside == ({torch.float64} if plan.all_to_all == "dedup" else set()), (where, got["log"])
            scatters = {dt for k, dt in got["log"] if k == "reduce_scatter"}
            assert scatters <= {torch.float32}, (where, got["log"])  # grads summed in the master dtype
        for rank in range(2):
            shard = ref.layout.__class__(
                num_experts=num_experts, model_dim=M, hidden_dim=H, world_size=2, rank=rank, activation="gelu"
            )
            want = shard.shard({n: p.grad for n, p in ref.experts.named_parameters()})
            for n, g in want.items():
                got = per_rank[rank][i][n]
                assert got.dtype == torch.float32, (n, where)
                assert _rel(got, g) <= 2e-2, (n, where, _rel(got, g))


def test_cost_model_charges_the_bytes_that_travel():
    model = CostModel(PRESETS["a100"])
    shape = dict(model_dim=1024, hidden_dim=4096, num_experts=16, world_size=64, capacity=512, tokens=4096)
    fp32 = LayerShape(bytes_per_element=4, **shape)
    mixed = LayerShape(bytes_per_element=2, master_bytes_per_element=4, **shape)
    pure16 = LayerShape(bytes_per_element=2, **shape)
    # expert parallel: the all-to-all carries the compute dtype
    assert model.step_time(mixed, Plan(r=1)) < model.step_time(fp32, Plan(r=1))
    # r = 0: gathered in bf16, gradients reduce-scattered in the fp32 master dtype
    r0 = [model.step_time(s, Plan(r=0)) for s in (pure16, mixed, fp32)]
    assert r0[0] < r0[1] < r0[2], r0


def test_layer_tells_the_tuner_its_compute_dtype():
    layer = _layer()
    shape = layer.tuner.rank_plans.layer_shape
    layer(_x())
    assert shape(8).bytes_per_element == 4
    with torch.autocast("cpu", dtype=LOW):
        layer(_x())
    assert shape(8).bytes_per_element == LOW.itemsize == 2
    assert shape(8).master_bytes_per_element == 4


@pytest.mark.timeout(300)
def test_training_with_bf16_precision_runs_moe_layers_under_autocast(tmp_path, monkeypatch):
    seen = []
    forward = MoELayer.forward

    def spying_forward(self, x, plan=None):
        y = forward(self, x, plan)
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), y.dtype, self.aux_loss.dtype))
        return y

    monkeypatch.setattr(MoELayer, "forward", spying_forward)
    config = TrainConfig(
        limit=120,
        epochs=1,
        batch_size=16,
        max_steps_per_epoch=2,
        out_dir=str(tmp_path),
        model_overrides=dict(embed_dim=16, num_heads=[1, 2, 4, 8], num_experts=4),
        precision="bf16",
    )
    result = train(config)
    assert seen and all(s == (True, LOW, torch.float32) for s in seen), seen
    assert all(math.isfinite(e["train_loss"]) for e in result["epochs"])
    assert parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_cuda_autocast_dtypes_and_closeness(low):
    layer = _layer().cuda()
    x = _x(256).detach().cuda().requires_grad_(True)
    y32 = layer(x)
    (y32 * y32).sum().backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=low):
        y = layer(x)
        assert layer.aux_loss.dtype == torch.float32
    assert y.dtype == low
    (y.float() * y.float()).sum().backward()
    assert _rel(y, y32) <= 1e-2
    for n, p in layer.named_parameters():
        assert p.grad.dtype == torch.float32 and _rel(p.grad, want[n]) <= 2e-2, n


def test_functions_run_on_tensors_autocast_does_not_know():
    w = ExpertWeights(
        torch.ones(1, M, H, device="meta"), None, torch.ones(1, H, M, device="meta"), None, "relu"
    )
    out = grouped_expert_ffn(torch.ones(3, M, device="meta"), w, (3,))
    assert out.shape == (3, M) and out.device.type == "meta"


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_run_in_the_autocast_dtype_and_stay_close_to_fp32(gated):
    layer = _layer(shared_hidden_dim=16, shared_expert_gate=gated)
    x = _x()
    y32 = layer(x)
    with torch.autocast("cpu", dtype=LOW):
        y16 = layer(x)
    assert y16.dtype == LOW
    y16.float().square().sum().backward()
    grads = [p.grad for p in layer.shared_experts.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert _rel(y16.float(), y32.detach()) <= 1e-2
