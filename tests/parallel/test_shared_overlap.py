"""Shared experts overlapped with the expert-parallel all-to-all (r >= 1) on 2 gloo ranks: the same
output and gradients as computing them after the routed experts (float64), and the overlap itself:
the shared FFN runs after the chunks are started and before the first wait, in forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan
from flexmoe.testing.distributed import DistributedPool

M, H, SHARED_H = 6, 8, 5
CASES = [  # (E, plan, gated, activation); E = 1 < W = 2: two ranks share the expert
    (4, Plan(r=1, d=1), False, "gelu"),
    (4, Plan(r=1, d=2), True, "swiglu"),
    (1, Plan(r=1, d=2), True, "gelu"),
    (1, Plan(r=2, d=1), False, "relu"),
    (1, Plan(r=2, d=2), True, "swiglu"),
    (4, Plan(r=1, all_to_all="dedup"), True, "swiglu"),  # not overlapped: the shared experts run after
]


def _layers(E: int, gated: bool, act: str, seed: int) -> tuple[MoELayer, MoELayer]:
    """The layer with shared experts, and the same layer without them (same gate and experts)."""
    common = dict(top_k=min(2, E), capacity_factor=0.0, activation=act, seed=seed, dtype=torch.float64)
    layer = MoELayer(M, H, E, shared_hidden_dim=SHARED_H, shared_expert_gate=gated, tuner=False, **common)
    plain = MoELayer(M, H, E, tuner=False, **common)
    for (n, p), (n2, q) in zip(layer.named_parameters(), plain.named_parameters(), strict=False):
        assert n == n2 and torch.equal(p, q), n
    return layer, plain


def _run(layer: MoELayer, x, plan, probe, leaves, shared_beside: MoELayer | None = None):
    """y and the gradients of (y * probe).sum() w.r.t. `leaves` (None entries where unused)."""
    y = layer(x, plan=plan)
    if shared_beside is not None:  # the unoverlapped reference: the shared FFN after the routed experts
        y = y + shared_beside.shared_experts(x)
    if not torch.is_grad_enabled():
        return y, []
    grads = torch.autograd.grad((y * probe).sum(), leaves, allow_unused=True)
    return y, list(grads)


def equal_to_unoverlapped_worker(case_index: int) -> int:
    E, plan, gated, act = CASES[case_index]
    rank = dist.get_rank()
    layer, plain = _layers(E, gated, act, seed=10 + case_index)
    gen = torch.Generator().manual_seed(100 * case_index + rank)
    x = torch.randn(9 + 4 * rank, M, generator=gen, dtype=torch.float64)
    probe = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    shared = list(layer.shared_experts.parameters())
    routed = list(layer.experts.parameters()) + list(layer.gate.parameters())
    plain_routed = list(plain.experts.parameters()) + list(plain.gate.parameters())
    checks = 0
    # gradients of x and the parameters; x without grad; the parameters only while x requires grad
    # (the gradient then never reaches the exchange's start, so the exchange finishes on its own)
    for x_requires_grad, want_x in ((True, True), (False, False), (True, False)):
        xa, xb = (x.clone().requires_grad_(x_requires_grad) for _ in range(2))
        y, got = _run(layer, xa, plan, probe, [xa] * want_x + shared + routed)
        y_ref, want = _run(plain, xb, plan, probe, [xb] * want_x + shared + plain_routed, shared_beside=layer)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        checks += 1 + len(got)
    layer.eval(), plain.eval()
    with torch.no_grad():
        y, _ = _run(layer, x, plan, probe, [])
        y_ref, _ = _run(plain, x, plan, probe, [], shared_beside=layer)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    return checks + 1


def event_order_worker(d: int) -> dict:
    """The order of all-to-all starts and waits and of the shared experts' forward and backward."""
    layer, _ = _layers(4, True, "gelu", seed=5)
    events: list[tuple] = []

    def recorded(real_start):
        def start(*args, **kwargs):
            handle, n = real_start(*args, **kwargs), sum(e[0] == "start" for e in events)
            events.append(("start", n))
            real_wait = handle.wait

            def wait():
                events.append(("wait", n))
                return real_wait()

            handle.wait = wait
            return handle

        return start

    # the counts (all_to_all_start) and the packed chunks (all_to_all_rows_start)
    for name in ("all_to_all_start", "all_to_all_rows_start"):
        setattr(layer.groups, name, recorded(getattr(layer.groups, name)))
    layer.shared_experts.register_forward_pre_hook(lambda m, a: events.append(("shared forward",)))
    layer.shared_experts.register_forward_hook(lambda m, a, out: events.append(("shared forward done",)))
    for n, p in layer.shared_experts.named_parameters():
        p.register_hook(lambda g, n=n: events.append(("shared grad", n)))
    x = torch.randn(11, M, dtype=torch.float64, generator=torch.Generator().manual_seed(dist.get_rank()))
    y = layer(x.requires_grad_(), plan=Plan(r=1, d=d))
    forward = list(events)
    events.clear()
    y.sum().backward()
    return {"forward": forward, "backward": list(events)}


