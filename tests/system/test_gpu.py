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
