"""The CUDA path (skipped without a GPU; run by scripts/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan
from flexmoe.testing.distributed import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
M, H, E = 64, 128, 8


def _grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("k,cf", [(1, 1.25), (2, 1.0), (2, 0.0)])
def test_cuda_layer_matches_cpu_in_float64(k, cf):
    cpu = MoELayer(M, H, E, top_k=k, capacity_factor=cf, seed=0, dtype=torch.float64).double()
    gpu = MoELayer(M, H, E, top_k=k, capacity_factor=cf, seed=0, dtype=torch.float64).double().cuda()
    x = torch.randn(300, M, dtype=torch.float64)
    y0, gx0, g0 = _grads(cpu, x)
    y1, gx1, g1 = _grads(gpu, x.cuda())
    torch.testing.assert_close(y1.cpu(), y0, rtol=0, atol=1e-9)
    torch.testing.assert_close(gx1.cpu(), gx0, rtol=0, atol=1e-9)
    for n in g0:
        torch.testing.assert_close(g1[n].cpu(), g0[n], rtol=0, atol=1e-9, msg=n)


def test_bfloat16_on_cuda_is_close_to_float32():
    x = torch.randn(512, M, device="cuda")
    f32 = MoELayer(M, H, E, top_k=2, capacity_factor=0, seed=1).cuda()
    bf16 = MoELayer(M, H, E, top_k=2, capacity_factor=0, seed=1, dtype=torch.bfloat16).cuda()
    torch.testing.assert_close(bf16(x.bfloat16()).float(), f32(x), rtol=0.05, atol=0.05)


def test_nccl_group_of_one_runs_every_plan():
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        layer = MoELayer(M, H, E, top_k=2, seed=2).cuda()
        x = torch.randn(256, M, device="cuda")
        ref = layer(x, plan=Plan())
        for plan in (Plan(r=0), Plan(r=1, d=4)):
            torch.testing.assert_close(layer(x, plan=plan), ref)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("kept_list", [[12, 11, 12, 10], [12, 11, 12, 5]])  # padded to 12 rows; not
def test_packed_exchange_on_cuda_matches_cpu(d, kept_list):
    """The packed layout's index work (runs, regrouping, zero-row padding) on the device, through the
    pipelined exchange of one process, against the same on the CPU in float64."""
    from flexmoe.ops.expert_ffn import ExpertWeights
    from flexmoe.parallel.chunks import PackedChunks
    from flexmoe.parallel.comm import ExpertGroups
    from flexmoe.parallel.pipeline import pipelined_expert_exchange

    L, Cp, width = 4, 12, 16
    kept = torch.tensor(kept_list)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(int(kept.sum()), width, generator=g, dtype=torch.float64)
    params = [
        torch.randn(*s, generator=g, dtype=torch.float64)
        for s in ((L, width, 8), (L, 8), (L, 8, width), (L, width))
    ]
    results = []
    for device in ("cpu", "cuda"):
        w = ExpertWeights(*(p.to(device).requires_grad_() for p in params), "gelu")
        layout = PackedChunks(kept.to(device), world_size=1, capacity=Cp, d=d)
        slot = (
            (torch.arange(Cp, device=device) < kept.to(device).unsqueeze(1)).reshape(-1).nonzero().squeeze(1)
        )
        rows = layout.rows(slot)
        send = torch.zeros(layout.num_rows, width, dtype=torch.float64, device=device)
        send = send.index_copy(0, rows, x.to(device)).requires_grad_()
        ret, _ = pipelined_expert_exchange(send, layout, w, ExpertGroups(None))
        grads = torch.autograd.grad(ret.index_select(0, rows).pow(2).sum(), [send, w.w1_GMX, w.b2_GM])
        results.append([ret.index_select(0, rows).detach().cpu(), *(t.cpu() for t in grads)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_the_index_builders_do_not_synchronise_the_device():
    """The runs, the padded chunks' rows and the packed routes are built from host-side sizes:
    CUDA's sync debug mode raises on any stream synchronisation (an .item(), a nonzero, a pageable
    host-to-device copy) inside."""
    from flexmoe.ops.expert_ffn import padded_slots
    from flexmoe.ops.runs import concatenated_runs
    from flexmoe.parallel.chunks import FilledRows, PackedRoute

    cuda = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runs = concatenated_runs([5, 0, 9], [2, 3, 1], cuda)
        slots = padded_slots((2, 0, 3), 3, cuda)
        rows = FilledRows.from_counts([[3, 3, 2], [3, 2, 3]], 4, 16, cuda)  # padded
        ragged = FilledRows.from_counts([[3, 1, 2], [3, 2, 3]], 3, 16, cuda)
        route = PackedRoute([[2, 1, 1], [1, 2, 1]], [2, 2], hidden_width=4, device=cuda)  # padded
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runs.tolist() == [5, 6, 0, 1, 2, 9] and slots.tolist() == [0, 1, 6, 7, 8]
    assert rows.source.tolist() == [0, 1, 2, 12, 13, 14, 4, 5, 6, 16, 17, 7, 8, 9, 20, 21, 22, 10]
    assert ragged.source.numel() == 14 and route.source.device.type == "cuda"