def autocast_worker(d: int) -> bool:
    """Under CPU bf16 autocast (float32 parameters) the overlapped layer still computes the same."""
    layer, plain = _layers(4, True, "swiglu", seed=7)
    layer.float(), plain.float()
    x = torch.randn(10, M, generator=torch.Generator().manual_seed(dist.get_rank())).requires_grad_()
    leaves = [x, *layer.shared_experts.parameters(), *layer.experts.parameters(), *layer.gate.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, plan=Plan(r=1, d=d))
        y_ref = plain(x, plan=Plan(r=1, d=d))
        with torch.autocast("cpu", enabled=False):  # as the layer runs it: on the tokens cast to bf16
            y_ref = y_ref + layer.shared_experts(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    got = torch.autograd.grad(y.float().sum(), leaves)
    plain_leaves = [
        x,
        *layer.shared_experts.parameters(),
        *plain.experts.parameters(),
        *plain.gate.parameters(),
    ]
    want = torch.autograd.grad(y_ref.float().sum(), plain_leaves)
    for g, w in zip(got, want, strict=True):  # x's bf16 gradient terms are summed in another order
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
    return True


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=180.0) as p:
        yield p


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case_index", range(len(CASES)), ids=lambda i: f"E{CASES[i][0]}-{CASES[i][1]}")
def test_overlapped_shared_experts_equal_the_unoverlapped_layer(pool, case_index):
    assert all(n > 1 for n in pool.run(equal_to_unoverlapped_worker, case_index))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("d", [1, 2])
def test_shared_experts_run_while_the_all_to_alls_are_in_flight(pool, d):
    for res in pool.run(event_order_worker, d):
        fwd, bwd = res["forward"], res["backward"]
        # forward: the counts exchanged, the d token chunks started, then the shared FFN, then the first
        # wait for a chunk
        begin, done = fwd.index(("shared forward",)), fwd.index(("shared forward done",))
        assert fwd[:begin] == [("start", 0), ("wait", 0)] + [("start", i) for i in range(1, d + 1)], fwd
        first_chunk_wait = next(i for i, e in enumerate(fwd) if e[0] == "wait" and e[1] > 0)
        assert begin < done < first_chunk_wait, fwd
        # backward: the d outbound gradient chunks started, then the shared FFN's backward, then their waits
        starts = [i for i, e in enumerate(bwd) if e[0] == "start"]
        outbound = {bwd[i][1] for i in starts[-d:]}
        grads = [i for i, e in enumerate(bwd) if e[0] == "shared grad"]
        waits = [i for i, e in enumerate(bwd) if e[0] == "wait" and e[1] in outbound]
        assert len(grads) == 5 and len(waits) == d, bwd
        assert starts[-1] < min(grads) and max(grads) < min(waits), bwd


@pytest.mark.timeout(120)
@pytest.mark.parametrize("d", [1, 2])
def test_overlap_under_autocast(pool, d):
    assert all(pool.run(autocast_worker, d))
