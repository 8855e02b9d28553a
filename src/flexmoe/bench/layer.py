"""`flexmoe bench layer`: one-process MoE layer against the einsum baseline, fairscale and two floors.

For each workload, in one run (same process, same threads):
- flexmoe: MoELayer forward+backward and forward-only (no_grad);
- padded: the same routing and experts but every capacity slot multiplied (dispatch -> [E, C, M]);
- einsum: flexmoe.baselines.GShardMoELayer (the Fairseq/GShard one-hot formulation), same weights;
- fairscale: fairscale.nn.MOELayer with Top2Gate, when installed and k == 2;
- expert ffn: the grouped expert FFN op alone (GEMMs, biases, activation) on the same kept rows, so
  that layer / expert ffn is what routing, dispatch and combine add on top of the experts;
- gemm floor: only the expert GEMMs (6 per expert for fwd+bwd, 2 for fwd) on exactly the kept rows;
- peak floor: the FLOPs of those GEMMs over the rate of a large square matmul.

Every step runs once per round, rounds repeat; times are medians and every ratio is the median of the
per-round ratios, so that a slow spell of this shared machine cancels out of the comparisons.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from flexmoe import MoELayer
from flexmoe.baselines import GShardMoELayer
from flexmoe.bench.common import (
    add_cpu_allocator_argument,
    apply_cpu_allocator,
    environment,
    format_table,
    interleaved_times,
    paired_ratio,
    square_matmul_step,
    write_json,
)
from flexmoe.dispatch import combine, dispatch
from flexmoe.ops.expert_ffn import grouped_expert_ffn
from flexmoe.routing import route


@dataclass(frozen=True, kw_only=True)
class LayerWorkload:
    model_dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    tokens: int
    capacity_factor: float

    @property
    def name(self) -> str:
        return (
            f"M{self.model_dim} H{self.hidden_dim} E{self.num_experts} k{self.top_k} "
            f"T{self.tokens} cf{self.capacity_factor:g}"
        )


WORKLOADS = (
    LayerWorkload(model_dim=512, hidden_dim=2048, num_experts=8, top_k=2, tokens=4096, capacity_factor=1.0),
    LayerWorkload(
        model_dim=1024, hidden_dim=4096, num_experts=16, top_k=1, tokens=8192, capacity_factor=1.25
    ),
    LayerWorkload(model_dim=512, hidden_dim=1024, num_experts=64, top_k=2, tokens=8192, capacity_factor=1.0),
)
QUICK_WORKLOADS = (
    LayerWorkload(model_dim=32, hidden_dim=64, num_experts=4, top_k=2, tokens=128, capacity_factor=1.0),
    LayerWorkload(model_dim=32, hidden_dim=64, num_experts=8, top_k=1, tokens=128, capacity_factor=1.25),
)


def _fwd_bwd(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        y.float().pow(2).mean().backward()

    return step


def _fwd(module, x):
    def step():
        with torch.no_grad():
            module(x)

    return step


def _padded_step(layer: MoELayer, x, *, backward: bool):
    """Same routing and experts, but every capacity slot is multiplied (the padded approach)."""
    cfg = layer.config

    def forward():
        x_TM = x.reshape(-1, cfg.model_dim)
        routing = route(layer.gate(x_TM), cfg.routing(training=layer.training), training=layer.training)
        buffer_ECM = dispatch(x_TM, routing, is_postscore=cfg.is_postscore)
        E, C, M = buffer_ECM.shape
        out = grouped_expert_ffn(buffer_ECM.reshape(E * C, M), layer.experts.local_weights(), (C,) * E)
        return combine(out.view(E, C, M), routing, is_postscore=cfg.is_postscore)

    def step():
        if backward:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            forward().pow(2).mean().backward()
        else:
            with torch.no_grad():
                forward()

    return step


def _gemm_floor_steps(layer: MoELayer, kept: list[int], dtype, device):
    """Only the expert GEMMs on exactly the kept rows, with the same matmul library."""
    M, H = layer.config.model_dim, layer.config.hidden_dim
    w1 = layer.experts.fc1_weight.detach()
    w2 = layer.experts.fc2_weight.detach()
    rows = [torch.randn(n, M, dtype=dtype, device=device) for n in kept]
    grads = [torch.randn(n, M, dtype=dtype, device=device) for n in kept]
    hidden = [torch.randn(n, w1.shape[2], dtype=dtype, device=device) for n in kept]

    def forward():
        for e, x in enumerate(rows):
            h = x @ w1[e]
            _ = h[:, :H] @ w2[e]

    def forward_backward():
        for e, (x, g, h) in enumerate(zip(rows, grads, hidden, strict=True)):
            h1 = x @ w1[e]
            _ = h1[:, :H] @ w2[e]
            _ = h[:, :H].t() @ g  # grad fc2
            gh = g @ w2[e].t()  # grad hidden
            _ = x.t() @ gh  # grad fc1
            _ = gh @ w1[e][:, :H].t()  # grad x

    return forward_backward, forward


def _expert_ffn_step(layer: MoELayer, kept: list[int], dtype, device):
    rows = torch.randn(sum(kept), layer.config.model_dim, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn_like(rows)

    def step():
        layer.zero_grad(set_to_none=True)
        rows.grad = None
        grouped_expert_ffn(rows, layer.experts.local_weights(), tuple(kept)).backward(grad)

    return step


def _fairscale_layer(w: LayerWorkload, dtype):
    try:
        from fairscale.nn import MOELayer, Top2Gate
    except ImportError:
        return None
    if w.top_k != 2:
        return None
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=600),
        )
    experts = torch.nn.ModuleList(
        torch.nn.Sequential(
            torch.nn.Linear(w.model_dim, w.hidden_dim),
            torch.nn.GELU(),
            torch.nn.Linear(w.hidden_dim, w.model_dim),
        )
        for _ in range(w.num_experts)
    )
    return MOELayer(Top2Gate(w.model_dim, w.num_experts), experts).to(dtype)


def bench_workload(w: LayerWorkload, *, repeats: int, warmup: int, dtype, device) -> dict:
    torch.manual_seed(0)
    kwargs = dict(top_k=w.top_k, capacity_factor=w.capacity_factor, seed=0, dtype=dtype)
    layer = MoELayer(w.model_dim, w.hidden_dim, w.num_experts, **kwargs).to(device)
    base = GShardMoELayer(w.model_dim, w.hidden_dim, w.num_experts, **kwargs).to(device)
    base.load_state_dict(layer.state_dict())
    # the input needs its gradient, as anywhere but in a model's first layer: every implementation pays
    # the GEMM back to the tokens (the sixth in the floor)
    x = torch.randn(w.tokens, w.model_dim, dtype=dtype, device=device, requires_grad=True)
    layer(x)
    kept = layer.last_routing.kept_counts
    rows = sum(kept)

    square, square_flops = square_matmul_step(
        size=2048 if torch.device(device).type == "cpu" else 8192, dtype=dtype, device=device
    )
    floor_fb, floor_f = _gemm_floor_steps(layer, kept, dtype, device)
    steps = {
        "square_matmul_s": square,
        "gemm_floor_fb_s": floor_fb,
        "gemm_floor_f_s": floor_f,
        "expert_ffn_fb_s": _expert_ffn_step(layer, kept, dtype, device),
        "flexmoe_fb_s": _fwd_bwd(layer, x),
        "flexmoe_f_s": _fwd(layer, x),
        "padded_fb_s": _padded_step(layer, x, backward=True),
        "padded_f_s": _padded_step(layer, x, backward=False),
        "einsum_fb_s": _fwd_bwd(base, x),
        "einsum_f_s": _fwd(base, x),
    }
    fairscale = _fairscale_layer(w, dtype) if torch.device(device).type == "cpu" else None
    if fairscale is not None:
        xs = x.detach().view(w.num_experts, -1, w.model_dim).requires_grad_()
        steps.update(fairscale_fb_s=_fwd_bwd(fairscale, xs), fairscale_f_s=_fwd(fairscale, xs))
    times = interleaved_times(steps, warmup=warmup, repeats=repeats, device=device)
    result = {"workload": w.name, **asdict(w), "capacity": layer.last_plan.capacity, "kept_rows": rows}
    result.update({name: statistics.median(ts) for name, ts in times.items()})
    # peak floor: the kept rows' GEMM FLOPs at the square matmul's rate of the same rounds
    flops_fb = 12 * rows * w.model_dim * w.hidden_dim
    result["square_gflops"] = square_flops / result["square_matmul_s"] / 1e9
    result["peak_floor_fb_s"] = flops_fb / square_flops * result["square_matmul_s"]
    result["peak_floor_f_s"] = result["peak_floor_fb_s"] / 3
    result["gemm_efficiency"] = (
        flops_fb / square_flops * paired_ratio(times["square_matmul_s"], times["gemm_floor_fb_s"])
    )
    for impl in ("einsum", "fairscale", "padded"):
        if f"{impl}_fb_s" in times:
            for mode in ("fb", "f"):
                result[f"speedup_vs_{impl}_{mode}"] = paired_ratio(
                    times[f"{impl}_{mode}_s"], times[f"flexmoe_{mode}_s"]
                )
    result["over_gemm_floor_fb"] = paired_ratio(times["flexmoe_fb_s"], times["gemm_floor_fb_s"])
    result["over_gemm_floor_f"] = paired_ratio(times["flexmoe_f_s"], times["gemm_floor_f_s"])
    result["over_expert_ffn_fb"] = paired_ratio(times["flexmoe_fb_s"], times["expert_ffn_fb_s"])
    result["expert_ffn_over_gemm_floor_fb"] = paired_ratio(times["expert_ffn_fb_s"], times["gemm_floor_fb_s"])
    return result


COLUMNS = (
    "workload",
    "flexmoe_fb_s",
    "flexmoe_f_s",
    "einsum_fb_s",
    "fairscale_fb_s",
    "padded_fb_s",
    "gemm_floor_fb_s",
    "peak_floor_fb_s",
    "speedup_vs_fairscale_fb",
    "speedup_vs_einsum_fb",
    "speedup_vs_padded_fb",
    "over_gemm_floor_fb",
    "over_gemm_floor_f",
    "over_expert_ffn_fb",
    "expert_ffn_over_gemm_floor_fb",
    "gemm_efficiency",
    "square_gflops",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="flexmoe bench layer", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="bench_results/layer.json")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fairscale runs on cpu only)")
    parser.add_argument("--only", type=int, action="append", help="run only these workload numbers (0-based)")
    add_cpu_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = apply_cpu_allocator(args.cpu_allocator)
    dtype = getattr(torch, args.dtype)
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    if args.only:
        workloads = [workloads[i] for i in args.only]
    rows = []
    for w in workloads:
        rows.append(
            bench_workload(w, repeats=args.repeats, warmup=args.warmup, dtype=dtype, device=args.device)
        )
        print(f"done: {w.name}", flush=True)
    print(format_table(rows, COLUMNS))
    print(f"dtype {args.dtype}; host allocator: {allocator}; ratios are medians of per-round ratios")
    payload = {
        "environment": environment(
            benchmark="layer",
            dtype=args.dtype,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            cpu_allocator=allocator,
        ),
        "results": rows,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return payload
